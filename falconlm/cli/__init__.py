"""The ``falconlm`` command: subcommands, one-line errors, exit codes (0 ok, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import batch, bench, generate, info, quantize, serve, train

COMMANDS = (generate, info, train, bench, serve, batch, quantize)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandError(Exception):
    """A user mistake found by a command: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="falconlm", description="Run, train and serve Falcon language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (CommandError, ValueError, OSError, RecursionError) as exc:
        print(f"falconlm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _version() -> str:
    from .. import __version__

    return f"falconlm {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
