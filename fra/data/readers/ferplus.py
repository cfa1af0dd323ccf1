"""FERPlus: ``Labels/FER2013{Train,Valid,Test}/label.csv`` + ``Images/<same>/<name>.png``.

Each label row is ``name, face box, 10 vote counts`` (neutral, happiness, surprise, sadness,
anger, disgust, fear, contempt, unknown, not-a-face). The majority protocol of the FERPlus
reference code: counts <= 1 are zeroed; if the largest count is more than half of the rest's sum,
its index is the label, otherwise "unknown"; images whose label is unknown or not-a-face
(index >= 8) are excluded by protocol (counted). Splits: train / val / test = Train / Valid /
Test (the reference evaluates on Test = FER2013 PrivateTest).
"""
from __future__ import annotations

import csv
import io

from fra.data.readers.base import Reader, Record, Scan, Skip, text_digest

FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}


def majority_label(votes: list[float], num_classes: int = 8) -> int:
    """FERPlus majority vote; returns the class index or -1 (unknown / not a face)."""
    votes = [0.0 if v <= 1.0 else float(v) for v in votes]
    total = sum(votes)
    top = max(votes) if votes else 0.0
    if top <= 0.5 * total or top == 0:
        return -1
    idx = votes.index(top)
    return idx if idx < num_classes else -1


class FERPlusReader(Reader):
    """Reader of the FERPlus label layout (see module docstring)."""

    def scan(self, split: str) -> Scan:
        folder = self.options.get("folders", FOLDERS).get(split)
        if folder is None:
            return Scan([], [], {})
        text = self.read_text(f"Labels/{folder}/label.csv")
        image_dir = f"Images/{folder}"
        sizes = {self.rel(f.path): f.size for f in self.list_files(image_dir)}
        num_classes = len(self.card.classes)
        records, skipped, excluded = [], [], {}
        for row in csv.reader(io.StringIO(text)):
            if not row or not row[0].strip() or row[0].strip().lower() in ("image name", "image"):
                continue
            rel = f"{image_dir}/{row[0].strip()}"
            try:
                votes = [float(v) for v in row[2:12]]
                if len(votes) != 10:
                    raise ValueError(f"{len(votes)} vote columns")
            except ValueError as exc:
                skipped.append(Skip(split, rel, "unknown_label", f"bad vote columns: {exc}"))
                continue
            label = majority_label(votes, num_classes)
            if label < 0:
                excluded["no_majority_or_not_face"] = excluded.get("no_majority_or_not_face", 0) + 1
            elif rel not in sizes:
                skipped.append(Skip(split, rel, "missing", "listed in label.csv"))
            else:
                records.append(Record(split, rel, label, size=sizes[rel]))
        return Scan(records, skipped, excluded, text_digest(text))
