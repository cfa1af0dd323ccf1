"""WFLW from the official ``list_98pt_rect_attr_{train,test}.txt`` (see ``datasets/wflw.yaml``).

Each line: 196 landmark coordinates, the box (xmin ymin xmax ymax), the 6 attribute flags (pose,
expression, illumination, makeup, occlusion, blur) and the image path under ``WFLW_images/``.
Options: ``annotation_files`` ({split: path}), ``image_dir``, ``num_points``, ``attributes``,
``expected_subset_sizes`` (checked, with a warning, when the test file holds all 2,500 faces).
"""
from __future__ import annotations

import logging

from fra.data.readers.base import Record, Scan, Skip, text_digest
from fra.data.readers.landmarks import FACE_SUFFIX, LandmarkReader, all_finite

log = logging.getLogger(__name__)
OFFICIAL_TEST_FACES = 2500


class WFLWReader(LandmarkReader):
    """Reader of the official WFLW annotation lists (see module docstring)."""

    def scan(self, split: str) -> Scan:
        files = self.options.get("annotation_files", {})
        if split not in files:
            return Scan([], [], {})
        text = self.read_text(files[split])
        image_dir = self.options.get("image_dir", "WFLW_images")
        sizes = {self.rel(f.path): f.size for f in self.list_files(image_dir)}
        n, names = self.num_points, self.attribute_names()
        expected = 2 * n + 4 + len(names) + 1
        records, skipped, faces = [], [], {}
        for lineno, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            image = f"{image_dir}/{fields[-1]}"
            k = faces[image] = faces.get(image, -1) + 1
            rel = image if k == 0 else f"{image}{FACE_SUFFIX}{k}"
            if len(fields) != expected:
                skipped.append(Skip(split, rel, "bad_annotation", f"line {lineno}: {len(fields)} fields, expected "
                                    f"{expected} ({n} points, box, {len(names)} flags, path)"))
                continue
            try:
                values = [float(v) for v in fields[:-1]]
            except ValueError as exc:
                skipped.append(Skip(split, rel, "bad_annotation", f"line {lineno}: {exc}"))
                continue
            marks, box, flags = values[:2 * n], tuple(values[2 * n:2 * n + 4]), values[2 * n + 4:]
            if not all_finite(values) or any(f not in (0.0, 1.0) for f in flags):
                skipped.append(Skip(split, rel, "bad_annotation", f"line {lineno}: non-finite value or flag not 0/1"))
                continue
            if image not in sizes:
                skipped.append(Skip(split, rel, "missing", f"listed on line {lineno} of {files[split]}"))
                continue
            records.append(Record(split, rel, box=box, landmarks=tuple(marks), attributes=tuple(flags),
                                  size=sizes[image]))
        self._check_subsets(split, records)
        return Scan(records, skipped, {}, text_digest(text))

    def _check_subsets(self, split: str, records: list[Record]) -> None:
        expected = self.options.get("expected_subset_sizes") or {}
        if split != "test" or not expected or len(records) != OFFICIAL_TEST_FACES:
            return
        names = self.attribute_names()
        counts = {name: int(sum(r.attributes[i] for r in records)) for i, name in enumerate(names)}
        if any(counts.get(k) != v for k, v in expected.items()):
            log.warning("WFLW test subsets %s differ from the published sizes %s", counts, expected)
