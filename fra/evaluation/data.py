"""FER datasets for evaluation: train / test / validation streams over Parquet shards.

Built on :func:`fra.data.stream.fer_dataset` (reference transforms, FRA_SPEC §9). Two things
are added here:

* a held-out validation split carved from train by a hash of each row's source path
  (``row_key(path) % 10**6 < fraction * 10**6``): fixed across seeds and runs, disjoint from the
  training rows, no state to store;
* class-balanced sampling (the reference's ``ImbalancedDatasetSampler``): every epoch draws
  ``len(train)`` rows with replacement, with weight ``1 / count(class)``, from a generator seeded
  by ``(seed, epoch)``. Rows are repeated *before* augmentation and each copy gets its own path
  suffix (``#1``, ``#2`` ...), so copies draw independent augmentations, as in the reference.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fra.data.manifest import Manifest
from fra.errors import ConfigError, DataError

KEY_BUCKETS = 10**6


@dataclass(frozen=True)
class SplitIndex:
    """The rows of one split: stable keys and labels (read from the small Parquet columns)."""

    keys: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return int(self.keys.size)


def split_index(manifest: Manifest, split: str) -> SplitIndex:
    """Keys (:func:`fra.data.stream.row_key` of the path) and labels of every row of ``split``."""
    import pyarrow.parquet as pq

    from fra.data.readers.base import resolve
    from fra.data.stream import row_key

    uris = manifest.shard_uris(split)
    if not uris:
        raise DataError(f"{manifest.uri}: no rows in split {split!r} (splits: {list(manifest.counts)})")
    keys, labels = [], []
    for uri in uris:
        fs, path = resolve(uri)
        table = pq.read_table(path, columns=["path", "label"], filesystem=fs)
        keys.extend(row_key(p) for p in table.column("path").to_pylist())
        labels.extend(table.column("label").to_pylist())
    return SplitIndex(np.asarray(keys, np.int64), np.asarray(labels, np.int64))


def is_val(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Which rows the validation carve takes (bool per key)."""
    return (np.asarray(keys, np.int64) % KEY_BUCKETS) < int(round(fraction * KEY_BUCKETS))


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)


def balanced_multiplicity(index: SplitIndex, num_classes: int, seed: int, epoch: int) -> np.ndarray:
    """How often each row of ``index`` is drawn in ``epoch`` (sums to ``len(index)``)."""
    counts = class_counts(index.labels, num_classes).astype(np.float64)
    weights = 1.0 / counts[index.labels]
    rng = np.random.default_rng([int(seed), int(epoch), 5])
    draws = rng.choice(len(index), size=len(index), replace=True, p=weights / weights.sum())
    return np.bincount(draws, minlength=len(index))


def fer_datasets(manifest: Manifest, *, image_size: int, train_split: str, test_split: str, val_split: str = "",
                 val_fraction: float = 0.0, balanced: bool = False, seed: int = 0, num_cpus: float = 1.0,
                 cache_eval_mb: int = 0, augment: dict | None = None) -> tuple[dict, dict]:
    """Ray datasets ``train``, ``test`` (and ``val``) plus their row counts.

    The training stream is lazy (fresh augmentation every epoch). The evaluation streams are
    deterministic, so when their decoded size is at most ``cache_eval_mb`` they are executed
    once here and kept in the object store instead of being re-read every evaluation.

    Returns:
        (datasets, info) with info ``{"train": n, "test": n, "val": n, "train_class_counts": [...]}``.
    """
    from fra.data.stream import fer_dataset

    if val_split and val_fraction:
        raise ConfigError("set data.val_split or data.val_fraction, not both")
    if val_split and val_split in (test_split, train_split):
        raise ConfigError(f"data.val_split={val_split!r} must differ from the train and test splits")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    shards = manifest.uri
    num_classes = len(manifest.classes)
    augment = {k: tuple(v) if isinstance(v, list) else v for k, v in (augment or {}).items()}  # hashable
    train_index = split_index(manifest, train_split)
    keep = ~is_val(train_index.keys, val_fraction) if val_fraction else np.ones(len(train_index), bool)
    train_rows = SplitIndex(train_index.keys[keep], train_index.labels[keep])
    if len(train_rows) == 0:
        raise DataError(f"no training rows left in split {train_split!r} after the validation carve")
    out: dict = {"test": fer_dataset(shards, image_size, test_split, train=False, seed=seed, num_cpus=num_cpus)}
    info = {"train": len(train_rows), "test": manifest.num_rows(test_split),
            "train_class_counts": class_counts(train_rows.labels, num_classes).tolist()}
    if val_fraction:
        val = fer_dataset(shards, image_size, train_split, train=False, seed=seed, num_cpus=num_cpus, with_keys=True)
        out["val"] = val.map_batches(_select, batch_format="numpy", fn_kwargs={"fraction": val_fraction, "val": True})
        info["val"] = int((~keep).sum())
    elif val_split:
        out["val"] = fer_dataset(shards, image_size, val_split, train=False, seed=seed, num_cpus=num_cpus)
        info["val"] = manifest.num_rows(val_split)
    for name in ("test", "val"):
        if name in out and info[name] * 3 * image_size ** 2 <= cache_eval_mb * 2**20:
            out[name] = out[name].materialize()
    if balanced or val_fraction:
        out["train"] = _train_resampled(manifest, train_rows, image_size, train_split, seed, num_cpus,
                                        val_fraction, balanced, dict(augment or {}))
    else:
        out["train"] = fer_dataset(shards, image_size, train_split, train=True, seed=seed, num_cpus=num_cpus,
                                   augment=dict(augment or {}))
    return out, info


def eval_data_config(train_options=None):
    """Train rows are split equally over workers (same step count for DDP), with ``train_options``
    as their execution options (:func:`fra.ray_runtime.ingest_options`; None = Ray Train's default);
    evaluation sets are split without dropping rows, so every test image is scored exactly once."""
    from ray.train import DataConfig

    class FERDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if name == "train":
                    parts = super().configure({name: ds}, world_size, worker_handles, worker_node_ids, **kwargs)
                    for i in range(world_size):
                        out[i][name] = parts[i][name]
                    continue
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = it
            return out

    return FERDataConfig(execution_options={"train": train_options} if train_options is not None else None)


def _select(batch: dict, *, fraction: float, val: bool) -> dict:
    """Keep the validation (or the training) rows of a keyed batch and drop the key column."""
    mask = is_val(batch["key"], fraction)
    mask = mask if val else ~mask
    return {k: v[mask] for k, v in batch.items() if k != "key"}


def _train_resampled(manifest: Manifest, rows: SplitIndex, image_size: int, split: str, seed: int,
                     num_cpus: float, val_fraction: float, balanced: bool, augment: dict):
    """The training stream with the validation rows removed and/or class-balanced repetition,
    applied before decoding and augmentation."""
    from fra.data import stream

    # NOTE: uses the stream module's reader and per-batch UDF (not its public API) so that rows
    # are selected / repeated before augmentation; see the module docstring.
    try:
        read, fer_batch = stream._read, stream._fer_batch
    except AttributeError as exc:  # pragma: no cover - guards against a refactor of fra.data.stream
        raise DataError("fra.data.stream no longer exposes _read/_fer_batch needed for "
                        "balanced sampling / validation carving") from exc
    box_scale = stream._box_scale(manifest.dataset, None)
    ds = read(manifest, split, ["image", "label", "path"] + (["box"] if box_scale else []), seed)
    order = np.argsort(rows.keys)
    table = {"keys": rows.keys[order], "labels": rows.labels[order]}
    ds = ds.map_batches(_resample, batch_format="numpy", fn_kwargs={
        "table": table, "num_classes": len(manifest.classes), "seed": seed, "val_fraction": val_fraction,
        "balanced": balanced})
    kwargs = {"image_size": int(image_size), "train": True, "seed": int(seed),
              "mean": tuple(manifest.normalization.get("mean", (0.5231, 0.4044, 0.3489))),
              "augment": augment, "box_scale": box_scale, "with_keys": False}
    return ds.map_batches(fer_batch, batch_size=32, batch_format="numpy", num_cpus=num_cpus, fn_kwargs=kwargs)


@functools.lru_cache(maxsize=4)
def _epoch_multiplicity(table_id: int, seed: int, epoch: int, num_classes: int) -> np.ndarray:
    keys, labels = _TABLES[table_id]
    return balanced_multiplicity(SplitIndex(keys, labels), num_classes, seed, epoch)


_TABLES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _resample(batch: dict, *, table: dict, num_classes: int, seed: int, val_fraction: float, balanced: bool) -> dict:
    from fra.data.stream import _execution_index, row_key

    keys = np.asarray([row_key(p) for p in batch["path"]], np.int64)
    reps = np.ones(len(keys), np.int64)
    if val_fraction:
        reps[is_val(keys, val_fraction)] = 0
    if balanced:
        table_id = hash((table["keys"].tobytes()[:4096], len(table["keys"])))
        _TABLES.setdefault(table_id, (table["keys"], table["labels"]))
        mult = _epoch_multiplicity(table_id, seed, _execution_index(), num_classes)
        pos = np.clip(np.searchsorted(table["keys"], keys), 0, len(table["keys"]) - 1)
        known = table["keys"][pos] == keys
        reps = np.where(known, mult[pos], 0) * (reps > 0)
    idx = np.repeat(np.arange(len(keys)), reps)
    copy = np.concatenate([np.arange(r) for r in reps]) if len(idx) else np.zeros(0, np.int64)
    out = {k: v[idx] for k, v in batch.items()}
    out["path"] = np.asarray([p if c == 0 else f"{p}#{c}" for p, c in zip(out["path"], copy)], dtype=object)
    return out
