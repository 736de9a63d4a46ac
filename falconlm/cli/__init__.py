"""The ``falconlm`` command: subcommands, one-line errors, exit codes (0 ok, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
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
    try:
        with _SigintLatch() as latch:
            parser = build_parser()  # imports torch (some options show its defaults): Ctrl-C may land here
            args = parser.parse_args(argv)
        if latch.hit:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
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


def console_main() -> None:
    """The ``falconlm`` command (and ``python -m falconlm``): :func:`main`, then exit with its code; a rank under
    ``torchrun`` skips the interpreter's finalization (``parallel.state.exit_rank`` says why)."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..parallel.state import exit_rank

        exit_rank(code)
    sys.exit(code)


class _SigintLatch:
    """Remembers a Ctrl-C even when C code swallows its KeyboardInterrupt (torch's import of numpy does)."""

    def __enter__(self) -> _SigintLatch:
        self.hit = False
        self._previous = None
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.hit = True
        raise KeyboardInterrupt

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _version() -> str:
    from .. import __version__

    return f"falconlm {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
