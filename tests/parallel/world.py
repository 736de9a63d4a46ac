"""Run a function on every rank of a small gloo world on this machine, with a timeout and clean-up.

``run_world(fn, n, *args)`` spawns ``n`` processes (MASTER_ADDR 127.0.0.1, a free port), each calls
``fn(state, *args)`` with its :class:`~falconlm.parallel.ParallelState`, and returns the ranks' results in rank
order (tensors, lists, dicts and numbers: they travel through ``torch.save``). A rank that fails or a world that
runs past ``timeout`` raises in the caller, and every process is gone afterwards.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple) -> None:
    from falconlm.parallel import init_parallel
    from falconlm.parallel.state import exit_rank

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        state = init_parallel(world, "cpu", timeout_s=60)
        result = fn(state, *args)
        torch.save(result, Path(out) / f"{rank}.pt")
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    exit_rank(0)  # no interpreter finalization (see exit_rank)


def run_world(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``fn(state, *args)`` on ranks 0..world-1; their results in rank order."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _entry, args=(fn, world, free_port(), out, args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a {world}-rank world ran past {timeout} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            errors = sorted(Path(out).glob("*.err"))
            raise RuntimeError(errors[0].read_text() if errors else str(exc)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        return [torch.load(Path(out) / f"{r}.pt", weights_only=True) for r in range(world)]
