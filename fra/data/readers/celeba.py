"""CelebA facial attributes from the official files (DOWNSTREAM_SPEC §1).

Layout under the root: ``img_align_celeba/<name>.jpg`` (the aligned 178x218 JPEGs),
``list_attr_celeba.txt`` and ``list_eval_partition.txt``. The attribute file is
space-separated with runs of spaces: line 1 is the image count, line 2 the attribute names (40
in the release; read from the file, never hard-coded), then one row per image: the file name
and one value per attribute, each ``-1`` or ``1``. The partition file has lines
``<name> <k>`` with k = 0 train, 1 valid, 2 test (``options.partitions`` maps the codes to the
card's splits). Attribute values are stored as 0/1 flags, ``(v + 1) / 2`` (the reference's
mapping), in the shard's ``attributes`` column, in header order; the manifest records the names.

Skipped and counted (listed in the manifest): a row with the wrong number of columns
(``malformed``), a value other than -1 / 1 (``unknown_label``), a repeated file name
(``duplicate``), an image listed but absent (``missing``), an image with a partition but no
attribute row (``unlabelled``). Attribute rows with no (or an unknown) partition cannot be
given a split: they are listed once, under the split ``unassigned``. The other files of the
release (identities, boxes, landmarks) are not needed and not read; the reference also checks
their MD5 sums, which this reader does not do.

The release's split sizes (162,770 / 19,867 / 19,962) are checked when the partition file lists
exactly their total (``options.expected_split_sizes``); subsets are accepted as they are.
"""
from __future__ import annotations

import logging

from fra.data.readers.base import Reader, Record, Scan, Skip, text_digest
from fra.errors import DataError

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"


class CelebAReader(Reader):
    """Reader of the official CelebA attribute layout (see module docstring)."""

    def _files(self) -> tuple[str, str, str]:
        o = self.options
        return (o.get("attr_file", "list_attr_celeba.txt"), o.get("partition_file", "list_eval_partition.txt"),
                o.get("image_dir", "img_align_celeba"))

    def _partitions(self) -> dict[str, str]:
        mapping = self.options.get("partitions", {0: "train", 1: "val", 2: "test"})
        return {str(k): str(v) for k, v in mapping.items()}

    def _parse_attributes(self) -> tuple[str, tuple[str, ...], list[tuple[int, str, list[str]]]]:
        """(text, names, rows as (line number, name, value fields)); header errors raise."""
        attr_file = self._files()[0]
        text = self.read_text(attr_file)
        lines = text.splitlines()
        if len(lines) < 2:
            raise DataError(f"{attr_file}: expected an image count and a header line, got {len(lines)} line(s)")
        try:
            count = int(lines[0].strip())
        except ValueError as exc:
            raise DataError(f"{attr_file}: line 1 must be the number of images, got {lines[0].strip()[:80]!r}") from exc
        names = tuple(lines[1].split())
        if not names or len(set(names)) != len(names):
            raise DataError(f"{attr_file}: line 2 must name the attributes (distinct), got {lines[1].strip()[:120]!r}")
        rows = [(i + 1, f[0], f[1:]) for i, line in enumerate(lines[2:], start=2) if (f := line.split())]
        if count != len(rows):
            log.warning("%s: line 1 says %d images, the file has %d rows", attr_file, count, len(rows))
        return text, names, rows

    def attribute_names(self) -> tuple[str, ...]:
        return self._parse_attributes()[1]

    def scan(self, split: str) -> Scan:
        attr_file, part_file, image_dir = self._files()
        text, names, rows = self._parse_attributes()
        part_text = self.read_text(part_file)
        codes = self._partitions()
        first = self.splits()[0]
        skipped: list[Skip] = []
        assigned: dict[str, str] = {}
        bad_lines: set[str] = set()
        for line in part_text.splitlines():
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in codes:
                bad_lines.add(fields[0])
                if split == first:
                    skipped.append(Skip(UNASSIGNED, f"{image_dir}/{fields[0]}", "bad_partition",
                                        f"{part_file} line {line.strip()[:80]!r}"))
                continue
            assigned[fields[0]] = codes[fields[1]]
        self._check_sizes(assigned)
        sizes = {self.rel(f.path): f.size for f in self.list_files(image_dir)}
        records, seen = [], set()
        for lineno, name, values in rows:
            rel = f"{image_dir}/{name}"
            where = assigned.get(name)
            if where is None:
                if split == first and name not in bad_lines:
                    skipped.append(Skip(UNASSIGNED, rel, "no_partition", f"not in {part_file}"))
                continue
            if where != split:
                seen.add(name)
                continue
            if name in seen:
                skipped.append(Skip(split, rel, "duplicate", f"{attr_file} line {lineno + 1}: repeated file name"))
                continue
            seen.add(name)
            if len(values) != len(names):
                skipped.append(Skip(split, rel, "malformed", f"{attr_file} line {lineno + 1}: {len(values)} values "
                                                             f"for {len(names)} attributes"))
                continue
            if any(v not in ("-1", "1") for v in values):
                bad = sorted({v for v in values if v not in ("-1", "1")})
                skipped.append(Skip(split, rel, "unknown_label", f"{attr_file} line {lineno + 1}: values {bad[:5]} "
                                                                 "(expected -1 or 1)"))
                continue
            if rel not in sizes:
                skipped.append(Skip(split, rel, "missing", f"listed in {attr_file}"))
                continue
            flags = tuple(float((int(v) + 1) // 2) for v in values)  # {-1, 1} -> {0, 1}, as the reference
            records.append(Record(split, rel, -1, attributes=flags, size=sizes[rel]))
        labelled = {name for _, name, _ in rows}
        for name, where in assigned.items():
            if where == split and name not in labelled:
                skipped.append(Skip(split, f"{image_dir}/{name}", "unlabelled", f"in {part_file}, not in {attr_file}"))
        return Scan(records, skipped, {}, text_digest(text, part_text))

    def _check_sizes(self, assigned: dict[str, str]) -> None:
        expected = {str(k): int(v) for k, v in (self.options.get("expected_split_sizes") or {}).items()}
        if not expected or len(assigned) != sum(expected.values()):
            return
        got = {s: 0 for s in expected}
        for where in assigned.values():
            got[where] = got.get(where, 0) + 1
        if got != expected:
            raise DataError(f"{self._files()[1]} lists the release's {len(assigned)} images but splits them "
                            f"{got}, expected {expected}")
