"""SwAV / FRL multi-crop augmentation (FRL_SPEC §1.3), uint8 out, numpy + PIL + OpenCV.

Per crop: RandomResizedCrop(size, scale range, ratio 3/4-4/3, bilinear) → ColorJitter(0.8s,
0.8s, 0.8s, 0.2s) with p = 0.8 → RandomGrayscale(0.2) → Gaussian blur (p = 0.5, 23×23 kernel,
σ ~ U(0.1, 2.0)) → horizontal flip (0.5). Normalisation (ImageNet mean, FRL's std
:data:`FRL_STD`) happens on the trainer, on the batch.

The blur is OpenCV's, as FRL's (``--use_pil_blur false``). Each image draws its own parameters from its own ``numpy.random.Generator``. The colour ops
are torchvision's PIL implementations, applied one after the other (with their clamping), in
the random order ColorJitter picks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from fra.data.augment import random_resized_crop_box, to_pil

FRL_MEAN = (0.485, 0.456, 0.406)
# NOTE: FRL normalises with std 0.228 for red (ImageNet's is 0.229): kept for parity with the release.
FRL_STD = (0.228, 0.224, 0.225)

BLUR_KERNEL = 23  # OpenCV kernel size of FRL's run.sh (--use_pil_blur false)


@dataclass(frozen=True)
class CropParams:
    """The random draw behind one crop.

    Attributes:
        size: output side S.
        box: crop (left, top, right, bottom) in source pixels.
        jitter: (brightness, contrast, saturation, hue) factors, or None if not applied.
        order: order (indices into ``jitter``) in which the colour ops are applied.
        grey: RandomGrayscale fired.
        blur_sigma: Gaussian blur sigma in output pixels, or None.
        flip: horizontal flip.
    """

    size: int
    box: tuple[int, int, int, int]
    jitter: tuple[float, float, float, float] | None
    order: tuple[int, ...]
    grey: bool
    blur_sigma: float | None
    flip: bool


def gaussian_blur(img: np.ndarray, sigma: float, kernel: int = BLUR_KERNEL) -> np.ndarray:
    """FRL's blur, ``cv2.GaussianBlur(img, (kernel, kernel), sigma)`` (default borders: reflect-101).

    Args:
        img: uint8 (H, W, 3).
    Returns:
        uint8 (H, W, 3).
    """
    from fra.data.augment import _cv2

    return _cv2().GaussianBlur(np.ascontiguousarray(img), (kernel, kernel), sigma)


def _adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL ``adjust_hue``: shift the uint8 HSV hue channel with wrap-around."""
    shift = int(hue * 255)
    if shift == 0:
        return img
    h, s, v = img.convert("HSV").split()
    h = h.point([(i + shift) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


_COLOUR_OPS = (
    lambda im, f: ImageEnhance.Brightness(im).enhance(f),
    lambda im, f: ImageEnhance.Contrast(im).enhance(f),
    lambda im, f: ImageEnhance.Color(im).enhance(f),
    _adjust_hue,
)


class MultiCropTransform:
    """``sum(nmb_crops)`` crops of one image: groups of ``nmb_crops[i]`` crops of side ``size_crops[i]``.

    Args:
        size_crops: output side per group (224, 96).
        nmb_crops: crops per group (2, 6).
        min_scale: RandomResizedCrop lower area bound per group (0.14, 0.05).
        max_scale: RandomResizedCrop upper area bound per group (1.0, 0.14).
        color_strength: s of the colour distortion (``--color_distorsion_scale``, 1.0).
        jitter_p, grey_p, blur_p, flip_p: probabilities (0.8, 0.2, 0.5, 0.5).
        blur_sigma: sigma range of the blur (0.1, 2.0), output pixels.
        pil_blur: PIL's GaussianBlur(radius=σ) (FRL ``--use_pil_blur true``) instead of the
            23×23 OpenCV-style kernel run.sh uses.
        ratio: RandomResizedCrop aspect-ratio range.
    """

    def __init__(self, size_crops: Sequence[int] = (224, 96), nmb_crops: Sequence[int] = (2, 6),
                 min_scale: Sequence[float] = (0.14, 0.05), max_scale: Sequence[float] = (1.0, 0.14), *,
                 color_strength: float = 1.0, jitter_p: float = 0.8, grey_p: float = 0.2, blur_p: float = 0.5,
                 flip_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0), pil_blur: bool = False,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        groups = [tuple(size_crops), tuple(nmb_crops), tuple(min_scale), tuple(max_scale)]
        if len({len(g) for g in groups}) != 1 or not groups[0]:
            raise ValueError(f"size_crops, nmb_crops, min_scale and max_scale must have the same length, got {groups}")
        if any(not 0 < lo <= hi <= 1 for lo, hi in zip(min_scale, max_scale)):
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale} / {max_scale}")
        # One (size, scale range) entry per crop, in output order.
        self.crops = [(int(s), (float(lo), float(hi)))
                      for s, n, lo, hi in zip(size_crops, nmb_crops, min_scale, max_scale) for _ in range(int(n))]
        if len(self.crops) < 2:
            raise ValueError(f"need at least 2 crops, got nmb_crops={list(nmb_crops)}")
        s = color_strength
        self.jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.jitter_p, self.grey_p, self.blur_p, self.flip_p = jitter_p, grey_p, blur_p, flip_p
        self.blur_sigma, self.pil_blur, self.ratio = tuple(blur_sigma), bool(pil_blur), tuple(ratio)

    @property
    def num_crops(self) -> int:
        return len(self.crops)

    def sample_crop(self, width: int, height: int, size: int, scale: tuple[float, float],
                    rng: np.random.Generator) -> CropParams:
        """Draw one crop's parameters for a ``width`` x ``height`` source."""
        box = random_resized_crop_box(width, height, scale, self.ratio, rng)
        jitter, order = None, (0, 1, 2, 3)
        if rng.random() < self.jitter_p:
            b, c, s, h = self.jitter
            order = tuple(int(i) for i in rng.permutation(4))
            jitter = (float(rng.uniform(max(0.0, 1 - b), 1 + b)), float(rng.uniform(max(0.0, 1 - c), 1 + c)),
                      float(rng.uniform(max(0.0, 1 - s), 1 + s)), float(rng.uniform(-h, h)))
        grey = bool(rng.random() < self.grey_p)
        sigma = float(rng.uniform(*self.blur_sigma)) if rng.random() < self.blur_p else None
        flip = bool(rng.random() < self.flip_p)
        return CropParams(size, box, jitter, order, grey, sigma, flip)

    def sample(self, width: int, height: int, rng: np.random.Generator) -> list[CropParams]:
        """Parameters of every crop, in output order (global crops first)."""
        return [self.sample_crop(width, height, size, scale, rng) for size, scale in self.crops]

    def render(self, img: Image.Image, p: CropParams) -> np.ndarray:
        """Apply one crop's parameters to an RGB PIL image; returns uint8 (S, S, 3)."""
        out = img.resize((p.size, p.size), Image.BILINEAR, box=p.box)
        if p.jitter is not None:
            for op in p.order:
                out = _COLOUR_OPS[op](out, p.jitter[op])
        if p.grey:
            out = out.convert("L").convert("RGB")
        if p.blur_sigma is not None:
            if self.pil_blur:
                out = out.filter(ImageFilter.GaussianBlur(p.blur_sigma))
            else:
                out = Image.fromarray(gaussian_blur(np.asarray(out), p.blur_sigma))
        if p.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out)

    def __call__(self, img, rng: np.random.Generator) -> list[np.ndarray]:
        """All crops of one image.

        Args:
            img: PIL image, uint8 (H, W[, 3]) array or encoded bytes.
            rng: this image's generator (one per image; never shared across a batch).
        Returns:
            ``num_crops`` uint8 arrays (S_i, S_i, 3), global crops first.
        """
        pil = to_pil(img)
        return [self.render(pil, p) for p in self.sample(pil.width, pil.height, rng)]

    @staticmethod
    def as_columns(crops: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Crops -> row columns ``view1``, ``view2``, ``crop1`` ... ``cropN`` (the extra crops).

        :func:`fra.engine.batch_views` reads ``view1``, ``view2`` and a ``crops`` list; a collate
        builds that list from ``crop1`` ... ``cropN`` in order.
        """
        cols = {"view1": crops[0], "view2": crops[1]}
        cols.update({f"crop{i}": c for i, c in enumerate(crops[2:], start=1)})
        return cols


def crop_area_fraction(p: CropParams, width: int, height: int) -> float:
    """Fraction of the source area a crop covers (for checking scale ranges)."""
    left, top, right, bottom = p.box
    return (right - left) * (bottom - top) / float(width * height)


__all__ = ["FRL_MEAN", "FRL_STD", "CropParams", "MultiCropTransform", "gaussian_blur", "crop_area_fraction"]
