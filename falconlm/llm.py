"""LLM: the offline API (vLLM's shape) — load a checkpoint once, generate for many prompts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from .engine.engine import Engine, EngineConfig
from .engine.memory import check_max_model_len
from .engine.outputs import RequestOutput
from .engine.sampling_params import SamplingParams
from .quant import load_checkpoint
from .tokenizer import NoTokenizer, load_tokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

Prompt = str | Sequence[int]


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 and friends -> torch dtype, 'auto' -> :func:`auto_dtype` on
    ``device``; ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype == "auto":
        return auto_dtype(resolve_device(device))[0]
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of auto, float32, bfloat16, float16")


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The fastest weights dtype on ``device`` and why: bfloat16 on GPUs, and on CPUs where the native kernels
    run (they widen bfloat16 to float32 where the CPU has no bfloat16 arithmetic, so bfloat16 reads half the
    bytes and computes as fast) or the CPU multiplies bfloat16 itself; float32 elsewhere, where torch's bfloat16
    GEMMs are several times slower than its float32 ones."""
    from . import native
    from .native.ops import bf16_hardware

    if device.type == "cuda":
        return torch.bfloat16, "a CUDA device"
    if native.kernels() is not None:
        return torch.bfloat16, f"the native {native.chosen_variant()} kernels run here"
    if bf16_hardware():
        return torch.bfloat16, "the CPU has bfloat16 arithmetic"
    return torch.float32, f"no native kernels ({native.unavailable_reason()}) and no bfloat16 arithmetic"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None means CUDA when present, else CPU; ValueError (one line) for a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a device name torch knows; use cpu or cuda") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} is not available: {why}; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) here")
    return resolved


class LLM:
    """A Falcon model and its tokenizer on the continuous-batching engine, ready to generate.

    >>> llm = LLM("path/to/falcon")                               # doctest: +SKIP
    >>> llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))[0].text  # doctest: +SKIP

    With ``skip_tokenizer_init`` (vLLM's name), or when the folder has no ``tokenizer.json``, no tokenizer is
    loaded: prompts must be token ids, and outputs carry token ids with empty text.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        quantize: str | None = None,
        deterministic: bool = False,
        skip_tokenizer_init: bool = False,
    ) -> None:
        if model is None:
            from .default_model import default_model_path

            model = default_model_path()
        self.path = Path(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # A quantized folder loads as stored; quantize="int8" / "int4[-gN][-sym]" quantizes a plain one on load.
        self.model = load_checkpoint(self.path, dtype=self.dtype, device=self.device, quantize=quantize)
        self.config = self.model.config
        self.tokenizer = load_tokenizer(self.path, self.config.eos_token_id, skip_tokenizer_init)
        self.max_model_len = check_max_model_len(self.config, max_model_len)
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.engine = Engine(
            self.model,
            self.tokenizer,
            EngineConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens or max(512, self.max_model_len),
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                max_model_len=self.max_model_len,
                enable_prefix_caching=enable_prefix_caching,
                deterministic=deterministic,
            ),
        )
        self._next_id = 0

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A string is tokenized; a list of ints is taken as token ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        return ids

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; all prompts share the engine's continuous batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        if isinstance(self.tokenizer, NoTokenizer) and any(sp.stop for sp in params):
            raise ValueError(f"stop strings need a tokenizer, and {self.tokenizer.reason}; use stop_token_ids")
        token_prompts = [self.encode_prompt(p) for p in prompts]
        results = [
            RequestOutput(str(i), p if isinstance(p, str) else None, ids, [None] * sp.n)
            for i, (p, ids, sp) in enumerate(zip(prompts, token_prompts, params, strict=True))
        ]
        # n > 1 becomes n engine requests; child i of a seeded request uses seed + i.
        id_to_slot: dict[str, tuple[int, int]] = {}
        try:
            for req, (ids, sp) in enumerate(zip(token_prompts, params, strict=True)):
                for child in range(sp.n):
                    seed = None if sp.seed is None else sp.seed + child
                    request_id = self._new_id()
                    self.engine.add_request(request_id, ids, replace(sp, seed=seed, n=1))
                    id_to_slot[request_id] = (req, child)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        req, child = id_to_slot[out.request_id]
                        out.output.index = child
                        results[req].outputs[child] = out.output
        finally:  # an error (or Ctrl-C) must not leave requests behind in the engine
            for request_id in id_to_slot:
                self.engine.abort(request_id)
        return results

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one completion as they are produced (never a broken UTF-8 character)."""
        request_id = self._new_id()
        self.engine.add_request(request_id, self.encode_prompt(prompt), sampling_params or SamplingParams())
        try:
            finished = False
            while not finished:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        if out.text:
                            yield out.text
                        finished = out.finished
        finally:
            self.engine.abort(request_id)

    def chat_prompt(self, messages: list[dict]) -> str:
        """Render a conversation with the tokenizer's chat template, ready for the assistant's turn."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def _new_id(self) -> str:
        self._next_id += 1
        return f"llm-{self._next_id}"

    @staticmethod
    def _params_per_prompt(sp: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} sampling params for {n} prompts")
        return sp
