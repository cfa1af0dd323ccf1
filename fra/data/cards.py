"""Dataset cards: ``datasets/<name>.yaml`` loaded and validated into a frozen dataclass.

A card is the data side of a recipe: layout, splits, class names in label order, normalisation
statistics and how to obtain the data. Code never branches on a dataset name; it reads the card
(``reader`` picks the layout module in :mod:`fra.data.readers`, ``options`` parameterise it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fra.config import from_dict, load_yaml
from fra.errors import ConfigError

CARDS_DIR_ENV = "FRA_DATASETS_DIR"


@dataclass(frozen=True)
class Normalization:
    """Per-channel RGB mean and std of images scaled to [0, 1]."""

    mean: tuple[float, float, float] = (0.5231, 0.4044, 0.3489)
    std: tuple[float, float, float] = (0.2536, 0.2194, 0.2070)

    def __post_init__(self) -> None:
        if min(self.std) <= 0:
            raise ConfigError(f"normalization.std must be positive, got {self.std}")


@dataclass(frozen=True)
class DatasetCard:
    """One dataset card.

    Attributes:
        name: card name (the file stem).
        description: what the data is.
        source: where it comes from (paper, site).
        layout: the official on-disk layout, in words.
        reader: layout module in :mod:`fra.data.readers` (default: ``name``).
        splits: split names (a list), or a mapping with ``names`` or ``fractions`` (+ extras).
        eval_split: the split evaluation reports on (default: the last split).
        classes: class names in label order (empty for identity-only data).
        num_classes: must equal ``len(classes)`` when both are given.
        normalization: mean / std for the trainer-side normalisation.
        parts: mask part names (index = mask value), if the data has masks.
        landmarks: landmark names, if the data has landmarks.
        options: reader options (e.g. ``protocol``, ``label_offset``, file names).
        obtain: how to get the data.
        license: terms of use, in words.
    """

    name: str
    description: str = ""
    source: str = ""
    layout: str = ""
    reader: str = ""
    splits: Any = ("train",)
    eval_split: str = ""
    classes: tuple[str, ...] = ()
    num_classes: int = 0
    normalization: Normalization = field(default_factory=Normalization)
    parts: tuple[str, ...] = ()
    landmarks: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    obtain: str = ""
    license: str = ""

    def __post_init__(self) -> None:
        if self.num_classes and self.classes and self.num_classes != len(self.classes):
            raise ConfigError(
                f"card {self.name}: num_classes={self.num_classes} but {len(self.classes)} class names"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"card {self.name}: duplicate class names {self.classes}")
        names = self.split_names
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"card {self.name}: splits must name distinct splits, got {self.splits!r}")
        if self.eval_split and self.eval_split not in names:
            raise ConfigError(f"card {self.name}: eval_split {self.eval_split!r} is not one of {list(names)}")

    @property
    def split_names(self) -> tuple[str, ...]:
        """The split names, in card order."""
        s = self.splits
        if isinstance(s, str):
            return (s,)
        if isinstance(s, dict):
            if "names" in s:
                return tuple(s["names"])
            if "fractions" in s:
                return tuple(s["fractions"])
            return ()
        return tuple(s)

    @property
    def reader_name(self) -> str:
        """Key of the reader in :data:`fra.data.readers.READERS`."""
        return self.reader or self.name

    @property
    def evaluation_split(self) -> str:
        """The split evaluation reports on."""
        return self.eval_split or self.split_names[-1]


def cards_dir() -> Path:
    """``$FRA_DATASETS_DIR`` or the repository's ``datasets/`` folder."""
    env = os.environ.get(CARDS_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "datasets"


def list_cards() -> list[str]:
    """Names of all cards in :func:`cards_dir`."""
    return sorted(p.stem for p in cards_dir().glob("*.yaml"))


def load_card(name_or_path: str | Path) -> DatasetCard:
    """Load a card by name (``rafdb``) or by path to a YAML file.

    Raises:
        ConfigError: unknown card (the message lists the known ones) or an invalid card.
    """
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = cards_dir() / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown dataset card {str(name_or_path)!r}; known: {', '.join(list_cards())}")
    data = load_yaml(p)
    data.setdefault("name", p.stem)
    return from_dict(DatasetCard, data, path=f"datasets/{p.name}")


__all__ = ["DatasetCard", "Normalization", "cards_dir", "list_cards", "load_card"]
