"""RAF-DB basic emotions: ``EmoLabel/list_patition_label.txt`` + ``Image/aligned/<stem>_aligned.jpg``.

Label lines look like ``train_00001.jpg 5``; the split is ``train`` when the name contains
``train``, else ``test`` (the reference's rule); the label is the value minus 1 (1-7 = Surprise,
Fear, Disgust, Happiness, Sadness, Anger, Neutral). Options: ``label_file``, ``image_dir``,
``image_suffix`` (use ``Image/original`` and ``""`` for the unaligned images).
"""
from __future__ import annotations

from fra.data.readers.base import Reader, Record, Scan, Skip, text_digest


class RAFDBReader(Reader):
    """Reader of the RAF-DB basic-emotion layout (see module docstring)."""

    def scan(self, split: str) -> Scan:
        text = self.read_text(self.options.get("label_file", "EmoLabel/list_patition_label.txt"))
        image_dir = self.options.get("image_dir", "Image/aligned")
        suffix = self.options.get("image_suffix", "_aligned")
        sizes = {self.rel(f.path): f.size for f in self.list_files(image_dir)}
        num_classes = len(self.card.classes)
        records, skipped = [], []
        for line in text.splitlines():
            fields = line.split()
            if not fields:
                continue
            name = fields[0]
            if ("train" if "train" in name else "test") != split:
                continue
            stem, _, ext = name.rpartition(".")
            rel = f"{image_dir}/{stem}{suffix}.{ext}"
            try:
                label = int(fields[1]) - 1
            except (IndexError, ValueError):
                label = -1
            if not 0 <= label < num_classes:
                skipped.append(Skip(split, rel, "unknown_label", f"label line {line.strip()!r}"))
            elif rel not in sizes:
                skipped.append(Skip(split, rel, "missing", f"listed in the label file as {name}"))
            else:
                records.append(Record(split, rel, label, size=sizes[rel]))
        return Scan(records, skipped, {}, text_digest(text))
