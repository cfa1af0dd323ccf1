"""VGGFace2: ``<root>/<split>/<identity>/<image>.jpg`` (identity folders like ``n000002``).

Optional files used when present: ``meta/identity_meta.csv`` (identities not listed there are
skipped as ``unknown_label``) and the loose boxes / 5 landmarks of
``bb_landmark/loose_bb_<split>.csv`` and ``bb_landmark/loose_landmark_<split>.csv`` (keyed by
``NAME_ID`` = ``<identity>/<image stem>``). The label is the identity's index among the split's
identity folders, sorted (torchvision ImageFolder order, as the reference). The loose box is stored
with each image; the card's ``crop_to_box`` / ``box_scale`` make the pretraining views from the face
crop (:func:`fra.data.stream.pretrain_dataset`).
"""
from __future__ import annotations

import csv
import io

from fra.data.readers.base import Reader, Record, Scan, Skip, is_image, text_digest


class VGGFace2Reader(Reader):
    """Reader of the VGGFace2 folder layout (see module docstring)."""

    def scan(self, split: str) -> Scan:
        files = [f for f in self.list_files(split) if is_image(f.path)]
        skipped: list[Skip] = []
        by_identity: dict[str, list] = {}
        for f in files:
            rel = self.rel(f.path)
            parts = rel.split("/")
            if len(parts) != 3:
                skipped.append(Skip(split, rel, "unexpected_path", "expected <split>/<identity>/<image>"))
                continue
            by_identity.setdefault(parts[1], []).append((rel, f.size))
        known, digest_parts = self._meta_identities()
        boxes, marks, box_texts = self._boxes(split)
        identities = sorted(by_identity)
        records = []
        for label, ident in enumerate(identities):
            for rel, size in by_identity[ident]:
                if known is not None and ident not in known:
                    skipped.append(Skip(split, rel, "unknown_label", f"identity {ident} not in identity_meta.csv"))
                    continue
                key = rel.split("/", 1)[1].rsplit(".", 1)[0]
                records.append(Record(split, rel, label, ident, boxes.get(key), marks.get(key), size=size))
        return Scan(records, skipped, {}, text_digest(*digest_parts, *box_texts))

    def _meta_identities(self) -> tuple[set[str] | None, list[str]]:
        rel = self.options.get("identity_meta", "meta/identity_meta.csv")
        if not rel or not self.exists(rel):
            return None, []
        text = self.read_text(rel)
        rows = csv.reader(io.StringIO(text), skipinitialspace=True)
        next(rows, None)  # header: Class_ID, Name, Sample_Num, Flag, Gender
        return {r[0].strip() for r in rows if r}, [text]

    def _boxes(self, split: str):
        boxes: dict[str, tuple] = {}
        marks: dict[str, tuple] = {}
        texts = []
        bb = self.options.get("boxes", "bb_landmark/loose_bb_{split}.csv").format(split=split)
        lm = self.options.get("landmarks", "bb_landmark/loose_landmark_{split}.csv").format(split=split)
        if bb and self.exists(bb):
            texts.append(text := self.read_text(bb))
            for row in _rows(text):  # NAME_ID, X, Y, W, H
                x, y, w, h = (float(v) for v in row[1:5])
                boxes[row[0]] = (x, y, x + w, y + h)
        if lm and self.exists(lm):
            texts.append(text := self.read_text(lm))
            for row in _rows(text):  # NAME_ID, P1X, P1Y, ..., P5X, P5Y
                marks[row[0]] = tuple(float(v) for v in row[1:11])
        return boxes, marks, texts


def _rows(text: str):
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    next(rows, None)
    for row in rows:
        if row:
            yield [row[0].strip().strip('"')] + row[1:]
