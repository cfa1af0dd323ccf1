"""Loading a registered backbone (weights only, unless pickles are explicitly trusted)."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from torch import nn

from fra.checkpoint import load_backbone
from fra.registry.connection import (READY, STATUS_TAG, RegistryError, _fluent_uri, call, check_reachable, client,
                                     resolve_uri)

log = logging.getLogger("fra.registry")


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
