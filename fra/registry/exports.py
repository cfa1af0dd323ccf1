"""Reading what gets registered: an export folder, a ``backbone.pt`` or a training checkpoint, and
the FER ``results.json`` whose headline metrics go with it."""
from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fra.checkpoint import FRA_BACKBONE_FORMAT, infer_arch, load_backbone, safe_load
from fra.errors import CheckpointError, FraError
from fra.redaction import redact

log = logging.getLogger("fra.registry")

EXPORT_CANDIDATES = ("backbone.pt", "export/backbone.pt", "checkpoint.pt")


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
    # Redacted once here: the card becomes version tags, the description and the logged card file.
    return _Export(path, redact(card), model.eval())


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
