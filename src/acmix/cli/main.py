"""``acmix`` entry point: ``main(argv) -> int`` so tests call it in-process.

Errors a user can fix (bad arguments, missing files, unknown names) print one line to stderr and return 2; a file
that cannot be written or read (full disk, I/O error, read-only folder) or a data loader that fails prints one line
and returns 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .._env import configure_logging
from ..train.data import DataLoaderError
from ..version import __version__

#: subcommand modules under ``acmix.cli``; each has ``register(subparsers) -> None``
COMMAND_MODULES = (
    "info",
    "demo",
    "cost",
    "train",
    "evaluate",
    "predict",
    "inspect",
    "bench",
    "convert",
    "export",
    "models",
)


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    description: str | None,
    func: Callable[[argparse.Namespace], int],
    *,
    raw: bool = True,
) -> argparse.ArgumentParser:
    """Add one subcommand: ``help`` for the command list, ``description`` for its ``--help`` (kept as written when
    ``raw``, e.g. the command module's docstring; re-wrapped otherwise) and ``func(args) -> exit status``."""
    formatter = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
    p = subparsers.add_parser(name, help=help, description=description, formatter_class=formatter)
    p.set_defaults(func=func)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``acmix CMD: error: ...`` and exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="acmix", description="ACmix: self-attention and convolution, integrated.")
    parser.add_argument("--version", action="version", version=f"acmix {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log INFO (-v) or DEBUG (-vv)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
    configure_logging()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        print(f"acmix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, DataLoaderError) as exc:  # full disk, I/O error, read-only folder; a data-loader worker died
        print(f"acmix {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"acmix {args.command}: interrupted", file=sys.stderr)
        return 130


def console_entry() -> None:
    sys.exit(main())
