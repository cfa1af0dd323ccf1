"""Region-awareness score: do the K heat maps line up with facial parts?

FRA claims its queries learn "facial regions". On synthetic faces we have the ground-truth
part masks, so we can measure it: the argmax of the heat maps (over K, upsampled to mask size)
is a label map, compared with the part labels over the whole scored set (a query means the
same region in every image):

* ``miou``: Hungarian matching (``scipy.optimize.linear_sum_assignment``) of queries to parts
  on the pooled IoU matrix, mean IoU over the matched pairs; ``best_iou`` is each query's best
  part IoU (no one-to-one constraint), averaged over queries;
* ``nmi``: normalised mutual information between the two label maps (arithmetic-mean
  normalisation, as scikit-learn's default), in [0, 1];
* ``random_*``: the same numbers for random heat maps (softmax of Gaussian noise at the
  heat maps' own resolution, upsampled the same way): the chance level;
* anchors at the heat maps' own grid (``grid``, the backbone map's h x w): the ``floor_*`` of a
  collapsed map (one query everywhere) and the ``oracle_*`` ceiling of a map that gives each
  cell its majority part (one label per part), and the normalised scores
  ``norm_nmi`` / ``norm_miou`` = (model - floor) / (oracle - floor): 0 for a collapsed map,
  1 for the oracle. NMI is the headline: a collapsed map has NMI 0 and random maps ~0, whereas
  its mIoU sits *above* random maps' (one query covering all the skin matches it well), so
  ``norm_miou`` of random maps is negative. ``norm_miou`` uses ``miou_parts`` (unmatched parts
  count 0), so a model with fewer queries than scored parts cannot reach 1.

# NOTE: a 64 px input gives ResNet a 2 x 2 map, where even the oracle reaches NMI ~0.08: nothing
# can be told apart. :func:`score_model` therefore scores at an input of at least
# ``32 * min_cells`` px (faces upsampled if need be), in the heat-map mode training uses.

No Ray / MLflow imports: the evaluation orchestration layer calls these functions.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

from fra.data.synthetic import PARTS, SyntheticFaces
from fra.errors import DataError


def label_map(heatmaps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Heat maps (N, K, h, w) -> argmax region labels (N, H, W), bilinear upsampling first."""
    heat = heatmaps.float()
    if tuple(heat.shape[-2:]) != tuple(size):
        heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)
    return heat.argmax(dim=1)


def contingency(regions: torch.Tensor, masks: torch.Tensor, num_queries: int, num_parts: int,
                ignore_background: bool = True) -> np.ndarray:
    """Pixel counts ``table[k, p]`` = #pixels in region k and part p, pooled over images.

    Args:
        regions: (N, H, W) region labels in [0, K).
        masks: (N, H, W) part labels in [0, P).
        ignore_background: drop pixels whose part is 0 (background).
    Returns:
        int64 (K, P).
    """
    r = regions.reshape(-1).long().cpu()
    m = masks.reshape(-1).long().cpu()
    if ignore_background:
        keep = m != 0
        r, m = r[keep], m[keep]
    counts = torch.bincount(r * num_parts + m, minlength=num_queries * num_parts)
    return counts.reshape(num_queries, num_parts).numpy().astype(np.int64)


def matched_iou(table: np.ndarray) -> tuple[float, list[tuple[int, int]], np.ndarray]:
    """Hungarian matching of queries (rows) to parts (columns) maximising total IoU.

    Args:
        table: (K, P) contingency counts over the scored parts only.
    Returns:
        (mean IoU over the min(K, P) matched pairs, [(query, part column)], IoU matrix (K, P)).
    """
    t = table.astype(np.float64)
    union = t.sum(axis=1, keepdims=True) + t.sum(axis=0, keepdims=True) - t
    iou = np.divide(t, union, out=np.zeros_like(t), where=union > 0)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    pairs = [(int(r), int(c)) for r, c in zip(rows, cols)]
    return float(iou[rows, cols].mean()) if pairs else 0.0, pairs, iou


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information ``I(A; M) / ((H(A) + H(M)) / 2)`` from a contingency table."""
    t = table.astype(np.float64)
    n = t.sum()
    if n == 0:
        return float("nan")
    p = t / n
    pa, pm = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pm)[nz])).sum())
    ha = -float((pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hm = -float((pm[pm > 0] * np.log(pm[pm > 0])).sum())
    if ha + hm == 0:
        return 1.0  # both maps constant: identical partitions
    return float(min(max(mi / ((ha + hm) / 2), 0.0), 1.0))


def _scores(table: np.ndarray, part_ids: Sequence[int]) -> dict:
    """Metrics from a (K, P) table restricted to the scored parts."""
    sub = table[:, list(part_ids)]
    miou, pairs, iou = matched_iou(sub)
    p = sub.shape[1]
    return {
        "miou": miou,
        # unmatched parts count 0 (only differs from miou when K < number of scored parts)
        "miou_parts": float(sum(iou[q, c] for q, c in pairs) / p),
        "best_iou": float(iou.max(axis=1).mean()),
        "nmi": nmi(sub),
        "matching": {_part_name(part_ids[c]): q for q, c in pairs},
        "part_iou": {_part_name(part_ids[c]): float(iou[q, c]) for q, c in pairs},
    }


def _part_name(i: int) -> str:
    return PARTS[i] if i < len(PARTS) else f"part{i}"


def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def oracle_labels(masks, grid: tuple[int, int], num_parts: int = len(PARTS), ignore_background: bool = True
                  ) -> torch.Tensor:
    """The oracle's label map at ``grid`` resolution: each cell its majority part, shown at mask
    size the way the model's maps are (one-hot cell maps, bilinear upsampling, argmax).

    Cell (i, j) counts the pixels of its block (rows ``floor(y * h / H) == i``); with
    ``ignore_background`` the majority is taken over the scored (non-background) pixels, and a
    cell without any gets the background label.

    Args:
        masks: (N, H, W) part labels in [0, num_parts).
        grid: (h, w).
    Returns:
        int64 (N, H, W) labels in [0, num_parts).
    """
    m = _as_tensor(masks).long()
    n, height, width = m.shape
    h, w = grid
    rows = (torch.arange(height) * h) // height
    cols = (torch.arange(width) * w) // width
    cell = (rows[:, None] * w + cols[None, :]).expand(n, height, width)
    image = torch.arange(n)[:, None, None].expand(n, height, width)
    index = (image * h * w + cell) * num_parts + m
    weight = (m != 0).double() if ignore_background else torch.ones_like(m, dtype=torch.float64)
    counts = torch.zeros(n * h * w * num_parts, dtype=torch.float64).index_add_(0, index.reshape(-1), weight.reshape(-1))
    best = counts.reshape(n, h, w, num_parts).argmax(dim=-1)  # all-zero cells -> 0 (background)
    onehot = F.one_hot(best, num_parts).permute(0, 3, 1, 2).float()
    return label_map(onehot, (height, width))


def anchors(masks, grid: tuple[int, int], num_queries: int, num_parts: int = len(PARTS),
            ignore_background: bool = True) -> dict:
    """Floor (collapsed map) and oracle (majority part per ``grid`` cell) scores on ``masks``.

    Returns:
        ``{"floor": scores, "oracle": scores}`` with the keys of the model's scores
        (``miou``, ``miou_parts``, ``nmi`` ...).
    """
    m = _as_tensor(masks).long()
    part_ids = list(range(1 if ignore_background else 0, num_parts))
    collapsed = contingency(torch.zeros_like(m), m, num_queries, num_parts, ignore_background)
    oracle = contingency(oracle_labels(m, grid, num_parts, ignore_background), m, num_parts, num_parts,
                         ignore_background)
    return {"floor": _scores(collapsed, part_ids), "oracle": _scores(oracle, part_ids)}


def normalised(value: float, floor: float, oracle: float) -> float:
    """(value - floor) / (oracle - floor); NaN when the anchors coincide."""
    span = oracle - floor
    return float((value - floor) / span) if span > 1e-12 else float("nan")


def region_awareness(heatmaps, masks, num_parts: int = len(PARTS), ignore_background: bool = True, *,
                     seed: int = 0, random_size: tuple[int, int] | None = None, chunk: int = 32,
                     grid: tuple[int, int] | None = None) -> dict:
    """Score heat maps against ground-truth part masks, with a random-heat-map baseline.

    Args:
        heatmaps: (N, K, h, w) heat maps (softmax over K), any resolution; tensor or array.
        masks: (N, H, W) integer part labels in [0, num_parts) (0 = background).
        num_parts: P.
        ignore_background: leave background pixels and the background part out of every score.
        seed: seed of the random baseline.
        random_size: (h, w) of the random heat maps; defaults to the heat maps' resolution.
        chunk: images per upsampling chunk (bounds memory at chunk·K·H·W floats).
        grid: (h, w) of the anchors; defaults to the heat maps' resolution.
    Returns:
        ``miou``, ``miou_parts``, ``best_iou``, ``nmi``, ``matching`` {part: query},
        ``part_iou`` {part: IoU}, the same numbers prefixed ``random_`` for the baseline
        (``random_miou``, ``random_best_iou``, ``random_nmi`` ...), the anchors
        ``floor_{nmi,miou_parts}`` and ``oracle_{nmi,miou_parts}``, the normalised
        ``norm_nmi``, ``norm_miou`` (and ``random_norm_*``), ``grid``, ``num_queries``,
        ``num_parts_scored``, ``pixels``.
    """
    heat = _as_tensor(heatmaps)
    m = _as_tensor(masks).long()
    if heat.ndim != 4 or m.ndim != 3 or heat.shape[0] != m.shape[0]:
        raise ValueError(f"expected heatmaps (N, K, h, w) and masks (N, H, W), got {tuple(heat.shape)} "
                         f"and {tuple(m.shape)}")
    if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_parts):
        raise ValueError(f"mask labels must be in [0, {num_parts}), got [{int(m.min())}, {int(m.max())}]")
    n, k = heat.shape[:2]
    size = tuple(m.shape[-2:])
    part_ids = list(range(1 if ignore_background else 0, num_parts))
    gen = torch.Generator().manual_seed(seed)
    rand_hw = tuple(random_size or heat.shape[-2:])
    table = np.zeros((k, num_parts), np.int64)
    rand_table = np.zeros((k, num_parts), np.int64)
    for s in range(0, n, chunk):
        mc = m[s:s + chunk]
        table += contingency(label_map(heat[s:s + chunk], size), mc, k, num_parts, ignore_background)
        noise = torch.randn(mc.shape[0], k, *rand_hw, generator=gen).softmax(dim=1)
        rand_table += contingency(label_map(noise, size), mc, k, num_parts, ignore_background)
    pixels = int(table.sum())
    if pixels == 0:
        raise ValueError("no pixels to score (every mask pixel is background?)")
    out = _scores(table, part_ids)
    out.update({f"random_{key}": v for key, v in _scores(rand_table, part_ids).items()})
    grid = tuple(grid or heat.shape[-2:])
    anchor = anchors(m, grid, k, num_parts, ignore_background)
    for name in ("floor", "oracle"):
        out.update({f"{name}_nmi": anchor[name]["nmi"], f"{name}_miou_parts": anchor[name]["miou_parts"]})
    for prefix in ("", "random_"):
        out[f"{prefix}norm_nmi"] = normalised(out[f"{prefix}nmi"], out["floor_nmi"], out["oracle_nmi"])
        out[f"{prefix}norm_miou"] = normalised(out[f"{prefix}miou_parts"], out["floor_miou_parts"],
                                               out["oracle_miou_parts"])
    out.update(grid=list(grid), num_queries=int(k), num_parts_scored=len(part_ids), pixels=pixels)
    return out


def render_masks(spec: SyntheticFaces, n_images: int, image_size: int, split: str = "test"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_images`` held-out faces: images uint8 (N, S, S, 3), masks uint8 (N, S, S)."""
    images, masks = [], []
    for i, sample in enumerate(spec.iter_split(split)):
        if i >= n_images:
            break
        img, mask = sample["image"], sample["mask"]
        if img.shape[0] != image_size:
            img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize((image_size, image_size), Image.NEAREST))
        images.append(img)
        masks.append(mask)
    if len(images) < n_images:
        raise ValueError(f"split {split!r} has only {len(images)} images, {n_images} requested")
    return np.stack(images), np.stack(masks)


@torch.no_grad()
def _model_heatmaps(model, images: np.ndarray, mean, std, mode: str, batch_size: int) -> torch.Tensor:
    from fra.engine import Normalizer
    from fra.heatmaps import compute_heatmaps

    param = next(model.parameters())
    norm = Normalizer(mean, std, param.device, param.dtype)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return torch.cat([compute_heatmaps(model, norm(x[s:s + batch_size]), mode).float().cpu()
                      for s in range(0, x.shape[0], batch_size)])


def score_model(model, spec: SyntheticFaces, n_images: int, image_size: int, mean, std, *, mode: str = "batch",
                split: str = "test", baseline: bool = False, seed: int = 0, batch_size: int = 16,
                ignore_background: bool = True, min_cells: int = 4) -> dict:
    """Region-awareness of an FRA model on held-out synthetic faces, with its anchors.

    Args:
        model: an FRA model (with heat maps; ``method=byol`` has none).
        spec: the synthetic dataset; its ``split`` identities are rendered.
        n_images: how many faces to score.
        image_size: the model's training input side.
        mean, std: the model's input normalisation.
        mode: heat-map mode of :func:`fra.heatmaps.compute_heatmaps`: "batch" (default: the
            batch-mean mask embeddings, what training uses) or "proto" (the EMA prototypes).
        baseline: also score the same model at step 0 (the config built under ``seed``, as the
            training loop builds it), in the same mode (keys ``init_*``, and ``gain_norm_nmi``).
        seed: seed of the random-heat-map baseline and of the step-0 model (``run.seed``).
        ignore_background: see :func:`region_awareness`.
        min_cells: score at an input of at least ``32 * min_cells`` px, so that the stride-32
            map has at least ``min_cells`` x ``min_cells`` cells (faces and masks are rendered at
            that size: a 64 px face is upsampled to 128 px).
    Returns:
        :func:`region_awareness`'s dict (anchors and normalised scores included), plus the
        ``init_*`` scores with ``baseline=True``, and ``n_images``, ``image_size``,
        ``score_size``, ``mode``.
    Raises:
        DataError: the model has no heat maps (``method`` byol or swav).
    """
    method = getattr(getattr(model, "cfg", None), "method", "fra")
    if method != "fra":
        raise DataError(f"a {method} model has no region heat maps to score (method must be fra)")
    score_size = max(int(image_size), 32 * min_cells)
    images, masks = render_masks(spec, n_images, score_size, split)
    # The anchors and the random heat maps live on the backbone's stride-32 grid, like the model's maps.
    grid = (math.ceil(score_size / 32),) * 2
    heat = _model_heatmaps(model, images, mean, std, mode, batch_size)
    out = region_awareness(heat, masks, len(PARTS), ignore_background, seed=seed, random_size=grid, grid=grid)
    if baseline:
        from fra.models import build_model

        param = next(model.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init = build_model(model.cfg).to(param.device, param.dtype)
        init_heat = _model_heatmaps(init, images, mean, std, mode, batch_size)
        init_scores = region_awareness(init_heat, masks, len(PARTS), ignore_background, seed=seed,
                                       random_size=grid, grid=grid)
        out.update({f"init_{key}": v for key, v in init_scores.items()
                    if not key.startswith(("random_", "floor_", "oracle_"))})
        out["gain_norm_nmi"] = out["norm_nmi"] - out["init_norm_nmi"]
    out.update(n_images=int(n_images), image_size=int(image_size), score_size=score_size, mode=mode)
    return out
