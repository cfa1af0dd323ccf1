"""`fra convert`: official FRA / FRL checkpoints -> fra's formats (full model or backbone)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="official FRA training checkpoint, FRL release, or torchvision state dict")
    p.add_argument("out", help="output directory")
    p.add_argument("--what", choices=("backbone", "model"), default="backbone",
                   help="backbone: torchvision-compatible backbone.pt + model_card.json; "
                        "model: a full fra FRA state dict (official FRA checkpoints only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config of the official checkpoint, e.g. --set backbone=resnet50")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fra.checkpoint import (FRA_BACKBONE_FORMAT, FRA_CHECKPOINT_FORMAT, backbone_state_dict,
                                infer_arch, load_backbone, official_model_config, official_to_fra_state_dict, safe_load)
    from fra.config import ModelConfig, load_config, to_dict
    from fra.models import build_model
    from fra.utils.io import atomic_torch_save, atomic_write_json

    obj = safe_load(args.source)
    out = Path(args.out)
    if args.what == "backbone":
        net, report = load_backbone(obj)  # validates: all backbone keys present, shapes agree
        sd, layout, _ = backbone_state_dict(obj, args.source)
        arch = infer_arch(sd)
        epoch = obj.get("epoch") if isinstance(obj, dict) else None  # official checkpoints carry it
        epoch = epoch if isinstance(epoch, int) else 0
        atomic_torch_save({"format": FRA_BACKBONE_FORMAT, "arch": arch, "epoch": epoch, "state_dict": sd},
                          out / "backbone.pt")
        atomic_write_json(out / "model_card.json", {"format": FRA_BACKBONE_FORMAT, "architecture": arch,
                                                   "converted_from": str(args.source), "source_layout": layout})
        print(f"{report}\nwrote {out / 'backbone.pt'}")
        return 0
    sd = official_to_fra_state_dict(obj)
    cfg = load_config(ModelConfig, data=official_model_config(obj), overrides=args.overrides)
    arch, k = cfg.backbone, cfg.num_proto
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        from fra.errors import CheckpointError

        raise CheckpointError(f"official checkpoint does not fit {arch}/K={k}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    atomic_torch_save({"format": FRA_CHECKPOINT_FORMAT, "arch": arch, "model": model.state_dict(),
                       "config": {"model": to_dict(cfg)}, "state": {"step": 0, "epoch": int(obj.get("epoch", 0))}},
                      out / "model.pt")
    print(f"converted {len(sd)} tensors ({arch}, K={k}, hidden {cfg.hidden_dim}) -> {out / 'model.pt'}")
    return 0
