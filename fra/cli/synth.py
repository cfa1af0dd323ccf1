"""`fra synth`: render procedural synthetic faces.

    fra synth sheet OUT.png [--n 32 --size 112 --seed 0]      # contact sheet to look at
    fra synth folder OUT_DIR [--split train --identities 50 --per-identity 10 --size 112 --seed 0]
"""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    sheet = actions.add_parser("sheet", help="write a PNG contact sheet of faces, masks and landmarks")
    sheet.add_argument("out", help="output PNG path")
    sheet.add_argument("--n", type=int, default=32, help="number of faces")
    sheet.add_argument("--size", type=int, default=112, help="face image side in pixels")
    sheet.add_argument("--seed", type=int, default=0)
    sheet.add_argument("--no-masks", action="store_true", help="faces only, without mask tiles")

    folder = actions.add_parser("folder", help="write one split as a class-per-folder image tree")
    folder.add_argument("out", help="output directory; gets one sub-folder per expression")
    folder.add_argument("--split", default="train", choices=("train", "val", "test"))
    folder.add_argument("--identities", type=int, default=50,
                        help="identities in the whole dataset; the split takes its share (80/0/20)")
    folder.add_argument("--per-identity", type=int, default=10, help="images per identity")
    folder.add_argument("--size", type=int, default=112)
    folder.add_argument("--seed", type=int, default=0)
    folder.add_argument("--format", default="jpg", choices=("jpg", "png"))
    folder.add_argument("--quality", type=int, default=90, help="JPEG quality")
    folder.add_argument("--intensity", type=float, nargs=2, default=(0.6, 1.1), metavar=("LOW", "HIGH"),
                        help="expression strength range; (0.25, 1.0) is the harder FER setting")
    folder.add_argument("--jitter", type=float, default=0.08, help="noise on expression parameters")


def run(args: argparse.Namespace) -> int:
    from fra.data.synthetic import SyntheticFaces, contact_sheet, write_image_folder

    if args.action == "sheet":
        path = contact_sheet(args.out, n=args.n, size=args.size, seed=args.seed, with_masks=not args.no_masks)
        logger.info("wrote contact sheet %s", path)
        return 0
    spec = SyntheticFaces(num_identities=args.identities, images_per_identity=args.per_identity,
                          size=args.size, seed=args.seed, intensity=tuple(args.intensity), jitter=args.jitter)
    count = write_image_folder(args.out, spec, args.split, fmt=args.format, quality=args.quality)
    logger.info("wrote %d images (%s split of %d identities) to %s",
                count, args.split, args.identities, args.out)
    return 0
