"""The procedural synthetic faces (:mod:`fra.data.synthetic`), rendered while sharding.

Images are stored as JPEG (quality option ``jpeg_quality``, default 90), with the part mask as
PNG and the 5 landmarks. Generator settings come from the card (``splits.num_identities``,
``splits.images_per_identity``, ``splits.fractions``) and can be overridden by reader options:
``num_identities``, ``images_per_identity``, ``size``, ``seed``, ``intensity``, ``jitter``,
``clutter``, ``split_fractions``, ``align`` (similarity-align each face on its 5 landmarks, like
RAF-DB's aligned crops), ``landmark_set`` (``five``, or ``ibug68``: the 68 iBUG points the
``synthetic_landmarks`` card stores for face alignment), ``glasses`` (probability of glasses) and
``with_attributes`` (store the binary attributes and valence / arousal of
:mod:`fra.data.synthetic_attributes` in the ``attributes`` / ``targets`` columns: the embedded
default of the attribute and affect evaluations).
"""
from __future__ import annotations

from fra.data.decode import encode_jpeg, encode_png
from fra.data.readers.base import Reader, Record, Scan

_SPEC_KEYS = ("num_identities", "images_per_identity", "size", "seed", "intensity", "jitter", "clutter",
              "split_fractions", "align", "landmark_set", "glasses")


class SyntheticFacesReader(Reader):
    """Renders :class:`~fra.data.synthetic.SyntheticFaces` samples (root is ignored)."""

    def spec(self):
        from fra.data.synthetic import SPLITS, SyntheticFaces

        splits = self.card.splits if isinstance(self.card.splits, dict) else {}
        kwargs = {k: splits[k] for k in ("num_identities", "images_per_identity") if k in splits}
        if "fractions" in splits:
            kwargs["split_fractions"] = tuple(float(splits["fractions"].get(s, 0.0)) for s in SPLITS)
        kwargs.update({k: self.options[k] for k in _SPEC_KEYS if self.options.get(k) is not None})
        for k in ("intensity", "split_fractions"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        return SyntheticFaces(**kwargs)

    def describe(self) -> dict:
        out = super().describe()
        out["spec"] = repr(self.spec())
        return out

    def attribute_names(self) -> tuple[str, ...]:
        from fra.data.synthetic_attributes import attribute_names

        return attribute_names(float(self.options.get("glasses") or 0) > 0) if self._annotated() else ()

    def target_names(self) -> tuple[str, ...]:
        from fra.data.synthetic_attributes import TARGETS

        return TARGETS if self._annotated() else ()

    def _annotated(self) -> bool:
        return bool(self.options.get("with_attributes", False))

    def scan(self, split: str) -> Scan:
        spec = self.spec()
        records = []
        for i in spec.identities(split):
            for k in range(spec.images_per_identity):
                attributes, targets = spec.annotations(i, k) if self._annotated() else (None, None)
                records.append(Record(split, f"synthetic/{i:06d}_{k:03d}", spec.label(i, k), str(i), payload=(i, k),
                                      attributes=attributes, targets=targets))
        return Scan(records, [], {})

    def load(self, record: Record) -> dict:
        sample = self.spec().sample(*record.payload)
        return {
            "image": encode_jpeg(sample["image"], int(self.options.get("jpeg_quality", 90))),
            "mask": encode_png(sample["mask"]),
            "landmarks": tuple(float(v) for v in sample["landmarks"].ravel()),
        }
