"""Region-awareness score: chance on random maps, ~1 on ground-truth maps, Hungarian matching, NMI."""
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fra.data.synthetic import PARTS, SyntheticFaces
from fra.errors import DataError
from fra.evaluation.region_score import nmi, oracle_labels, region_awareness, render_masks, score_model

SPEC = SyntheticFaces(num_identities=20, images_per_identity=2, size=112)


@pytest.fixture(scope="module")
def masks():
    return render_masks(SPEC, 8, 112)[1]  # (8, 112, 112), held-out identities


def _gt_heatmaps(masks, perm=None, extra_queries=0):
    """One-hot of the mask, Gaussian-smoothed (3x3), softmax at temperature 0.1: (N, K, H, W)."""
    onehot = F.one_hot(torch.from_numpy(masks).long(), len(PARTS)).permute(0, 3, 1, 2).float()
    if perm is not None:
        onehot = onehot[:, perm]  # query k shows part perm[k]
    onehot = torch.cat([onehot, torch.zeros(onehot.shape[0], extra_queries, *onehot.shape[2:])], dim=1)
    k = onehot.shape[1]
    g = torch.tensor([1.0, 2.0, 1.0])
    g = torch.outer(g, g) / 16
    smooth = F.conv2d(F.pad(onehot, (1, 1, 1, 1), mode="replicate"), g.expand(k, 1, 3, 3), groups=k)
    return (smooth / 0.1).softmax(dim=1)


def test_ground_truth_maps_score_near_one(masks):
    out = region_awareness(_gt_heatmaps(masks, extra_queries=1), masks)
    assert out["miou"] > 0.95 and out["nmi"] > 0.95
    assert out["num_queries"] == 8 and out["num_parts_scored"] == 6  # background ignored
    assert out["matching"] == {name: i for i, name in enumerate(PARTS) if i > 0}
    assert out["random_miou"] < 0.2 and out["random_nmi"] < 0.15
    with_bg = region_awareness(_gt_heatmaps(masks), masks, ignore_background=False)
    assert with_bg["num_parts_scored"] == 7 and with_bg["miou"] > 0.95 and "background" in with_bg["matching"]


def test_random_maps_score_at_chance(masks):
    g = torch.Generator().manual_seed(123)
    heat = torch.randn(len(masks), 8, 4, 4, generator=g).softmax(dim=1)  # a 4x4 grid, like 128 px / 32
    out = region_awareness(heat, masks, seed=0)
    assert abs(out["miou"] - out["random_miou"]) < 0.05
    assert abs(out["nmi"] - out["random_nmi"]) < 0.05 and out["nmi"] < 0.15
    gt = region_awareness(_gt_heatmaps(masks), masks)
    assert gt["miou"] > out["miou"] + 0.7


def test_hungarian_matching_recovers_a_permutation(masks):
    perm = [3, 6, 0, 5, 1, 4, 2]  # query k <- part perm[k]
    out = region_awareness(_gt_heatmaps(masks, perm), masks)
    assert out["matching"] == {PARTS[p]: k for k, p in enumerate(perm) if p != 0}
    assert out["miou"] > 0.95
    # numpy inputs; the order of queries only changes how argmax breaks exact ties at part borders
    ref = region_awareness(_gt_heatmaps(masks).numpy(), masks)
    assert out["miou"] == pytest.approx(ref["miou"], abs=0.01) and out["nmi"] == pytest.approx(ref["nmi"], abs=0.01)


def test_nmi_bounds_and_hand_cases():
    assert nmi(np.array([[5, 0], [0, 7]])) == pytest.approx(1.0)
    assert nmi(np.array([[0, 5, 0], [4, 0, 0], [0, 0, 9]])) == pytest.approx(1.0)  # relabelled
    assert nmi(np.array([[3, 3], [3, 3]])) == pytest.approx(0.0, abs=1e-12)  # independent
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = nmi(rng.integers(0, 50, (rng.integers(1, 9), rng.integers(1, 8))))
        assert 0.0 <= v <= 1.0


def test_rejects_bad_inputs(masks):
    with pytest.raises(ValueError, match="expected"):
        region_awareness(torch.rand(2, 4, 7, 7), masks)
    with pytest.raises(ValueError, match="labels"):
        region_awareness(torch.rand(8, 4, 7, 7), masks + 7)


@pytest.fixture(scope="module")
def masks128():
    """48 held-out aligned-pose faces at 128 px (a 4 x 4 map at stride 32)."""
    spec = SyntheticFaces(num_identities=120, images_per_identity=2, size=64)
    return render_masks(spec, 48, 128)[1]


def _block_majority(masks: np.ndarray, cells: int) -> np.ndarray:
    """(N, cells, cells) majority non-background part of each (S / cells)-pixel block, 0 if none."""
    n, size, _ = masks.shape
    b = size // cells
    blocks = masks.reshape(n, cells, b, cells, b).transpose(0, 1, 3, 2, 4).reshape(n, cells, cells, b * b)
    counts = np.stack([(blocks == p).sum(-1) for p in range(len(PARTS))], axis=-1)
    counts[..., 0] = 0  # background pixels are not scored
    best = counts.argmax(-1)
    return np.where(counts.max(-1) > 0, best, 0)


@pytest.mark.slow
def test_anchors_collapsed_is_0_oracle_is_1_random_maps_about_0(masks128):
    """The normalised score (model - floor) / (oracle - floor), with the floor a collapsed map and
    the oracle each 4 x 4 cell's majority part, both computed here by hand."""
    n, k = len(masks128), 4
    collapsed = torch.zeros(n, k, 4, 4)
    collapsed[:, 2] = 1.0  # one query everywhere
    out = region_awareness(collapsed.softmax(dim=1), masks128, grid=(4, 4))
    assert out["nmi"] == pytest.approx(0.0, abs=1e-12) and out["floor_nmi"] == pytest.approx(0.0, abs=1e-12)
    assert out["norm_nmi"] == pytest.approx(0.0, abs=1e-9) and out["norm_miou"] == pytest.approx(0.0, abs=1e-9)
    # the oracle as heat maps: one-hot of each cell's majority part, upsampled as any heat map
    major = torch.from_numpy(_block_majority(masks128, 4)).long()
    assert torch.equal(oracle_labels(masks128, (4, 4))[:, 16::32, 16::32], major)  # block centres
    onehot = F.one_hot(major, len(PARTS)).permute(0, 3, 1, 2).float()
    best = region_awareness((onehot / 0.01).softmax(dim=1), masks128, grid=(4, 4))
    assert best["nmi"] == pytest.approx(best["oracle_nmi"], abs=1e-9)
    assert best["norm_nmi"] == pytest.approx(1.0, abs=1e-9) and best["norm_miou"] == pytest.approx(1.0, abs=1e-9)
    # random 4 x 4 maps: NMI at the collapsed floor; their mIoU falls *below* a collapsed map's
    for seed in (1, 2):
        heat = torch.randn(n, k, 4, 4, generator=torch.Generator().manual_seed(seed)).softmax(dim=1)
        rand = region_awareness(heat, masks128, grid=(4, 4), seed=seed)
        assert abs(rand["norm_nmi"]) < 0.05 and abs(rand["random_norm_nmi"]) < 0.05, rand["norm_nmi"]
        assert rand["norm_miou"] < 0.0
    # at 64 px (a 2 x 2 map) even the oracle tells little apart (issue 18: NMI ~0.08)
    coarse = render_masks(SyntheticFaces(num_identities=120, images_per_identity=2, size=64), 48, 64)[1]
    assert region_awareness(collapsed[..., :2, :2], coarse, grid=(2, 2))["oracle_nmi"] < best["oracle_nmi"] / 2


def test_score_model_with_random_init_baseline():
    from fra.config import ModelConfig
    from fra.data.augment import VGGFACE2_MEAN, VGGFACE2_STD
    from fra.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", hidden_dim=32, num_proto=4, dropout=0.0))
    out = score_model(model, SPEC, n_images=4, image_size=64, mean=VGGFACE2_MEAN, std=VGGFACE2_STD,
                      baseline=True, batch_size=2)
    for key in ("miou", "best_iou", "nmi", "random_miou", "random_nmi", "init_miou", "init_nmi"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["num_queries"] == 4 and out["n_images"] == 4 and out["mode"] == "batch"  # as training
    assert out["score_size"] == 128 and out["grid"] == [4, 4]  # 64 px training: scored on 128 px faces
    assert out["gain_norm_nmi"] == pytest.approx(out["norm_nmi"] - out["init_norm_nmi"])
    assert 0.0 <= out["oracle_nmi"] <= 1.0 and out["floor_nmi"] == 0.0
    assert model.training  # compute_heatmaps restores the mode
    with pytest.raises(DataError, match="no region heat maps"):
        score_model(SimpleNamespace(cfg=ModelConfig(method="byol")), SPEC, 4, 64, VGGFACE2_MEAN, VGGFACE2_STD)


@pytest.mark.slow
def test_new_modules_import_no_ray_or_mlflow():
    mods = "fra.evaluation.region_score, fra.models.swav, fra.losses.swav, fra.data.multicrop"
    code = f"import sys, {mods}; bad = {{'ray', 'mlflow'}} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
