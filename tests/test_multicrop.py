"""FRL multi-crop transform: shapes, scale ranges, per-image randomness, op parity (numpy/PIL only)."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fra.data.multicrop import FRL_STD, MultiCropTransform, crop_area_fraction, gaussian_blur


def _image(h=120, w=100, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("sizes,counts", [((64, 32), (2, 3)), ((48,), (2,)), ((56, 24, 16), (2, 2, 1))])
def test_shapes_and_order(sizes, counts):
    t = MultiCropTransform(sizes, counts, (0.14,) * len(sizes), (1.0,) * len(sizes))
    crops = t(_image(), np.random.default_rng(0))
    expected = [s for s, n in zip(sizes, counts) for _ in range(n)]
    assert t.num_crops == len(crops) == sum(counts)
    assert [c.shape for c in crops] == [(s, s, 3) for s in expected]
    assert all(c.dtype == np.uint8 for c in crops)
    cols = MultiCropTransform.as_columns(crops)
    assert list(cols) == ["view1", "view2"] + [f"crop{i}" for i in range(1, len(crops) - 1)]
    # also takes PIL images and encoded bytes; the same generator gives the same crops
    pil = Image.fromarray(_image())
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    for source in (pil, buf.getvalue()):
        assert all(np.array_equal(a, b) for a, b in zip(t(source, np.random.default_rng(0)), crops))


def test_frl_defaults():
    t = MultiCropTransform()
    assert [size for size, _ in t.crops] == [224, 224] + [96] * 6
    assert [scale for _, scale in t.crops] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    assert t.jitter == (0.8, 0.8, 0.8, 0.2) and FRL_STD[0] == 0.228


def test_scale_ranges_and_probabilities():
    t = MultiCropTransform()
    rng = np.random.default_rng(1)
    w, h = 200, 240
    params = [t.sample(w, h, rng) for _ in range(400)]
    for group, (lo, hi) in ((slice(0, 2), (0.14, 1.0)), (slice(2, 8), (0.05, 0.14))):
        areas = np.array([crop_area_fraction(p, w, h) for ps in params for p in ps[group]])
        # integer rounding of the crop sides moves the area by a few percent at most
        assert areas.min() >= lo * 0.95 and areas.max() <= hi * 1.05
        assert areas.min() < lo + 0.1 * (hi - lo) and areas.max() > hi - 0.1 * (hi - lo)  # range is used
    flat = [p for ps in params for p in ps]
    n = len(flat)
    assert abs(sum(p.jitter is not None for p in flat) / n - 0.8) < 0.03
    assert abs(sum(p.grey for p in flat) / n - 0.2) < 0.03
    assert abs(sum(p.blur_sigma is not None for p in flat) / n - 0.5) < 0.03
    assert abs(sum(p.flip for p in flat) / n - 0.5) < 0.03
    jit = np.array([p.jitter for p in flat if p.jitter is not None])
    assert jit[:, :3].min() >= 0.2 and jit[:, :3].max() <= 1.8 and np.abs(jit[:, 3]).max() <= 0.2
    sig = [p.blur_sigma for p in flat if p.blur_sigma is not None]
    assert min(sig) >= 0.1 and max(sig) <= 2.0


def test_per_image_parameters_differ_and_are_reproducible():
    t = MultiCropTransform((48, 24), (2, 2), (0.14, 0.05), (1.0, 0.14))
    img = _image()
    a = t.sample(100, 120, np.random.default_rng([0, 1]))
    b = t.sample(100, 120, np.random.default_rng([0, 2]))
    assert [p.box for p in a] != [p.box for p in b]
    assert len({p.box for p in a}) == len(a)  # the crops of one image differ too
    same1 = t(img, np.random.default_rng(7))
    same2 = t(img, np.random.default_rng(7))
    other = t(img, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(same1, same2))
    assert not all(np.array_equal(x, y) for x, y in zip(same1, other))


def test_colour_ops_match_torchvision_pil():
    tf = pytest.importorskip("torchvision.transforms.functional")
    from fra.data.multicrop import _COLOUR_OPS

    img = Image.fromarray(_image(40, 40, seed=3))
    ref = (tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation, tf.adjust_hue)
    for op, factor in zip(range(4), (1.6, 0.3, 1.7, -0.17)):
        assert np.array_equal(np.asarray(_COLOUR_OPS[op](img, factor)), np.asarray(ref[op](img, factor)))


def test_blur_is_the_23_tap_gaussian_with_reflect101_borders():
    ndimage = pytest.importorskip("scipy.ndimage")
    img = _image(30, 26, seed=4)
    sigma = 1.7
    x = np.arange(-11, 12)
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    ref = np.stack([ndimage.correlate(img[..., c].astype(np.float64), np.outer(k, k), mode="mirror")
                    for c in range(3)], axis=-1)
    d = np.abs(gaussian_blur(img, sigma).astype(np.float64) - ref)  # OpenCV's uint8 path is fixed point
    assert d.max() <= 1.5 and d.mean() <= 0.35, (d.max(), d.mean())


def test_bad_arguments_and_no_torch_import():
    with pytest.raises(ValueError, match="same length"):
        MultiCropTransform((224, 96), (2,), (0.1, 0.1), (1.0, 1.0))
    with pytest.raises(ValueError, match="at least 2"):
        MultiCropTransform((224,), (1,), (0.1,), (1.0,))
    code = "import sys, fra.data.multicrop; assert not {'torch', 'ray', 'mlflow'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
