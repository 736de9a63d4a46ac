"""One engine factory for LLM, ``falconlm serve`` and ``falconlm batch``: settings in, a ready Engine out.

It resolves the device and dtype, loads the weights (``FalconForCausalLM.from_pretrained``: plain, falconlm-quantized
and GPTQ folders) and the tokenizer, turns a KV-pool fraction into bytes of the memory free once the weights are
loaded, and builds the Engine, whose pool ``memory.kv_cache_blocks`` sizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.falcon import FalconForCausalLM
from ..parallel import init_parallel, load_sharded
from ..parallel.state import DEFAULT_TIMEOUT_S
from ..tokenizer import NoTokenizer, Tokenizer, load_tokenizer
from .devices import auto_dtype, resolve_device, resolve_dtype
from .engine import Engine, EngineConfig
from .memory import check_max_model_len, free_memory
from .pooling import TASKS, resolve_pooling_config
from .tp_runner import attach_driver

logger = logging.getLogger(__name__)


@dataclass
class EngineArgs:
    """What to load and how much to run at once.

    ``model`` None is the embedded default model. ``max_num_batched_tokens`` None is max(512, the context).
    ``kv_cache_memory`` is bytes, a fraction (a float in (0, 1]) of the memory free after loading, or None
    for ``max_num_seqs`` full contexts capped by the free memory. ``threads`` sets torch's CPU threads.
    ``skip_tokenizer_init`` loads no tokenizer (token ids in and out); ``tokenizer_optional`` does the same for a
    folder without one instead of failing (the offline LLM; the server and batch need text).
    ``task`` "embed" serves embeddings only; ``pooling`` / ``normalize`` (None: the checkpoint's
    sentence-transformers files, else last-token and normalised) set embedding requests' defaults (``pooling.py``).
    ``tensor_parallel_size`` > 1 runs under ``torchrun`` with that many processes: this one (rank 0) schedules and
    the others follow (``tp_follower.run_follower``); ``distributed_timeout_s`` bounds every collective, so a dead
    rank is an error, not a hang. ``num_scheduler_steps``: the most model steps one schedule runs while every
    running request decodes (``EngineConfig``); 1 runs one step per schedule.
    """

    model: str | Path | None = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device | None = None
    quantize: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | float | None = None
    enable_prefix_caching: bool = True
    max_waiting: int | None = None
    deterministic: bool = False
    threads: int | None = None
    skip_tokenizer_init: bool = False
    tokenizer_optional: bool = False
    task: str = "generate"
    pooling: str | None = None
    normalize: bool | None = None
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = DEFAULT_TIMEOUT_S
    num_scheduler_steps: int = 16

    @property
    def model_path(self) -> Path:
        if self.model is None:
            from ..default_model import default_model_path

            return default_model_path()
        return Path(self.model)


def build_engine(args: EngineArgs) -> Engine:
    """Load the model and tokenizer and build the Engine; ValueError (one line) for a bad setting."""
    if args.max_num_seqs < 1:  # before the weights load: a bad setting fails at once
        raise ValueError(f"max_num_seqs must be >= 1, got {args.max_num_seqs}")
    if args.num_scheduler_steps < 1:
        raise ValueError(f"num_scheduler_steps must be >= 1, got {args.num_scheduler_steps}")
    if args.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {args.task!r}")
    if args.tensor_parallel_size > 1 and args.task == "embed":
        raise ValueError("--task embed does not run with --tensor-parallel-size > 1 (embeddings run on one process)")
    pooling = resolve_pooling_config(args.model_path, args.pooling, args.normalize)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = args.model_path
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.dtype == "auto":
        logger.info("dtype auto: %s (%s)", str(dtype).removeprefix("torch."), auto_dtype(device)[1])
    state = None
    if args.tensor_parallel_size > 1:
        state = init_parallel(args.tensor_parallel_size, device, args.distributed_timeout_s)
        if not state.is_driver:
            raise ValueError(f"rank {state.rank} follows rank 0: it runs tp_follower.run_follower, not an Engine")
        device = state.device
        model = load_sharded(path, state, dtype, args.quantize)
    else:
        # A quantized folder loads as stored; quantize="int8" / "int4[-gN][-sym]" quantizes a plain one on load.
        model = FalconForCausalLM.from_pretrained(path, dtype=dtype, device=device, quantize=args.quantize)
    model.eval()
    tokenizer = _tokenizer(path, model.config.eos_token_id, args)
    max_model_len = check_max_model_len(model.config, args.max_model_len)
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens or max(512, max_model_len),
        block_size=args.block_size,
        kv_cache_memory=kv_cache_bytes(args.kv_cache_memory, device),
        max_model_len=max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        max_waiting=args.max_waiting,
        deterministic=args.deterministic,
        task=args.task,
        pooling=pooling,
        num_scheduler_steps=args.num_scheduler_steps,
    )
    engine = Engine(model, tokenizer, config)
    if state is not None:
        attach_driver(engine, state)  # sends the runner's plan: the followers allocate their caches now
    logger.info("model loaded: %s (%d KV blocks of %d tokens)", path, engine.stats().num_blocks, args.block_size)
    logger.info("embeddings: %s pooling, normalize %s (%s)", pooling.pooling_type, pooling.normalize, pooling.source)
    return engine


def _tokenizer(path: Path, eos_token_id: int | None, args: EngineArgs) -> Tokenizer | NoTokenizer:
    if args.skip_tokenizer_init or args.tokenizer_optional:
        return load_tokenizer(path, eos_token_id, args.skip_tokenizer_init)
    return Tokenizer.from_pretrained(path)


def kv_cache_bytes(amount: int | float | None, device: torch.device) -> int | None:
    """Bytes for the KV pool: as given, or a fraction of the memory free now (after the weights loaded)."""
    if amount is None or isinstance(amount, int):
        return amount
    free = free_memory(device)
    if free is None:
        raise ValueError("cannot tell the free memory here; give --kv-cache-memory in bytes")
    return int(amount * free)
