"""What the face-alignment layouts (WFLW, 300W, AFLW-19) share: the annotation checks and per-face paths.

A landmark record carries ``landmarks`` (flat x, y, ... in source pixels, 0-based), ``box``
(x0, y0, x1, y1) and ``attributes`` (the card's ``options.attributes`` flags, 0/1). Bad
annotations are skipped and counted like bad images, with these reasons:

* ``bad_annotation``: a wrong number of points / fields, or values that do not parse;
* ``missing``: the annotated image is not there;
* ``box_outside``: less than half of the face box lies inside the image (checked by the shard
  writer once the image size is known), or the box is empty.

An image holding several faces (WFLW) gives one record per face; the second and later faces get
the path suffix ``#face<k>`` so every row has its own path (row keys, augmentation seeds); the
suffix is dropped when the image is read.
"""
from __future__ import annotations

import math

from fra.data.readers.base import Reader, Record, Skip

FACE_SUFFIX = "#face"
MIN_BOX_INSIDE = 0.5  # fraction of the box area that must lie inside the image


def image_path(record_path: str) -> str:
    """The image file of a record path (without a ``#face<k>`` suffix)."""
    return record_path.split(FACE_SUFFIX, 1)[0]


def box_from_points(values) -> tuple[float, float, float, float]:
    """The bounding box (x0, y0, x1, y1) of flat x, y, ... points."""
    xs, ys = values[0::2], values[1::2]
    return (min(xs), min(ys), max(xs), max(ys))


def box_skip(record: Record, width: int, height: int) -> Skip | None:
    """``box_outside`` when the record's box is empty or mostly outside a ``width`` x ``height`` image."""
    if record.box is None:
        return None
    x0, y0, x1, y1 = record.box
    area = (x1 - x0) * (y1 - y0)
    if not (x1 > x0 and y1 > y0) or not math.isfinite(area):
        return Skip(record.split, record.path, "box_outside", f"empty box {record.box}")
    inside = max(0.0, min(x1, width) - max(x0, 0.0)) * max(0.0, min(y1, height) - max(y0, 0.0))
    if inside < MIN_BOX_INSIDE * area:
        return Skip(record.split, record.path, "box_outside",
                    f"box {tuple(round(v, 1) for v in record.box)} is {100 * inside / area:.0f}% inside "
                    f"the {width}x{height} image")
    return None


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


class LandmarkReader(Reader):
    """Base of the landmark layouts: per-face paths and the box check."""

    def check(self, record: Record, width: int, height: int) -> Skip | None:
        return box_skip(record, width, height)

    def load(self, record: Record) -> dict:
        with self.fs.open_input_stream(self.full(image_path(record.path))) as fh:
            return {"image": fh.readall()}

    @property
    def num_points(self) -> int:
        return int(self.options["num_points"])
