"""FER2013: one ``fer2013.csv`` with columns ``emotion, pixels, Usage``.

Images are 48x48 grey pixel strings; they are stored as lossless PNG (there are no original image
files). ``Usage`` Training / PublicTest / PrivateTest -> train / val / test (the reference
evaluates on PrivateTest). Labels 0-6 = Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral.
"""
from __future__ import annotations

import csv
import io

import numpy as np

from fra.data.decode import CorruptImageError, encode_png
from fra.data.readers.base import Reader, Record, Scan, Skip, text_digest

USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SIDE = 48


class FER2013Reader(Reader):
    """Reader of ``fer2013.csv`` (see module docstring)."""

    def scan(self, split: str) -> Scan:
        name = self.options.get("csv", "fer2013.csv")
        text = self.read_text(name)
        usage = self.options.get("usage", USAGE)
        num_classes = len(self.card.classes)
        records, skipped = [], []
        for i, row in enumerate(csv.DictReader(io.StringIO(text))):
            if usage.get((row.get("Usage") or "").strip()) != split:
                continue
            rel = f"{name}#{i}"
            try:
                label = int(row["emotion"])
            except (KeyError, TypeError, ValueError):
                label = -1
            if not 0 <= label < num_classes:
                skipped.append(Skip(split, rel, "unknown_label", f"emotion {row.get('emotion')!r}"))
                continue
            records.append(Record(split, rel, label, payload=row.get("pixels") or ""))
        return Scan(records, skipped, {}, text_digest(text))

    def load(self, record: Record) -> dict:
        """Encode the pixel string as PNG; a malformed string raises :class:`CorruptImageError`."""
        try:
            values = np.array(record.payload.split(), dtype=np.int64)
        except ValueError as exc:
            raise CorruptImageError(f"non-numeric pixel values: {exc}") from exc
        if values.size != SIDE * SIDE or values.min(initial=0) < 0 or values.max(initial=0) > 255:
            raise CorruptImageError(f"expected {SIDE * SIDE} pixel values in 0-255, got {values.size}")
        return {"image": encode_png(values.astype(np.uint8).reshape(SIDE, SIDE))}
