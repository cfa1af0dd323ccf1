"""Heat-map overlays: what facial regions each of the K queries attends to.

Pure torch + PIL. Inference heat maps use the ``proto`` buffer (the running mean of the
mask embeddings) as the reference intends; ``mode="batch"`` uses the batch-averaged mask
embeddings instead, exactly as in training.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fra.engine import Normalizer
from fra.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def palette(k: int) -> np.ndarray:
    """K distinct colours (K, 3) uint8."""
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(i / k, 0.85, 1.0)] for i in range(k)], np.uint8)


@torch.no_grad()
def compute_heatmaps(model, images: torch.Tensor, mode: str = "proto") -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> heat maps (B, K, H, W) upsampled to the input size."""
    if mode not in ("proto", "batch"):
        raise ValueError(f"mode must be 'proto' or 'batch', got {mode!r}")
    was_training = model.training
    model.eval()
    try:
        out = model.online_net(images, use_proto=mode == "proto")
    finally:
        model.train(was_training)
    if out.obj_attn is None:
        raise DataError("this model has no region branch (method=byol): no heat maps")
    return F.interpolate(out.obj_attn.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """One panel row: the image, its argmax region map blended in, and each query's map.

    Args:
        image: (H, W, 3) uint8.
        heat: (K, H, W) float heat maps (softmax over K).
    """
    k, h, w = heat.shape
    colours = palette(k)
    region = colours[heat.argmax(0)]
    # Blend more where the winning query is confident.
    conf = ((heat.max(0) - 1.0 / k) / (1 - 1.0 / k)).clip(0, 1)[..., None]
    a = alpha * (0.35 + 0.65 * conf)
    blended = (image * (1 - a) + region * a).astype(np.uint8)
    panels = [image, blended]
    for q in range(k):
        m = heat[q]
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-8)
        panels.append((image * 0.35 + m[..., None] * colours[q] * 0.65).astype(np.uint8))
    return Image.fromarray(np.concatenate(panels, axis=1))


def load_images(paths: Sequence[Path], size: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """Read and resize images; unreadable files raise DataError naming the file."""
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
        except OSError as exc:
            raise DataError(f"cannot read image {p}: {exc}") from exc
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return arrays, batch


def write_overlays(model, image_paths: Sequence[str | Path], out_dir: str | Path, image_size: int,
                   mean, std, mode: str = "proto") -> list[Path]:
    """Write one overlay PNG per image plus ``grid.png`` stacking them; returns the paths."""
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError("no images given for heat maps")
    arrays, batch = load_images(paths, image_size)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    heat = compute_heatmaps(model, Normalizer(mean, std, device, dtype)(batch), mode).cpu().numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    for p, img, hm in zip(paths, arrays, heat):
        panel = overlay(img, hm)
        target = out_dir / f"{p.stem}_heatmap.png"
        panel.save(target)
        written.append(target)
        rows.append(np.asarray(panel))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_dir / "grid.png")
    written.append(out_dir / "grid.png")
    return written


def find_images(folder: str | Path, limit: int = 0) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths[:limit] if limit else paths
