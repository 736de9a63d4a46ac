"""Tensor-parallel building blocks: linear layers and embeddings that hold one rank's slice of a matrix.

Every module here keeps the parameter names of the layer it replaces (``weight``, ``bias``), so a sharded model
has exactly the unsharded model's state-dict names (transformers' names): loading and quantization still find
modules by name. Each one records which slice of the full checkpoint tensor each of its parameters holds in
``module.tp_shards`` (``{"weight": Shard, "bias": Shard}``; a parameter not listed is replicated whole), and
:func:`parameter_shards` collects them by full parameter name for the loader. Any module may carry
``tp_shards`` (:func:`set_shards`), not only the ones defined here.

A :class:`Shard` is a list of ``[start, stop)`` index ranges along one dim of the full tensor (0: rows, i.e.
output features or vocabulary entries; 1: columns, i.e. input features), concatenated in order. Falcon-7B's fused
QKV rows on rank 0 of 2 are three ranges (the rank's query heads, the shared key head, the value head)::

    Shard(0, ((0, 36 * d), (71 * d, 72 * d), (72 * d, 73 * d)), full=73 * d)

The layers (``state`` is the rank's :class:`~falconlm.parallel.state.ParallelState`; every rank must call the same
layers in the same order, since the reducing ones run collectives):

* :class:`ColumnParallelLinear` ``(in_features, rows, bias, state)``: this rank's output rows; the output stays
  split (each rank has its features), no communication.
* :class:`RowParallelLinear` ``(columns, out_features, bias, state)``: this rank's input columns; the partial
  products are all-reduced and the (replicated) bias is added once, after the reduce. ``partial(x)`` is the
  un-reduced, bias-free product, and :func:`row_parallel_sum` sums several row-parallel outputs with one
  all-reduce (a parallel attention + MLP block); a layer built with ``reduce=False`` returns only its partial
  product, for a caller that sums several and finishes them with :func:`finish_rows`.
* :class:`VocabParallelEmbedding` ``(vocab, embedding_dim, state)``: this rank's vocabulary slice (a
  :class:`~falconlm.parallel.partition.Partition`); ids outside it give 0 and the ranks' lookups are all-reduced.
* :class:`VocabParallelHead` ``(in_features, vocab, state, sizes)``: logits of this rank's vocabulary slice,
  gathered (``all_gather_last``, every rank's slice size in ``sizes``) so every rank returns the full logits. A
  tied head shares the embedding's slice. :func:`vocab_partition` and :func:`vocab_sizes` split a vocabulary.

The linear ones are :class:`~falconlm.model.falcon.FalconLinear` subclasses, so the engine's native bfloat16
matmul binding (``matmul`` set per weight) works inside them. :func:`quantized_twin` builds the quantized module
that replaces one of them (``QuantizedLinear`` / ``QuantizedEmbedding`` subclasses with the same communication
and ``tp_shards``) from this rank's :class:`~falconlm.quant.primitives.QuantizedTensor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.falcon import FalconLinear
from ..quant.kernels import Kernel, WeightSpec, select_kernel
from ..quant.linear import QuantizedEmbedding, QuantizedLinear
from ..quant.primitives import QuantizedTensor
from .partition import Partition, aligned
from .state import ParallelState


@dataclass(frozen=True)
class Shard:
    """The slice of a full tensor that a rank holds: ``ranges`` along ``dim``, concatenated in order."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int  # the full tensor's size along ``dim``

    def __post_init__(self) -> None:
        for start, stop in self.ranges:
            if not 0 <= start <= stop <= self.full:
                raise ValueError(f"shard range [{start}, {stop}) is outside 0..{self.full}")

    @classmethod
    def whole(cls, dim: int, full: int) -> Shard:
        return cls(dim, ((0, full),), full)

    @classmethod
    def of(cls, part: Partition, dim: int, unit: int = 1) -> Shard:
        """The partition's share along ``dim``, in units of ``unit`` elements (e.g. heads of ``head_dim`` rows)."""
        return cls(dim, ((part.start * unit, part.stop * unit),), part.total * unit)

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    @property
    def is_whole(self) -> bool:
        return self.size == self.full and self.ranges == ((0, self.full),)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of a full tensor (a view when it is one range)."""
        if full.shape[self.dim] != self.full:
            raise ValueError(f"expected {self.full} along dim {self.dim}, the tensor has {list(full.shape)}")
        parts = [full.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def divided(self, factor: int, what: str = "shard") -> Shard:
        """The same shard of a tensor ``factor`` times narrower along ``dim`` (packed int4 bytes, quantization
        groups); ValueError naming ``what`` when a range boundary falls inside a unit."""
        if any(start % factor or stop % factor for start, stop in self.ranges) or self.full % factor:
            raise ValueError(f"{what}: slice {list(self.ranges)} of {self.full} does not fall on units of {factor}")
        return Shard(self.dim, tuple((a // factor, b // factor) for a, b in self.ranges), self.full // factor)


def set_shards(module: nn.Module, **shards: Shard | None) -> nn.Module:
    """Record which slice of the full tensor each named parameter of ``module`` holds (None: replicated)."""
    current = dict(getattr(module, "tp_shards", {}))
    for name, shard in shards.items():
        if shard is None:
            current.pop(name, None)
        else:
            current[name] = shard
    module.tp_shards = current
    return module


def parameter_shards(model: nn.Module) -> dict[str, Shard]:
    """Full parameter name -> its shard, for every sharded parameter of ``model`` (the rest are replicated)."""
    out = {}
    for prefix, module in model.named_modules():
        for leaf, shard in getattr(module, "tp_shards", {}).items():
            out[f"{prefix}.{leaf}" if prefix else leaf] = shard
    return out


def local_product(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with this rank's weight, without bias: FalconLinear (bound matmul or F.linear) or QuantizedLinear."""
    if isinstance(module, QuantizedLinear):
        return module.kernel.matmul(x, tuple(module._buffers[n] for n in module._names), module.spec)
    return F.linear(x, module.weight) if module.matmul is None else module.matmul(x, module.weight)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


# ---- linear layers --------------------------------------------------------------------------------------------
class ColumnParallelLinear(FalconLinear):
    """This rank's output rows (``rows``, a dim-0 Shard) of a linear layer; the output stays split."""

    def __init__(self, in_features: int, rows: Shard, bias: bool, state: ParallelState) -> None:
        super().__init__(in_features, rows.size, bias=bias)
        self.state = state
        set_shards(self, weight=rows, bias=rows if bias else None)


class RowParallelLinear(FalconLinear):
    """This rank's input columns (``columns``, a dim-1 Shard) of a linear layer; outputs are all-reduced and the
    replicated bias is added once, after the reduce."""

    def __init__(
        self, columns: Shard, out_features: int, bias: bool, state: ParallelState, reduce: bool = True
    ) -> None:
        super().__init__(columns.size, out_features, bias=bias)
        self.state, self.reduce = state, reduce
        set_shards(self, weight=columns)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the product: no reduce, no bias."""
        return local_product(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reduced product plus bias; with ``reduce`` False only :meth:`partial` (the caller reduces, then
        adds the bias: :func:`finish_rows`)."""
        return _add_bias(self.state.all_reduce(self.partial(x)), self.bias) if self.reduce else self.partial(x)


def finish_rows(y: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    """The sum of non-reducing row-parallel layers' outputs ``y`` (``reduce=False``) all-reduced once, then each
    layer's bias added once (a parallel attention + MLP block)."""
    y = layers[0].state.all_reduce(y)
    for layer in layers:
        y = _add_bias(y, layer.bias)
    return y


def row_parallel_sum(*pairs: tuple[nn.Module, torch.Tensor]) -> torch.Tensor:
    """``sum(layer(x) for layer, x in pairs)`` for row-parallel layers of one state, with one all-reduce: the
    partial products are summed, reduced once, then each layer's bias is added once."""
    y = None
    for layer, x in pairs:
        p = layer.partial(x)
        y = p if y is None else y + p
    return finish_rows(y, *(layer for layer, _ in pairs))


# ---- vocabulary-parallel embedding and head -------------------------------------------------------------------
def _vocab_lookup(
    ids: torch.Tensor,
    vocab: Partition,
    lookup: Callable[[torch.Tensor], torch.Tensor],
    width: int,
    dtype: torch.dtype,
    state: ParallelState,
) -> torch.Tensor:
    """Rows of this rank's vocabulary slice for ``ids`` (0 outside it), all-reduced over ranks."""
    local = ids - vocab.start
    outside = (local < 0) | (local >= vocab.size)
    if vocab.size:
        out = lookup(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0)
    else:
        out = torch.zeros(*ids.shape, width, dtype=dtype, device=ids.device)
    return state.all_reduce(out)


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``vocab.start:vocab.stop`` of the embedding; an id outside them gives 0 here and the ranks' lookups
    are all-reduced, so every rank gets every id's row."""

    def __init__(self, vocab: Partition, embedding_dim: int, state: ParallelState) -> None:
        super().__init__(vocab.size, embedding_dim)
        self.vocab, self.state = vocab, state
        set_shards(self, weight=Shard.of(vocab, 0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return _vocab_lookup(ids, self.vocab, lambda i: F.embedding(i, w), w.shape[1], w.dtype, self.state)


class VocabParallelHead(FalconLinear):
    """Logits of vocabulary slice ``vocab`` (bias-free), gathered so every rank returns all ``vocab.total``."""

    def __init__(self, in_features: int, vocab: Partition, state: ParallelState, sizes: list[int]) -> None:
        super().__init__(in_features, vocab.size, bias=False)
        self.vocab, self.state, self.sizes = vocab, state, list(sizes)
        set_shards(self, weight=Shard.of(vocab, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state.all_gather_last(local_product(self, x), self.sizes)


def vocab_partition(total: int, state: ParallelState, rank: int | None = None, multiple: int = 1) -> Partition:
    """Rank ``rank``'s (default: this rank's) vocabulary slice, with boundaries on multiples of ``multiple`` rows
    where that gives every rank a share (``multiple`` 1: :func:`~falconlm.parallel.partition.partition`)."""
    rank = state.rank if rank is None else rank
    return aligned(total, state.world_size, rank, multiple, 1, "vocabulary")


def vocab_sizes(total: int, state: ParallelState, multiple: int = 1) -> list[int]:
    """Every rank's vocabulary share (for :class:`VocabParallelHead`), as :func:`vocab_partition` splits it."""
    return [vocab_partition(total, state, r, multiple).size for r in range(state.world_size)]


# ---- quantized twins ------------------------------------------------------------------------------------------
class QuantizedColumnParallelLinear(QuantizedLinear):
    """A :class:`ColumnParallelLinear` with quantized weights."""

    state: ParallelState


class QuantizedRowParallelLinear(QuantizedLinear):
    """A :class:`RowParallelLinear` with quantized weights (the bias is added once, after the reduce)."""

    state: ParallelState
    reduce: bool = True

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return local_product(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(self.state.all_reduce(self.partial(x)), self.bias) if self.reduce else self.partial(x)


class QuantizedVocabParallelHead(QuantizedLinear):
    """A :class:`VocabParallelHead` with quantized weights."""

    state: ParallelState
    vocab: Partition
    sizes: list[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state.all_gather_last(local_product(self, x), self.sizes)


class QuantizedVocabParallelEmbedding(QuantizedEmbedding):
    """A :class:`VocabParallelEmbedding` with quantized weights (a tied one reads its head's tensors)."""

    state: ParallelState
    vocab: Partition

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lookup = super().forward
        return _vocab_lookup(ids, self.vocab, lookup, self.embedding_dim, self.compute_dtype, self.state)


_TWINS: dict[type, type] = {
    ColumnParallelLinear: QuantizedColumnParallelLinear,
    RowParallelLinear: QuantizedRowParallelLinear,
    VocabParallelHead: QuantizedVocabParallelHead,
}


def quantized_twin(
    module: nn.Module,
    qt: QuantizedTensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    kernel: str | Kernel | None = None,
    head: QuantizedLinear | None = None,
) -> nn.Module:
    """The quantized module that replaces ``module`` (a layer of this file, or a plain FalconLinear /
    nn.Embedding when replicated), holding this rank's ``qt``, with the same communication and ``tp_shards``.
    ``kernel``: a Kernel, a kernel name or None (chosen for the weight); ``head``: the quantized tied head an
    embedding shares its tensors with."""
    if isinstance(module, nn.Embedding):
        cls = QuantizedVocabParallelEmbedding if isinstance(module, VocabParallelEmbedding) else QuantizedEmbedding
        twin = cls(qt, dtype, head)
    else:
        if kernel is None or isinstance(kernel, str):
            kernel = select_kernel(WeightSpec.of(qt), qt.qweight.device, kernel)
        twin = _TWINS.get(type(module), QuantizedLinear)(qt, bias, dtype, kernel)
    for attr in ("state", "vocab", "sizes", "reduce"):
        if hasattr(module, attr):
            setattr(twin, attr, getattr(module, attr))
    if hasattr(module, "tp_shards"):
        twin.tp_shards = dict(module.tp_shards)
    return twin
