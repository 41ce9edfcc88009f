"""``rnnjax``: the command line, a thin shell over ``rnnjax.loop``.

Every :class:`~rnnjax.config.Config` field is a flag (``hidden_size`` -> ``--hidden-size``).
Bad flags or data print one line, ``rnnjax: error: <problem>; <fix>``, and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rnnjax.config import Config, ConfigError

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UsageError(Exception):
    """A bad command line or input; the message says what and how to fix it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    hints = {f.name: f.type for f in dataclasses.fields(Config)}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if hints[f.name] in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(hints[f.name]), str)
        parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"),
                            metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train and evaluate (defaults: the seed experiment)")
    _add_config_flags(train)
    train.add_argument("--workdir", type=Path, default=None,
                       help="write config, metrics and summary here (default: print only)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The defaults, overridden by the flags given."""
    names = {f.name for f in dataclasses.fields(Config)}
    changes = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return Config(**changes)


def check_writable(directory: Path) -> None:
    """Fail before training, not after, when ``directory`` could not be written.

    Creates nothing: the run makes the directory once its data has loaded.
    """
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--workdir {directory}: {existing} is not a directory; "
                         "choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--workdir {directory}: {existing} is not writable; "
                         "choose a writable directory")


def _train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.workdir is not None:
        check_writable(args.workdir)
    from rnnjax.loop import TrainingDiverged, train_and_evaluate

    try:
        train_and_evaluate(config, args.workdir, progress=args.progress)
    except TrainingDiverged as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rnnjax`` console script; returns the exit code."""
    from rnnjax.data.idx import IdxError

    try:
        args = build_parser().parse_args(argv)
        return {"train": _train}[args.command](args)
    except (UsageError, ConfigError, IdxError) as e:
        print(f"rnnjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rnnjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
