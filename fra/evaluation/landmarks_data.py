"""Face-alignment streams over landmark shards: decode, crop, augment, in Ray Data tasks.

Rows (``image`` uint8 (3, S, S), ``points`` float32 (L, 2) crop pixels — the training target —,
``matrix`` float32 (2, 3) source -> crop, ``gt`` float32 (L, 2) source pixels, ``box`` float32 (4,),
``attributes`` float32 (A,), ``corrupt`` bool). A corrupt image, or a row whose point count is not
the protocol's, becomes a flagged placeholder that :class:`fra.data.stream.BatchStream` drops and
counts, as for FER. Evaluation maps predictions back through ``matrix`` and scores them against
``gt`` in source pixels, so the NME is the benchmark's, not the crop's.

The protocol (point count, flip pairs, normaliser, FR threshold, crop scale, subsets) comes from
the dataset card's ``options`` (``datasets/wflw.yaml`` ...) and the manifest's attribute names.
A validation split can be carved from train by path hash (``val_fraction``), as for FER.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from fra.data.manifest import Manifest
from fra.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LandmarkProtocol:
    """What a card says about scoring and augmenting one landmark dataset."""

    num_points: int
    flip_pairs: tuple[tuple[int, int], ...] = ()
    normalizer: str = "inter_ocular"
    normalizer_points: tuple = ()
    fr_threshold: float = 0.10
    box_scale: float = 1.25
    attributes: tuple[str, ...] = ()
    extra_normalizers: tuple[str, ...] = ()  # box-based normalisers reported next to the main one (AFLW-19: box)

    def to_dict(self) -> dict:
        return asdict(self)


def landmark_protocol(manifest: Manifest, overrides: dict | None = None) -> LandmarkProtocol:
    """The protocol of the manifest's dataset card (``options``), with ``overrides`` on top.

    Raises:
        ConfigError: the card is unknown or has no ``num_points`` (not a landmark dataset).
    """
    from fra.data.cards import load_card

    options = dict(load_card(manifest.dataset).options)
    options.update(overrides or {})
    if "num_points" not in options:
        raise ConfigError(f"{manifest.uri}: dataset {manifest.dataset!r} has no num_points in its card; "
                          "not a landmark dataset (wflw, 300w, aflw19, synthetic_landmarks)")

    def nested(v):
        return tuple(nested(x) for x in v) if isinstance(v, (list, tuple)) else v

    return LandmarkProtocol(
        num_points=int(options["num_points"]),
        flip_pairs=tuple(tuple(int(i) for i in p) for p in options.get("flip_pairs", ())),
        normalizer=str(options.get("normalizer", "inter_ocular")),
        normalizer_points=nested(options.get("normalizer_points", ())),
        fr_threshold=float(options.get("fr_threshold", 0.10)),
        box_scale=float(options.get("box_scale", 1.25)),
        attributes=tuple(manifest.attributes),
        extra_normalizers=_extra_normalizers(options.get("extra_normalizers", ()), manifest.dataset),
    )


def _extra_normalizers(value, dataset: str) -> tuple[str, ...]:
    """The card's ``extra_normalizers``: box-based only (they need no points of their own)."""
    names = (value,) if isinstance(value, str) else tuple(value or ())
    bad = [n for n in names if n not in ("box", "diag")]
    if bad:
        raise ConfigError(f"dataset {dataset!r}: extra_normalizers {bad} not supported; valid: box, diag "
                          "(reported next to the protocol's normalizer)")
    return tuple(str(n) for n in names)


def landmark_dataset(manifest: Manifest, split: str, protocol: LandmarkProtocol, *, image_size: int, train: bool,
                     seed: int = 0, num_cpus: float = 1.0, augment: dict | None = None, val_fraction: float = 0.0,
                     select: str = "all"):
    """A lazy Ray dataset of landmark rows (module docstring).

    Args:
        select: ``all`` rows, or with ``val_fraction`` the ``train`` or ``val`` part of the split.
    """
    from fra.data import stream

    # NOTE: uses the stream module's reader (as fra.evaluation.data does) so the per-epoch file and
    # row shuffles, and the execution index that seeds the augmentation, are the FER stream's.
    ds = stream._read(manifest, split, ["image", "path", "box", "landmarks", "attributes"], seed if train else None,
                      shuffle_rows=train)
    from fra.data.landmark_augment import flip_permutation

    perm = tuple(int(i) for i in flip_permutation(protocol.num_points, protocol.flip_pairs))
    kwargs = {"image_size": int(image_size), "train": bool(train), "seed": int(seed),
              "num_points": protocol.num_points, "num_attributes": len(protocol.attributes),
              "box_scale": protocol.box_scale, "flip_perm": perm if protocol.flip_pairs else None,
              "augment": dict(augment or {}), "val_fraction": float(val_fraction), "select": select}
    return ds.map_batches(_landmark_batch, batch_size=32, batch_format="numpy", num_cpus=num_cpus, fn_kwargs=kwargs)


def _landmark_batch(batch: dict, *, image_size: int, train: bool, seed: int, num_points: int, num_attributes: int,
                    box_scale: float, flip_perm, augment: dict, val_fraction: float, select: str) -> dict:
    from fra.data.landmark_augment import LandmarkTransform
    from fra.data.stream import CORRUPT, _decode, _execution_index, row_key
    from fra.evaluation.data import is_val

    keys = np.asarray([row_key(p) for p in batch["path"]], np.int64)
    keep = np.ones(len(keys), bool)
    if val_fraction and select != "all":
        keep = is_val(keys, val_fraction) if select == "val" else ~is_val(keys, val_fraction)
    idx = np.flatnonzero(keep)
    n, s = len(idx), image_size
    transform = LandmarkTransform(s, train=train, box_scale=box_scale,
                                  flip_perm=tuple(flip_perm) if flip_perm else None, **augment)
    out = {"image": np.zeros((n, 3, s, s), np.uint8), "points": np.zeros((n, num_points, 2), np.float32),
           "matrix": np.zeros((n, 2, 3), np.float32), "gt": np.zeros((n, num_points, 2), np.float32),
           "box": np.zeros((n, 4), np.float32), "attributes": np.zeros((n, num_attributes), np.float32),
           CORRUPT: np.zeros(n, bool)}
    execution = _execution_index()
    for j, i in enumerate(idx):
        path = batch["path"][i]
        marks = batch["landmarks"][i]
        img = _decode(batch["image"][i], path)
        if img is None or marks is None or len(marks) != 2 * num_points:
            if img is not None:
                log.warning("dropping %s: %s landmark values, expected %d", path,
                            None if marks is None else len(marks), 2 * num_points)
            out[CORRUPT][j] = True
            out["matrix"][j] = np.eye(2, 3)
            continue
        gt = np.asarray(marks, np.float64).reshape(num_points, 2)
        box = batch["box"][i]
        if box is None or len(box) != 4:
            box = (gt[:, 0].min(), gt[:, 1].min(), gt[:, 0].max(), gt[:, 1].max())
        rng = np.random.default_rng([seed, execution, 1, int(keys[i])]) if train else None
        image, points, matrix = transform(img, gt, box, rng)
        out["image"][j] = image.transpose(2, 0, 1)
        out["points"][j], out["matrix"][j], out["gt"][j], out["box"][j] = points, matrix, gt, box
        flags = batch["attributes"][i]
        if num_attributes and flags is not None:
            out["attributes"][j] = np.asarray(flags, np.float32)[:num_attributes]
    return out


def landmark_datasets(manifest: Manifest, protocol: LandmarkProtocol, *, image_size: int, train_split: str,
                      test_split: str, val_fraction: float = 0.0, seed: int = 0, num_cpus: float = 1.0,
                      augment: dict | None = None) -> tuple[dict, dict]:
    """Ray datasets ``train``, ``test`` (and ``val``) and their row counts (the val carve is by path hash,
    counted from the shards' path column)."""
    from fra.evaluation.data import is_val, split_index

    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    for split in (train_split, test_split):
        if split not in manifest.counts or not manifest.num_rows(split):
            raise ConfigError(f"{manifest.uri} has no rows in split {split!r} (splits: {list(manifest.counts)})")
    common = {"protocol": protocol, "image_size": image_size, "seed": seed, "num_cpus": num_cpus}
    out = {"train": landmark_dataset(manifest, train_split, train=True, augment=augment, val_fraction=val_fraction,
                                     select="train" if val_fraction else "all", **common),
           "test": landmark_dataset(manifest, test_split, train=False, **common)}
    info = {"train": manifest.num_rows(train_split), "test": manifest.num_rows(test_split)}
    if val_fraction:
        out["val"] = landmark_dataset(manifest, train_split, train=False, val_fraction=val_fraction, select="val",
                                      **common)
        carved = int(is_val(split_index(manifest, train_split).keys, val_fraction).sum())
        info["train"], info["val"] = info["train"] - carved, carved
        if not info["train"] or not carved:
            raise ConfigError(f"data.val_fraction={val_fraction} leaves {info['train']} training and {carved} "
                              "validation rows")
    return out, info


__all__ = ["LandmarkProtocol", "landmark_protocol", "landmark_dataset", "landmark_datasets"]
