"""Streaming shards with Ray Data: read_parquet -> decode + augment in map_batches -> batches.

The training and evaluation layers use three functions: :func:`pretrain_dataset` and
:func:`fer_dataset` build lazy datasets (pass them to a ``TorchTrainer`` or iterate them), and
:func:`iter_batches` iterates a dataset or a Ray Train shard for one epoch as a
:class:`BatchStream`, which counts the corrupt images it dropped.

Corrupt images. A decoding task keeps the row of an image that fails to decode as a zero-filled
placeholder flagged in the ``corrupt`` column; :class:`BatchStream` drops the placeholders,
re-batches to the requested size and counts them (``skipped_corrupt``). The count thus travels
with the data from whichever process decoded it to the consumer, per epoch and per worker, with
no shared state between runs. Rows that Ray Train's equal split drops never reach a worker and
are not counted.

Randomness. Each epoch is one execution of the dataset. The shard writer already shuffled the
records (seeded) across shards and row groups. Per epoch, the shard order is shuffled with
``FileShuffleConfig(seed)`` (re-seeded per execution) and the rows of each block (a shard file
or a slice of it) are permuted inside the read task, *before* decoding: a block-sized local
shuffle on the JPEG bytes, 25x less data than shuffling decoded views (a 256-row driver-side
buffer measured ~0.33 ms/image at 224 px; it is still available as ``local_shuffle_buffer``).
Each image's augmentation comes from ``default_rng([seed, execution, 1, hash(source path)])``:
independent of how rows are split into tasks, different every epoch, identical for the same
(seed, epoch). :func:`iter_batches` sets the execution index of a ``Dataset`` to ``epoch``;
under Ray Train, Ray's split coordinator counts the executions from the index the dataset
carries when a worker group starts, which fra's Train jobs (pretraining and the downstream
evaluations) set to the epoch of the checkpoint the group resumes from
(:class:`fra.ray_runtime.EpochAlignedDataset`), so a resumed or restarted run draws the order
and augmentations of its own epoch, not those of the first.

Order. :func:`pretrain_dataset` and the training stream of every downstream evaluation
(:func:`fra.evaluation.job.fit_evaluation`) preserve the block order (Ray Data's
``preserve_order``, :func:`ordered`): without it blocks leave in the order their tasks finish,
and two runs of the same config saw the same batches at different steps. With one consumer (a
``Dataset`` iterated directly, or one Ray Train worker) the batch at each position of an epoch
is thus a pure function of (seed, epoch, position). With several Ray Train workers, Ray's
streaming split hands each block to the worker that asks first, so the per-worker order is not
reproducible; the epoch's rows and their augmentations still are.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, Iterable, Iterator

import numpy as np

from fra.data.augment import FERTransform, TwoViewTransform
from fra.data.decode import CorruptImageError, decode_image, decode_pil
from fra.data.manifest import Manifest, read_manifest
from fra.data.readers.base import join, resolve
from fra.errors import DataError

logger = logging.getLogger(__name__)

CORRUPT = "corrupt"  # bool column of every decoded batch: the row stands for a corrupt image


# ---- dataset builders -----------------------------------------------------------------------
def pretrain_dataset(shards: str, image_size: int = 224, split: str = "train", seed: int = 0, *,
                     augment: dict | None = None, batch_size: int = 64, num_cpus: float = 1.0,
                     shuffle_files: bool = True, with_params: bool = False, with_masks: bool = False,
                     with_keys: bool = False, multicrop: dict | None = None, crop_to_box: bool | None = None,
                     augment_on: str = "workers"):
    """Two-view pretraining stream (FRA_SPEC §8), or SwAV's multi-crop stream (FRL_SPEC §1.3).

    Args:
        shards: shard root or manifest URI (local or ``s3://``...).
        image_size: view side S.
        split: split to read.
        seed: base seed (file order and augmentation).
        augment: extra :class:`TwoViewTransform` arguments (e.g. ``{"scale": (0.08, 1)}``).
        batch_size: rows per map_batches call.
        num_cpus: CPUs per augmentation task.
        shuffle_files: shuffle the shard / row-group order and the rows inside each block, every
            epoch.
        with_params: also return ``box1``/``box2`` (float32 (B, 4): crop x0, y0, x1, y1 as
            fractions of the source width / height) and ``flip1``/``flip2`` (bool (B,)).
        with_masks: also return ``mask1``/``mask2``: the shard's part masks (uint8 (B, S, S))
            co-transformed with each view's crop and flip (shards must have a mask column).
        with_keys: also return ``key`` (int64, :func:`row_key` of the source path).
        multicrop: :class:`fra.data.multicrop.MultiCropTransform` arguments (``size_crops``,
            ``nmb_crops``, ``min_scale``, ``max_scale``, ...): SwAV crops instead of FRA's two
            views; ``image_size``, ``augment``, ``with_params`` and ``with_masks`` do not apply.
        crop_to_box: make the views from the stored face box (scaled by the card's ``box_scale``
            about its centre, clipped to the image) instead of the whole image; rows without a
            box use the whole image. Default: the dataset card's ``crop_to_box`` (VGGFace2: on).
        augment_on: ``workers`` (whole views) or ``device``: the tasks only crop, resize and flip,
            ship ``view1``/``view2`` channels-last (uint8 (S, S, 3) rows) and add ``aug1``/``aug2``
            (float32 (12,) rows, :func:`fra.data.augment.photometric_row`), which
            :func:`fra.data.device_augment.augment_batches` turns into (B, 3, S, S) views on the
            trainer (``data.augment_on``).

    Returns:
        A lazy ``ray.data.Dataset`` of rows ``{"view1", "view2": uint8 (3, S, S), "label": int64,
        "corrupt": bool}`` (see the module docstring; :func:`iter_batches` drops corrupt rows);
        with ``multicrop``, ``view1``/``view2`` are the first two crops and ``crop1`` ...
        ``cropN`` the others, in order (:func:`fra.engine.batch_views` reads them all).
    """
    manifest = read_manifest(shards)
    box_scale = _box_scale(manifest.dataset, crop_to_box)
    box_column = ["box"] if box_scale else []
    if augment_on not in ("workers", "device"):
        raise ValueError(f"augment_on must be 'workers' or 'device', got {augment_on!r}")
    if multicrop is not None:
        if augment_on == "device":
            raise ValueError("augment_on='device' is not available with multicrop")
        if with_params or with_masks:
            raise ValueError("with_params / with_masks are not available with multicrop")
        ds = _read(manifest, split, ["image", "label", "path"] + box_column, seed if shuffle_files else None,
                   shuffle_rows=shuffle_files)
        _multicrop_transform(tuple(sorted((k, _freeze(v)) for k, v in multicrop.items())))  # bad arguments: fail here
        kwargs = {"seed": int(seed), "multicrop": dict(multicrop), "with_keys": with_keys, "box_scale": box_scale}
        return ordered(ds.map_batches(_multicrop_batch, batch_size=batch_size, batch_format="numpy",
                                      num_cpus=num_cpus, fn_kwargs=kwargs))
    columns = ["image", "label", "path"] + (["mask"] if with_masks else []) + box_column
    ds = _read(manifest, split, columns, seed if shuffle_files else None, shuffle_rows=shuffle_files)
    kwargs = {"image_size": int(image_size), "seed": int(seed), "augment": dict(augment or {}),
              "with_params": with_params, "with_masks": with_masks, "with_keys": with_keys, "box_scale": box_scale,
              "augment_on": augment_on}
    return ordered(ds.map_batches(_two_view_batch, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                                  fn_kwargs=kwargs))


def ordered(ds):
    """``ds`` with its block order preserved (module docstring, "Order"). The context is this
    dataset's own (``read_parquet`` copied the global one), so no other dataset changes. Under Ray
    Train, pass :func:`fra.ray_runtime.ingest_options` of it as the dataset's execution options."""
    ds.context.execution_options.preserve_order = True
    return ds


def fer_dataset(shards: str, image_size: int = 224, split: str = "train", train: bool = True, seed: int = 0, *,
                batch_size: int = 64, num_cpus: float = 1.0, crop_to_box: bool | None = None,
                shuffle_files: bool | None = None, augment: dict | None = None, with_keys: bool = False,
                extra_columns: tuple[str, ...] = ()):
    """FER fine-tune / probe / eval stream (FRA_SPEC §9 transforms, RandomErasing included).

    Args:
        shards: shard root or manifest URI.
        image_size: output side S.
        split: split to read.
        train: random train transform, else the deterministic eval resize.
        seed: base seed.
        batch_size: rows per map_batches call.
        num_cpus: CPUs per task.
        crop_to_box: crop to the stored face box first (scaled by the card's ``box_scale``);
            default: the card's ``crop_to_box`` (off for every shipped FER card: the reference
            reads the images whole).
        shuffle_files: shuffle file order and rows within blocks per epoch (default: ``train``).
        augment: extra :class:`FERTransform` arguments.
        with_keys: also return ``key`` (int64, :func:`row_key` of the source path).
        extra_columns: list columns passed through as float32 (B, K) arrays: ``attributes``
            (CelebA's flags) or ``targets`` (valence, arousal) for the attribute and affect
            evaluations; a row without a value is an error naming it.

    Returns:
        A lazy ``ray.data.Dataset`` of rows ``{"image": uint8 (3, S, S), "label": int64, "corrupt": bool}``
        (plus the ``extra_columns``).
    """
    manifest = read_manifest(shards)
    box_scale = _box_scale(manifest.dataset, crop_to_box)
    shuffle = train if shuffle_files is None else shuffle_files
    columns = ["image", "label", "path"] + (["box"] if box_scale else []) + list(extra_columns)
    ds = _read(manifest, split, columns, seed if shuffle else None, shuffle_rows=shuffle)
    kwargs = {"image_size": int(image_size), "train": bool(train), "seed": int(seed),
              "mean": tuple(manifest.normalization.get("mean", (0.5231, 0.4044, 0.3489))),
              "augment": dict(augment or {}), "box_scale": box_scale, "with_keys": with_keys}
    if extra_columns:
        kwargs["extra_columns"] = tuple(extra_columns)
    return ds.map_batches(_fer_batch, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs=kwargs)


def check_stream_epoch(shard, epoch: int) -> int | None:
    """The epoch a Ray Train worker's ``shard`` starts streaming at; warns if it is not ``epoch``, the
    epoch the worker resumes in. ``None`` (no warning) when the shard does not tell.

    The split coordinator starts counting executions (epochs) from the index the dataset carried
    when it was created (:class:`fra.ray_runtime.EpochAlignedDataset` sets it); a mismatch means
    this run trains on another epoch's order and augmentations than an uninterrupted one.
    """
    try:
        start = int(getattr(shard.get_context(), "_execution_idx"))
    except Exception as exc:  # noqa: BLE001 - a diagnostic only; the stream itself reports its errors
        logger.debug("cannot read the data stream's epoch: %s", exc)
        return None
    if start != epoch:
        logger.warning("the data stream starts at epoch %d but training resumes in epoch %d: this run draws another "
                       "epoch's data order and augmentations than an uninterrupted run would", start + 1, epoch + 1)
    return start


def iter_batches(ds_or_shard, batch_size: int, epoch: int = 0, seed: int = 0, drop_last: bool = True,
                 local_shuffle_buffer: int | None = 0, prefetch_batches: int = 2,
                 device: Any = None) -> BatchStream:
    """Iterate one epoch of torch batches from a ``Dataset`` or a Ray Train ``DataIterator``.

    Args:
        ds_or_shard: ``ray.data.Dataset`` or ``ray.train.get_dataset_shard(name)``.
        batch_size: rows per batch (per worker under Ray Train).
        epoch: epoch number (sets the shuffle / augmentation draws of a ``Dataset``).
        seed: base seed of the local shuffle.
        drop_last: drop the last incomplete batch (its corrupt images are still counted).
        local_shuffle_buffer: rows in an extra driver-side shuffle buffer (default 0: rows are
            already permuted per block in the read tasks, see the module docstring). Memory is
            about ``buffer x 2 x 3 S^2`` bytes for two-view rows.
        prefetch_batches: batches prefetched by Ray.
        device: optional torch device for the tensors.

    Returns:
        A :class:`BatchStream` of dicts of torch tensors (uint8 images, int64 labels) without
        corrupt rows; its ``skipped_corrupt`` counts the corrupt images dropped so far.
    """
    import ray

    if isinstance(ds_or_shard, ray.data.Dataset):
        ds_or_shard.context._execution_idx = int(epoch)
    # Ray keeps the last partial batch so that its corrupt rows are counted; BatchStream drops it.
    kwargs: dict[str, Any] = {"batch_size": batch_size, "drop_last": False, "prefetch_batches": prefetch_batches}
    if local_shuffle_buffer:
        kwargs["local_shuffle_buffer_size"] = max(int(local_shuffle_buffer), batch_size)
        kwargs["local_shuffle_seed"] = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return BatchStream(ds_or_shard.iter_torch_batches(**kwargs), batch_size, drop_last, device)


class BatchStream:
    """One pass over torch batches with the corrupt-image placeholders taken out.

    Batches keep ``batch_size`` rows: after a placeholder was dropped, the following batches are
    re-cut from the remaining rows (one copy per batch, only in an epoch that met a corrupt image).

    Args:
        batches: dicts of tensors with a bool ``corrupt`` column (batches without one pass as they are).
        batch_size: rows per yielded batch.
        drop_last: drop the last incomplete batch.
        device: optional torch device the yielded tensors are moved to.

    Attributes:
        skipped_corrupt: corrupt images dropped from the batches read so far.
    """

    def __init__(self, batches: Iterable[dict], batch_size: int, drop_last: bool = True, device: Any = None):
        self.skipped_corrupt = 0
        self._it = self._deliver(iter(batches), int(batch_size), drop_last, device)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def _deliver(self, batches: Iterator[dict], batch_size: int, drop_last: bool, device: Any) -> Iterator[dict]:
        import torch

        carry: dict | None = None  # rows left over after a placeholder was dropped (< batch_size)
        for batch in batches:
            flags = batch.pop(CORRUPT, None)
            if flags is not None and bool(flags.any()):
                self.skipped_corrupt += int(flags.sum())
                batch = {k: v[~flags] for k, v in batch.items()}
            if carry is not None:
                batch = {k: torch.cat([carry[k], v]) for k, v in batch.items()}
                carry = None
            n = _num_rows(batch)
            if n == batch_size:
                yield _to_device(batch, device)
                continue
            for start in range(0, n - batch_size + 1, batch_size):
                yield _to_device({k: v[start:start + batch_size] for k, v in batch.items()}, device)
            rest = n % batch_size
            if rest:
                carry = {k: v[n - rest:] for k, v in batch.items()}
        if carry is not None and not drop_last:
            yield _to_device(carry, device)


def _num_rows(batch: dict) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _to_device(batch: dict, device: Any) -> dict:
    if device is None:
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---- reading -------------------------------------------------------------------------------
def _read(manifest: Manifest, split: str, columns: list[str], shuffle_seed: int | None, shuffle_rows: bool = False):
    import ray

    shards = [s for s in manifest.shards if s.split == split and s.rows > 0]
    if not shards:
        raise DataError(f"{manifest.uri}: no rows in split {split!r} (splits: {list(manifest.counts)})")
    fs, base = resolve(manifest.root)
    paths = [join(base, s.path) for s in shards]
    shuffle = None
    if shuffle_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=int(shuffle_seed), reseed_after_execution=True)
    from fra.data.executor_backoff import IdleBackoff

    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    callbacks = ctx.custom_execution_callback_classes
    # The dataset snapshots the context here; a new list, so restoring ours leaves the snapshot's.
    # IdleBackoff stops the executor's scheduling loop from spinning while the trainer is behind.
    ctx.custom_execution_callback_classes = [*callbacks, *([] if IdleBackoff in callbacks else [IdleBackoff])]
    try:
        # NOTE: Ray 2.60's default Parquet datasource (V2) starts a pool of 32 FooterReader actors
        # (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, read in the worker environment) on *every*
        # execution, i.e. every epoch: on a 2-core node that cost ~1.5 CPU-s/epoch of process
        # start-up and imports (py-spy), a third of a 1,500-image epoch. The V1 datasource reads
        # the footers once, here, and only runs read tasks per epoch.
        ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=shuffle, partitioning=None, columns=columns)
    finally:
        ctx.use_datasource_v2 = v2
        ctx.custom_execution_callback_classes = callbacks
    if shuffle_rows and shuffle_seed is not None:
        ds = ds.map_batches(_permute_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"seed": int(shuffle_seed)})
    return ds


@functools.lru_cache(maxsize=None)
def _card_options(name: str) -> dict:
    from fra.data.cards import load_card
    from fra.errors import ConfigError

    try:
        return dict(load_card(name).options)
    except ConfigError:
        return {}


def _box_scale(dataset: str, crop_to_box: bool | None) -> float:
    """0.0 = use whole images; else crop to the stored box scaled by this factor (card options
    ``crop_to_box`` and ``box_scale``; ``crop_to_box`` given here overrides the card's)."""
    options = _card_options(dataset)
    crop = bool(options.get("crop_to_box", False)) if crop_to_box is None else bool(crop_to_box)
    return float(options.get("box_scale", 1.0)) if crop else 0.0


def face_crop_box(box, width: int, height: int, scale: float = 1.0) -> tuple[int, int, int, int] | None:
    """The integer crop (left, top, right, bottom) of ``box`` (x0, y0, x1, y1) scaled by ``scale``
    about its centre and clipped to the ``width`` x ``height`` image; None if nothing is left."""
    if box is None or len(box) != 4:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, scale * (x1 - x0) / 2, scale * (y1 - y0) / 2
    left, top = max(0, int(round(cx - hw))), max(0, int(round(cy - hh)))
    right, bottom = min(width, int(round(cx + hw))), min(height, int(round(cy + hh)))
    return (left, top, right, bottom) if right > left and bottom > top else None


def _crop(img, box, scale: float, mask=None):
    """``img`` (PIL, or a uint8 (H, W, 3) array) and its ``mask`` cropped to the scaled face box,
    or unchanged without a box."""
    crop = face_crop_box(box, *_size(img), scale) if scale else None
    if crop is None:
        return img, mask
    m = None if mask is None else mask[crop[1]:crop[3], crop[0]:crop[2]]
    return (img[crop[1]:crop[3], crop[0]:crop[2]] if isinstance(img, np.ndarray) else img.crop(crop)), m


def _size(img) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W, 3) array."""
    return (img.shape[1], img.shape[0]) if isinstance(img, np.ndarray) else img.size


# ---- per-batch UDFs (run in Ray Data tasks) ---------------------------------------------------
@functools.lru_cache(maxsize=8)
def _two_view_transform(image_size: int, augment: tuple) -> TwoViewTransform:
    return TwoViewTransform(image_size, **dict(augment))


@functools.lru_cache(maxsize=8)
def _fer_transform(image_size: int, train: bool, mean: tuple, augment: tuple) -> FERTransform:
    return FERTransform(image_size, train=train, mean=mean, **dict(augment))


def _freeze(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@functools.lru_cache(maxsize=8)
def _multicrop_transform(args: tuple):
    from fra.data.multicrop import MultiCropTransform

    return MultiCropTransform(**dict(args))


def row_key(path) -> int:
    """Stable non-negative int64 key of a row (hash of its source path); the ``key`` column."""
    return int.from_bytes(hashlib.blake2b(str(path).encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def _execution_index() -> int:
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def _permute_block(block, *, seed: int):
    """Seeded per-epoch permutation of one block's rows (still encoded bytes, so cheap)."""
    n = block.num_rows
    if n < 2:
        return block
    rng = np.random.default_rng([seed, _execution_index(), 2, row_key(block.column("path")[0].as_py())])
    return block.take(rng.permutation(n))


def _decode(raw, path, as_array: bool = False):
    """The decoded image (PIL, or a uint8 (H, W, 3) array), or None when it is corrupt (its row
    becomes a placeholder)."""
    try:
        return decode_image(bytes(raw)) if as_array else decode_pil(bytes(raw))
    except CorruptImageError as exc:
        logger.warning("dropping corrupt image %s: %s", path, exc)
        return None


def _two_view_batch(batch: dict, *, image_size: int, seed: int, augment: dict, with_params: bool,
                    with_masks: bool, with_keys: bool = False, box_scale: float = 0.0,
                    augment_on: str = "workers") -> dict:
    from fra.data.augment import PHOTOMETRIC_COLUMNS, photometric_row
    from fra.data.decode import decode_mask

    transform = _two_view_transform(image_size, tuple(sorted(augment.items())))
    execution = _execution_index()
    n, s = len(batch["image"]), image_size
    # Views are written straight into the (N, 3, S, S) outputs: no per-batch stack/transpose copies.
    views = np.empty((2, n, 3, s, s), np.uint8)
    corrupt = np.zeros(n, bool)
    boxes, flips = np.zeros((2, n, 4), np.float32), np.zeros((2, n), bool)
    masks_out = np.zeros((2, n, s, s), np.uint8) if with_masks else None
    on_device = augment_on == "device"  # the tasks crop, resize and flip; the rest runs on the trainer
    table = np.zeros((2, n, len(PHOTOMETRIC_COLUMNS)), np.float32) if on_device else None
    if on_device:  # channels-last on the wire: resized straight into the batch (the trainer permutes for free)
        views = np.empty((2, n, s, s, 3), np.uint8)
    keys = [row_key(path) for path in batch["path"]]
    masks = batch["mask"] if with_masks else [None] * n
    face_boxes = batch["box"] if box_scale else [None] * n
    for i, (raw, path, mask, face) in enumerate(zip(batch["image"], batch["path"], masks, face_boxes)):
        img = _decode(raw, path, as_array=on_device)  # device placement: no PIL image unless a crop shrinks
        if img is None:
            corrupt[i] = True
            views[:, i] = 0
            continue
        m = None
        if with_masks:
            m = decode_mask(bytes(mask)) if mask is not None else np.zeros(_size(img)[::-1], np.uint8)
        img, m = _crop(img, face, box_scale, m)
        width, height = _size(img)
        pair = transform.sample(width, height, np.random.default_rng([seed, execution, 1, keys[i]]))
        for v, p in enumerate(pair):
            if on_device:
                transform.render_geometry(img, p, out=views[v, i])
                table[v, i] = photometric_row(p)
            else:
                views[v, i] = transform.render_array(img, p).transpose(2, 0, 1)
            boxes[v, i], flips[v, i] = _norm_box(p.box, (width, height)), p.flip
            if with_masks:
                masks_out[v, i] = transform.render_mask(m, p)
    out = {"view1": views[0], "view2": views[1], "label": np.asarray(batch["label"], dtype=np.int64),
           CORRUPT: corrupt}
    for v in (0, 1):
        if on_device:
            out[f"aug{v + 1}"] = table[v]
        if with_params:
            out[f"box{v + 1}"], out[f"flip{v + 1}"] = boxes[v], flips[v]
        if with_masks:
            out[f"mask{v + 1}"] = masks_out[v]
    if with_keys:
        out["key"] = np.asarray(keys, dtype=np.int64)
    return out


def _multicrop_batch(batch: dict, *, seed: int, multicrop: dict, with_keys: bool = False,
                     box_scale: float = 0.0) -> dict:
    transform = _multicrop_transform(tuple(sorted((k, _freeze(v)) for k, v in multicrop.items())))
    execution = _execution_index()
    sizes = [size for size, _ in transform.crops]
    n = len(batch["image"])
    outs = [np.empty((n, 3, s, s), np.uint8) for s in sizes]
    corrupt = np.zeros(n, bool)
    keys = [row_key(path) for path in batch["path"]]
    face_boxes = batch["box"] if box_scale else [None] * n
    for i, (raw, path, face) in enumerate(zip(batch["image"], batch["path"], face_boxes)):
        img = _decode(raw, path)
        if img is None:
            corrupt[i] = True
            for out in outs:
                out[i] = 0
            continue
        img, _ = _crop(img, face, box_scale)
        for out, crop in zip(outs, transform(img, np.random.default_rng([seed, execution, 1, keys[i]]))):
            out[i] = crop.transpose(2, 0, 1)
    cols = {"view1": outs[0], "view2": outs[1]}
    cols.update({f"crop{i}": o for i, o in enumerate(outs[2:], start=1)})
    cols["label"] = np.asarray(batch["label"], dtype=np.int64)
    cols[CORRUPT] = corrupt
    if with_keys:
        cols["key"] = np.asarray(keys, dtype=np.int64)
    return cols


def _fer_batch(batch: dict, *, image_size: int, train: bool, seed: int, mean: tuple, augment: dict,
               box_scale: float = 0.0, with_keys: bool = False, extra_columns: tuple[str, ...] = ()) -> dict:
    transform = _fer_transform(image_size, train, tuple(mean), tuple(sorted(augment.items())))
    execution = _execution_index()
    n = len(batch["image"])
    images, corrupt = [], np.zeros(n, bool)
    keys = [row_key(path) for path in batch["path"]]
    boxes = batch["box"] if box_scale else [None] * n
    for i, (raw, path, box) in enumerate(zip(batch["image"], batch["path"], boxes)):
        img = _decode(raw, path)
        if img is None:
            corrupt[i] = True
            images.append(np.zeros((image_size, image_size, 3), np.uint8))
            continue
        img, _ = _crop(img, box, box_scale)
        rng = np.random.default_rng([seed, execution, 1, keys[i]]) if train else None
        images.append(transform(img, rng))
    out = {"image": _stack_chw(images, image_size), "label": np.asarray(batch["label"], dtype=np.int64),
           CORRUPT: corrupt}
    if with_keys:
        out["key"] = np.asarray(keys, dtype=np.int64)
    for name in extra_columns:
        out[name] = _stack_values(batch[name], batch["path"], name)
    return out


def _stack_values(values, paths, name: str) -> np.ndarray:
    """A list column as float32 (B, K); every row must have K values."""
    rows = []
    for value, path in zip(values, paths):
        if value is None:
            raise DataError(f"row {path} has no {name!r} values (shards written without them?)")
        rows.append(np.asarray(value, np.float32))
    if len({r.shape for r in rows}) > 1:
        raise DataError(f"rows of column {name!r} differ in length: {sorted({r.shape for r in rows})}")
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def _stack_chw(views: list[np.ndarray], size: int) -> np.ndarray:
    if not views:
        return np.zeros((0, 3, size, size), np.uint8)
    return np.ascontiguousarray(np.stack(views).transpose(0, 3, 1, 2))


def _norm_box(box, size) -> tuple[float, float, float, float]:
    w, h = size
    return box[0] / w, box[1] / h, box[2] / w, box[3] / h


__all__ = ["pretrain_dataset", "fer_dataset", "iter_batches", "BatchStream", "row_key", "CORRUPT", "check_stream_epoch",
           "ordered"]
