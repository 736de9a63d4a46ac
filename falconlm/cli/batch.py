"""``falconlm batch run|status|cancel``: OpenAI Batch JSONL files through the engine, resumable after a crash."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .options import add_model_options, check_model_path, positive_int
from .parallel import (
    add_parallel_options,
    distributed_timeout,
    join_group,
    leave_group,
    run_follower,
)

STATE_SUFFIX = ".state"
LOCAL_RAY = ""  # --ray without an address


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="run an OpenAI Batch JSONL file offline; resumes after a crash",
        description="Run OpenAI Batch JSONL files through the engine. Progress lives in a SQLite store under "
        "--state: after a crash or Ctrl-C, the same command resumes without redoing finished requests.",
    )
    actions = p.add_subparsers(dest="batch_command", required=True, parser_class=type(p), metavar="ACTION")

    run = actions.add_parser(
        "run",
        help="run (or resume) a batch file",
        description="Run every request of INPUT (lines of {custom_id, method, url, body}); write one output line "
        "per answered request to --output and one error line per bad line or failed request to --errors.",
    )
    run.add_argument("input", type=Path, nargs="?", help="the batch input, a JSONL file")
    run.add_argument("--output", "-o", type=Path, required=True, help="where to write the results (JSONL)")
    run.add_argument("--errors", type=Path, default=None, help="where to write errors (default: OUTPUT.errors.jsonl)")
    run.add_argument("--state", type=Path, default=None, help=f"job store folder (default: OUTPUT{STATE_SUFFIX})")
    add_model_options(run)
    run.add_argument(
        "--max-num-seqs", type=positive_int, default=16, help="sequences the engine runs at once (default 16)"
    )
    run.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=None,
        help="requests in the engine at once (default 2 x max-num-seqs); with --ray, in each actor",
    )
    add_parallel_options(run)
    run.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (with --ray: per actor)")
    add_ray_options(run)
    run.set_defaults(run=run_batch)

    status = actions.add_parser("status", help="show the jobs of a state folder", description="Show batch jobs.")
    status.add_argument("--state", type=Path, required=True, help="the job store folder")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=run_status)

    cancel = actions.add_parser(
        "cancel",
        help="cancel the unfinished jobs of a state folder",
        description="Cancel unfinished jobs: a running `batch run` stops within a second and writes what it has.",
    )
    cancel.add_argument("--state", type=Path, required=True, help="the job store folder")
    cancel.set_defaults(run=run_cancel)


class _RayAddress(argparse.Action):
    """``--ray [ADDRESS]``. A bare ``--ray`` placed before the input would take the input's name as its address:
    a value that is an existing file or ends in ``.jsonl`` is kept aside as the input instead."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if value != LOCAL_RAY and (value.endswith(".jsonl") or Path(value).is_file()):
            namespace.ray_input = Path(value)
            value = LOCAL_RAY
        namespace.ray = value


def _input_after_ray(args: argparse.Namespace) -> None:
    """Sets ``args.input`` from a name that a bare ``--ray`` took (see :class:`_RayAddress`)."""
    taken = getattr(args, "ray_input", None)
    if taken is not None and args.input is not None:
        raise ValueError(f"two inputs: {taken} (after --ray) and {args.input}; --ray ADDRESS takes a Ray address")
    args.input = args.input or taken
    if args.input is None:
        raise ValueError("no input file: batch run INPUT --output OUTPUT ...")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_RAY,
        default=None,
        action=_RayAddress,
        metavar="ADDRESS",
        help="spread the requests over Ray actors, each with its own engine (or, with --tensor-parallel-size N, "
        "N actors on one node per engine): alone, on a local Ray instance started for this run; with ADDRESS (or "
        "'auto'), on that cluster (needs pip install 'falconlm[ray]')",
    )
    p.add_argument(
        "--ray-actors",
        type=positive_int,
        default=None,
        metavar="N",
        help="engines on Ray, each of --tensor-parallel-size actors with --threads each "
        "(default: 2, or the cluster's CPUs / (--threads x --tensor-parallel-size))",
    )


def fingerprint(path: Path) -> str:
    """sha256 of the file's bytes: a resumed job must read the same input."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    source: Path = args.input
    if not source.exists():
        raise FileNotFoundError(f"input file {source} does not exist")
    if not source.is_file():
        raise ValueError(f"input {source} is not a file")
    output: Path = args.output
    errors: Path = args.errors or output.with_name(f"{output.name.removesuffix('.jsonl')}.errors.jsonl")
    for path in (output, errors):
        if path.resolve() == source.resolve():
            raise ValueError(f"{path} is the input file; choose another output path")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} does not exist")
    if output.resolve() == errors.resolve():
        raise ValueError("--output and --errors must be different files")
    for path in (output, errors):
        check_writable(path)
    state: Path = args.state or output.with_name(output.name + STATE_SUFFIX)
    return output, errors, state


def check_writable(path: Path) -> None:
    """Fail now, before any work, when the results could not be written to ``path`` at the end.

    Writes and removes the temp file that writing the results goes through (``.NAME.tmp`` beside it).
    """
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path for the results")
    probe = path.with_name(f".{path.name}.tmp")
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        probe.unlink(missing_ok=True)


def run_batch(args: argparse.Namespace) -> int:
    _input_after_ray(args)
    if args.ray is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--ray starts the tensor-parallel ranks as Ray actors itself; run it without torchrun")
    # --ray with --tensor-parallel-size N: the Ray actors form the groups (batch/ray_tp.py), this process joins none
    if args.ray is None and join_group(args) > 0:  # a follower rank: rank 0 owns the job store and writes the files
        check_model_path(args.model)
        return run_follower(_engine_args(args), "batch run")
    try:
        return _run_batch(args)
    finally:
        leave_group()


def _run_batch(args: argparse.Namespace) -> int:
    import asyncio

    from ..batch.ingest import ingest
    from ..batch.outputs import write_outputs
    from ..batch.ray_executor import RayJobError
    from ..batch.runner import BatchRunner
    from ..batch.store import StateLock, Store
    from ..engine.devices import resolve_device
    from ..serving.settings import ServerSettings

    output, errors, state = _paths(args)
    check_model_path(args.model)
    resolve_device(args.device)  # a device this machine lacks is refused before any work
    max_in_flight = 2 * args.max_num_seqs if args.max_in_flight is None else args.max_in_flight
    ray_runner = _ray_runner_factory(args, max_in_flight)  # before any work: ray may be missing
    store = Store(state)
    lock = StateLock(state)
    if not lock.acquire():
        store.close()
        raise ValueError(f"another falconlm process (pid {lock.holder()}) is running the jobs in {state}")
    engines: list = []
    runners: list = []  # a Ray runner, closed at the end (its actors, and the Ray instance it started)
    job = None
    try:
        job = _open_job(store, args.input, output, errors)
        if job.status == "validating" and not job.cancel_requested:
            ingest(store, job, args.input, lambda: store.cancel_requested(job.id))
            job = store.get_job(job.id)
            if job.status == "validating" and not job.cancel_requested:
                job = store.set_status(job.id, "in_progress")
        progress = _Progress(job.total, job.completed + job.failed)

        def load_engine():
            engines.append(_start_engine(args))
            progress.begin()  # the clock starts once the model is loaded
            return engines[0]

        settings = ServerSettings(served_model_names=(_model_name(args),), model_path=str(args.model or ""))
        if ray_runner is not None:
            runner = ray_runner(store, settings, progress)
            runners.append(runner)
        else:
            runner = BatchRunner(
                store, load_engine, settings, max_in_flight, on_progress=progress.update, ignore_body_model=True
            )

        def finalize(job, cancelled: bool) -> dict:
            write_outputs(store, job, output, errors, cancelled)
            return {}

        try:
            job = asyncio.run(runner.run(job.id, args.input, finalize))
        finally:
            progress.close()
        return _report(store.get_job(job.id), output, errors, progress)
    except RayJobError as exc:
        where = f"; run the same command again to resume job {job.id}" if job is not None else ""
        print(f"falconlm batch: error: {exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if job is not None:
            print(f"falconlm batch: interrupted; run the same command again to resume job {job.id}", file=sys.stderr)
        raise
    finally:
        for engine in engines:
            engine.shutdown(timeout=1.0)
        for ray_runner_ in runners:
            ray_runner_.close()
        lock.release()
        store.close()


def _open_job(store, source: Path, output: Path, errors: Path):
    """The job to continue for ``source`` in this store, or a new one."""
    from ..batch.jsonl import new_id

    key = str(source.resolve())
    digest = fingerprint(source)
    options = json.dumps({"output": str(output.resolve()), "errors": str(errors.resolve())})
    job = store.latest_job("cli", key)
    if job is not None and job.is_active:
        if job.fingerprint != digest:
            raise ValueError(
                f"{source} changed since job {job.id} started; restore it, or pass a new --state to start over"
            )
        print(f"falconlm batch: resuming job {job.id} ({job.completed + job.failed}/{job.total} done)", file=sys.stderr)
        return store.set_status(job.id, job.status, options=options)
    if job is not None and job.status == "completed" and job.fingerprint == digest:
        return store.set_status(job.id, "finalizing", options=options)  # rewrite the files; nothing is rerun
    if job is not None and job.status == "cancelled" and job.fingerprint == digest:
        job = store.reopen(job.id)  # what was done before the cancel stays done
        print(
            f"falconlm batch: resuming cancelled job {job.id} ({job.completed + job.failed}/{job.total} done)",
            file=sys.stderr,
        )
        return store.set_status(job.id, job.status, options=options)
    return store.create_job(new_id("batch_"), "cli", key, fingerprint=digest, options=options)


def _ray_runner_factory(args: argparse.Namespace, max_in_flight: int):
    """None without --ray; else what builds the Ray runner (ray is imported now, so its absence fails first)."""
    if args.ray is None:
        if args.ray_actors is not None:
            raise ValueError("--ray-actors needs --ray")
        return None
    from ..batch.ray_executor import RayBatchRunner, RayJobError, RayOptions, RayUnavailable, check_address, import_ray

    try:
        import_ray()
        check_address(args.ray or None)
    except (RayUnavailable, RayJobError) as exc:
        from . import CommandError

        raise CommandError(str(exc)) from None
    options = RayOptions(
        address=args.ray or None, actors=args.ray_actors, threads=args.threads, max_in_flight=max_in_flight
    )

    def build(store, settings, progress: _Progress):
        return RayBatchRunner(
            store, settings, _engine_args(args), options, on_progress=progress.update, on_ready=progress.begin
        )

    return build


def _engine_args(args: argparse.Namespace):
    from ..engine.factory import EngineArgs

    return EngineArgs(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        quantize=args.quantize,
        deterministic=args.deterministic,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_timeout_s=distributed_timeout(args),
        threads=args.threads,
    )


def _start_engine(args: argparse.Namespace):
    from ..engine.async_engine import AsyncEngine
    from ..engine.factory import build_engine

    engine = AsyncEngine(build_engine(_engine_args(args)))
    engine.start()
    if not engine.wait_ready(timeout=600):
        raise RuntimeError(f"the engine did not start: {engine.load_error}")
    return engine


def _model_name(args: argparse.Namespace) -> str:
    return args.model.name if args.model is not None else "falconlm-default"


class _Progress:
    """done/total, requests/s and ETA (tqdm) plus generated tokens/s; silent when stderr is not a terminal."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        self.bar = None
        self.start: float | None = None
        self.tokens = self.requests = 0

    def begin(self) -> None:
        from tqdm import tqdm

        self.start = time.monotonic()
        self.bar = tqdm(
            total=self.total,
            initial=self.done,
            unit="req",
            desc="batch",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        )

    @property
    def elapsed(self) -> float:
        return 0.0 if self.start is None else time.monotonic() - self.start

    def update(self, requests: int, tokens: int) -> None:
        if self.bar is None:
            self.begin()
        self.tokens += tokens
        self.requests += requests
        self.bar.set_postfix_str(f"{self.tokens / max(self.elapsed, 1e-9):.0f} tok/s", refresh=False)
        self.bar.update(requests)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _report(job, output: Path, errors: Path, progress: _Progress) -> int:
    elapsed, ran, tokens = progress.elapsed, progress.requests, progress.tokens
    rate = f" in {elapsed:.1f} s ({ran / elapsed:.0f} req/s, {tokens / elapsed:.0f} tok/s)" if ran and elapsed else ""
    counts = f"{job.completed} completed, {job.failed} failed of {job.total}"
    if job.status == "completed":
        print(f"falconlm batch: job {job.id} {counts} -> {output}, errors -> {errors}{rate}", file=sys.stderr)
        return 0
    if job.status == "cancelled":
        print(f"falconlm batch: job {job.id} was cancelled: {counts} (written to {output}, {errors})", file=sys.stderr)
        return 1
    print(
        f"falconlm batch: job {job.id} stopped in status {job.status} ({counts}); run the same command to resume",
        file=sys.stderr,
    )
    return 1


def _existing_store(state: Path):
    from ..batch.store import DB_NAME, Store

    if not (state / DB_NAME).is_file():
        raise FileNotFoundError(f"no batch jobs in {state} (no {DB_NAME})")
    return Store(state)


def run_status(args: argparse.Namespace) -> int:
    store = _existing_store(args.state)
    try:
        jobs = store.list_jobs()
    finally:
        store.close()
    rows = [_job_summary(job) for job in jobs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no jobs in {args.state}")
    for row in rows:
        print(
            f"{row['id']}  {row['status']:<11}  {row['completed']} completed, {row['failed']} failed, "
            f"{row['pending']} {'cancelled' if row['status'] == 'cancelled' else 'pending'} of {row['total']}  "
            f"created {row['created']}  input {row['input']}"
        )
    return 0


def _job_summary(job) -> dict:
    created = datetime.fromtimestamp(job.created_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {
        "id": job.id,
        "source": job.source,
        "status": job.status,
        "total": job.total,
        "completed": job.completed,
        "failed": job.failed,
        "pending": job.pending,
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "created": created,
        "input": job.input_path,
    }


def run_cancel(args: argparse.Namespace) -> int:
    from ..batch.outputs import write_outputs
    from ..batch.store import StateLock

    store = _existing_store(args.state)
    lock = StateLock(args.state)
    try:
        active = [job for job in store.list_jobs("cli") if job.is_active]
        if not active:
            print(f"no unfinished jobs in {args.state}")
            return 0
        for job in active:
            store.request_cancel(job.id)
        if not lock.acquire():
            ids = ", ".join(job.id for job in active)
            print(f"cancelling {ids}: the running process (pid {lock.holder()}) stops within a second")
            return 0
        for job in active:  # nobody runs them: finish the cancel here
            job = store.get_job(job.id)
            paths = job.option
            if "output" in paths:
                write_outputs(store, job, Path(paths["output"]), Path(paths["errors"]), cancelled=True)
            store.set_status(job.id, "cancelled")
            print(f"cancelled {job.id}: {job.completed} completed, {job.failed} failed of {job.total}")
        return 0
    finally:
        lock.release()
        store.close()
