"""`fra heatmaps`: heat-map overlays for a folder of images and a checkpoint."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="fra training checkpoint or official FRA checkpoint")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the overlay PNGs")
    p.add_argument("--image-size", type=int, default=0, help="input size (default: the checkpoint's)")
    p.add_argument("--mode", choices=("proto", "batch"), default="proto",
                   help="proto: the running-mean mask embeddings (inference); batch: the batch mean (as in training)")
    p.add_argument("--limit", type=int, default=16, help="at most this many images (0 = all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config for official checkpoints, e.g. --set backbone=resnet50")


def run(args: argparse.Namespace) -> int:
    from fra.checkpoint import load_fra_model, official_model_config, safe_load
    from fra.config import ModelConfig, load_config
    from fra.engine import VGGFACE2_MEAN, VGGFACE2_STD
    from fra.heatmaps import find_images, write_overlays
    from fra.models import build_model

    obj = safe_load(args.checkpoint)
    saved = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    if saved and "model" in saved:  # a fra checkpoint carries its resolved config
        cfg = load_config(ModelConfig, data=saved["model"], overrides=args.overrides)
        size = args.image_size or (saved.get("data") or {}).get("image_size", 224)
    else:  # an official checkpoint: read K and the widths off the tensors
        cfg = load_config(ModelConfig, data=official_model_config(obj), overrides=args.overrides)
        size = args.image_size or 224
    model = build_model(cfg)
    load_fra_model(obj, model)
    paths = find_images(args.images, args.limit)
    written = write_overlays(model, paths, args.out, size, VGGFACE2_MEAN, VGGFACE2_STD, mode=args.mode)
    print(f"wrote {len(written)} overlays to {args.out} (grid: {written[-1]})")
    return 0
