"""Registering a backbone: a pt2 MLflow model with its weights and card, all or nothing.

See :mod:`fra.registry` for what is registered and why; :func:`register_backbone` never leaves a
``ready`` version behind when a step fails (:func:`_cleanup`).
"""
from __future__ import annotations

import json
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from fra.redaction import redact_text
from fra.registry.connection import (CARD_FIELDS, CARD_TAG_PREFIX, DATASET_TAG, EXAMPLE_SIDE, FAILED, METRIC_TAG_PREFIX,
                                     MODEL_NAME_IN_RUN, PENDING, PROTOCOL_TAG, READY, REGISTRATION_TAG,
                                     REGISTRY_EXPERIMENT, STATUS_TAG, ModelVersionInfo, RegistryError, _fluent_uri,
                                     _healthy, call, check_reachable, client, get_version, resolve_uri)
from fra.registry.exports import _Export, _git_commit, _read_export

log = logging.getLogger("fra.registry")


def register_backbone(export_dir_or_checkpoint: str | Path, name: str, *, tracking_uri: str | None = None,
                      fer_metrics: dict[str, float] | None = None, eval_protocol: str = "",
                      dataset_fingerprint: str = "", run_id: str | None = None) -> ModelVersionInfo:
    """Register an exported backbone as a new version of ``name`` (on the driver).

    Args:
        export_dir_or_checkpoint: an export directory (``backbone.pt`` + ``model_card.json``), a
            run directory holding ``export/``, a ``backbone.pt``, or a full training checkpoint.
        name: registered model name.
        tracking_uri: MLflow URI; None = :func:`resolve_uri`.
        fer_metrics: downstream FER metrics (e.g. ``fer_top1_mean_last5``), logged to the run and
            attached to the version as ``fra.metric.*`` tags.
        eval_protocol: how the metrics were measured; promotion only compares equal protocols.
        dataset_fingerprint: fingerprint of the FER evaluation data; likewise compared.
        run_id: log into this run (e.g. the training run); default a new run in ``fra-registry``.

    Returns:
        The ``ready`` version.

    Raises:
        RegistryError: the tracking server is unreachable (nothing was created) or registration
            failed (see the module docstring for what is cleaned up).
        CheckpointError: the export cannot be read.
    """
    uri = resolve_uri(tracking_uri, create=True)
    metrics = {str(k): float(v) for k, v in (fer_metrics or {}).items()}
    with tempfile.TemporaryDirectory(prefix="fra-register-") as tmp:
        export = _read_export(export_dir_or_checkpoint, Path(tmp))
        check_reachable(uri, create=True)  # the first version may create a sqlite store
        # MLflow's stores open default clients internally (the sqlite registry resolves
        # ``models:/m-...`` sources through ``MlflowClient()``), so the fluent URI must match.
        with _fluent_uri(uri):
            info = _register(uri, export, name, metrics, eval_protocol, dataset_fingerprint, run_id, Path(tmp))
    log.info("registered %s version %d (run %s)", name, info.version, info.run_id)
    return info


def _register(uri: str, export: _Export, name: str, metrics: dict, protocol: str, fingerprint: str,
              run_id: str | None, tmp: Path) -> ModelVersionInfo:
    mlc = client(uri)
    reg_id = uuid.uuid4().hex
    created_model = _ensure_registered_model(mlc, name)
    own_run = run_id is None
    tags = _version_tags(export.card, metrics, protocol, fingerprint, reg_id)
    state: dict[str, Any] = {}
    try:
        run_id = state["run_id"] = run_id or _create_run(mlc, uri, name)
        state["model_id"] = _log_model(run_id, export, metrics, tags, tmp)
        mv = _create_version(mlc, name, state["model_id"], run_id, tags, reg_id)
        state["version"] = int(mv.version)
        call("describe version", lambda: mlc.update_model_version(name, mv.version, _description(export.card, metrics)))
        call("mark version ready", lambda: mlc.set_model_version_tag(name, mv.version, STATUS_TAG, READY))
    except BaseException as exc:
        _cleanup(uri, mlc, name, reg_id, state, created_model, own_run, exc)
        if not isinstance(exc, Exception):
            raise
        raise RegistryError(f"registering {name} at {uri} failed: {str(exc).splitlines()[0][:300]} "
                            "(no ready version was left behind)") from exc
    if own_run:
        call("finish run", lambda: mlc.set_terminated(run_id, "FINISHED"))
    return get_version(mlc, name, state["version"])


def _ensure_registered_model(mlc, name: str) -> bool:
    """Create ``name`` if missing; True when this call created it."""
    from mlflow.exceptions import MlflowException

    try:
        call("create registered model", lambda: mlc.create_registered_model(
            name, description="FRA pretrained backbones (torchvision ResNet trunks); see fra.registry"))
        return True
    except Exception as exc:  # noqa: BLE001 - anything but "exists" means nothing was created
        if isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            return False
        raise RegistryError(f"cannot create registered model {name}: {str(exc).splitlines()[0][:300]}") from exc


def _create_run(mlc, uri: str, name: str) -> str:
    exp = call("get experiment", lambda: mlc.get_experiment_by_name(REGISTRY_EXPERIMENT))
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        exp_id = call("create experiment",
                      lambda: mlc.create_experiment(REGISTRY_EXPERIMENT, artifact_location=location))
    else:
        exp_id = exp.experiment_id
    run = call("create run", lambda: mlc.create_run(exp_id, run_name=f"register-{name}"))
    return run.info.run_id


def _version_tags(card: dict, metrics: dict, protocol: str, fingerprint: str, reg_id: str) -> dict[str, str]:
    import fra

    tags = {STATUS_TAG: PENDING, REGISTRATION_TAG: reg_id, PROTOCOL_TAG: protocol, DATASET_TAG: fingerprint,
            "fra.code_version": str(card.get("fra_version", fra.__version__))}
    commit = card.get("git_commit") or _git_commit()
    if commit:
        tags["fra.git_commit"] = commit
    for key in CARD_FIELDS:
        value = card.get(key, "")
        tags[CARD_TAG_PREFIX + key] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    tags.update({METRIC_TAG_PREFIX + k: repr(v) for k, v in metrics.items()})
    return tags


def _description(card: dict, metrics: dict) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    return (f"{card.get('architecture')} trunk, input {card.get('input_size')} px, features (B, C) from float32 "
            f"(B, 3, H, W) normalised with {card.get('normalization')}. {shown}")


def _log_model(run_id: str, export: _Export, metrics: dict, tags: dict, tmp: Path) -> str:
    """Log metrics, the card and the pt2 model into ``run_id``; returns the LoggedModel id."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    card_file = tmp / "model_card.json"
    card_file.write_text(json.dumps(export.card, indent=2, sort_keys=True, default=str))
    gen = torch.Generator().manual_seed(0)
    # Two decimals keep input_example.json and serving_input_example.json small (~170 KB each).
    example = torch.randn(2, 3, EXAMPLE_SIDE, EXAMPLE_SIDE, generator=gen).round(decimals=2)
    with torch.no_grad():
        features = export.trunk(example)
    # Unnamed tensor specs: a named one makes MLflow's pyfunc pass a dict, which the torch flavour rejects.
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, features.shape[1]))]))
    card_meta = {k: export.card.get(k) for k in CARD_FIELDS}
    norm = json.loads(json.dumps(export.card.get("normalization")))  # a copy: no YAML anchors in MLmodel
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        if metrics:
            call("log metrics", lambda: mlflow.log_metrics(metrics))
        call("tag run", lambda: mlflow.set_tags({k: v for k, v in tags.items() if k != STATUS_TAG}))
        call("log model card", lambda: mlflow.log_artifact(str(card_file), "model_card"))
        info = call("log model", lambda: mlflow.pytorch.log_model(
            export.trunk, name=MODEL_NAME_IN_RUN, signature=signature, input_example=example.numpy(),
            serialization_format="pt2", pip_requirements=requirements,
            extra_files=[str(export.weights), str(card_file)],
            metadata={"fra_model_card": card_meta, "normalization": norm}), attempts=2)
    return info.model_id


def _create_version(mlc, name: str, model_id: str, run_id: str, tags: dict, reg_id: str):
    """Create the version; a retry first looks for a version an earlier attempt already made."""
    def create():
        existing = _versions_with_registration(mlc, name, reg_id)
        if existing:
            return existing[0]
        return mlc.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                        model_id=model_id)

    return call("create model version", create)


def _versions_with_registration(mlc, name: str, reg_id: str) -> list:
    found = mlc.search_model_versions(f"name = '{name}'")
    return [mv for mv in found if (mv.tags or {}).get(REGISTRATION_TAG) == reg_id]


def _cleanup(uri: str, mlc, name: str, reg_id: str, state: dict, created_model: bool, own_run: bool,
             exc: BaseException) -> None:
    """Best effort: no ``ready`` version, no empty model created by us, the run marked failed."""
    if not _healthy(uri):
        # Each MLflow call would retry for minutes; a version, if any, stays pending and is refused.
        log.warning("MLflow at %s is gone; %s left as is (any new version stays %s=%s)", uri, name, STATUS_TAG, PENDING)
        return
    reason = redact_text(f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}")  # a tag
    steps: list[tuple[str, Callable[[], Any]]] = []
    try:
        versions = [int(mv.version) for mv in _versions_with_registration(mlc, name, reg_id)]
    except Exception:  # noqa: BLE001 - the server may be gone; fall back to what we know
        versions = [state["version"]] if "version" in state else []
    for v in map(str, versions):
        steps.append((f"tag version {v} failed", lambda v=v: mlc.set_model_version_tag(name, v, STATUS_TAG, FAILED)))
        steps.append((f"tag version {v} reason", lambda v=v: mlc.set_model_version_tag(name, v, "fra.failure", reason)))
        steps.append((f"delete version {v}", lambda v=v: mlc.delete_model_version(name, v)))
    if created_model:
        steps.append(("delete empty registered model",
                      lambda: mlc.search_model_versions(f"name = '{name}'") or mlc.delete_registered_model(name)))
    if "model_id" in state:
        steps.append(("mark logged model failed", lambda: mlc.finalize_logged_model(state["model_id"], "FAILED")))
    run_id = state.get("run_id")
    if run_id:
        steps.append(("tag run", lambda: mlc.set_tag(run_id, "fra.registration", f"failed: {reason}")))
    if run_id and own_run:
        steps.append(("fail run", lambda: mlc.set_terminated(run_id, "FAILED")))
    for what, fn in steps:
        try:
            call(what, fn, attempts=2)
        except Exception as err:  # noqa: BLE001
            log.warning("cleanup after failed registration of %s: %s failed: %s", name, what, err)


def target_metrics_from_results(path: str | Path) -> tuple[dict[str, float], str, str]:
    """Read an attribute or affect ``results.json`` (``fra evaluate attributes|affect``): (metrics,
    protocol, dataset fingerprint) for the registry, the metrics prefixed by the kind.

    Attributes: ``attributes_mean_acc_last``, ``attributes_mean_acc_mean_last_k`` (and
    ``..._at_val_best`` with a validation split; accuracies in %) and
    ``attributes_mean_balanced_acc_last``. Affect: ``affect_mean_ccc_last`` /
    ``_mean_last_k`` (/ ``_at_val_best``) and the last epoch's ``affect_<ccc|pcc|rmse|sagr>_<target>``
    (``affect_ccc_valence``, ``affect_rmse_arousal``, ...). Only RMSE is lower-is-better
    (:func:`fra.registry_promotion.gate_mode` picks the direction from the name). The protocol string is
    ``<kind>:<protocol>/<dataset>/<test split>``, so runs are only compared like for like.
    """
    import math

    from fra import storage as st

    try:
        res = st.read_json(path)
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read attribute / affect results {path}: {exc}") from exc
    kind, metric = res.get("kind"), res.get("metric")
    if kind not in ("attributes", "affect") or not metric:
        raise RegistryError(f"{path} is not an attribute or affect results.json (kind {kind!r})")

    def key(*parts) -> str:
        return "_".join("".join(c if c.isalnum() or c in "-." else "_" for c in str(p)) for p in (kind, *parts))

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    head = res.get("headline") or {}
    metrics = {key(k): float(v) for k, v in head.items() if k.startswith(metric) and finite(v)}
    last = res.get("last_epoch") or {}
    if kind == "attributes" and finite(last.get("mean_balanced_acc")):
        metrics[key("mean_balanced_acc_last")] = float(last["mean_balanced_acc"])
    if kind == "affect":
        for name in ("ccc", "pcc", "rmse", "sagr"):
            for target, v in (last.get(name) or {}).items():
                if finite(v):
                    metrics[key(name, target)] = float(v)
    dataset = res.get("dataset") or {}
    split = (res.get("resolved") or {}).get("test_split", "")
    protocol = f"{kind}:" + "/".join(str(p) for p in (res.get("protocol", ""), dataset.get("name", ""), split) if p)
    return metrics, protocol, str(dataset.get("fingerprint", ""))
