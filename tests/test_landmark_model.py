"""Face-alignment building blocks against hand calculations: STAR / AWing losses, decoders, the crop transform."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fra.data.landmark_augment import LandmarkTransform, flip_permutation, invert_points
from fra.losses.landmarks import AWingLoss, LandmarkLoss, STARLoss, gaussian_maps
from fra.models.landmarks import LandmarkNet, argmax_subpixel, soft_argmax, to_pixels, to_unit


def test_star_loss_by_hand():
    # Half the mass at grid x = -1 and half at x = +1 (middle row of a 3x3 map): mean (0, 0); the
    # unbiased weighted variance along x is 1 / (V1 - V2 / V1), V1 = 1 + 1e-5, V2 = 0.5 + 1e-5; along y 0.
    maps = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    maps[0, 0, 1, 0] = maps[0, 0, 1, 2] = 0.5
    target = torch.tensor([[[0.1, 0.02]]], dtype=torch.float64)
    v1, v2 = 1 + 1e-5, 0.5 + 1e-5
    lam = 1 / (v1 - v2 / v1)
    # smooth-L1 (s = 0.01) of the error along each axis, over sqrt(eigenvalue + 1e-5), + |eigenvalues|
    expected = (0.02 - 0.005) / math.sqrt(0 + 1e-5) + (0.1 - 0.005) / math.sqrt(lam + 1e-5) + lam
    assert STARLoss()(maps, target).item() == pytest.approx(expected, rel=1e-6)
    # inside the smooth-L1 knee: 0.5 d^2 / s
    small = torch.tensor([[[0.004, 0.0]]], dtype=torch.float64)
    assert STARLoss(w=0.0)(maps, small).item() == pytest.approx(0.5 * 0.004**2 / 0.01 / math.sqrt(lam + 1e-5), rel=1e-6)


def test_awing_by_hand():
    awing = AWingLoss(weighted=False)
    # |y - p| = 0.8 >= theta = 0.5: A d - C with power alpha - y = 1.1, theta / epsilon = 0.5:
    # A = 14 / (1 + 0.5^1.1) * 1.1 * 0.5^0.1 = 9.7978, C = 0.5 A - 14 ln(1 + 0.5^1.1) = -0.4617 -> 8.2999
    one = awing(torch.tensor([[[[0.2]]]]), torch.tensor([[[[1.0]]]])).item()
    a = 14 / (1 + 0.5**1.1) * 1.1 * 0.5**0.1
    assert one == pytest.approx(a * 0.8 - (0.5 * a - 14 * math.log(1 + 0.5**1.1)), rel=1e-5)
    assert one == pytest.approx(8.2999, abs=1e-3)
    # |y - p| = 0.1 < theta: omega ln(1 + d^(alpha - y)) with y = 0
    assert awing(torch.tensor([[[[0.1]]]]), torch.zeros(1, 1, 1, 1)).item() == pytest.approx(
        14 * math.log(1 + 0.1**2.1), rel=1e-5)
    # STAR's weight map: 1 + 10 where maxpool3x3(target) >= 0.2
    weighted = AWingLoss()(torch.tensor([[[[0.2]]]]), torch.tensor([[[[1.0]]]])).item()
    assert weighted == pytest.approx(11 * one, rel=1e-5)


def test_decoders_find_a_gaussian():
    point = torch.tensor([[[0.25, -0.5]]])
    maps = gaussian_maps(point, 33, 1.5)
    assert soft_argmax(maps) == pytest.approx(point, abs=1e-3)  # symmetric mass about the centre
    # the arg-max pixel is 20.625 -> 21 (x: 0.25 -> pixel 20), moved a quarter pixel towards the larger side
    x_px, y_px = (0.25 + 1) * 32 / 2, (-0.5 + 1) * 32 / 2  # 20.0, 8.0 exactly on the grid
    got = argmax_subpixel(maps)[0, 0]
    assert got[0].item() * 16 + 16 == pytest.approx(x_px, abs=0.26) and got[1].item() * 16 + 16 == pytest.approx(y_px, abs=0.26)
    assert to_pixels(to_unit(torch.tensor([3.0, 60.5]), 64), 64).tolist() == pytest.approx([3.0, 60.5])


def test_transform_moves_pixels_and_points_together():
    # a single bright source pixel at (5, 7), crop 4x up: the point goes to 4 (5 - 8) + 31.5 = 19.5,
    # 4 (7 - 8) + 31.5 = 27.5, and the upsampled pixel is centred there (equal values at 19 / 20, 27 / 28)
    img = np.zeros((16, 16, 3), np.uint8)
    img[7, 5] = 255
    out, pts, m = LandmarkTransform(64, box_scale=1.0)(Image.fromarray(img), np.array([[5.0, 7.0]]), (0, 0, 16, 16))
    assert pts.tolist() == [[19.5, 27.5]]
    red = out[..., 0].astype(int)
    assert red[27, 19] == red[27, 20] == red[28, 19] == red[28, 20] == red.max()
    np.testing.assert_allclose(invert_points(pts, m), [[5.0, 7.0]], atol=1e-5)


def test_flip_renumbers_points_by_the_permutation():
    perm = flip_permutation(3, [(0, 2)])
    assert perm.tolist() == [2, 1, 0]
    t = LandmarkTransform(32, train=True, box_scale=1.0, flip_perm=tuple(perm), flip_p=1.0, rotation=0.0, scale=0.0,
                          shift=0.0)
    src = np.array([[4.0, 10.0], [16.0, 12.0], [28.0, 10.0]])  # left eye, nose, right eye
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    _, pts, m = t(img, src, (-0.5, -0.5, 31.5, 31.5), np.random.default_rng(0))  # centred on the image
    # mirrored: x' = 31 - x, and point 0 (the new image-left eye) is the old point 2 mirrored
    assert pts.tolist() == [[31 - 28.0, 10.0], [31 - 16.0, 12.0], [31 - 4.0, 10.0]]


def test_model_output_shapes_and_loss_backward():
    torch.manual_seed(0)
    model = LandmarkNet("resnet18", 5, channels=16)
    out = model(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, 5, 16, 16) for k in ("fused", "heat", "point")}
    for kind in ("star", "awing", "l2"):
        loss = LandmarkLoss(kind, 64)(model(torch.randn(2, 3, 64, 64)), torch.rand(2, 5, 2) - 0.5)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="unknown landmark loss"):
        LandmarkLoss("wing")
