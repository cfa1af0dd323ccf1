"""Procedural synthetic faces: a labelled stand-in for VGGFace2 / RAF-DB that needs no files.

Each image comes with a 7-class expression label, a 7-part segmentation mask and 5 landmarks.
A dataset is just a range of seeds (:class:`SyntheticFaces`); the same arguments always give the
same pixels. Design and measurements: ``DATA_NOTES.md`` section 2. Only numpy and PIL are used, so
this module is safe to import in light processes (no torch).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fra.data.synthetic_render import (
    CLOTHES_LABEL, EXPRESSIONS, IBUG68_FLIP_PAIRS, LANDMARKS, PARTS, Canvas, draw_head, expression_params, ibug68,
    identity,
)
from fra.data import synthetic_attributes as _attrs
from fra.errors import DataError

__all__ = ["EXPRESSIONS", "PARTS", "LANDMARKS", "LANDMARK_SETS", "IBUG68_FLIP_PAIRS", "identity", "render", "SyntheticFaces",
           "contact_sheet", "write_image_folder"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# "five": the 5 ArcFace points (LANDMARKS); "ibug68": the 68 iBUG / 300W points on the same face.
LANDMARK_SETS = ("five", "ibug68")


_FG_LUT = [0] + [255] * 255  # every drawn label (clothes included) is foreground
_LABEL_LUT = np.arange(256, dtype=np.uint8)
_LABEL_LUT[CLOTHES_LABEL] = 0
_NOISE_SEED = 20261123
_NOISE_PAD = 32


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    """Unit Gaussian noise, (size + pad, size + pad, 3); cropping at random offsets is far cheaper
    than drawing fresh normals per image, and a fixed seed keeps it deterministic."""
    rng = np.random.default_rng(_NOISE_SEED)
    return rng.standard_normal((size + _NOISE_PAD, size + _NOISE_PAD, 3), dtype=np.float32)


def _background(rng: np.random.Generator, side: int, clutter: bool) -> Image.Image:
    """A vertical two-colour gradient, plus 4-13 random rectangles, ellipses and lines if cluttered."""
    c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None]
    column = (c0 + (c1 - c0) * t).astype(np.uint8)[:, None, :]
    img = Image.fromarray(column).resize((side, side), Image.Resampling.NEAREST)
    if clutter:
        draw = ImageDraw.Draw(img)
        # One draw for all shapes: kind, x0, y0, x1, y1, r, g, b, line width; corners may lie a
        # little outside the image so shapes get cut by its border.
        shapes = rng.random((int(rng.integers(4, 14)), 9))
        for kind, *corners, red, green, blue, width in shapes.tolist():
            x0, y0, x1, y1 = ((v * 1.2 - 0.1) * side for v in corners)
            colour = (int(red * 255.99), int(green * 255.99), int(blue * 255.99))
            if kind < 2 / 3:
                box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
                (draw.rectangle if kind < 1 / 3 else draw.ellipse)(box, fill=colour)
            else:
                draw.line((x0, y0, x1, y1), fill=colour, width=max(1, int((0.005 + 0.035 * width) * side)))
    return img


def _lighting(side: int, size: int, inverse: np.ndarray, offset: np.ndarray, ident: dict,
              light: np.ndarray, ambient: float) -> np.ndarray:
    """Lambertian shading of a head-sized ellipsoid: (size, size) float32 in [0, 1].

    Computed on a grid at 1/4 of the supersampled resolution and upsampled to the output size;
    shading is smooth, so finer grids only cost time.

    Outside the ellipsoid the normal is taken on its silhouette, so hair and ears get a plausible
    side-lit gradient instead of a hard edge.
    """
    m = max(8, side // 4)
    g = (np.arange(m, dtype=np.float64) + 0.5) * (side / m) - 0.5
    gx, gy = np.meshgrid(g - offset[0], g - offset[1])
    ux = inverse[0, 0] * gx + inverse[0, 1] * gy
    uy = inverse[1, 0] * gx + inverse[1, 1] * gy
    fw = ident["face_w"]
    nx = ux / (fw * 1.15)
    # Capping ny treats the neck as a cylinder facing the camera rather than the underside of
    # the head, which would leave it in full shadow whenever the light comes from above.
    ny = np.minimum((uy + 0.1) / (fw * ident["face_ratio"] * 1.15), 0.75)
    r2 = nx * nx + ny * ny
    outside = r2 > 1.0
    scale = np.where(outside, 1.0 / np.sqrt(np.maximum(r2, 1e-9)), 1.0)
    nz = np.sqrt(np.clip(1.0 - r2, 0.0, None))
    lambert = np.clip(nx * scale * light[0] + ny * scale * light[1] + nz * light[2], 0.0, 1.0)
    shade = (ambient + (1.0 - ambient) * lambert) * 255.0
    small = Image.fromarray(shade.astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def render(ident: dict, expression: int, rng: np.random.Generator, size: int = 112, ss: int = 2,
           clutter: bool = True, intensity: tuple[float, float] = (0.6, 1.1), jitter: float = 0.08,
           landmark_set: str = "five") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one face of ``ident`` showing ``expression`` in a random pose, light and background.

    The number of draws taken from ``rng`` before the background does not depend on the
    expression, so two renders from equally seeded generators differ only in the face features.

    Args:
        ident: parameters from :func:`identity`.
        expression: class index into :data:`EXPRESSIONS`.
        rng: the only source of randomness.
        size: output side in pixels (>= 16).
        ss: supersampling factor; shapes are drawn at ``size * ss`` and box-filtered down.
        clutter: draw random shapes over the background gradient.
        intensity: range of the expression strength (1 = the table's value); lower is harder.
        jitter: standard deviation of Gaussian noise added to each expression parameter.
        landmark_set: ``five`` or ``ibug68`` (:data:`LANDMARK_SETS`); the pixels do not depend on it.

    Returns:
        image (size, size, 3) uint8; mask (size, size) uint8 with values indexing :data:`PARTS`;
        landmarks (5, 2) float32 ``(x, y)`` in pixels (pixel centres at integers), in
        :data:`LANDMARKS` order, or (68, 2) in the iBUG order for ``ibug68``.
    """
    if landmark_set not in LANDMARK_SETS:
        raise DataError(f"landmark_set must be one of {LANDMARK_SETS}, got {landmark_set!r}")
    image, mask, points = _render(ident, expression, rng, size, ss, clutter, intensity, jitter)
    return image, mask, points[landmark_set]


def _render(ident: dict, expression: int, rng: np.random.Generator, size: int, ss: int, clutter: bool,
            intensity: tuple[float, float], jitter: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`render` with every landmark set: ``{"five": (5, 2), "ibug68": (68, 2)}``."""
    _check_render_args(size, ss, intensity, jitter)
    side = size * ss
    params = expression_params(expression, rng, intensity, jitter)
    roll = math.radians(rng.uniform(-25.0, 25.0))
    scale = rng.uniform(0.8, 1.15)
    shift = rng.uniform(-0.1, 0.1, 2)
    yaw = rng.uniform(-0.4, 0.4)
    azimuth, elevation, ambient = rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 1.1), rng.uniform(0.35, 0.6)
    blur, radius = rng.random() < 0.3, rng.uniform(0.4, 1.1) * size / 112
    gain = rng.uniform(0.7, 1.2)
    sigma = rng.uniform(2.0, 9.0) if rng.random() < 0.6 else 0.0
    noise_at = rng.integers(0, _NOISE_PAD + 1, 2)
    background = _background(rng, side, clutter)

    # One affine, face units -> supersampled pixels, used for shapes, shading and landmarks alike.
    k = 0.27 * side * scale
    matrix = k * np.array([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
    offset = side * (0.5 + shift) - 0.5
    canvas = Canvas(side, matrix, offset, ident["skin"])
    points = draw_head(canvas, ident, params, yaw)

    light = np.array([math.sin(elevation) * math.cos(azimuth), math.sin(elevation) * math.sin(azimuth),
                      math.cos(elevation)])
    foreground = canvas.label.point(_FG_LUT)
    img = Image.composite(canvas.rgb, background, foreground)
    if ss > 1:
        img, foreground = img.reduce(ss), foreground.reduce(ss)
    # Shading applies to the head only; at output resolution the reduced foreground is a soft
    # coverage map, so edge pixels get the matching share of it. This is 4x cheaper than shading
    # the supersampled layer and identical up to the box filter.
    shade = _lighting(side, size, np.linalg.inv(matrix), offset, ident, light, ambient)
    coverage = np.asarray(foreground, dtype=np.float32) / 255.0
    factor = 1.0 - coverage * (1.0 - shade)
    if blur:
        img = Image.fromarray((np.asarray(img, dtype=np.float32) * factor[..., None]).astype(np.uint8))
        img = img.filter(ImageFilter.GaussianBlur(radius))
        factor = np.ones_like(factor)
    pixels = np.asarray(img, dtype=np.float32) * (factor * gain)[..., None]
    if sigma > 0:
        oy, ox = (int(v) for v in noise_at)
        pixels += _noise_bank(size)[oy:oy + size, ox:ox + size] * sigma
    image = np.clip(pixels, 0.0, 255.0).astype(np.uint8)
    # Labels are point-sampled (never averaged) at the centre of each output pixel's footprint.
    mask = _LABEL_LUT[np.asarray(canvas.label)[ss // 2::ss, ss // 2::ss]]
    sets = {"five": points, "ibug68": ibug68(canvas.marks)}
    return image, mask, {k: ((v @ matrix.T + offset - (ss - 1) / 2.0) / ss).astype(np.float32) for k, v in sets.items()}


def _check_render_args(size, ss, intensity, jitter) -> None:
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise DataError(f"size must be an int >= 16, got {size!r}")
    if not isinstance(ss, (int, np.integer)) or ss < 1:
        raise DataError(f"ss (supersampling) must be an int >= 1, got {ss!r}")
    if len(intensity) != 2 or not 0.0 <= intensity[0] <= intensity[1]:
        raise DataError(f"intensity must be (low, high) with 0 <= low <= high, got {intensity!r}")
    if not jitter >= 0.0:
        raise DataError(f"jitter must be >= 0, got {jitter!r}")


@functools.lru_cache(maxsize=4096)
def _per_identity(seed: int, identity_id: int) -> tuple[dict, tuple[int, ...]]:
    """Identity parameters and expression order of one identity (a pure memo: every identity is
    rendered many times and these cost about a tenth of a render)."""
    params_seed = np.random.SeedSequence([seed, identity_id], spawn_key=(1,)).generate_state(1)[0]
    order = np.random.default_rng(np.random.SeedSequence([seed, identity_id], spawn_key=(2,)))
    return identity(int(params_seed)), tuple(int(v) for v in order.permutation(len(EXPRESSIONS)))


@dataclass(frozen=True)
class SyntheticFaces:
    """A dataset that is just a range of seeds; no files.

    Identities ``0 .. num_identities - 1`` are split into contiguous, disjoint train / val / test
    ranges by ``split_fractions``. Every identity shows the 7 expressions in turn (a per-identity
    permutation of ``index % 7``), so classes are balanced. The person comes from
    ``(seed, identity)``; everything else about sample ``(identity, index)`` (expression strength,
    pose, light, background, noise) from ``np.random.default_rng([seed, identity, index])``.
    """

    num_identities: int = 1000
    images_per_identity: int = 20
    size: int = 112
    seed: int = 0
    intensity: tuple[float, float] = (0.6, 1.1)
    jitter: float = 0.08
    clutter: bool = True
    split_fractions: tuple[float, float, float] = (0.8, 0.0, 0.2)
    align: bool = False  # similarity-align on the 5 landmarks, like RAF-DB's aligned crops
    landmark_set: str = "five"  # LANDMARK_SETS: the points a sample carries
    glasses: float = 0.0  # probability that an image wears glasses (fra.data.synthetic_attributes); 0 = none

    def __post_init__(self):
        for name in ("num_identities", "images_per_identity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DataError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise DataError(f"seed must be a non-negative int, got {self.seed!r}")
        _check_render_args(self.size, 1, tuple(self.intensity), self.jitter)
        if self.landmark_set not in LANDMARK_SETS:
            raise DataError(f"landmark_set must be one of {LANDMARK_SETS}, got {self.landmark_set!r}")
        if isinstance(self.glasses, bool) or not 0.0 <= float(self.glasses) <= 1.0:
            raise DataError(f"glasses must be a probability in [0, 1], got {self.glasses!r}")
        try:
            fractions = tuple(float(f) for f in self.split_fractions)
        except (TypeError, ValueError):
            fractions = ()
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise DataError(f"split_fractions must be 3 non-negative numbers summing to 1, "
                            f"got {self.split_fractions!r}")
        # YAML gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "split_fractions", fractions)
        object.__setattr__(self, "intensity", tuple(float(v) for v in self.intensity))

    def _bounds(self, split: str) -> tuple[int, int]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        n_train = round(self.split_fractions[0] * self.num_identities)
        n_val = min(round(self.split_fractions[1] * self.num_identities), self.num_identities - n_train)
        edges = (0, n_train, n_train + n_val, self.num_identities)
        i = SPLITS.index(split)
        return edges[i], edges[i + 1]

    def identities(self, split: str) -> list[int]:
        """Identity ids of ``split`` ("train", "val" or "test"); the three are disjoint."""
        return list(range(*self._bounds(split)))

    def split_size(self, split: str) -> int:
        """Number of images in ``split``."""
        lo, hi = self._bounds(split)
        return (hi - lo) * self.images_per_identity

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def label(self, identity_id: int, index: int) -> int:
        """Expression class of sample ``(identity_id, index)``, without rendering it."""
        return _per_identity(self.seed, int(identity_id))[1][index % len(EXPRESSIONS)]

    def identity_params(self, identity_id: int) -> dict:
        """The :func:`identity` parameters of ``identity_id`` in this dataset."""
        return dict(_per_identity(self.seed, int(identity_id))[0])

    def sample(self, identity_id: int, index: int) -> dict:
        """Render sample ``(identity_id, index)``; the same arguments always give the same pixels.

        Returns:
            ``{"image": uint8 (H, W, 3), "mask": uint8 (H, W), "landmarks": float32 (5, 2) or (68, 2),
            "label": int, "identity": int, "index": int}``.
        """
        if not 0 <= identity_id < self.num_identities:
            raise DataError(f"identity_id must be in [0, {self.num_identities}), got {identity_id!r}")
        if not 0 <= index < self.images_per_identity:
            raise DataError(f"index must be in [0, {self.images_per_identity}), got {index!r}")
        label = self.label(identity_id, index)
        rng = np.random.default_rng([self.seed, identity_id, index])
        image, mask, points = _render(self.identity_params(identity_id), label, rng, self.size, 2, self.clutter,
                                      self.intensity, self.jitter)
        landmarks = points[self.landmark_set]
        if _attrs.glasses_draw(self.seed, identity_id, index, self.glasses):
            image = _attrs.draw_glasses(image, points["five"][:2])
        if self.align:
            image, mask, landmarks = align_face(image, mask, points["five"], landmarks)
        return {"image": image, "mask": mask, "landmarks": landmarks, "label": label,
                "identity": int(identity_id), "index": int(index)}

    def annotations(self, identity_id: int, index: int) -> tuple[tuple[float, ...], tuple[float, float]]:
        """(attribute flags, (valence, arousal)) of sample ``(identity_id, index)`` without rendering
        it (:mod:`fra.data.synthetic_attributes`; names: ``attribute_names(self.glasses > 0)``)."""
        label = self.label(identity_id, index)
        scene = _attrs.scene_draws(label, np.random.default_rng([self.seed, identity_id, index]), self.intensity,
                                   self.jitter)
        wears = _attrs.glasses_draw(self.seed, identity_id, index, self.glasses) if self.glasses > 0 else None
        return (_attrs.attributes(self.identity_params(identity_id), scene, wears),
                _attrs.valence_arousal(label, scene, self.intensity))

    def iter_split(self, split: str) -> Iterator[dict]:
        """Yield the sample dict of every image of ``split``, identity by identity."""
        for identity_id in self.identities(split):
            for index in range(self.images_per_identity):
                yield self.sample(identity_id, index)


# The 5-point template of 112x112 aligned face crops (eyes, nose tip, mouth corners), in
# fractions of the side: the ArcFace / InsightFace convention RAF-DB-style aligned sets follow.
ALIGN_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64) / 112.0


def align_face(image: np.ndarray, mask: np.ndarray, landmarks: np.ndarray, carry: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity-align a face on its 5 landmarks to :data:`ALIGN_TEMPLATE` (same output size).

    Least-squares rotation + uniform scale + translation mapping the landmarks onto the
    template; the image is resampled bilinearly, the part mask with nearest neighbour.

    Args:
        image: uint8 (S, S, 3); mask: uint8 (S, S); landmarks: (5, 2) pixel coordinates.
        carry: other (K, 2) points to map into the aligned frame instead of ``landmarks``.
    Returns:
        (image, mask, landmarks or carry) in the aligned frame.
    """
    side = image.shape[0]
    dst = ALIGN_TEMPLATE * side
    src = np.asarray(landmarks, dtype=np.float64)
    # Output pixel (x, y) samples the source at (a x - b y + tx, b x + a y + ty): solve for the
    # inverse map template -> source directly, which is what PIL's AFFINE transform takes.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.asarray(rows), np.asarray(rhs), rcond=None)[0]
    coeffs = (a, -b, tx, b, a, ty)
    out = np.asarray(Image.fromarray(image).transform((side, side), Image.AFFINE, coeffs, Image.BILINEAR))
    out_mask = np.asarray(Image.fromarray(mask).transform((side, side), Image.AFFINE, coeffs, Image.NEAREST))
    # Forward map of the landmarks: invert [[a, -b], [b, a]].
    det = a * a + b * b
    d = (src if carry is None else np.asarray(carry, dtype=np.float64)) - np.array([tx, ty])
    lm = np.stack([(a * d[:, 0] + b * d[:, 1]) / det, (-b * d[:, 0] + a * d[:, 1]) / det], axis=1)
    return out, out_mask, lm.astype(np.float32)


# Mask colours for people looking at contact sheets, indexed like PARTS.
_PART_COLOURS = np.array(
    [[24, 24, 24], [236, 190, 150], [140, 70, 10], [30, 120, 255], [40, 200, 60], [230, 30, 40],
     [170, 40, 200]], dtype=np.uint8)
_SHEET_COLUMNS = 8


def _mask_tile(sample: dict) -> Image.Image:
    tile = Image.fromarray(_PART_COLOURS[np.minimum(sample["mask"], len(PARTS) - 1)])
    draw = ImageDraw.Draw(tile)
    r = max(1.0, tile.width / 64)
    for x, y in sample["landmarks"].tolist():
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 0))
    draw.text((2, tile.height - 12), EXPRESSIONS[sample["label"]], fill=(255, 255, 255))
    return tile


def contact_sheet(path, n: int = 32, size: int = 112, seed: int = 0, with_masks: bool = True) -> str:
    """Write a PNG grid of faces (and colour-coded masks + landmark dots beside them) for a person to look at.

    Sample k is identity k, image k, so identities and expressions both vary across the sheet.
    The grid has ``min(n, 8)`` columns and ``ceil(n / 8)`` rows; each cell is ``size`` square,
    or ``2 * size`` wide when ``with_masks`` (face on the left, mask with its label on the right).

    Returns:
        The path written, as a string.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n must be a positive int, got {n!r}")
    spec = SyntheticFaces(num_identities=n, images_per_identity=n, size=size, seed=seed)
    cols, rows = min(n, _SHEET_COLUMNS), math.ceil(n / _SHEET_COLUMNS)
    cell_w = size * (2 if with_masks else 1)
    sheet = Image.new("RGB", (cols * cell_w, rows * size), (255, 255, 255))
    for k in range(n):
        sample = spec.sample(k, k)
        x, y = (k % cols) * cell_w, (k // cols) * size
        sheet.paste(Image.fromarray(sample["image"]), (x, y))
        if with_masks:
            sheet.paste(_mask_tile(sample), (x + size, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return str(path)


_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}


def write_image_folder(root, spec: SyntheticFaces, split: str, fmt: str = "jpg", quality: int = 90) -> int:
    """Write a class-per-folder tree root/<expression_name>/<identity>_<index>.jpg; returns the count.

    Each file is written under a temporary name and renamed, so an interrupted run never leaves a
    truncated image behind. All 7 class folders are created even if a split is empty.

    Args:
        root: output directory (created if missing).
        spec: the dataset to render.
        split: "train", "val" or "test".
        fmt: "jpg" (or "jpeg") or "png".
        quality: JPEG quality, 1-95.
    """
    if fmt not in _FORMATS:
        raise DataError(f"unknown image format {fmt!r}; expected one of {', '.join(_FORMATS)}")
    if not 1 <= int(quality) <= 95:
        raise DataError(f"JPEG quality must be in [1, 95], got {quality!r}")
    root = Path(root)
    for name in EXPRESSIONS:
        (root / name).mkdir(parents=True, exist_ok=True)
    options = {"quality": int(quality)} if _FORMATS[fmt] == "JPEG" else {}
    count = 0
    for sample in spec.iter_split(split):
        final = root / EXPRESSIONS[sample["label"]] / f"{sample['identity']}_{sample['index']}.{fmt}"
        tmp = final.with_name(f".{final.name}.tmp")
        Image.fromarray(sample["image"]).save(tmp, format=_FORMATS[fmt], **options)
        os.replace(tmp, final)
        count += 1
        if count % 1000 == 0:
            logger.info("wrote %d / %d images to %s", count, spec.split_size(split), root)
    logger.info("wrote %d %s images of split %r to %s", count, fmt, split, root)
    return count
