"""Loading a checkpoint as one rank's shard (the entry point the engine factory calls).

The rank builds its family's shard on the meta device (``PLANS``: ``falcon.py``, ``falcon3.py``), then fills each
parameter with only its slice of the stored tensor (``reader.py``), so no rank ever holds the whole model. Quantized
models: a folder written by ``falconlm quantize`` is read slice by slice in its stored format (int8 rows and
columns, int4 packed bytes and groups), and ``quantize=`` quantizes each slice as it is read; both give the tensors
the one-process load gives (an int8 row split over ranks takes its scale from the whole row, through one
all-reduce of the row maxima).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model.checkpoint import CheckpointError
from ..model.falcon import FalconForCausalLM
from ..model.families import family_of, load_config
from ..model.formats import quant_method
from ..quant.convert import QUANT_METHOD, QuantRecipe, TensorPlan, module_kind, plan_model, recipe_of
from ..quant.linear import QuantizedEmbedding
from ..quant.primitives import INT8_MAX, GroupPlan, QuantizedTensor, quantize_int4, quantize_int8
from .falcon import build_falcon_shard
from .falcon3 import build_falcon3_shard
from .h1 import build_h1_shard
from .layers import Shard, parameter_shards, quantized_twin
from .mamba import build_mamba_shard
from .reader import CheckpointReader
from .state import ParallelState

# family name -> (full config, state, where a row-parallel kind's input may be split) -> the rank's model on meta
PLANS: dict[str, Callable[[Any, ParallelState, Callable[[str], int]], nn.Module]] = {
    "falcon": build_falcon_shard,
    "falcon3": build_falcon3_shard,
    "mamba": build_mamba_shard,
    "h1": build_h1_shard,
}


def load_sharded(
    path: str | Path,
    state: ParallelState,
    dtype: torch.dtype = torch.float32,
    quantize: str | QuantRecipe | None = None,
) -> nn.Module:
    """This rank's shard of the checkpoint at ``path``, in ``dtype`` on ``state.device``, in eval mode.

    The model answers the same calls as an unsharded one (``forward_hidden``, ``compute_logits``, ``config`` with
    this rank's head counts...), and its collectives run through ``state``: every rank must make the same calls
    in the same order. World size 1 is a plain load. Missing, unexpected and mis-shaped tensors give the
    unsharded loader's CheckpointError; a split the quantization groups forbid, a ValueError naming the layer.
    """
    if not state.distributed:
        return FalconForCausalLM.from_pretrained(path, dtype=dtype, device=state.device, quantize=quantize).eval()
    folder = Path(path)
    config = load_config(folder)
    family = family_of(config)
    if family.name not in PLANS:
        raise ValueError(f"tensor parallelism does not split {family.title} models")
    method = quant_method(folder)
    if method not in (None, QUANT_METHOD):
        raise ValueError(f"tensor parallelism reads plain and falconlm-quantized folders, not {method!r} ones")
    stored = recipe_of(config) if method is not None else None
    recipe = QuantRecipe.parse(quantize) if isinstance(quantize, str) else quantize
    if stored is not None and recipe is not None and recipe.canonical() != stored.canonical():
        raise ValueError(
            f"{folder} is already quantized ({stored.name}); quantizing it again as {recipe.name} is not supported"
        )
    active = stored or recipe
    plans = plan_model(config, active) if active is not None else {}
    model = PLANS[family.name](config, state, lambda kind: _column_multiple(plans.get(kind), kind))
    with CheckpointReader(folder) as reader:
        _Filler(model, reader, config, plans, active, stored is not None, dtype, state).fill()
    if stored is None and recipe is not None:
        block = recipe.to_config(config)
        old = model.config
        new = dataclasses.replace(old, extra={**old.extra, "quantization_config": block})
        for module in model.modules():
            if getattr(module, "config", None) is old:
                module.config = new
    return model.eval()


def _column_multiple(plan: TensorPlan | None, kind: str) -> int:
    """Where a row-parallel matrix's input columns may be split: on int4 group boundaries."""
    if plan is None or plan.group is None:
        return 1
    if plan.group.padded_in != plan.in_features:
        raise ValueError(
            f"{kind}: int4 groups of {plan.group.group_size} pad its {plan.in_features} input columns, which "
            "tensor parallelism cannot split; use another group size"
        )
    return plan.group.group_size


class _Filler:
    """Fills a rank's meta model from a checkpoint reader (one load)."""

    def __init__(
        self,
        model: nn.Module,
        reader: CheckpointReader,
        config: Any,
        plans: dict[str, TensorPlan],
        recipe: QuantRecipe | None,
        prequantized: bool,
        dtype: torch.dtype,
        state: ParallelState,
    ) -> None:
        self.model, self.reader, self.config, self.plans = model, reader, config, plans
        self.recipe, self.prequantized, self.dtype, self.state = recipe, prequantized, dtype, state
        self.shards = parameter_shards(model)
        self.params = dict(model.named_parameters())  # a tied head appears once, as the embedding
        self.quantized = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and module_kind(name) in plans
        ]

    # ---- names ------------------------------------------------------------------------------------------------
    def _expected(self) -> set[str]:
        names = set(self.params)
        if self.prequantized:
            for name, _ in self.quantized:
                names.discard(f"{name}.weight")
                plan = self.plans[module_kind(name)]
                names |= {f"{name}.{suffix}" for suffix in plan.stored_shapes(self.recipe.symmetric)}
        return names

    def _skipped(self, name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings)

    def _check_names(self, expected: set[str]) -> None:
        for name, stored in self.reader.tensors.items():
            if name not in expected and not self._skipped(name):
                raise CheckpointError(f"unexpected tensor {name} in {stored.file}")
        missing = sorted(n for n in expected if n not in self.reader.tensors)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"missing tensor {missing[0]} in {self.reader.source}{more}")

    def _read(self, name: str, shape: tuple[int, ...], shard: Shard | None, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name``'s ``shard``, after checking the stored tensor is ``shape`` (the full one)."""
        stored = self.reader.tensors[name]
        if stored.shape != shape:
            raise CheckpointError(f"shape mismatch for {name}: expected {shape}, got {stored.shape} (in {stored.file})")
        return self.reader.read(name, shard, dtype).to(self.state.device)

    def _full_shape(self, name: str, param: torch.Tensor) -> tuple[int, ...]:
        shape = list(param.shape)
        shard = self.shards.get(name)
        if shard is not None:
            shape[shard.dim] = shard.full
        return tuple(shape)

    # ---- filling ----------------------------------------------------------------------------------------------
    def fill(self) -> None:
        self._check_names(self._expected())
        done: set[str] = set()
        for name, module in self.quantized:
            done |= self._quantize_module(name, module)
        for name, param in self.params.items():
            if name in done:
                continue
            value = self._read(name, self._full_shape(name, param), self.shards.get(name), self.dtype)
            owner, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(owner), leaf, nn.Parameter(value))
        if self.config.tie_word_embeddings and not isinstance(self.model.get_input_embeddings(), QuantizedEmbedding):
            self.model.tie_weights()  # a quantized embedding already shares its tied head's tensors
        stray = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if stray:
            raise RuntimeError(f"{stray[0]} is still on the meta device after loading")

    def _quantize_module(self, name: str, module: nn.Module) -> set[str]:
        """Swap in ``name``'s quantized twin; the parameter names it consumed."""
        plan = self.plans[module_kind(name)]
        wname = f"{name}.weight"
        shard = self.shards.get(wname)
        if self.prequantized:
            qt = self._stored(name, plan, shard)
        else:
            w = self._read(wname, self._full_shape(wname, module.weight), shard, torch.float32)
            qt = self._quantize(name, w, plan, shard)
        bias = None
        if getattr(module, "bias", None) is not None:
            bname = f"{name}.bias"
            bias = self._read(bname, self._full_shape(bname, module.bias), self.shards.get(bname), self.dtype)
        qt = qt.to(self.state.device, dtype=self.dtype)  # scales in the compute dtype, as the plain loader
        owner, _, leaf = name.rpartition(".")
        parent = self.model.get_submodule(owner) if owner else self.model
        if isinstance(module, nn.Embedding):
            head = None
            if self.config.tie_word_embeddings:
                head = self.model.lm_head = quantized_twin(self.model.lm_head, qt, None, self.dtype)
            setattr(parent, leaf, quantized_twin(module, qt, None, self.dtype, head=head))
        else:
            setattr(parent, leaf, quantized_twin(module, qt, bias, self.dtype))
        return {wname, f"{name}.bias"}

    def _stored(self, name: str, plan: TensorPlan, shard: Shard | None) -> QuantizedTensor:
        """This rank's slice of a stored quantized matrix."""
        parts = {}
        for suffix, (dtype, shape) in plan.stored_shapes(self.recipe.symmetric).items():
            key = f"{name}.{suffix}"
            stored = self.reader.tensors[key]
            if stored.dtype != dtype or stored.shape != shape:
                raise CheckpointError(
                    f"{key} is {stored.dtype} {list(stored.shape)}, but quantization_config describes "
                    f"{dtype} {list(shape)}"
                )
            parts[suffix] = self.reader.read(key, _stored_shard(name, suffix, plan, shard))
        in_features = shard.size if shard is not None and shard.dim == 1 else plan.in_features
        group = plan.group.group_size if plan.group is not None else 0
        return QuantizedTensor(plan.bits, in_features, group, parts["qweight"], parts["scales"], parts.get("zeros"))

    def _quantize(self, name: str, w: torch.Tensor, plan: TensorPlan, shard: Shard | None) -> QuantizedTensor:
        """Quantize this rank's slice ``w`` as the whole matrix would be quantized."""
        columns = shard is not None and shard.dim == 1
        if plan.bits == 8:
            if not columns:
                return quantize_int8(w)
            row_max = w.abs().amax(dim=1)  # the scale is the whole row's: the maximum over every rank's columns
            if self.state.distributed:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.state.group)
            s = row_max / INT8_MAX
            q = (w / torch.where(s == 0, torch.ones_like(s), s)[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
            return QuantizedTensor(8, w.shape[1], 0, q.to(torch.int8), s)
        group = plan.group
        if columns:
            group = GroupPlan(group.group_size, w.shape[1], w.shape[1])
        try:
            return quantize_int4(w, group, self.recipe.symmetric)
        except ValueError as exc:
            raise CheckpointError(f"{name}.weight: {exc}") from None


def _stored_shard(name: str, suffix: str, plan: TensorPlan, shard: Shard | None) -> Shard | None:
    """The slice of a stored tensor (qweight, scales, zeros) that holds a weight's ``shard``."""
    if shard is None or shard.dim == 0:
        return shard
    what = f"{name}.{suffix}"
    if plan.bits == 8:
        return shard if suffix == "qweight" else None  # int8 scales are per row: every rank reads them all
    if suffix == "qweight":
        return shard.divided(2, what)
    return shard.divided(plan.group.group_size, what)
