"""Per-image augmentation: the FRA two-view pretraining transform and the FER transforms.

Both follow the reference (FRA_SPEC §8, §9) op for op, with each image drawing its own random
parameters from a ``numpy.random.Generator``. Outputs are uint8 (S, S, 3); normalisation
(:func:`normalize_batch`) happens on the trainer side, on the batch.

# NOTE: speed-ups that keep the statistics of the reference (DATA_NOTES §3, path "f"):
#  * ColorJitter's four ops (in their random order) and RandomGrayscale are affine maps of the
#    RGB vector, so they are composed into one 3x4 matrix applied by ``Image.convert``; contrast
#    uses the grey mean the reference would see (propagated analytically). Differences: no
#    clamping between sub-ops, and hue is a rotation about the grey axis instead of the HSV
#    hexagon shift (see :func:`colour_matrix`);
#  * blur: the reference calls PIL's ``GaussianBlur(radius=sigma)``, which approximates a Gaussian
#    of std sigma with three box passes and costs ~1.7 ms at 224 px whatever sigma is (half of
#    the whole transform). We compute the Gaussian it approximates with OpenCV (separable
#    kernel, 2*ceil(4 sigma)+1 taps, reflect-101 borders, as torchvision's gaussian_blur):
#    0.06-0.3 ms. Mean |difference| to PIL's output 0.2-0.9 grey levels; mean |change| made by
#    the blur within 3 % of PIL's for sigma >= 1; below 1 PIL's boxes are off the Gaussian (no
#    blur at 0.2, 4 % of it at 0.3, 60 % at 0.4, 110-115 % at 0.6-0.7).
#    The blur is always applied to the output-size view, as the reference does (resize, then
#    blur): blurring an upsampled crop before the upsampling, with sigma scaled to crop pixels,
#    left small sigmas without any effect (a 3-tap Gaussian of std 0.25 is the identity);
#  * when the crop is upsampled, the colour matrix is applied to the crop before the resize
#    (pointwise, so it commutes with the resize up to rounding), and a crop upsampled in both
#    directions is resized by OpenCV's bilinear (same sampling grid as PIL's for upsampling,
#    within 1 grey level, 7x cheaper); downsampling keeps PIL's antialiased resize.
#    ``backend="pil"`` runs the reference's ops in the reference's order (crop, PIL resize,
#    colour, PIL blur at the output size), bit for bit where the colour ops are not drawn.
# tests/test_augment.py checks per-op rates, ranges and view statistics against torchvision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from fra.data.decode import decode_pil

VGGFACE2_MEAN = (0.5231, 0.4044, 0.3489)
VGGFACE2_STD = (0.2536, 0.2194, 0.2070)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SOLARIZE_TABLE = np.array([i if i < 128 else 255 - i for i in range(256)], np.uint8)  # Solarize(128)


@dataclass(frozen=True)
class ViewParams:
    """The random draw behind one view (enough to co-transform a mask or a box).

    Attributes:
        box: crop (left, top, right, bottom) in source pixels.
        flip: horizontal flip applied after the crop.
        jitter: (brightness, contrast, saturation, hue) factors, or None if not applied.
        order: the order (indices into ``jitter``) in which the sub-ops are applied.
        grey: RandomGrayscale fired.
        blur_sigma: Gaussian blur sigma in output pixels, or None.
        solarize: solarisation fired.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[float, float, float, float] | None
    order: tuple[int, ...]
    grey: bool
    blur_sigma: float | None
    solarize: bool


def to_pil(img) -> Image.Image:
    """Accept a PIL image, a uint8 (H, W[, 3]) array or encoded bytes; return RGB PIL."""
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    if isinstance(img, (bytes, bytearray, memoryview)):
        return decode_pil(bytes(img))
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def random_resized_crop_box(width: int, height: int, scale, ratio, rng: np.random.Generator):
    """torchvision ``RandomResizedCrop.get_params``: (left, top, right, bottom)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height  # fallback: the largest central crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class TwoViewTransform:
    """FRA/BYOL asymmetric two-view augmentation (FRA_SPEC §8), uint8 out.

    Per view: RandomResizedCrop(S, scale, ratio 3/4-4/3, bilinear) -> HFlip(0.5) ->
    ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 -> RandomGrayscale(0.2) -> GaussianBlur
    (sigma ~ U(0.1, 2.0), p = 1.0 / 0.1) -> Solarize(128, p = 0.0 / 0.2).

    Args:
        image_size: output side S.
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        jitter: ColorJitter (brightness, contrast, saturation, hue).
        jitter_p: probability of applying the jitter.
        grey_p: RandomGrayscale probability.
        blur_p: blur probability for view 1 and view 2.
        blur_sigma: blur sigma range (output pixels).
        solarize_p: solarize probability for view 1 and view 2.
        flip_p: horizontal flip probability.
        backend: ``"opencv"`` (fast: OpenCV's true Gaussian blur, and OpenCV's bilinear resize
            when the crop is upsampled in both directions) or ``"pil"`` (the reference's PIL
            ``resize`` and ``GaussianBlur`` in the reference's order, bit for bit).
    """

    def __init__(
        self,
        image_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grey_p: float = 0.2,
        blur_p: tuple[float, float] = (1.0, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: tuple[float, float] = (0.0, 0.2),
        flip_p: float = 0.5,
        backend: str = "opencv",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.image_size = int(image_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.jitter, self.jitter_p, self.grey_p = tuple(jitter), jitter_p, grey_p
        self.blur_p, self.blur_sigma = tuple(blur_p), tuple(blur_sigma)
        self.solarize_p, self.flip_p = tuple(solarize_p), flip_p

    def sample_view(self, width: int, height: int, view: int, rng: np.random.Generator) -> ViewParams:
        """Draw the parameters of view 0 or 1 for a ``width`` x ``height`` source."""
        box = random_resized_crop_box(width, height, self.scale, self.ratio, rng)
        flip = bool(rng.random() < self.flip_p)
        jitter, order = None, (0, 1, 2, 3)
        if rng.random() < self.jitter_p:
            b, c, s, h = self.jitter
            order = tuple(int(i) for i in rng.permutation(4))
            jitter = (
                float(rng.uniform(max(0.0, 1 - b), 1 + b)),
                float(rng.uniform(max(0.0, 1 - c), 1 + c)),
                float(rng.uniform(max(0.0, 1 - s), 1 + s)),
                float(rng.uniform(-h, h)),
            )
        grey = bool(rng.random() < self.grey_p)
        sigma = float(rng.uniform(*self.blur_sigma)) if rng.random() < self.blur_p[view] else None
        solarize = bool(rng.random() < self.solarize_p[view])
        return ViewParams(box, flip, jitter, order, grey, sigma, solarize)

    def sample(self, width: int, height: int, rng: np.random.Generator) -> tuple[ViewParams, ViewParams]:
        """Draw both views' parameters (view 1 first, then view 2)."""
        return self.sample_view(width, height, 0, rng), self.sample_view(width, height, 1, rng)

    def render(self, img: Image.Image, p: ViewParams) -> np.ndarray:
        """Apply one view's parameters to an RGB PIL image; returns uint8 (S, S, 3), C-contiguous."""
        return np.ascontiguousarray(self.render_array(img, p))

    def render_array(self, img: Image.Image, p: ViewParams) -> np.ndarray:
        """:meth:`render` without the final copy: may return a flipped view of the array (lets
        callers copy it straight into a batch)."""
        size = self.image_size
        left, top, right, bottom = p.box
        w, h = right - left, bottom - top
        crop = img.crop(p.box)  # torchvision's resized_crop on PIL: crop, then resize
        if self.backend == "opencv" and w * h < size * size:
            # NOTE: the colour matrix is pointwise, so on an upsampled crop it is applied before the
            # resize, on fewer pixels; it commutes with the (linear) resize up to rounding.
            matrix = _view_matrix(crop, p)
            if matrix is not None:
                crop = crop.convert("RGB", matrix)
            if w <= size and h <= size:  # pure upsampling: OpenCV's bilinear = PIL's, +-1 level
                arr = _cv2().resize(np.asarray(crop), (size, size), interpolation=_cv2().INTER_LINEAR)
            else:
                arr = np.asarray(crop.resize((size, size), Image.BILINEAR))
            if p.blur_sigma is not None:  # the reference blurs the output-size view
                arr = gaussian_blur_array(arr, p.blur_sigma)
        else:  # the reference's order: resize, colour, blur at the output size
            out = crop.resize((size, size), Image.BILINEAR)
            matrix = _view_matrix(out, p)
            if matrix is not None:
                out = out.convert("RGB", matrix)
            if p.blur_sigma is not None:
                out = self._blur(out, p.blur_sigma)
            arr = np.asarray(out)
        if p.solarize:
            arr = _SOLARIZE_TABLE[arr]
        if p.flip:
            arr = arr[:, ::-1]
        return arr

    def render_geometry(self, img: Image.Image | np.ndarray, p: ViewParams, out: np.ndarray | None = None) -> np.ndarray:
        """Only the geometric part of a view: crop, resize to S and flip, uint8 (S, S, 3).

        The worker half of ``data.augment_on: device``: the per-pixel ops (jitter, greyscale,
        blur, solarise) are applied later, batched, by :mod:`fra.data.device_augment` from
        :func:`photometric_row` of the same ``p``. Same resize choice as :meth:`render`'s
        ``opencv`` backend: OpenCV's bilinear when the crop is upsampled in both directions, else
        PIL's antialiased bilinear on the crop (``backend="pil"``: always PIL).

        Args:
            img: the RGB source, a PIL image or a uint8 (H, W, 3) array (cheaper: a decoded
                array needs no conversion to PIL, and only a downsampled crop is converted).
            p: the view's parameters (:meth:`sample_view`).
            out: optional C-contiguous uint8 (S, S, 3) destination (e.g. a row of a batch): the
                resize and the flip write into it, with no extra copy.
        Returns:
            ``out`` when given, else a new array (possibly a flipped view).
        """
        size, cv2 = self.image_size, _cv2()
        left, top, right, bottom = p.box
        arr = img if isinstance(img, np.ndarray) else None
        if self.backend == "opencv" and right - left <= size and bottom - top <= size:
            src = np.asarray(img) if arr is None else arr
            res = cv2.resize(src[top:bottom, left:right], (size, size), dst=out, interpolation=cv2.INTER_LINEAR)
        else:
            # crop, then resize (torchvision's resized_crop): the antialiasing filter sees no pixel outside the box
            crop = img.crop(p.box) if arr is None else Image.fromarray(np.ascontiguousarray(arr[top:bottom, left:right]))
            res = np.asarray(crop.resize((size, size), Image.BILINEAR))
            if out is not None:
                out[...] = res
                res = out
        if not p.flip:
            return res
        return cv2.flip(res, 1, dst=res) if out is not None else res[:, ::-1]

    def _blur(self, img: Image.Image, sigma: float) -> Image.Image:
        if self.backend == "pil":
            return gaussian_blur_pil(img, sigma)
        return Image.fromarray(gaussian_blur_array(np.asarray(img), sigma))

    def render_mask(self, mask: Image.Image | np.ndarray, p: ViewParams) -> np.ndarray:
        """Co-transform a label mask (same crop and flip, nearest); returns uint8 (S, S)."""
        m = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, np.uint8))
        out = m.resize((self.image_size, self.image_size), Image.NEAREST, box=p.box)
        if p.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out)

    def __call__(self, img, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Two views of one image.

        Args:
            img: PIL image, uint8 (H, W[, 3]) array, or encoded bytes.
            rng: the generator for this image (one per image; never shared across a batch).

        Returns:
            (view1, view2), each uint8 (S, S, 3).
        """
        pil = to_pil(img)
        p1, p2 = self.sample(pil.width, pil.height, rng)
        return self.render(pil, p1), self.render(pil, p2)

    def views_with_params(self, img, rng: np.random.Generator, mask=None) -> dict:
        """Like ``__call__`` but also returns the parameters and, if given, the two masks.

        Returns:
            ``{"view1", "view2", "params1", "params2"}`` plus ``"mask1", "mask2"`` (uint8
            (S, S)) when ``mask`` is given. Same random draws as ``__call__``.
        """
        pil = to_pil(img)
        p1, p2 = self.sample(pil.width, pil.height, rng)
        out = {"view1": self.render(pil, p1), "view2": self.render(pil, p2), "params1": p1, "params2": p2}
        if mask is not None:
            out["mask1"], out["mask2"] = self.render_mask(mask, p1), self.render_mask(mask, p2)
        return out


# Columns of :func:`photometric_row` (the per-view parameter table of ``data.augment_on: device``).
PHOTOMETRIC_COLUMNS = ("jitter", "brightness", "contrast", "saturation", "hue", "order0", "order1", "order2",
                       "order3", "grey", "blur_sigma", "solarize")


def photometric_row(p: ViewParams) -> np.ndarray:
    """The per-pixel part of a view's parameters as float32 (12,) (:data:`PHOTOMETRIC_COLUMNS`).

    ``jitter`` is 1.0 when ColorJitter fired (then brightness ... hue are its factors and
    ``order0`` ... ``order3`` the sub-op order, 0 brightness, 1 contrast, 2 saturation, 3 hue),
    else 0.0 with identity factors; ``grey`` and ``solarize`` are 0/1; ``blur_sigma`` is 0.0
    for no blur. :class:`fra.data.device_augment.DeviceAugment` applies the row to a batch.
    """
    jitter = p.jitter if p.jitter is not None else (1.0, 1.0, 1.0, 0.0)
    return np.array([float(p.jitter is not None), *jitter, *p.order, float(p.grey),
                     p.blur_sigma if p.blur_sigma is not None else 0.0, float(p.solarize)], np.float32)


def gaussian_blur_array(img: np.ndarray, sigma_x: float, sigma_y: float | None = None) -> np.ndarray:
    """Gaussian blur of std ``sigma_x`` (horizontal) / ``sigma_y`` (vertical) pixels, uint8 (H, W, 3).

    OpenCV's fixed-point separable filter with ``2*ceil(4 sigma)+1`` taps and reflect-101 borders
    (torchvision's ``gaussian_blur`` padding). One OpenCV thread: parallelism comes from Ray tasks.
    """
    cv2 = _cv2()
    sigma_y = sigma_x if sigma_y is None else sigma_y
    kx, ky = 2 * math.ceil(4 * sigma_x) + 1, 2 * math.ceil(4 * sigma_y) + 1
    return cv2.GaussianBlur(np.ascontiguousarray(img), (kx, ky), sigmaX=sigma_x, sigmaY=sigma_y,
                            borderType=cv2.BORDER_REFLECT_101)


def gaussian_blur_pil(img: Image.Image, sigma_x: float, sigma_y: float | None = None) -> Image.Image:
    """The reference's blur: PIL ``ImageFilter.GaussianBlur(radius=(sigma_x, sigma_y))``."""
    return img.filter(ImageFilter.GaussianBlur((sigma_x, sigma_x if sigma_y is None else sigma_y)))


BACKENDS = ("opencv", "pil")
_CV2 = None


def _cv2():
    global _CV2
    if _CV2 is None:
        import cv2

        cv2.setNumThreads(1)
        _CV2 = cv2
    return _CV2


def _view_matrix(img: Image.Image, p: ViewParams) -> tuple[float, ...] | None:
    """The fused jitter (+ grey) colour matrix of a view for ``img``, or None for the identity."""
    if p.jitter is None and not p.grey:
        return None
    a, t = np.eye(3), np.zeros(3)
    if p.jitter is not None:
        mean = _mean_rgb(img) if p.jitter[1] != 1.0 else None
        a, t = colour_affine(p.jitter, p.order, mean)
    if p.grey:
        a, t = np.outer(np.ones(3), _LUMA) @ a, np.full(3, _LUMA @ t)
    return tuple(np.concatenate([a, t[:, None]], axis=1).ravel().tolist())


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, what PIL's convert("L") uses
_LEVELS = np.arange(256, dtype=np.float64)


def _mean_rgb(img: Image.Image) -> np.ndarray:
    """Per-channel mean of an RGB image (``ImageStat.Stat(img).mean`` without its Python loop)."""
    hist = np.asarray(img.histogram(), dtype=np.float64).reshape(3, 256)
    return hist @ _LEVELS / hist.sum(axis=1)


def colour_affine(jitter, order, mean_rgb=None) -> tuple[np.ndarray, np.ndarray]:
    """ColorJitter as one affine map ``x -> A x + t`` of the RGB vector (0-255 scale).

    Sub-ops as in torchvision/PIL: brightness ``f x``; contrast ``f x + (1 - f) m`` with ``m``
    the rounded grey mean of the image at that point; saturation ``f x + (1 - f) luma(x)``;
    hue a rotation by ``2 pi h`` about the grey axis (approximates the HSV hue shift).

    Args:
        jitter: (brightness, contrast, saturation, hue) factors.
        order: sub-op order, indices into ``jitter``.
        mean_rgb: mean RGB of the input image; needed when contrast != 1.

    Returns:
        (A (3, 3), t (3,)).
    """
    b, c, s, h = jitter
    a, t = np.eye(3), np.zeros(3)
    for op in order:
        if op == 0:
            m, k = b * np.eye(3), 0.0
        elif op == 1:
            grey = math.floor(_LUMA @ (a @ np.asarray(mean_rgb, float) + t) + 0.5)
            m, k = c * np.eye(3), (1 - c) * grey
        elif op == 2:
            m, k = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _LUMA), 0.0
        else:
            m, k = _hue_rotation(h), 0.0
        a, t = m @ a, m @ t + k
    return a, t


def _hue_rotation(h: float) -> np.ndarray:
    """Rotation of RGB space by ``2 pi h`` about the (1, 1, 1) axis (Rodrigues)."""
    theta = 2 * math.pi * h
    cos, sin, k = math.cos(theta), math.sin(theta), 1 / math.sqrt(3)
    cross = np.array([[0, -k, k], [k, 0, -k], [-k, k, 0]])
    return cos * np.eye(3) + sin * cross + (1 - cos) * np.full((3, 3), 1 / 3)


class FERTransform:
    """FER fine-tune / linear-probe transforms (FRA_SPEC §9), uint8 out.

    train: Resize((S, S)) -> HFlip(0.5) -> ColorJitter(0.5, 0.5, 0.5) p=0.5 -> RandomAffine(0,
    translate=(0.2, 0.2)) p=0.5 -> RandomRotation(10) p=0.5 -> RandomErasing(p=0.5, scale
    (0.02, 0.33), ratio (0.3, 3.3)). eval: Resize((S, S)).

    # NOTE: RandomErasing happens HERE, not on the trainer. The reference erases the normalised
    # tensor with value 0, i.e. with the normalisation mean; we fill with round(255 * mean), which
    # normalises to within 0.5/255/std (< 0.01) of 0. The trainer only normalises.

    Args:
        image_size: output side S.
        train: training (random) or evaluation (resize only) transform.
        mean: normalisation mean of the dataset (the erasing fill colour).
    """

    def __init__(
        self,
        image_size: int = 224,
        train: bool = True,
        jitter: tuple[float, float, float] = (0.5, 0.5, 0.5),
        jitter_p: float = 0.5,
        translate: float = 0.2,
        translate_p: float = 0.5,
        degrees: float = 10.0,
        rotate_p: float = 0.5,
        flip_p: float = 0.5,
        erase_p: float = 0.5,
        erase_scale: tuple[float, float] = (0.02, 0.33),
        erase_ratio: tuple[float, float] = (0.3, 3.3),
        mean: tuple[float, float, float] = VGGFACE2_MEAN,
    ):
        self.image_size, self.train = int(image_size), bool(train)
        self.jitter, self.jitter_p = tuple(jitter), jitter_p
        self.translate, self.translate_p = translate, translate_p
        self.degrees, self.rotate_p, self.flip_p = degrees, rotate_p, flip_p
        self.erase_p, self.erase_scale, self.erase_ratio = erase_p, tuple(erase_scale), tuple(erase_ratio)
        self.fill = tuple(int(round(255 * v)) for v in mean)

    def __call__(self, img, rng: np.random.Generator | None = None) -> np.ndarray:
        """Transform one image (PIL, uint8 array or bytes) to uint8 (S, S, 3)."""
        size = self.image_size
        out = to_pil(img).resize((size, size), Image.BILINEAR)
        if not self.train:
            return np.asarray(out)
        if rng is None:
            raise ValueError("FERTransform(train=True) needs a numpy Generator")
        if rng.random() < self.flip_p:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < self.jitter_p:
            b, c, s = self.jitter
            order = tuple(int(i) for i in rng.permutation(3))
            factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), 0.0)
            a, t = colour_affine(factors, order, _mean_rgb(out))
            out = out.convert("RGB", tuple(np.concatenate([a, t[:, None]], axis=1).ravel().tolist()))
        if rng.random() < self.translate_p:
            max_d = self.translate * size
            shift = (int(round(rng.uniform(-max_d, max_d))), int(round(rng.uniform(-max_d, max_d))))
            out = out.rotate(0, Image.NEAREST, translate=shift, fillcolor=(0, 0, 0))
        if rng.random() < self.rotate_p:
            out = out.rotate(float(rng.uniform(-self.degrees, self.degrees)), Image.NEAREST, fillcolor=(0, 0, 0))
        arr = np.asarray(out)
        if rng.random() < self.erase_p:
            box = _erase_box(size, size, self.erase_scale, self.erase_ratio, rng)
            if box is not None:
                arr = arr.copy()
                i, j, h, w = box
                arr[i : i + h, j : j + w] = self.fill
        return arr


def _erase_box(height: int, width: int, scale, ratio, rng: np.random.Generator):
    """torchvision ``RandomErasing.get_params``: (top, left, h, w) or None."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        erase_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def normalize_batch(batch, mean=VGGFACE2_MEAN, std=VGGFACE2_STD):
    """uint8 (B, 3, S, S) tensor -> float32, ``(x / 255 - mean) / std`` (trainer side, any device)."""
    import torch

    x = batch.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


__all__ = [
    "VGGFACE2_MEAN",
    "VGGFACE2_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ViewParams",
    "TwoViewTransform",
    "FERTransform",
    "normalize_batch",
    "random_resized_crop_box",
    "colour_affine",
    "to_pil",
    "PHOTOMETRIC_COLUMNS",
    "photometric_row",
]
