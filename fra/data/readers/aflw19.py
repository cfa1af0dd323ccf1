"""AFLW-19 from the release file ``AFLWinfo_release.mat`` (see ``datasets/aflw19.yaml``).

Fields: ``bbox`` (N x 4: left, right, top, bottom), ``data`` (N x 38: x1..x19 then y1..y19),
``mask_new`` (N x 19 visibility), ``nameList`` (N image paths under ``data/flickr/``), ``ra`` (a
1-based permutation): train = ``ra[:train_count]``, test = the rest. The one attribute,
``frontal``, is 1 for faces with all 19 points visible (FaRL's rule). Options:
``annotation_file``, ``image_dir``, ``train_count``, ``num_points``.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np

from fra.data.readers.base import Record, Scan, Skip
from fra.data.readers.landmarks import LandmarkReader, all_finite
from fra.errors import DataError

FIELDS = ("bbox", "data", "mask_new", "nameList", "ra")


class AFLW19Reader(LandmarkReader):
    """Reader of the AFLW-19 release file (see module docstring)."""

    def _release(self) -> tuple[dict, str]:
        from scipy.io import loadmat

        rel = self.options.get("annotation_file", "AFLWinfo_release.mat")
        try:
            with self.fs.open_input_stream(self.full(rel)) as fh:
                raw = fh.readall()
        except FileNotFoundError as exc:
            raise DataError(f"{self.card.name}: expected file {rel!r} under {self.root}") from exc
        try:
            mat = loadmat(io.BytesIO(raw))
        except (ValueError, TypeError, OSError) as exc:
            raise DataError(f"{self.card.name}: {rel} is not a readable MATLAB file: {exc}") from exc
        missing = [f for f in FIELDS if f not in mat]
        if missing:
            raise DataError(f"{self.card.name}: {rel} lacks the fields {missing} (has {sorted(k for k in mat if not k.startswith('__'))})")
        return mat, hashlib.sha256(raw).hexdigest()

    def scan(self, split: str) -> Scan:
        if split not in ("train", "test"):
            return Scan([], [], {})
        mat, digest = self._release()
        n = self.num_points
        data = np.asarray(mat["data"], np.float64)
        bbox = np.asarray(mat["bbox"], np.float64)
        visible = np.asarray(mat["mask_new"])
        names = [_string(v) for v in np.asarray(mat["nameList"], dtype=object).ravel()]
        count = len(names)
        if data.shape != (count, 2 * n) or bbox.shape != (count, 4) or visible.shape[0] != count:
            raise DataError(f"{self.card.name}: data {data.shape} / bbox {bbox.shape} / mask_new {visible.shape} do "
                            f"not match {count} names with {n} points")
        order = np.asarray(mat["ra"], np.int64).ravel() - 1
        if sorted(order.tolist()) != list(range(count)):
            raise DataError(f"{self.card.name}: ra is not a 1-based permutation of the {count} faces")
        cut = int(self.options.get("train_count", 20000))
        chosen = order[:cut] if split == "train" else order[cut:]
        image_dir = self.options.get("image_dir", "data/flickr")
        sizes = {self.rel(f.path): f.size for f in self.list_files(image_dir)}
        records, skipped = [], []
        for i in chosen.tolist():
            rel = f"{image_dir}/{names[i]}"
            xs, ys = data[i, :n], data[i, n:]
            marks = tuple(float(v) for pair in zip(xs, ys) for v in pair)
            left, right, top, bottom = (float(v) for v in bbox[i])
            if not all_finite(marks) or not all_finite((left, right, top, bottom)):
                skipped.append(Skip(split, rel, "bad_annotation", f"face {i + 1}: non-finite point or box"))
                continue
            if rel not in sizes:
                skipped.append(Skip(split, rel, "missing", f"face {i + 1} of the release file"))
                continue
            frontal = float(bool(np.all(visible[i] == 1)))
            records.append(Record(split, rel, box=(left, top, right, bottom), landmarks=marks,
                                  attributes=(frontal,), size=sizes[rel]))
        return Scan(records, skipped, {}, digest)


def _string(value) -> str:
    """A MATLAB cell entry (nested arrays of str) as a plain string."""
    while isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else ""
    return str(value).strip()
