"""In-process loaders over the same augmentation as the Ray pipeline (no Ray).

For the plain training loop, the demo and unit tests. Each image gets its own generator,
``default_rng([seed, epoch, 1, position])`` where ``position`` is the image's index in the
source, and the epoch's order is ``default_rng([seed, epoch, 0]).permutation(n)``: results are
reproducible and independent of ``num_threads``. Corrupt images are skipped and counted
(:func:`local_stats`).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fra.data.augment import FERTransform, TwoViewTransform
from fra.data.decode import CorruptImageError

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_STATS = {"skipped_corrupt": 0}


def local_stats(reset: bool = False) -> dict:
    """Counters of this process's local loaders, e.g. ``{"skipped_corrupt": 3}``."""
    with _LOCK:
        out = dict(_STATS)
        if reset:
            _STATS["skipped_corrupt"] = 0
    return out


class _Items:
    """Random access to (image, label) over the accepted source types."""

    def __init__(self, images, labels=None, split: str = "train", cache: bool = True):
        self._spec = None
        self._cache: dict[int, tuple[Any, int]] | None = None
        if hasattr(images, "sample") and hasattr(images, "identities"):  # a SyntheticFaces spec
            images = (images, split)
        if isinstance(images, tuple) and len(images) == 2 and hasattr(images[0], "sample"):
            spec, split = images
            self._spec = spec
            self._keys = [(i, k) for i in spec.identities(split) for k in range(spec.images_per_identity)]
            self._cache = {} if cache else None
            return
        if not isinstance(images, Sequence) or isinstance(images, (bytes, str)):
            images = list(images)  # e.g. SyntheticFaces.iter_split(...)
        self._images = images
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self._labels = labels

    def __len__(self) -> int:
        return len(self._keys) if self._spec is not None else len(self._images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self._spec is not None:
            if self._cache is not None and i in self._cache:
                return self._cache[i]
            sample = self._spec.sample(*self._keys[i])
            item = (sample["image"], int(sample["label"]))
            if self._cache is not None:
                self._cache[i] = item
            return item
        x = self._images[i]
        if isinstance(x, dict):
            return x["image"], int(x.get("label", -1))
        return x, int(self._labels[i]) if self._labels is not None else -1


class _LocalLoader:
    """Shared shuffling, batching, threading and corrupt-skipping logic."""

    def __init__(self, items: _Items, batch_size: int, seed: int, drop_last: bool, num_threads: int,
                 shuffle: bool):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._items, self.batch_size, self.seed = items, int(batch_size), int(seed)
        self.drop_last, self.num_threads, self.shuffle = drop_last, int(num_threads), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes order and augmentation draws; same epoch = same batches)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self._items)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _one(self, position: int):
        raise NotImplementedError

    def _collate(self, outputs: list) -> dict:
        raise NotImplementedError

    def _safe(self, position: int):
        try:
            return self._one(position)
        except CorruptImageError as exc:
            logger.warning("skipping corrupt image #%d: %s", position, exc)
            with _LOCK:
                _STATS["skipped_corrupt"] += 1
            return None

    def __iter__(self) -> Iterator[dict]:
        n = len(self._items)
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(n) if self.shuffle else np.arange(n)
        chunk = self.batch_size
        pool = ThreadPoolExecutor(self.num_threads) if self.num_threads > 0 else None
        mapper: Callable = pool.map if pool is not None else map
        pending: list = []
        try:
            for start in range(0, n, chunk):
                pending.extend(r for r in mapper(self._safe, order[start : start + chunk].tolist()) if r is not None)
                while len(pending) >= self.batch_size:
                    yield self._collate(pending[: self.batch_size])
                    pending = pending[self.batch_size :]
            if pending and not self.drop_last:
                yield self._collate(pending)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)


class LocalTwoViewLoader(_LocalLoader):
    """Iterable of two-view pretraining batches, like :func:`fra.data.stream.pretrain_dataset`.

    Args:
        images: a sequence of uint8 arrays / encoded bytes / ``{"image", "label"}`` dicts, a
            :class:`~fra.data.synthetic.SyntheticFaces` (with ``split``), a ``(spec, split)``
            tuple, or any iterable of sample dicts (materialised).
        batch_size: images per batch.
        image_size: view side S.
        seed: base seed.
        drop_last: drop the last incomplete batch.
        num_threads: 0 = in the calling thread; N = a pool of N threads (PIL and simplejpeg
            release the GIL).
        labels: optional labels for a plain image sequence (-1 otherwise).
        split: split of a SyntheticFaces source.
        transform: a :class:`TwoViewTransform` (default: the FRA recipe at ``image_size``).
        shuffle: reshuffle each epoch.
        cache: keep rendered synthetic faces in memory (they are re-augmented every epoch).

    Yields:
        ``{"view1": uint8 (B, 3, S, S), "view2": uint8 (B, 3, S, S), "label": int64 (B,)}``
        torch tensors.
    """

    def __init__(self, images, batch_size: int, image_size: int = 224, seed: int = 0, drop_last: bool = True,
                 num_threads: int = 0, labels: Sequence[int] | None = None, split: str = "train",
                 transform: TwoViewTransform | None = None, shuffle: bool = True, cache: bool = True):
        super().__init__(_Items(images, labels, split, cache), batch_size, seed, drop_last, num_threads, shuffle)
        self.transform = transform or TwoViewTransform(image_size)

    def _one(self, position: int):
        image, label = self._items[position]
        rng = np.random.default_rng([self.seed, self.epoch, 1, position])
        v1, v2 = self.transform(image, rng)
        return v1, v2, label

    def _collate(self, outputs: list) -> dict:
        import torch

        v1 = np.stack([o[0] for o in outputs]).transpose(0, 3, 1, 2)
        v2 = np.stack([o[1] for o in outputs]).transpose(0, 3, 1, 2)
        return {
            "view1": torch.from_numpy(np.ascontiguousarray(v1)),
            "view2": torch.from_numpy(np.ascontiguousarray(v2)),
            "label": torch.tensor([o[2] for o in outputs], dtype=torch.int64),
        }


class LocalFERLoader(_LocalLoader):
    """Iterable of FER batches (FRA_SPEC §9 transforms), like :func:`fra.data.stream.fer_dataset`.

    Args: as :class:`LocalTwoViewLoader`, plus ``train`` (random train transform and shuffling,
    or the deterministic eval transform in source order) and ``mean`` (erasing fill).

    Yields:
        ``{"image": uint8 (B, 3, S, S), "label": int64 (B,)}`` torch tensors.
    """

    def __init__(self, images, batch_size: int, image_size: int = 224, train: bool = True, seed: int = 0,
                 drop_last: bool | None = None, num_threads: int = 0, labels: Sequence[int] | None = None,
                 split: str = "train", transform: FERTransform | None = None, cache: bool = True):
        drop_last = train if drop_last is None else drop_last
        super().__init__(_Items(images, labels, split, cache), batch_size, seed, drop_last, num_threads, train)
        self.transform = transform or FERTransform(image_size, train=train)

    def _one(self, position: int):
        image, label = self._items[position]
        rng = np.random.default_rng([self.seed, self.epoch, 1, position])
        return self.transform(image, rng), label

    def _collate(self, outputs: list) -> dict:
        import torch

        x = np.stack([o[0] for o in outputs]).transpose(0, 3, 1, 2)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(x)),
            "label": torch.tensor([o[1] for o in outputs], dtype=torch.int64),
        }


__all__ = ["LocalTwoViewLoader", "LocalFERLoader", "local_stats"]
