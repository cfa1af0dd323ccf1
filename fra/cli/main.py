"""The `fra` console script.

Every sub-command lives in its own module under :mod:`fra.cli` and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``fra --help`` and light commands do not pay for importing Ray or MLflow.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("fra.cli.synth", "render synthetic faces or a contact sheet"),
    "heatmaps": ("fra.cli.heatmaps", "write FRA heat-map overlays for a folder of images"),
    "pretrain": ("fra.cli.pretrain", "pretrain FRA / BYOL / SwAV on Ray Train"),
    "shards": ("fra.cli.shards", "convert a dataset in its official layout to Parquet shards"),
    "evaluate": ("fra.cli.evaluate", "downstream evaluation (FER fine-tune / linear probe)"),
    "tune": ("fra.cli.tune", "Ray Tune sweep, each trial chained into FER evaluation"),
    "run": ("fra.cli.run", "run a declarative pipeline YAML"),
    "registry": ("fra.cli.registry", "MLflow model registry: list, show, promote, rollback"),
    "convert": ("fra.cli.convert", "convert an official FRA / FRL checkpoint to fra's format"),
    "mlflow-db": ("fra.cli.mlflow_db", "back up / restore the MLflow server's sqlite database (cluster head)"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Commands whose module exists in this installation."""
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fra", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


class _RedactedStream:
    """A console stream whose every write is redacted (:func:`fra.redaction.redact_text`)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        from fra.redaction import redact_text

        self.stream.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run one command; everything it prints or logs to the console is redacted."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _RedactedStream(sys.stdout), _RedactedStream(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    from fra.errors import FraError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except FraError as exc:
        print(f"fra {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
