"""Image bytes -> RGB uint8 arrays: simplejpeg for JPEG, Pillow for everything else.

Decoding is strict: a truncated or corrupt file raises :class:`CorruptImageError` (a
:class:`~fra.errors.DataError`) instead of returning a half-grey image, so the shard writer
can skip it and the streaming pipeline can drop and count it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from fra.errors import DataError

try:  # simplejpeg is a declared dependency; the fallback keeps a broken wheel from being fatal
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG"
# A decompression-bomb guard: larger images are certainly not face crops.
MAX_PIXELS = 64_000_000


class CorruptImageError(DataError):
    """The bytes are not a complete, decodable image."""


def image_format(data: bytes) -> str:
    """Sniff the container format from the magic bytes: ``jpeg``, ``png`` or ``other``."""
    if data[:2] == JPEG_MAGIC:
        return "jpeg"
    if data[:4] == PNG_MAGIC:
        return "png"
    return "other"


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to an RGB array.

    Args:
        data: encoded image (JPEG, PNG, or anything Pillow reads).

    Returns:
        uint8 array (H, W, 3).

    Raises:
        CorruptImageError: empty, truncated, corrupt or unrecognised data.
    """
    if not data:
        raise CorruptImageError("empty image data")
    if simplejpeg is not None and data[:2] == JPEG_MAGIC:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as exc:
            msg = str(exc)
            # libjpeg-turbo cannot convert some colour spaces (e.g. CMYK/YCCK); Pillow can.
            # Corrupt/truncated data is reported as such and not retried.
            if "Premature end" in msg or "Corrupt" in msg or "subsampling" in msg:
                raise CorruptImageError(f"corrupt JPEG: {msg}") from exc
    return np.asarray(_pil_open(data).convert("RGB"))


def decode_pil(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB :class:`PIL.Image.Image` (same checks as :func:`decode_image`)."""
    if data[:2] == JPEG_MAGIC and simplejpeg is not None:
        return Image.fromarray(decode_image(data))
    return _pil_open(data).convert("RGB")


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a single-channel label mask (PNG) to uint8 (H, W)."""
    im = _pil_open(data)
    if im.mode not in ("L", "P"):
        im = im.convert("L")
    return np.asarray(im)


def image_info(data: bytes) -> tuple[str, int, int]:
    """Fully decode ``data`` once to prove it is good.

    Returns:
        (format, width, height).

    Raises:
        CorruptImageError: the data does not decode completely.
    """
    arr = decode_image(data)
    return image_format(data), int(arr.shape[1]), int(arr.shape[0])


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 (H, W, 3) array as a baseline 4:2:0 JPEG."""
    image = np.ascontiguousarray(image)
    if simplejpeg is not None and image.ndim == 3 and image.shape[2] == 3:
        return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB", colorsubsampling="420")
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) or (H, W, 3) array losslessly as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _pil_open(data: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > MAX_PIXELS:
            raise CorruptImageError(f"image too large: {im.width}x{im.height}")
        im.load()  # forces the full decode; raises on truncation (LOAD_TRUNCATED_IMAGES is off)
    except CorruptImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"cannot decode image: {exc}") from exc
    return im
