"""Resolve a backbone source string to torchvision-named ResNet weights, with provenance.

Accepted sources (:func:`resolve_backbone`):

* ``random`` / ``random:resnet18`` / empty — random init (seeded, built on the driver so every
  worker and every rerun starts from the same weights);
* a file: a fra training checkpoint (``checkpoint.pt``), an exported backbone (``backbone.pt``),
  an official FRA checkpoint, an FRL released checkpoint, or a torchvision state dict — all
  through :func:`fra.checkpoint.backbone_state_dict` (``weights_only`` loading);
* a directory holding ``backbone.pt`` (``export/backbone.pt``) or ``checkpoint.pt`` (a fra run
  or export directory); ``model_card.json`` beside the weights supplies the normalisation;
* an MLflow URI: ``models:/name@alias``, ``models:/name/3``, ``models:/m-<id>``, ``runs:/<id>/path``
  or ``mlflow-artifacts:/...``. The model's ``backbone.pt`` (tensors only) is read. A model
  without one was not registered by fra, and loading its logged PyTorch model
  (``mlflow.pytorch.load_model``, pickle or pt2 alike) unpickles whatever its writer put there, so
  it is refused unless the caller passes ``trust_pickle=True`` (``backbone.trust_pickle`` /
  ``--trust-pickle``); that load is logged as a warning and recorded in ``detail``;
* an ``nn.Module`` or an already-loaded checkpoint dict (Python API only).

The fingerprint is a hash of the tensors themselves (names, shapes, dtypes, bytes), so the same
weights get the same fingerprint whatever container they came in.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fra import storage as st
from fra.checkpoint import backbone_state_dict, build_torchvision_resnet, infer_arch, load_backbone_into, safe_load
from fra.errors import CheckpointError

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
DIR_CANDIDATES = ("backbone.pt", "export/backbone.pt", "checkpoint.pt")


@dataclass
class BackboneSource:
    """Weights plus where they came from.

    Attributes:
        spec: the source as given.
        kind: ``random``, ``file``, ``mlflow`` or ``object``.
        layout: checkpoint layout (``fra-backbone``, ``fra``, ``fra-official``, ``frl``,
            ``torchvision``, ``random``).
        arch: torchvision ResNet name.
        state_dict: torchvision-named backbone tensors (no ``fc``).
        fingerprint: 16 hex digits of the tensor hash.
        normalization: ``{"mean": [...], "std": [...]}`` from a model card, if one was found.
        detail: human-readable load report.
    """

    spec: str
    kind: str
    layout: str
    arch: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    fingerprint: str
    normalization: dict | None = None
    detail: str = ""

    def params(self) -> dict[str, str]:
        """Flat provenance for MLflow params / results.json."""
        return {"backbone.source": self.spec, "backbone.kind": self.kind, "backbone.layout": self.layout,
                "backbone.arch": self.arch, "backbone.fingerprint": self.fingerprint}


def state_dict_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (sorted names, shapes, dtypes and raw bytes)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def resolve_backbone(source: Any, arch: str = "", seed: int = 0, tracking_uri: str = "",
                     trust_pickle: bool = False) -> BackboneSource:
    """Turn any supported source into torchvision ResNet weights (see the module docstring).

    Args:
        source: source string, path, ``nn.Module`` or checkpoint dict; None/"" means random.
        arch: torchvision ResNet name; empty = from the checkpoint (``resnet50`` for random).
        seed: seed of the random init.
        tracking_uri: MLflow tracking URI for ``models:/`` and ``runs:/`` sources.
        trust_pickle: allow unpickling an MLflow model that carries no ``backbone.pt``; only for
            registries whose every writer you trust as much as this code.

    Raises:
        CheckpointError: the source is missing, unreadable, of an unknown layout, or does not
            fit ``arch``; the message names the source and the problem.
    """
    if isinstance(source, nn.Module):
        return _finish("<module>", "object", source.state_dict(), arch)
    if isinstance(source, dict):
        return _finish("<dict>", "object", source, arch)
    spec = str(source or "random").strip()
    if spec == "random" or spec.startswith("random:"):
        name = spec.partition(":")[2] or arch or "resnet50"
        torch.manual_seed(seed)
        sd = {k: v for k, v in build_torchvision_resnet(name).state_dict().items() if not k.startswith("fc.")}
        return BackboneSource(spec, "random", "random", name, sd, state_dict_fingerprint(sd),
                              detail=f"random init ({name}, seed {seed})")
    if spec.startswith(MLFLOW_SCHEMES):
        return _from_mlflow(spec, arch, tracking_uri, trust_pickle)
    try:
        path = st.local_copy(spec, siblings=("model_card.json",))  # a URI is fetched into the local cache
    except FileNotFoundError:
        path = Path(spec).expanduser()
    if path.is_dir():
        found = next((path / c for c in DIR_CANDIDATES if (path / c).is_file()), None)
        if found is None:
            raise CheckpointError(f"backbone source {spec}: directory holds none of {list(DIR_CANDIDATES)}")
        path = found
    elif not path.exists():
        raise CheckpointError(
            f"backbone source {spec!r} not found: expected 'random[:arch]', a checkpoint file or directory, "
            f"or an MLflow URI ({', '.join(MLFLOW_SCHEMES)}...)")
    out = _finish(spec, "file", safe_load(path), arch, where=str(path))
    out.normalization = out.normalization or _card_normalization(path.parent / "model_card.json")
    return out


def _finish(spec: str, kind: str, obj: Any, arch: str, where: str | None = None) -> BackboneSource:
    """Extract the backbone, pick the architecture, and check that the weights load."""
    where = where or spec
    sd, layout, ignored = backbone_state_dict(obj, where)
    declared = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else ""
    declared = declared.removesuffix("_encoder") if declared.startswith("resnet") else ""
    name = arch or declared or infer_arch(sd)
    report = load_backbone_into(build_torchvision_resnet(name), sd, f"{where} ({layout})", ignored)
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    return BackboneSource(spec, kind, layout, name, sd, state_dict_fingerprint(sd), detail=str(report))


def _card_normalization(card: Path) -> dict | None:
    if not card.is_file():
        return None
    try:
        norm = json.loads(card.read_text()).get("normalization")
    except (OSError, ValueError):
        return None
    return norm if isinstance(norm, dict) and {"mean", "std"} <= set(norm) else None


def _from_mlflow(uri: str, arch: str, tracking_uri: str, trust_pickle: bool = False) -> BackboneSource:
    """Load a backbone from an MLflow model or artifact URI."""
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
    except ImportError as exc:  # pragma: no cover - mlflow is a dependency
        raise CheckpointError(f"{uri}: MLflow is not installed") from exc
    if tracking_uri:  # for this load only: MLflow's set_tracking_uri also sets $MLFLOW_TRACKING_URI for good
        from fra.registry.connection import _fluent_uri

        with _fluent_uri(tracking_uri):
            return _from_mlflow(uri, arch, "", trust_pickle)
    import tempfile

    # the download is read here and then removed (MLflow's own default is a temp folder it never deletes)
    with tempfile.TemporaryDirectory(prefix="fra-backbone-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except (MlflowException, OSError) as exc:
            raise CheckpointError(f"backbone source {uri}: cannot fetch from MLflow at "
                                  f"{mlflow.get_tracking_uri()}: {str(exc).splitlines()[0]}") from exc
        return _from_download(uri, local, arch, trust_pickle)


def _from_download(uri: str, local: Path, arch: str, trust_pickle: bool) -> BackboneSource:
    """The backbone in ``local``, a downloaded copy of the MLflow URI ``uri``."""
    files = [local] if local.is_file() else sorted(local.rglob("*"))
    weights = next((f for f in files if f.name == "backbone.pt"), None)
    if weights is None and local.is_file():
        weights = local
    if weights is not None:
        out = _finish(uri, "mlflow", safe_load(weights), arch, where=f"{uri} ({weights.name})")
    else:
        module = load_pickled_model(uri, trust_pickle, "backbone.trust_pickle: true (fra evaluate fer --trust-pickle)",
                                    load_from=str(local))
        out = _finish(uri, "mlflow", module.state_dict(), arch)
        out.detail = f"UNPICKLED with trust_pickle (no backbone.pt); {out.detail}"
    cards = [f for f in files if f.name == "model_card.json"]
    out.normalization = _card_normalization(cards[0]) if cards else _mlmodel_normalization(local)
    return out


def load_pickled_model(uri: str, trust_pickle: bool, opt_in: str, load_from: str | None = None) -> nn.Module:
    """``mlflow.pytorch.load_model`` for a model without ``backbone.pt``, only when trusted.

    Both of MLflow's PyTorch formats unpickle on load (pickle, and pt2's weights and constants),
    and the tracking server has no authentication, so a model fra did not register could run code
    here. Refused unless ``trust_pickle``; ``opt_in`` names the switch in the refusal;
    ``load_from`` is a local copy of ``uri`` already downloaded.

    Raises:
        CheckpointError: refused, not a loadable PyTorch model, or not a torch module.
    """
    if not trust_pickle:
        raise CheckpointError(
            f"{uri} has no backbone.pt, so it was not registered by fra; loading its logged PyTorch model would "
            "unpickle code from the MLflow server, which fra refuses. Re-register the weights with `fra registry "
            f"register EXPORT_DIR` (stores backbone.pt), or, if you trust every writer to that server, set {opt_in}")
    import mlflow
    from mlflow.exceptions import MlflowException

    log.warning("trust_pickle: unpickling the MLflow model %s (it has no backbone.pt)", uri)
    try:
        module = mlflow.pytorch.load_model(load_from or uri, map_location="cpu")
    except (MlflowException, OSError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"backbone source {uri}: not a loadable PyTorch model: "
                              f"{str(exc).splitlines()[0]}") from exc
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"backbone source {uri}: MLflow returned {type(module).__name__}, not a torch module")
    return module


def _mlmodel_normalization(local: Path) -> dict | None:
    """``normalization`` from the ``metadata`` block of an MLmodel file, if present."""
    mlmodel = local / "MLmodel" if local.is_dir() else None
    if mlmodel is None or not mlmodel.is_file():
        return None
    import yaml

    meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    norm = meta.get("normalization")
    return norm if isinstance(norm, dict) and {"mean", "std"} <= set(norm) else None
