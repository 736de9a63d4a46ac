"""``falconlm serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model.

The socket opens first and the model loads on the engine thread, so ``/health`` answers 503 until it is ready.
SIGTERM stops accepting connections, lets running requests finish for ``--shutdown-timeout`` seconds, aborts
the rest and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .options import (
    add_deterministic_option,
    add_dtype_option,
    add_quantize_option,
    byte_size,
    check_model_path,
    port_number,
    positive_int,
)
from .parallel import add_parallel_options, distributed_timeout, join_group, leave_group, run_follower
from .serve_embedding import add_embedding_options
from .serve_http import add_http_options, build_server_app, check_api_keys, http_settings, uvicorn_server
from .serve_ray import add_ray_options

if TYPE_CHECKING:
    from ..engine.factory import EngineArgs
    from ..serving.settings import ServerSettings

API_KEY_ENV = "FALCONLM_API_KEY"  # the key when neither --api-key nor --api-key-file is given (as VLLM_API_KEY)

logger = logging.getLogger("falconlm.serve")

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def memory_amount(text: str) -> int | float:
    """``--kv-cache-memory``: bytes ('4GiB', '512MB', '1000000') or a fraction of free memory ('0.5')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes like 4GiB or a fraction like 0.5, got {text!r}")
    number, unit = match.group(1), match.group(2) or ""
    if "." in number and not unit:
        fraction = float(number)
        if not 0 < fraction <= 1:
            raise argparse.ArgumentTypeError(f"a fraction of free memory must be in (0, 1], got {text!r}")
        return fraction
    amount = int(float(number) * _UNITS[unit])
    if amount < 1:
        raise argparse.ArgumentTypeError(f"--kv-cache-memory must be positive, got {text!r}")
    return amount


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models, "
        "/tokenize, /detokenize, /health and /metrics.",
    )
    p.add_argument("--model", "-m", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port to bind (default 8000)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key", default=None, metavar="KEY", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})"
    )
    keys.add_argument("--api-key-file", type=Path, default=None, metavar="FILE", help="accepted keys, one a line")
    p.add_argument("--served-model-name", default=None, metavar="NAME", help="model name in the API (default: folder)")
    add_dtype_option(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_quantize_option(p)
    add_deterministic_option(p)
    p.add_argument("--max-num-seqs", type=positive_int, default=16, help="requests per batch (default 16)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=None,
        help="tokens per step (default 512; 128 for generation on CPUs without bfloat16 arithmetic, such as "
        "AVX2-only ones)",
    )
    p.add_argument("--max-model-len", type=positive_int, default=None, help="context length (default: the model's)")
    p.add_argument(
        "--kv-cache-memory",
        type=memory_amount,
        default=None,
        metavar="BYTES|FRACTION",
        help="KV-cache pool: bytes (4GiB) or a fraction of free memory (0.5); default: max-num-seqs full contexts",
    )
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default 16)")
    p.add_argument(
        "--num-scheduler-steps",
        type=positive_int,
        default=16,
        help="most decode steps per schedule while every request decodes and none waits, cut to about 50 ms; "
        "tokens then stream in runs (default 16; 1: a schedule per token)",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks between prompts")
    p.add_argument("--max-waiting", type=positive_int, default=1024, help="queue limit before 429 (default 1024)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="request size limit (default 1 MiB)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="enable /v1/files and /v1/batches, kept in this folder; jobs resume after a restart",
    )
    p.add_argument(
        "--max-upload-bytes", type=byte_size, default=200 * 2**20, help="largest /v1/files upload (default 200MiB)"
    )
    p.add_argument(
        "--max-state-bytes",
        type=byte_size,
        default=10 * 2**30,
        help="uploads are refused (413) once the --state-dir files reach this size (default 10GiB)",
    )
    add_embedding_options(p)
    add_http_options(p)
    add_parallel_options(p)
    add_ray_options(p)
    p.set_defaults(run=run)


def read_api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """The accepted keys: --api-key, else the lines of --api-key-file, else $FALCONLM_API_KEY; () for none. A key
    given but empty is an error rather than an open server."""
    if args.api_key is not None:
        return _one_key(args.api_key, "--api-key is empty")
    if args.api_key_file is None:
        key = os.environ.get(API_KEY_ENV)
        return () if key is None else _one_key(key, f"{API_KEY_ENV} is set but empty")
    lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
    keys = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
    return keys


def _one_key(key: str, empty: str) -> tuple[str]:
    """``key`` stripped, as the only accepted key; ValueError(``empty``) when nothing is left."""
    if not key.strip():
        raise ValueError(empty)
    return (key.strip(),)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """The engine settings of a ``serve`` command line."""
    from ..engine.devices import PROMPT_STEP_TOKENS, auto_step_tokens, resolve_device
    from ..engine.factory import EngineArgs

    step_tokens = args.max_num_batched_tokens
    if step_tokens is None and args.task == "embed":  # no first tokens to wait for: larger packed forwards
        step_tokens = PROMPT_STEP_TOKENS
    elif step_tokens is None:
        step_tokens, why = auto_step_tokens(resolve_device(args.device))
        logger.info("max-num-batched-tokens auto: %d (%s)", step_tokens, why)
    return EngineArgs(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=step_tokens,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_waiting,
        deterministic=args.deterministic,
        threads=args.threads,
        task=args.task,
        pooling=args.pooling,
        normalize=args.normalize,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_timeout_s=distributed_timeout(args),
        num_scheduler_steps=args.num_scheduler_steps,
    )


def server_settings(args: argparse.Namespace, keys: tuple[str, ...]) -> ServerSettings:
    """The server settings of a ``serve`` command line (``keys``: the accepted API keys)."""
    from ..server import ServerSettings

    return ServerSettings(
        served_model_names=(args.served_model_name or args.model.resolve().name,),
        model_path=str(args.model),
        api_keys=keys,
        max_body_bytes=args.max_body_bytes,
        state_dir=str(args.state_dir) if args.state_dir else None,
        max_upload_bytes=args.max_upload_bytes,
        max_state_bytes=args.max_state_bytes,
        **http_settings(args),
    )


def _check_start(args: argparse.Namespace) -> None:
    """One-line errors before the socket opens: the device, the context length, a state dir in use."""
    from ..engine.devices import resolve_device
    from ..engine.memory import check_max_model_len
    from ..engine.pooling import resolve_pooling_config
    from ..model.families import load_config

    resolve_device(args.device)
    resolve_pooling_config(args.model, args.pooling, args.normalize)  # a sentence-transformers config we cannot run
    check_max_model_len(load_config(args.model), args.max_model_len)
    if args.state_dir is not None:
        from ..batch.store import StateLock

        args.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = StateLock(args.state_dir)
        if not lock.acquire():
            raise ValueError(f"--state-dir {args.state_dir} is in use by another process (pid {lock.holder()})")
        lock.release()  # the batch service takes it again once the server starts


def run(args: argparse.Namespace) -> int:
    check_model_path(args.model)
    if args.model is None:
        from ..default_model import default_model_path

        args.model = default_model_path()
    if args.ray is not None and args.ray_replicas is None:
        raise ValueError("--ray names the cluster for --ray-replicas; add --ray-replicas N")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError("--max-model-len must be at least 2")
    if args.tensor_parallel_size > 1 and args.task == "embed":
        raise ValueError("--task embed does not run with --tensor-parallel-size > 1 (embeddings run on one process)")
    if args.ray_replicas is not None and args.tensor_parallel_size > 1:
        raise ValueError("--ray-replicas runs one process per replica; it does not combine with --tensor-parallel-size")
    if join_group(args) > 0:
        return run_follower(engine_args(args), "serve")  # no HTTP here: rank 0 serves
    try:
        return _serve(args)
    finally:
        leave_group()


def _serve(args: argparse.Namespace) -> int:
    keys = read_api_keys(args)
    check_api_keys(keys)
    _check_start(args)
    from ..engine.async_engine import AsyncEngine
    from ..engine.factory import build_engine

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    if not keys and not is_loopback(args.host):
        logger.warning(
            "serving on %s without an API key: anyone who can reach it can use it (set --api-key or %s)",
            args.host,
            API_KEY_ENV,
        )
    if args.ray_replicas is not None:
        from .serve_ray import run_replicas

        return run_replicas(args, keys)
    settings = server_settings(args, keys)
    settings_for_engine = engine_args(args)
    engine = AsyncEngine(lambda: build_engine(settings_for_engine))  # loads on the engine thread
    app = build_server_app(engine, settings, shutdown_timeout=min(args.shutdown_timeout, 5.0))
    server = uvicorn_server(app, args)
    threading.Thread(target=_exit_on_load_failure, args=(engine, server), daemon=True).start()
    threading.Thread(target=_exit_on_engine_failure, args=(engine, server), daemon=True).start()
    # uvicorn re-raises the SIGTERM it handled once it has shut down; a no-op handler makes that an exit 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except SystemExit as exc:
        if exc.code:
            raise OSError(f"could not serve on {args.host}:{args.port} (see the log above)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if engine.load_error is not None:
        return 2  # the engine has logged why (one line for a bad checkpoint or setting)
    if engine.fatal_error is not None:  # a tensor-parallel rank died: logged in one line, the server stopped
        return 1
    return 0


def _exit_on_engine_failure(engine, server) -> None:
    """Stop the server when the engine loop stopped on its own (a tensor-parallel rank died)."""
    engine.wait_stopped()
    if engine.fatal_error is not None:
        server.should_exit = True


def _exit_on_load_failure(engine, server) -> None:
    """Stop the server when the model fails to load (the error is reported after it stops)."""
    engine.wait_ready()
    if engine.load_error is not None:
        server.should_exit = True
