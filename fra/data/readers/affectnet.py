"""AffectNet from the official CSVs (``Manually_Annotated_file_lists/{training,validation}.csv``).

Columns: ``subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks,
expression, valence, arousal``; images under ``Manually_Annotated_Images/``. Expression codes
0-7 = Neutral, Happiness, Sadness, Surprise, Fear, Disgust, Anger, Contempt; 8-10 = None,
Uncertain, No-Face. The card's class list sets the protocol: codes ``>= len(classes)`` up to 10
are excluded by protocol (counted), anything else is an ``unknown_label`` skip. The face box and
the 68 landmarks are stored with each image (the original JPEG is kept; cropping to the box is a
streaming option). Valence and arousal go to the ``targets`` column when both parse and lie in
[-1, 1] (-2 marks "not annotated"); with ``require_valence_arousal`` (the ``affectnet_va`` card)
a row without them is skipped as ``unknown_target``, else it keeps its expression label with no
targets.
"""
from __future__ import annotations

import csv
import io

from fra.data.readers.base import Reader, Record, Scan, Skip, text_digest

MAX_CODE = 10


class AffectNetReader(Reader):
    """Reader of the official AffectNet CSV layout (see module docstring)."""

    def target_names(self) -> tuple[str, ...]:
        return ("valence", "arousal")

    def scan(self, split: str) -> Scan:
        files = self.options.get("label_files", {"train": "Manually_Annotated_file_lists/training.csv",
                                                 "val": "Manually_Annotated_file_lists/validation.csv"})
        if split not in files:
            return Scan([], [], {})
        text = self.read_text(files[split])
        image_dir = self.options.get("image_dir", "Manually_Annotated_Images")
        sizes = {self.rel(f.path): f.size for f in self.list_files(image_dir)}
        num_classes = len(self.card.classes)
        records, skipped, excluded = [], [], {}
        for row in csv.DictReader(io.StringIO(text)):
            rel = f"{image_dir}/{row.get('subDirectory_filePath', '').strip()}"
            try:
                code = int(float(row["expression"]))
            except (KeyError, TypeError, ValueError):
                code = -1
            if num_classes <= code <= MAX_CODE:
                excluded[f"code_{code}"] = excluded.get(f"code_{code}", 0) + 1
                continue
            if not 0 <= code < num_classes:
                skipped.append(Skip(split, rel, "unknown_label", f"expression {row.get('expression')!r}"))
                continue
            targets = _valence_arousal(row)
            if targets is None and self.options.get("require_valence_arousal", False):
                skipped.append(Skip(split, rel, "unknown_target",
                                    f"valence {row.get('valence')!r}, arousal {row.get('arousal')!r}"))
                continue
            if rel not in sizes:
                skipped.append(Skip(split, rel, "missing", "listed in the CSV"))
                continue
            records.append(Record(split, rel, code, box=_box(row), landmarks=_landmarks(row), size=sizes[rel],
                                  targets=targets))
        return Scan(records, skipped, excluded, text_digest(text))


def _valence_arousal(row: dict):
    try:
        values = (float(row["valence"]), float(row["arousal"]))
    except (KeyError, TypeError, ValueError):
        return None
    return values if all(-1.0 <= v <= 1.0 for v in values) else None


def _box(row: dict):
    try:
        x, y, w, h = (float(row[k]) for k in ("face_x", "face_y", "face_width", "face_height"))
    except (KeyError, TypeError, ValueError):
        return None
    return (x, y, x + w, y + h)


def _landmarks(row: dict):
    raw = (row.get("facial_landmarks") or "").strip()
    try:
        values = tuple(float(v) for v in raw.split(";") if v.strip())
    except ValueError:
        return None
    return values if values and len(values) % 2 == 0 else None
