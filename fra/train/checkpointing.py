"""Full training checkpoints and exported backbones (pure torch, no Ray).

A checkpoint holds everything a resume needs: online + target + predictors + buffers,
optimizer, AMP scaler, step/epoch, data seed, RNG states and the resolved config. Files are
written atomically; loading uses ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fra.checkpoint import FRA_BACKBONE_FORMAT, FRA_CHECKPOINT_FORMAT, safe_load
from fra.config import to_record
from fra.engine import TrainState, VGGFACE2_MEAN, VGGFACE2_STD
from fra.errors import CheckpointError
from fra.utils.io import atomic_torch_save, atomic_write_json

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def save_checkpoint(path: str | Path, model, optimizer, state: TrainState, config, scaler=None,
                    extra: dict | None = None) -> Path:
    """Write a full training checkpoint atomically."""
    obj = {
        "format": FRA_CHECKPOINT_FORMAT,
        "arch": model.cfg.backbone,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": {"step": state.step, "epoch": state.epoch, "history": state.history},
        "config": to_record(config),  # redacted: a checkpoint is a file others read
        "rng": rng_state(),
        "extra": to_record(extra or {}),
    }
    return atomic_torch_save(obj, path)


def load_checkpoint(path: str | Path) -> dict:
    obj = safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FRA_CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a fra training checkpoint (format {obj.get('format') if isinstance(obj, dict) else type(obj)})")
    return obj


def restore(ckpt: dict, model, optimizer=None, scaler=None, restore_rng: bool = True) -> TrainState:
    """Load every piece of a checkpoint back; returns the loop position."""
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng"):
        set_rng_state(ckpt["rng"])
    s = ckpt["state"]
    return TrainState(step=int(s["step"]), epoch=int(s["epoch"]), history=list(s.get("history", [])))


def config_hash(config: Any) -> str:
    """Hash of the config as recorded (redacted), so a card read back from disk hashes the same."""
    return hashlib.sha256(json.dumps(to_record(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def export_backbone(model, out_dir: str | Path, config, image_size: int, manifest_fingerprint: str = "",
                    mean=None, std=None, extra_card: dict | None = None, epoch: int = 0) -> tuple[Path, Path]:
    """Write ``backbone.pt`` (torchvision ResNet names) and ``model_card.json``.

    ``backbone.pt`` is ``{"format", "arch", "epoch", "state_dict"}``: besides fra's own loader and
    ``torchvision.models.<arch>().load_state_dict(obj["state_dict"], strict=False)``, the reference's
    ``main_fer.py --finetune --pretrained backbone.pt --model-prefix online_net.backbone`` loads it
    (it takes ``state_dict``, strips the prefixes, asserts that only ``fc`` is missing and prints
    ``epoch``, the pretraining epochs completed, as in its own training checkpoints).

    ``mean``/``std`` default to the normalisation the views were trained with
    (:func:`fra.config.view_normalization` of a :class:`PretrainConfig`, else VGGFace2's).
    """
    import fra
    from fra.config import PretrainConfig, view_normalization

    if mean is None or std is None:
        m, s = view_normalization(config) if isinstance(config, PretrainConfig) else (VGGFACE2_MEAN, VGGFACE2_STD)
        mean, std = mean or m, std or s

    out_dir = Path(out_dir)
    sd = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    arch = model.cfg.backbone.removesuffix("_encoder")
    weights = atomic_torch_save({"format": FRA_BACKBONE_FORMAT, "arch": arch, "epoch": int(epoch), "state_dict": sd},
                                out_dir / "backbone.pt")
    card = {
        "format": FRA_BACKBONE_FORMAT,
        "architecture": arch,
        "torchvision_compatible": True,
        "method": model.cfg.method,
        "input_size": image_size,
        "epochs_trained": int(epoch),
        "normalization": {"mean": list(mean), "std": list(std)},
        "out_channels": int(model.backbone.out_channels),
        "config": to_record(config),
        "config_hash": config_hash(config),
        "data_manifest_fingerprint": manifest_fingerprint,
        "fra_version": fra.__version__,
        "load_with": "fra.checkpoint.load_backbone(path) or torchvision.models.<arch>().load_state_dict(obj['state_dict'], strict=False)",
    }
    card.update(extra_card or {})
    return weights, atomic_write_json(out_dir / "model_card.json", card)
