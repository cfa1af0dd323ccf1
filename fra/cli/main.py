"""The `fra` console script.

Every sub-command lives in its own module under :mod:`fra.cli` and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``fra --help`` and light commands do not pay for importing Ray or MLflow.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
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


def _console_options(parser: argparse.ArgumentParser, default) -> None:
    """``-v`` and ``--progress``, accepted before the command and after it (``fra run X -v``)."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="show everything on the terminal: fra's debug lines and Ray's, MLflow's and the "
                             "workers' output (by default they go to the run's log file only)")
    parser.add_argument("--progress", choices=("auto", "live", "lines", "off"), default=default("auto"),
                        help="progress display of long stages: live = one line redrawn in place, lines = a line "
                             "per epoch, auto = live on a terminal, lines otherwise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fra", description=__doc__.splitlines()[0])
    _console_options(parser, lambda v: v)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        _console_options(p, lambda v: argparse.SUPPRESS)  # given after the command, it wins
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command in a :func:`fra.console.session`: everything it prints or logs to the console
    is redacted, and a command that runs Ray work keeps the console quiet (:mod:`fra.console`)."""
    from fra import console
    from fra.errors import FraError

    with console.session() as con:
        parser = build_parser()
        args = parser.parse_args(argv)
        con.configure(verbose=args.verbose, progress=args.progress)
        if not getattr(args, "_module", None):
            parser.print_help()
            return 2
        try:
            return int(importlib.import_module(args._module).run(args) or 0)
        except FraError as exc:
            con.record_exception(exc)
            con.error(f"fra {args.command}: error: {exc}")
            if con.log_path:
                con.error(f"full log: {con.log_path}")
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
