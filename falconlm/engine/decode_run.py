"""A decode run's later steps in one native call (``falcon_decode_run``), where every row is greedy.

The scheduler may give a step's decode rows several model steps at once (``Scheduler._run_length``, vLLM's
multi-step scheduling). The runner runs the first as any step, and the rest either in Python, step by step
(``ModelRunner._run_on``), or, when every row takes the argmax and nothing else of its logits, here: the native
library then embeds each step's tokens, runs the layers, the final norm, the output head and the argmax, and
feeds the tokens to the next step, with no Python in between. Each of those is the entry point the single step
calls (the fused layers and ``FusedDecoder.final_norm``, the head's own native matmul, ``ops.argmax``), so a row's
tokens are the same either way; this module only says whether the model's embedding and head are ones the library
can read, and describes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..model.falcon import FalconLinear
from ..native import ops
from ..native.decode import Weight
from ..quant.kernels.native import NativeKernel
from ..quant.linear import QuantizedEmbedding, QuantizedLinear

if TYPE_CHECKING:
    from ..model.falcon import FalconForCausalLM
    from .request import Request

ACTIVATION_DTYPES = (torch.bfloat16, torch.float32)


def embedding_weight(embedding: torch.nn.Module, dtype: torch.dtype) -> Weight | None:
    """The token embedding as ``falcon_decode_run`` reads it, giving rows in ``dtype``: a bfloat16 / float32
    table (bits 16 / 32), or a tied head's native tiles (bits 8 / 4, as ``NativeKernel.rows`` reads them); None
    for any other embedding, whose runs stay in Python."""
    if type(embedding) is torch.nn.Embedding:
        w = embedding.weight
        if w.dtype is not dtype or not w.is_cpu or not w.is_contiguous() or embedding.max_norm is not None:
            return None
        n, h = w.shape
        return Weight(w.data_ptr(), None, n, h, h, 0, 16 if dtype is torch.bfloat16 else 32)
    if isinstance(embedding, QuantizedEmbedding) and type(embedding.head_kernel) is NativeKernel:
        return _tiles(embedding) if embedding.compute_dtype is dtype else None
    return None


def head_weight(head: torch.nn.Module, dtype: torch.dtype) -> Weight | None:
    """The output head as ``falcon_decode_run`` multiplies it, for activations in ``dtype``: quantized tiles on
    the native kernel (``falcon_qlinear``), or a bfloat16 weight bound to the invariant native matmul
    (``falcon_linear_bf16``, as ``kernels.bind_weight_kernels`` binds every head); None otherwise."""
    if getattr(head, "bias", None) is not None:
        return None
    if isinstance(head, QuantizedLinear) and type(head.kernel) is NativeKernel:
        return _tiles(head)
    if isinstance(head, FalconLinear) and head.matmul is ops.linear_invariant and dtype is torch.bfloat16:
        w = head.weight
        if w.dtype is not dtype or not w.is_cpu or not w.is_contiguous() or w.shape[1] % ops.LINEAR_K_MULTIPLE:
            return None
        n, h = w.shape
        return Weight(w.data_ptr(), None, n, h, h, 0, 16)
    return None


def _tiles(module: QuantizedLinear | QuantizedEmbedding) -> Weight | None:
    """A quantized module's native tiles (its ``spec`` and its tiled weight and scales buffers), on the CPU."""
    spec = module.spec
    tiled, scales = (module._buffers[name] for name in module._names)
    if not tiled.is_cpu:
        return None
    return Weight(tiled.data_ptr(), scales.data_ptr(), spec.out_features, spec.padded_in, spec.in_features,
                  spec.group_size, spec.bits)  # fmt: skip


def greedy_rows(params: Sequence[object]) -> bool:
    """Whether every row's token is the argmax of its raw logits: greedy, no logit bias, no logprobs (penalties
    and grammars never reach a run, ``Request.runs_ahead``)."""
    return all(
        getattr(p, "greedy", False) and not getattr(p, "logit_bias", None) and getattr(p, "logprobs", None) is None
        for p in params
    )


def stop_tokens(requests: Sequence[Request]) -> torch.Tensor:
    """[R, S] int64: the tokens that end each row's request (``Request.stops_at``), -1 where a row has fewer."""
    stops = [r.stop_tokens for r in requests]
    width = max(1, max(map(len, stops)))
    return torch.tensor([[*ids, *[-1] * (width - len(ids))] for ids in stops], dtype=torch.int64)


def run_parts(model: FalconForCausalLM) -> tuple[Weight, Weight, torch.dtype] | None:
    """The embedding and head of ``model`` for a native run, and the activations' dtype (the embedding's rows'),
    or None where it cannot run one."""
    embedding = model.get_input_embeddings()
    dtype = embedding.compute_dtype if isinstance(embedding, QuantizedEmbedding) else embedding.weight.dtype
    if dtype not in ACTIVATION_DTYPES:
        return None
    embed = embedding_weight(embedding, dtype)
    head = head_weight(model.lm_head, dtype)
    return None if embed is None or head is None else (embed, head, dtype)
