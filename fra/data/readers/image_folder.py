"""A generic class-per-folder tree: ``<root>/<split>/<class>/<image>`` or ``<root>/<class>/<image>``.

If any of the card's split folders exists the first form is used; otherwise the whole tree is
one split (option ``flat_split``, default the card's first split). Classes are the card's
``classes`` in order when given (files of other folders are ``unknown_label`` skips), else the
sorted folder names found in all splits (torchvision ImageFolder order).
"""
from __future__ import annotations

from fra.data.readers.base import Reader, Record, Scan, Skip, is_image


class ImageFolderReader(Reader):
    """Reader of a class-per-folder tree (see module docstring)."""

    def _split_dirs(self) -> dict[str, str]:
        names = self.card.split_names
        present = {s: s for s in names if self.fs.get_file_info(self.full(s)).type.name == "Directory"}
        if present:
            return present
        return {self.options.get("flat_split", names[0]): ""}

    def splits(self) -> list[str]:
        return list(self._split_dirs())

    def classes(self) -> tuple[str, ...]:
        """Class names in label order."""
        if self.card.classes:
            return tuple(self.card.classes)
        found = set()
        for rel_dir in self._split_dirs().values():
            for f in self.list_files(rel_dir):
                parts = self.rel(f.path).split("/")[1 if rel_dir else 0 :]
                if len(parts) >= 2 and is_image(f.path):
                    found.add(parts[0])
        return tuple(sorted(found))

    def scan(self, split: str) -> Scan:
        dirs = self._split_dirs()
        if split not in dirs:
            return Scan([], [], {})
        rel_dir = dirs[split]
        index = {c: i for i, c in enumerate(self.classes())}
        records, skipped = [], []
        for f in self.list_files(rel_dir):
            if not is_image(f.path):
                continue
            rel = self.rel(f.path)
            parts = rel.split("/")[1 if rel_dir else 0 :]
            if len(parts) < 2 or parts[0] not in index:
                skipped.append(Skip(split, rel, "unknown_label", f"class folder {parts[0] if len(parts) > 1 else ''!r}"))
                continue
            records.append(Record(split, rel, index[parts[0]], size=f.size))
        return Scan(records, skipped, {})
