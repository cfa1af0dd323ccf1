"""Loading weights safely: fra checkpoints, official FRA / FRL checkpoints, torchvision dicts.

Everything goes through ``torch.load(..., weights_only=True)``: a file that needs arbitrary
unpickling is refused. Backbones load into a torchvision ResNet; missing or mis-shaped
backbone keys fail loudly, naming the problem.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from fra.errors import CheckpointError

log = logging.getLogger(__name__)

FRA_CHECKPOINT_FORMAT = "fra-checkpoint/1"
FRA_BACKBONE_FORMAT = "fra-backbone/1"

# Prefixes that lead to the backbone inside each known layout, most specific first.
BACKBONE_PREFIXES = {
    "fra": ("online_net.backbone.",),
    "fra-official": ("module.online_net.backbone.", "online_net.backbone.", "module.encoder_q.", "encoder_q."),
    "frl": ("module.base_net.", "base_net.", "module.encoder_q.", "encoder_q."),
}


@dataclass
class LoadReport:
    """What a load did: the detected layout and the keys that did not match."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        extra = f", ignored {len(self.unexpected)} non-backbone keys" if self.unexpected else ""
        miss = f", missing {self.missing}" if self.missing else ""
        return f"{self.source}: loaded {self.loaded} tensors{miss}{extra}"


def safe_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and clear errors."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p}: refused to load: the file contains objects other than tensors and plain containers "
            f"(weights_only=True). Only load checkpoints from sources you trust. Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{p}: not a readable torch checkpoint: {exc}") from exc


def _state_dict_of(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"{where}: no state dict found (expected a 'state_dict'/'model' entry or a tensor dict)")


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """Name the key layout of a state dict: fra, fra-official, frl or torchvision."""
    keys = list(sd)
    if any(k.startswith("online_net.backbone.") for k in keys) and not any(k.startswith("module.") for k in keys):
        return "fra"
    if any(".online_net.backbone." in k or k.startswith(("module.encoder_q.", "encoder_q.", "online_net.")) for k in keys):
        return "fra-official"
    if any(k.startswith(("module.base_net.", "base_net.")) for k in keys):
        return "frl"
    if "conv1.weight" in sd or "module.conv1.weight" in sd:
        return "torchvision"
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {keys[:5]}); expected fra, official FRA "
        "(online_net.backbone./encoder_q.), FRL (module.base_net.) or torchvision ResNet keys"
    )


def backbone_state_dict(obj: Any, where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Extract torchvision-named backbone tensors from any supported checkpoint object.

    Returns:
        (state dict with torchvision ResNet names, layout name, ignored keys)
    """
    if isinstance(obj, dict) and obj.get("format") == FRA_BACKBONE_FORMAT:
        return dict(obj["state_dict"]), "fra-backbone", []
    sd = _state_dict_of(obj, where)
    layout = detect_layout(sd)
    if layout == "torchvision":
        out = {k.removeprefix("module."): v for k, v in sd.items()}
        ignored = [k for k in out if k.startswith("fc.")]
        return {k: v for k, v in out.items() if not k.startswith("fc.")}, layout, ignored
    prefixes = BACKBONE_PREFIXES[layout]
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if picked:
            ignored = [k for k in sd if not k.startswith(prefix)]
            return picked, layout, ignored
    raise CheckpointError(f"{where}: layout {layout} but no key starts with any of {prefixes}")


def build_torchvision_resnet(arch: str, num_classes: int = 1000) -> nn.Module:
    if not hasattr(tvm, arch) or not arch.startswith("resnet"):
        raise CheckpointError(f"unknown torchvision ResNet {arch!r}")
    return getattr(tvm, arch)(weights=None, num_classes=num_classes)


def infer_arch(sd: dict[str, torch.Tensor]) -> str:
    """Guess resnet18/34/50/101 from the tensors present."""
    bottleneck = "layer1.0.conv3.weight" in sd
    n3 = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
    if bottleneck:
        return {6: "resnet50", 23: "resnet101"}.get(n3, "resnet50")
    return {2: "resnet18", 6: "resnet34"}.get(n3, "resnet18")


def load_backbone_into(model: nn.Module, backbone_sd: dict[str, torch.Tensor], source: str,
                       ignored: list[str] | None = None) -> LoadReport:
    """Load backbone tensors into a torchvision ResNet; only ``fc.*`` may stay missing."""
    own = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in backbone_sd.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch for {len(wrong)} tensors, e.g. {wrong[:3]}")
    result = model.load_state_dict(backbone_sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} backbone tensors missing from the checkpoint, e.g. {missing[:5]} "
            "(wrong architecture or key prefix?)"
        )
    unexpected = list(result.unexpected_keys) + list(ignored or [])
    report = LoadReport(source, len(backbone_sd) - len(result.unexpected_keys), list(result.missing_keys), unexpected)
    log.info("backbone %s", report)
    return report


def load_backbone(path_or_obj: Any, arch: str | None = None, num_classes: int = 1000) -> tuple[nn.Module, LoadReport]:
    """Build a torchvision ResNet (fresh ``fc`` for ``num_classes``) with weights from a checkpoint.

    Accepts fra checkpoints and exported backbones, official FRA training checkpoints, FRL
    released checkpoints and torchvision state dicts (path or already-loaded object).
    """
    where = str(path_or_obj) if isinstance(path_or_obj, (str, Path)) else "checkpoint"
    obj = safe_load(path_or_obj) if isinstance(path_or_obj, (str, Path)) else path_or_obj
    sd, layout, ignored = backbone_state_dict(obj, where)
    arch = arch or (obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str)
                    and obj.get("arch", "").startswith("resnet") else None) or infer_arch(sd)
    model = build_torchvision_resnet(arch, num_classes)
    return model, load_backbone_into(model, sd, f"{where} ({layout})", ignored)


def official_to_fra_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Turn a whole official FRA training checkpoint into a fra :class:`FRA` state dict.

    Strips ``module.`` and drops the ``encoder_q.*`` alias of the online backbone; every other
    key (online, target, predictors, ``proto`` and BN buffers, ``center``) maps 1:1.
    """
    sd = _state_dict_of(obj, "official checkpoint")
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("encoder_q."):
            continue
        out[k] = v
    if not any(k.startswith("online_net.neck.") for k in out):
        raise CheckpointError("not a full official FRA checkpoint: no online_net.neck.* keys")
    return out


def load_fra_model(obj: Any, model: nn.Module) -> LoadReport:
    """Load a fra or official FRA full checkpoint into ``model`` (strict)."""
    sd = _state_dict_of(obj, "checkpoint")
    layout = detect_layout(sd)
    if layout == "fra-official":
        sd = official_to_fra_state_dict(obj)
    elif layout != "fra":
        raise CheckpointError(f"a {layout} checkpoint holds no FRA neck; it can only load as a backbone")
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise CheckpointError(f"FRA model/checkpoint shape mismatch: {str(exc)[:500]}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"FRA model/checkpoint mismatch: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} "
            "(different backbone, num_proto or hidden_dim?)"
        )
    return LoadReport(layout, len(sd))


def official_model_config(obj: Any) -> dict:
    """Model settings (backbone, K, hidden width) read off an official FRA checkpoint's tensors."""
    sd = official_to_fra_state_dict(obj)
    trunk = {k.removeprefix("online_net.backbone."): v for k, v in sd.items() if k.startswith("online_net.backbone.")}
    return {"backbone": infer_arch(trunk),
            "num_proto": int(sd["online_net.neck.proj_attn.query_embed.weight"].shape[0]),
            "hidden_dim": int(sd["online_net.neck.proj.mlp.0.weight"].shape[0])}
