"""Layout readers, one module per official dataset layout, registered by name.

A card's ``reader`` field (default: the card name) selects the class here; ``get_reader`` builds it.
"""
from __future__ import annotations

from fra.data.cards import DatasetCard, load_card
from fra.data.readers.affectnet import AffectNetReader
from fra.data.readers.aflw19 import AFLW19Reader
from fra.data.readers.base import Reader, Record, Scan, Skip
from fra.data.readers.celeba import CelebAReader
from fra.data.readers.fer2013 import FER2013Reader
from fra.data.readers.ferplus import FERPlusReader
from fra.data.readers.ibug300w import IBUG300WReader
from fra.data.readers.image_folder import ImageFolderReader
from fra.data.readers.rafdb import RAFDBReader
from fra.data.readers.synthetic_faces import SyntheticFacesReader
from fra.data.readers.vggface2 import VGGFace2Reader
from fra.data.readers.wflw import WFLWReader
from fra.errors import ConfigError

READERS: dict[str, type[Reader]] = {
    "vggface2": VGGFace2Reader,
    "rafdb": RAFDBReader,
    "affectnet": AffectNetReader,
    "ferplus": FERPlusReader,
    "fer2013": FER2013Reader,
    "image_folder": ImageFolderReader,
    "synthetic_faces": SyntheticFacesReader,
    "celeba": CelebAReader,
    "wflw": WFLWReader,
    "ibug300w": IBUG300WReader,
    "aflw19": AFLW19Reader,
}


def get_reader(source: str | DatasetCard, root: str = "", **options) -> Reader:
    """Build the reader for a card (by name, path or object) over ``root``.

    Raises:
        ConfigError: unknown card or reader (the message lists the valid names).
    """
    card = source if isinstance(source, DatasetCard) else load_card(source)
    cls = READERS.get(card.reader_name)
    if cls is None:
        raise ConfigError(f"card {card.name}: unknown reader {card.reader_name!r}; valid: {sorted(READERS)}")
    return cls(card, root, **options)


def reader_classes(reader: Reader) -> tuple[str, ...]:
    """Class names in label order (readers that discover classes override ``classes``)."""
    fn = getattr(reader, "classes", None)
    return tuple(fn()) if callable(fn) else tuple(reader.card.classes)


__all__ = ["READERS", "Reader", "Record", "Scan", "Skip", "get_reader", "reader_classes"]
