"""``fra shards SOURCE [ROOT] OUT``: convert a dataset in its official layout to Parquet shards.

SOURCE is a dataset card name (``rafdb``, ``vggface2``, ``affectnet7``, ``ferplus``, ``fer2013``,
``image_folder``, ``synthetic_faces``) or a card path; ROOT is the dataset root (omit it for
``synthetic_faces``); OUT is the shard directory. ROOT and OUT may be ``s3://`` / ``gs://`` URIs.
Re-running the same command resumes: finished shards are verified and kept.
"""
from __future__ import annotations

import argparse
import logging

import yaml

from fra.errors import ConfigError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="dataset card name or path (datasets/<name>.yaml)")
    parser.add_argument("paths", nargs="+", metavar="[ROOT] OUT", help="dataset root (not for synthetic) and output")
    parser.add_argument("--split", default=None, help="only this split (default: all splits of the card)")
    parser.add_argument("--images-per-shard", type=int, default=5000)
    parser.add_argument("--row-group-size", type=int, default=1000)
    parser.add_argument("--no-resume", action="store_true", help="rewrite every shard")
    parser.add_argument("--verify", choices=("sha256", "size"), default="sha256",
                        help="how finished shards are checked on resume")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order inside each split")
    parser.add_argument("--seed", type=int, default=0, help="record shuffle seed")
    parser.add_argument("--local", action="store_true", help="write in this process, without Ray")
    parser.add_argument("--address", default=None, help="Ray address (default: start or join a local one)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="reader option overriding the card (value parsed as YAML); repeatable")
    synth = parser.add_argument_group("synthetic_faces")
    synth.add_argument("--num-identities", type=int, default=None)
    synth.add_argument("--images-per-identity", type=int, default=None)
    synth.add_argument("--size", type=int, default=None, help="rendered image side")
    synth.add_argument("--synthetic-seed", type=int, default=None, help="generator seed")


def _options(args: argparse.Namespace) -> dict:
    options = {}
    for item in args.option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r} must look like key=value")
        options[key] = yaml.safe_load(raw)
    for key, value in (("num_identities", args.num_identities), ("images_per_identity", args.images_per_identity),
                       ("size", args.size), ("seed", args.synthetic_seed)):
        if value is not None:
            options[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    from fra.data.readers.base import redact
    from fra.data.shards import write_shards

    if len(args.paths) > 2:
        raise ConfigError(f"expected [ROOT] OUT, got {len(args.paths)} paths")
    root, out = (args.paths[0], args.paths[1]) if len(args.paths) == 2 else ("", args.paths[0])
    if not args.local:
        from fra.ray_runtime import init_ray

        init_ray(address=args.address or "")
    manifest = write_shards(
        args.source, root, out, split=args.split, images_per_shard=args.images_per_shard,
        row_group_size=args.row_group_size, resume=not args.no_resume, verify=args.verify,
        shuffle=not args.no_shuffle, seed=args.seed, parallel=not args.local, options=_options(args),
    )
    for split, c in manifest.counts.items():
        logger.info("%s: %d images %s", split, c["total"], dict(sorted(c["classes"].items())) if manifest.classes else "")
    reasons: dict[str, int] = {}
    for s in manifest.skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    logger.info("skipped %d %s; excluded by protocol %s; fingerprint %s", len(manifest.skipped), reasons,
                manifest.excluded or {}, manifest.fingerprint[:16])
    print(redact(manifest.uri))
    return 0
