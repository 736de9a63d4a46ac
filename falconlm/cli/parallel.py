"""Tensor-parallel launch for ``serve``, ``generate`` and ``batch run``: the options, joining torchrun's group, and
the follower ranks' whole run.

Under ``torchrun --nproc-per-node N ... --tensor-parallel-size N`` every process runs the same command line. Rank 0
does the command's work (HTTP, output, files); the other ranks load their shard, follow rank 0's steps and print
nothing. They ignore SIGINT and SIGTERM: rank 0 decides when they stop (its stop message, or its death, which
fails their next wait within ``--distributed-timeout``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING

from .options import positive_int

if TYPE_CHECKING:
    from ..engine.factory import EngineArgs
    from ..parallel import ParallelState

TIMEOUT_ENV = "FALCONLM_DIST_TIMEOUT"
_joined: ParallelState | None = None  # this process's place in torchrun's group, once joined
DEFAULT_TIMEOUT_S = 120.0


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="split the model over N processes started by 'torchrun --nproc-per-node N' (default 1)",
    )
    p.add_argument(
        "--distributed-timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help=f"how long a rank waits for the others before failing (default ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT_S:g})",
    )


def distributed_timeout(args: argparse.Namespace) -> float:
    if args.distributed_timeout is not None:
        return args.distributed_timeout
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        return positive_seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{TIMEOUT_ENV}: {exc}") from None


def join_group(args: argparse.Namespace) -> int:
    """This process's rank, after joining torchrun's group when there is one; ValueError (one line, exit 2) when
    ``--tensor-parallel-size`` is not the number of processes torchrun started (or there is no torchrun)."""
    size = args.tensor_parallel_size
    if size == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0  # the usual single process: torch.distributed is not even imported
    from ..engine.devices import resolve_device
    from ..parallel import init_parallel

    global _joined
    _joined = init_parallel(size, resolve_device(args.device), distributed_timeout(args))
    return _joined.rank


def leave_group() -> None:
    """Destroy the process group (every rank, at the end of the command). Rank 0 first releases followers that
    still wait for an engine; after a clean run the ranks then meet at a barrier, so none closes its connections
    while another still reads its last message."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    from ..engine.tp_runner import TensorParallelError, group_failed, release_followers

    if not (dist.is_available() and dist.is_initialized()):
        return
    if _joined is not None:
        with contextlib.suppress(TensorParallelError):
            release_followers(_joined)
    if not group_failed():
        with contextlib.suppress(Exception):  # a rank that is gone already: nothing left to wait for
            dist.barrier()
    dist.destroy_process_group()


def run_follower(engine_args: EngineArgs, command: str) -> int:
    """A rank > 0's whole command: follow rank 0 until it stops (0), or report the group's failure in one line (1)."""
    from ..engine.tp_follower import run_follower as follow
    from ..engine.tp_runner import TensorParallelError

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        follow(engine_args)
    except TensorParallelError as exc:
        print(f"falconlm {command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        leave_group()
    return 0
