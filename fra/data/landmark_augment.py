"""Geometry-aware face-alignment transform: box crop with jitter, rotation, scale and a landmark-aware flip.

Every output is one similarity (plus an optional mirror) ``crop = M @ [x, y, 1]`` from source
pixels to crop pixels (pixel centres at integers), applied to the image (PIL, bilinear, black
border) and to the points alike, so they cannot disagree. The crop is a square of side
``box_scale * max(w, h)`` centred on the face box (HRNet's 1.25 x scale convention).

Training draws (STAR's ``augmentation.py`` magnitudes, DOWNSTREAM_SPEC §2): flip with p = 0.5 (the
points are mirrored and renumbered by the dataset's flip permutation), rotation ~ N(0, 18 deg),
scale ~ N(1, 0.1), shift ~ N(0, 0.05) of the crop side per axis (box jitter).
NOTE: draws are clipped at 2.5 standard deviations (the reference's are not) so a rare draw cannot
turn the face out of the crop; STAR's photometric draws (occlusion, blur, gamma, noise, grey) are not
applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fra.errors import DataError


def flip_permutation(num_points: int, pairs) -> np.ndarray:
    """Index map of a horizontal flip: point i of the mirrored face is point perm[i] of the original."""
    perm = np.arange(num_points)
    for a, b in pairs or ():
        if not (0 <= a < num_points and 0 <= b < num_points):
            raise DataError(f"flip pair ({a}, {b}) outside the {num_points} points")
        perm[a], perm[b] = b, a
    return perm


@dataclass(frozen=True)
class LandmarkTransform:
    """Crop (and, when training, randomly transform) a face and its points.

    Args:
        size: crop side S in pixels.
        train: draw a random flip / rotation / scale / shift; else the plain box crop.
        box_scale: crop side = box_scale x max(box w, box h).
        flip_perm: :func:`flip_permutation` of the dataset (None: never flip).
        rotation: standard deviation of the rotation, degrees.
        scale: standard deviation of the scale factor.
        shift: standard deviation of the shift, as a fraction of the crop side.
        flip_p: flip probability.
        clip: draws are clipped at this many standard deviations.
    """

    size: int
    train: bool = False
    box_scale: float = 1.25
    flip_perm: tuple[int, ...] | None = None
    rotation: float = 18.0
    scale: float = 0.1
    shift: float = 0.05
    flip_p: float = 0.5
    clip: float = 2.5

    def matrix(self, box, rng: np.random.Generator | None = None) -> tuple[np.ndarray, bool]:
        """(M (2, 3) source -> crop pixels, flipped)."""
        x0, y0, x1, y1 = (float(v) for v in box)
        side = self.box_scale * max(x1 - x0, y1 - y0)
        if not side > 0:
            raise DataError(f"empty face box {tuple(box)}")
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        angle, factor, flip = 0.0, 1.0, False
        if self.train and rng is not None:
            def draw(std: float) -> float:
                return float(np.clip(rng.normal(0.0, 1.0), -self.clip, self.clip)) * std

            flip = self.flip_perm is not None and rng.random() < self.flip_p
            angle = math.radians(draw(self.rotation))
            factor = 1.0 + draw(self.scale)
            cx += draw(self.shift) * side
            cy += draw(self.shift) * side
        k = self.size / (side / factor)
        c, s = math.cos(angle) * k, math.sin(angle) * k
        half = (self.size - 1) / 2.0
        m = np.array([[c, -s, half - c * cx + s * cy], [s, c, half - s * cx - c * cy]], np.float64)
        if flip:  # x' = S - 1 - x in the crop
            m = np.array([[-1.0, 0.0, self.size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
        return m, flip

    def __call__(self, img: Image.Image, points: np.ndarray, box, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crop ``img`` and map ``points`` (L, 2) source pixels.

        Returns:
            image uint8 (S, S, 3); points float32 (L, 2) in crop pixels (renumbered when flipped);
            M float32 (2, 3) source -> crop (invert it to map predictions back).
        """
        m, flip = self.matrix(box, rng)
        inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
        # PIL maps output pixel centres (x + 0.5) to input coordinates whose pixel centres are at + 0.5 too.
        inv[:, 2] += 0.5 - 0.5 * inv[:, :2].sum(axis=1)
        out = img.convert("RGB").transform((self.size, self.size), Image.AFFINE, tuple(inv.ravel()),
                                           resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        pts = np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]
        if flip:
            pts = pts[np.asarray(self.flip_perm)]
        return np.asarray(out, np.uint8), pts.astype(np.float32), m.astype(np.float32)


def invert_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map (..., L, 2) crop pixels back to source pixels through the inverse of (..., 2, 3) ``matrix``."""
    m = np.asarray(matrix, np.float64)
    a, t = m[..., :2], m[..., 2]
    ainv = np.linalg.inv(a)
    return np.einsum("...ij,...lj->...li", ainv, np.asarray(points, np.float64) - t[..., None, :])


__all__ = ["LandmarkTransform", "flip_permutation", "invert_points"]
