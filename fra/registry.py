"""MLflow model registry for pretrained backbones: register, load, list and show.

Promotion (the ``champion`` alias, its JSON history and rollback) lives in
:mod:`fra.registry_promotion` and is re-exported here.

**What gets registered.** The backbone is a torchvision ResNet trunk (``fc`` replaced by
``Identity``) mapping float32 images ``(B, 3, H, W)`` to features ``(B, C)``. It is logged as an
MLflow PyTorch model in the **pt2** format (``torch.export``) with the batch *and* spatial
dimensions dynamic: the signature says ``(-1, 3, -1, -1)`` and the input example has batch 2, so
the exporter keeps those dimensions symbolic instead of specialising them (a batch-1 example
would freeze the batch, RAY_NOTES §5).

Why pt2 and not pickle: a pt2 archive is a graph plus tensors, so loading it runs no pickled code
(MLflow checks this when ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``) and needs neither fra's nor
torchvision's classes. The costs are a few seconds of ``torch.export`` per registration and one
export guard: the final 32x down-sampled map must be larger than 1x1, so H, W >= 33 px. Training
code never needs the pt2 graph. The model also carries ``extra_files/backbone.pt`` (tensors only,
loaded with ``weights_only``) and ``extra_files/model_card.json``, and :func:`load_registered`
builds a torchvision ResNet from those.

The model's ``requirements.txt`` pins only ``torch`` (plus the ``mlflow`` MLflow adds itself):
loading the pt2 graph needs nothing else.

**No half-registered versions.** :func:`register_backbone` checks that the tracking server
answers before creating anything. The version is created with ``fra.status=pending`` and flipped
to ``ready`` as the last step. If anything fails after the model was logged, the version is
deleted (or, if even that fails, left ``pending``/``failed``), a registered model created by this
call is removed again, and the run is marked FAILED. Promotion and :func:`load_registered` refuse
versions whose status is not ``ready``, so a failed registration can never become champion.
Transient failures (connection errors, HTTP 5xx/429, a locked sqlite file) are retried with
exponential back-off; version creation is retried idempotently via a ``fra.registration_id`` tag.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fra.checkpoint import FRA_BACKBONE_FORMAT, infer_arch, load_backbone, safe_load
from fra.errors import CheckpointError, FraError

log = logging.getLogger(__name__)

REGISTRY_EXPERIMENT = "fra-registry"
MODEL_NAME_IN_RUN = "backbone"
CHAMPION = "champion"
STATUS_TAG, READY, PENDING, FAILED = "fra.status", "ready", "pending", "failed"
PROTOCOL_TAG = "fra.eval_protocol"
DATASET_TAG = "fra.dataset_fingerprint"
METRIC_TAG_PREFIX = "fra.metric."
CARD_TAG_PREFIX = "fra.card."
REGISTRATION_TAG = "fra.registration_id"
CARD_FIELDS = ("architecture", "input_size", "normalization", "config_hash", "data_manifest_fingerprint",
               "fra_version")
EXPORT_CANDIDATES = ("backbone.pt", "export/backbone.pt", "checkpoint.pt")
EXAMPLE_SIDE = 64  # input-example height/width; any H, W >= 33 works (see module docstring)


class RegistryError(FraError):
    """The registry is unreachable, or a registry operation was refused or failed."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered backbone version."""

    name: str
    version: int
    run_id: str
    model_id: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# --------------------------------------------------------------------------------------
# Connection: URI, retries, reachability
# --------------------------------------------------------------------------------------
def resolve_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs>/runs/mlflow.db``."""
    from fra.tracking import resolve_tracking_uri

    return resolve_tracking_uri(uri or "", "runs")


def is_transient(exc: BaseException) -> bool:
    """Worth another try: connection errors, HTTP 5xx/429, a locked sqlite file.

    An MLflow "Max retries exceeded" error is *not* retried again: MLflow's HTTP client already
    retried it with back-off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, factor 2).
    """
    from mlflow.exceptions import RestException

    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, (ConnectionError, TimeoutError, urllib.error.URLError)):
        return True
    # Only a real HTTP answer counts: a local MlflowException maps INTERNAL_ERROR to "500" too.
    if isinstance(exc, RestException) and (exc.get_http_status_code() >= 500 or exc.get_http_status_code() == 429):
        return True
    if getattr(exc, "error_code", "") in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return True
    return "database is locked" in str(exc)


def call(what: str, fn: Callable[[], Any], attempts: int = 4, delay_s: float = 0.5) -> Any:
    """Run ``fn``, retrying transient failures with exponential back-off (0.5, 1, 2 s)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises HTTP, sqlite and OS errors
            if attempt == attempts or not is_transient(exc):
                raise
            log.warning("MLflow %s failed (%s); retry %d/%d", what, str(exc).splitlines()[0][:200],
                        attempt, attempts - 1)
            time.sleep(delay_s * 2 ** (attempt - 1))


def _healthy(uri: str, timeout_s: float = 3.0) -> bool:
    """One quick probe; non-HTTP backends count as healthy."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:  # noqa: S310
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def check_reachable(uri: str, attempts: int = 3, timeout_s: float = 3.0) -> None:
    """Fail fast, naming the URI, when the tracking backend does not answer.

    HTTP servers are probed at ``/health`` with a short timeout (MLflow's own client would
    retry a dead server for minutes); every backend then answers one cheap registry query.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"

        def probe() -> None:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - http(s) only
                resp.read()

        try:
            call(f"health check {url}", probe, attempts=attempts)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code == 429:
                raise RegistryError(f"MLflow tracking server {uri} is unhealthy (HTTP {exc.code} on /health)") from exc
            # A proxy without /health: the registry query below decides.
        except (OSError, urllib.error.URLError) as exc:
            raise RegistryError(
                f"MLflow tracking server {uri} is not reachable ({getattr(exc, 'reason', exc)}). Start it "
                "(fra.mlflow_server or `mlflow server ...`) or point --tracking-uri / MLFLOW_TRACKING_URI at a "
                "running one. Nothing was changed in the registry.") from exc
    try:
        call("registry query", lambda: client(uri).search_registered_models(max_results=1), attempts=attempts)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"MLflow registry at {uri} does not answer: {str(exc).splitlines()[0][:300]}") from exc


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """One MlflowClient per URI (creating one opens and checks the store, about 1 s on sqlite)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (needed by ``log_model``) at ``uri`` for the block, then restore.

    Restores ``$MLFLOW_TRACKING_URI`` too: MLflow's own ``_use_tracking_uri`` unsets it on exit
    when no URI had been set in code, which would silently re-point later stages at the default.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def get_version(mlc, name: str, version: int | str) -> ModelVersionInfo:
    mv = call("get model version", lambda: mlc.get_model_version(name, str(version)))
    return _info(mv)


def _info(mv) -> ModelVersionInfo:
    tags = dict(mv.tags or {})
    model_id = getattr(mv, "model_id", None) or (mv.source or "").removeprefix("models:/")
    return ModelVersionInfo(mv.name, int(mv.version), mv.run_id or "", model_id if model_id.startswith("m-") else "",
                            tags.get(STATUS_TAG, ""), tags)


def champion_version(mlc, name: str) -> int | None:
    """The version holding the ``champion`` alias (int on every backend), or None."""
    aliases = call("get registered model", lambda: mlc.get_registered_model(name)).aliases or {}
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


# --------------------------------------------------------------------------------------
# Reading an export
# --------------------------------------------------------------------------------------
@dataclass
class _Export:
    weights: Path  # a backbone.pt (fra-backbone/1)
    card: dict
    trunk: nn.Module  # torchvision ResNet, fc = Identity, eval mode


def _read_export(source: str | Path, workdir: Path) -> _Export:
    """An export dir / ``backbone.pt`` (+ ``model_card.json``) or a full training checkpoint,
    local or at a URI (fetched into the local cache)."""
    from fra import storage as st

    path = st.local_copy(source, siblings=("model_card.json",))
    if path.is_dir():
        found = next((path / c for c in EXPORT_CANDIDATES if (path / c).is_file()), None)
        if found is None:
            raise CheckpointError(f"{path}: holds no backbone.pt, export/backbone.pt or checkpoint.pt")
        path = found
    obj = safe_load(path)
    card_path = path.parent / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    declared = obj.get("arch", "") if isinstance(obj, dict) else ""
    declared = declared.removesuffix("_encoder") if isinstance(declared, str) and declared.startswith("resnet") else ""
    model, report = load_backbone(obj, arch=declared or card.get("architecture") or None)
    arch = declared or card.get("architecture") or infer_arch(model.state_dict())
    card = card or _card_from_checkpoint(obj, arch)
    card.setdefault("architecture", arch)
    if not isinstance(obj, dict) or obj.get("format") != FRA_BACKBONE_FORMAT:
        # A training checkpoint: write the weights-only backbone file that loaders expect.
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
        workdir.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FRA_BACKBONE_FORMAT, "arch": arch, "state_dict": sd}, workdir / "backbone.pt")
        path = workdir / "backbone.pt"
    missing = [k for k in ("input_size", "normalization") if k not in card]
    if missing:
        raise CheckpointError(f"{source}: the model card lacks {missing}; "
                              "export with fra.train.checkpointing.export_backbone")
    model.fc = nn.Identity()
    log.info("registering %s (%s)", path, report)
    return _Export(path, card, model.eval())


def _card_from_checkpoint(obj: Any, arch: str) -> dict:
    from fra.config import PretrainConfig, from_dict, view_normalization
    from fra.engine import VGGFACE2_MEAN, VGGFACE2_STD
    from fra.train.checkpointing import config_hash

    import fra

    cfg = obj.get("config") if isinstance(obj, dict) else None
    cfg = cfg if isinstance(cfg, dict) else {}
    extra = (obj.get("extra") or {}) if isinstance(obj, dict) else {}
    mean, std = VGGFACE2_MEAN, VGGFACE2_STD
    try:
        mean, std = view_normalization(from_dict(PretrainConfig, cfg))
    except FraError:  # a config from another version: keep VGGFace2's, the FRA default
        pass
    return {"format": FRA_BACKBONE_FORMAT, "architecture": arch,
            "input_size": int((cfg.get("data") or {}).get("image_size", 224)),
            "normalization": {"mean": list(mean), "std": list(std)},
            "config_hash": config_hash(cfg) if cfg else "",
            "data_manifest_fingerprint": str(extra.get("manifest_fingerprint", "")),
            "fra_version": fra.__version__}


def fer_metrics_from_results(path: str | Path) -> tuple[dict[str, float], str, str]:
    """Read a FER ``results.json``: (``fer_*`` headline metrics, protocol, dataset fingerprint).

    The protocol string is ``<protocol>/<dataset>/<test split>`` so that a linear probe on RAF-DB
    is never compared with a fine-tune, or with another split.
    """
    try:
        from fra import storage as st

        res = st.read_json(path)
    except (OSError, ValueError) as exc:
        raise FraError(f"cannot read FER results {path}: {exc}") from exc
    metrics = {f"fer_{k}": float(v) for k, v in (res.get("headline") or {}).items() if isinstance(v, (int, float))}
    dataset = res.get("dataset") or {}
    split = (res.get("resolved") or {}).get("test_split", "")
    protocol = "/".join(str(p) for p in (res.get("protocol", ""), dataset.get("name", ""), split) if p)
    return metrics, protocol, str(dataset.get("fingerprint", ""))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


# --------------------------------------------------------------------------------------
# Register
# --------------------------------------------------------------------------------------
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
    uri = resolve_uri(tracking_uri)
    metrics = {str(k): float(v) for k, v in (fer_metrics or {}).items()}
    with tempfile.TemporaryDirectory(prefix="fra-register-") as tmp:
        export = _read_export(export_dir_or_checkpoint, Path(tmp))
        check_reachable(uri)
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
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"
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


# --------------------------------------------------------------------------------------
# Load, list, show
# --------------------------------------------------------------------------------------
def load_registered(uri: str, *, tracking_uri: str | None = None, num_classes: int = 1000,
                    arch: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """A torchvision ResNet (fresh ``fc`` for ``num_classes``, eval mode) with registered weights.

    Args:
        uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/m-<id>`` or
            ``runs:/<run_id>/backbone``.
        tracking_uri: MLflow URI; None = :func:`resolve_uri`.
        trust_pickle: allow unpickling a model without ``backbone.pt`` (registered by something
            other than fra); see :func:`fra.evaluation.backbones.load_pickled_model`.

    Raises:
        RegistryError: unreachable server, unknown model, or a version that is not ``ready``.
        CheckpointError: the model has no ``backbone.pt`` and ``trust_pickle`` is false.
    """
    import mlflow

    turi = resolve_uri(tracking_uri)
    check_reachable(turi)
    _refuse_unready(client(turi), uri)
    with tempfile.TemporaryDirectory(prefix="fra-load-") as tmp, _fluent_uri(turi):
        try:
            local = Path(call(f"download {uri}", lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tmp, tracking_uri=turi, registry_uri=turi)))
        except Exception as exc:  # noqa: BLE001
            raise RegistryError(f"cannot fetch {uri} from {turi}: {str(exc).splitlines()[0][:300]}") from exc
        weights = next((f for f in sorted(local.rglob("backbone.pt"))), None) if local.is_dir() else None
        if weights is not None:
            model, report = load_backbone(weights, arch=arch, num_classes=num_classes)
        else:  # registered by something else: its logged model unpickles, so only on explicit trust
            from fra.evaluation.backbones import load_pickled_model

            module = load_pickled_model(uri, trust_pickle, "load_registered(..., trust_pickle=True)", str(local))
            model, report = load_backbone(module.state_dict(), arch=arch, num_classes=num_classes)
    log.info("loaded %s: %s", uri, report)
    return model.eval()


def _refuse_unready(mlc, uri: str) -> None:
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = call("get version by alias", lambda: mlc.get_model_version_by_alias(name, alias))
        else:
            name, _, version = ref.partition("/")
            mv = call("get model version", lambda: mlc.get_model_version(name, version))
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {str(exc).splitlines()[0][:300]}") from exc
    status = (mv.tags or {}).get(STATUS_TAG, READY)
    if status != READY:
        raise RegistryError(f"{uri} is version {mv.version} with {STATUS_TAG}={status}; only ready versions load")


def list_models(tracking_uri: str | None = None) -> list[dict]:
    """One row per registered model: name, latest version, champion, description."""
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    mlc = client(uri)
    rows = []
    from fra.registry_lock import is_lock

    for rm in call("search registered models", lambda: mlc.search_registered_models(max_results=1000)):
        if is_lock(rm.name):  # a promotion in progress holds it (fra.registry_lock)
            continue
        aliases = {k: int(v) for k, v in (rm.aliases or {}).items()}
        latest = max((int(v.version) for v in rm.latest_versions or []), default=None)
        rows.append({"name": rm.name, "latest_version": latest, "champion": aliases.get(CHAMPION),
                     "aliases": aliases, "description": rm.description or ""})
    return rows


def show(name: str, tracking_uri: str | None = None) -> dict:
    """A registered model: aliases, every version (status, metrics, protocol, fingerprint), history."""
    from mlflow.exceptions import MlflowException

    from fra.registry_promotion import read_history

    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    mlc = client(uri)
    try:
        rm = call("get registered model", lambda: mlc.get_registered_model(name))
    except MlflowException as exc:
        raise RegistryError(f"no registered model {name!r}: {str(exc).splitlines()[0][:200]}") from exc
    versions = []
    for mv in sorted(call("search versions", lambda: mlc.search_model_versions(f"name = '{name}'")),
                     key=lambda m: int(m.version)):
        t = mv.tags or {}
        versions.append({"version": int(mv.version), "status": t.get(STATUS_TAG, ""), "run_id": mv.run_id,
                         "eval_protocol": t.get(PROTOCOL_TAG, ""), "dataset_fingerprint": t.get(DATASET_TAG, ""),
                         "metrics": {k.removeprefix(METRIC_TAG_PREFIX): float(v) for k, v in t.items()
                                     if k.startswith(METRIC_TAG_PREFIX)},
                         "architecture": t.get(CARD_TAG_PREFIX + "architecture", ""),
                         "created": mv.creation_timestamp})
    return {"name": rm.name, "description": rm.description or "",
            "aliases": {k: int(v) for k, v in (rm.aliases or {}).items()},
            "versions": versions, "history": read_history(mlc, name)}


_PROMOTION_API = ("PromotionDecision", "promote", "read_history", "rollback")


def __getattr__(attr: str):
    # Promotion lives in fra.registry_promotion (which imports this module); re-export it lazily
    # so callers only need ``fra.registry`` and either module can be imported first.
    if attr in _PROMOTION_API:
        from fra import registry_promotion

        return getattr(registry_promotion, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
