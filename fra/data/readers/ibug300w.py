"""300W (iBUG) from its folders of images with ``.pts`` files beside them (see ``datasets/300w.yaml``).

A ``.pts`` file: ``version: 1``, ``n_points: 68``, ``{``, 68 lines ``x y``, ``}``; coordinates are
1-based and stored 0-based (``coordinate_offset``). Options: ``folders`` ({split: [folder, ...]}),
``subset_folders`` ({attribute: [folder, ...]}, the 0/1 attributes in ``attributes`` order),
``num_points``, ``box_from_landmarks`` (the face box is the points' bounding box). An image is
matched to its ``.pts`` by stem, ignoring spaces (iBUG's ``image_092 _01.jpg``); a ``.pts``
without an image is ``missing``; an image without a ``.pts`` is not annotated and not listed.
"""
from __future__ import annotations

import posixpath

from fra.data.readers.base import Record, Scan, Skip, is_image, text_digest
from fra.data.readers.landmarks import LandmarkReader, all_finite, box_from_points


def parse_pts(text: str) -> tuple[list[float], int]:
    """(flat x, y, ... values, declared n_points) of a ``.pts`` file.

    Raises:
        ValueError: no ``{ ... }`` block, or a line inside it that is not two numbers.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    declared = -1
    for ln in lines:
        if ln.lower().startswith("n_points"):
            declared = int(ln.split(":", 1)[1])
    if "{" not in lines or "}" not in lines:
        raise ValueError("no { ... } block")
    body = lines[lines.index("{") + 1:lines.index("}")]
    values = []
    for ln in body:
        parts = ln.split()
        if len(parts) != 2:
            raise ValueError(f"point line {ln!r} is not 'x y'")
        values += [float(parts[0]), float(parts[1])]
    return values, declared


class IBUG300WReader(LandmarkReader):
    """Reader of the 300W folder layout (see module docstring)."""

    def scan(self, split: str) -> Scan:
        folders = self.options.get("folders", {}).get(split, [])
        subsets = self.options.get("subset_folders", {})
        names = self.attribute_names()
        offset = float(self.options.get("coordinate_offset", 1.0))
        records, skipped, texts = [], [], []
        for folder in folders:
            files = self.list_files(folder)
            images = {}
            for f in files:
                rel = self.rel(f.path)
                if is_image(rel):
                    images[_stem_key(rel)] = (rel, f.size)
            flags = tuple(1.0 if folder in subsets.get(name, []) else 0.0 for name in names)
            for f in files:
                pts = self.rel(f.path)
                if not pts.endswith(".pts"):
                    continue
                text = self.read_text(pts)
                texts.append(f"{pts}\n{text}")
                image = images.get(_stem_key(pts))
                rel = image[0] if image else pts
                try:
                    values, declared = parse_pts(text)
                except ValueError as exc:
                    skipped.append(Skip(split, rel, "bad_annotation", f"{pts}: {exc}"))
                    continue
                if len(values) != 2 * self.num_points or declared != self.num_points or not all_finite(values):
                    skipped.append(Skip(split, rel, "bad_annotation", f"{pts}: {len(values) // 2} points (n_points "
                                        f"{declared}), expected {self.num_points}"))
                    continue
                if image is None:
                    skipped.append(Skip(split, rel, "missing", f"no image beside {pts}"))
                    continue
                marks = tuple(v - offset for v in values)
                records.append(Record(split, rel, box=box_from_points(marks), landmarks=marks,
                                      attributes=flags if names else None, size=image[1]))
        return Scan(records, skipped, {}, text_digest(*texts))


def _stem_key(rel: str) -> str:
    """Folder + file stem without spaces: the key pairing an image with its ``.pts``."""
    folder, name = posixpath.split(rel)
    return f"{folder}/{posixpath.splitext(name)[0].replace(' ', '')}"
