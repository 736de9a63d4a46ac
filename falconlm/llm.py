"""LLM: the offline API (vLLM's shape) — load a checkpoint once, generate for many prompts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .engine.devices import DTYPES, auto_dtype, resolve_device, resolve_dtype
from .engine.factory import EngineArgs, build_engine
from .engine.outputs import RequestOutput
from .engine.pooling import EmbeddingOutput, EmbeddingRequestOutput, PoolingParams, truncate_prompt
from .engine.sampling_params import SamplingParams
from .engine.validation import check_token_ids
from .tokenizer import NoTokenizer

__all__ = ["DTYPES", "LLM", "Prompt", "auto_dtype", "resolve_device", "resolve_dtype"]

Prompt = str | Sequence[int]


class LLM:
    """A Falcon model and its tokenizer on the continuous-batching engine, ready to generate.

    >>> llm = LLM("path/to/falcon")                               # doctest: +SKIP
    >>> llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))[0].text  # doctest: +SKIP

    With ``skip_tokenizer_init`` (vLLM's name), or when the folder has no ``tokenizer.json``, no tokenizer is
    loaded: prompts must be token ids, and outputs carry token ids with empty text.

    :meth:`embed` gives embeddings (pooled final hidden states, see ``engine/pooling.py``); ``task="embed"``
    loads the model for embeddings only, ``pooling`` ("last", "mean", "cls") and ``normalize`` override the
    checkpoint's sentence-transformers pooling (default: last token, L2-normalised).

    ``tensor_parallel_size`` > 1 makes this process rank 0 of a ``torchrun`` group of that many processes; the
    other ranks run ``falconlm.engine.tp_follower.run_follower`` with the same settings, and ``self.engine.close()``
    at the end lets them exit. Embeddings are refused then.

    ``num_scheduler_steps``: the most decode steps one schedule runs while every request decodes (a decode run,
    ``EngineConfig``); 1 schedules every token.
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
        task: str = "generate",
        pooling: str | None = None,
        normalize: bool | None = None,
        tensor_parallel_size: int = 1,
        distributed_timeout_s: float = 120.0,
        num_scheduler_steps: int = 16,
    ) -> None:
        args = EngineArgs(
            model=model,
            dtype=dtype,
            device=device,
            quantize=quantize,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching,
            deterministic=deterministic,
            skip_tokenizer_init=skip_tokenizer_init,
            tokenizer_optional=True,
            task=task,
            pooling=pooling,
            normalize=normalize,
            tensor_parallel_size=tensor_parallel_size,
            distributed_timeout_s=distributed_timeout_s,
            num_scheduler_steps=num_scheduler_steps,
        )
        self.path = args.model_path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.engine = build_engine(args)
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        self.config = self.model.config
        self.max_model_len = self.engine.max_model_len
        self._next_id = 0

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A string is tokenized; a list of ints is taken as token ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return check_token_ids(prompt, self.config.vocab_size, "prompt")

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
        # One engine request per prompt; n > 1 runs as its child sequences (engine/parallel_sampling.py).
        parent_to_prompt: dict[str, int] = {}
        try:
            for i, (ids, sp) in enumerate(zip(token_prompts, params, strict=True)):
                request_id = self._new_id()
                self.engine.add_request(request_id, ids, sp)
                parent_to_prompt[request_id] = i
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[parent_to_prompt[out.parent_id]].outputs[out.output.index] = out.output
        finally:  # an error (or Ctrl-C) must not leave requests behind in the engine
            for request_id in parent_to_prompt:
                self.engine.abort(request_id)
        return results

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One EmbeddingRequestOutput per prompt, in order (vLLM's shape: ``out.outputs.embedding`` is the vector,
        a list of floats). All prompts share the engine's steps with any generation; none uses the KV cache.

        A prompt longer than the context is a ValueError unless ``truncate_prompt_tokens`` keeps only its last
        tokens."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        token_prompts = [truncate_prompt(self.encode_prompt(p), truncate_prompt_tokens) for p in prompts]
        params = pooling_params or PoolingParams()
        request_ids = [self._new_id() for _ in token_prompts]
        vectors: dict[str, list[float]] = {}
        try:
            for request_id, ids in zip(request_ids, token_prompts, strict=True):
                self.engine.add_request(request_id, ids, params)
            while len(vectors) < len(request_ids) and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.embedding is not None:
                        vectors[out.request_id] = out.embedding
        finally:  # an error (or Ctrl-C) must not leave requests behind in the engine
            for request_id in request_ids:
                if request_id not in vectors:
                    self.engine.abort(request_id)
        return [
            EmbeddingRequestOutput(rid, ids, EmbeddingOutput(vectors[rid]))
            for rid, ids in zip(request_ids, token_prompts, strict=True)
        ]

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
