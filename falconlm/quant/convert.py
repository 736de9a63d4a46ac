"""Quantization recipes and the rewrite of a Falcon model into its quantized form.

A :class:`QuantRecipe` says what to do (int8 or int4 with groups, symmetric or not, the head's bits); a plan
per module kind (:func:`plan_model`) says how each matrix is grouped, padding and smaller groups included.
Three verbs use them, and all three produce the same tensors from the same weights:

* :func:`quantize_tensors`: checkpoint tensors in, stored quantized tensors out, one at a time (offline);
* :func:`build_quantized_model`: stored tensors in, a ready FalconForCausalLM out (loading);
* :func:`quantize_model`: a model that is already built is rewritten in place (gpt-fast's handler shape).

``model/falcon.py`` imports nothing from here; these functions swap its modules after it is built.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..model.checkpoint import CheckpointError, _SkipInit
from ..model.config import FalconConfig
from ..model.falcon import FalconForCausalLM
from ..model.families import build_model, family_of
from .kernels import Kernel, WeightSpec, select_kernel
from .linear import QuantizedEmbedding, QuantizedLinear
from .primitives import GROUP_SIZES, GroupPlan, QuantizedTensor, plan_groups, quantize_int4, quantize_int8

QUANT_METHOD = "falconlm"
FORMAT_VERSION = 1
BITS = (4, 8)
METHODS = ("rtn", "gptq")
HEAD_BITS = (4, 8, 16)  # 16: the embedding / head stays in the model's dtype
BODY_KINDS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
HEAD_KINDS = ("word_embeddings", "lm_head")  # Falcon's; other families name their embedding (``families.py``)
_LAYER_PREFIX = re.compile(r"^(?:[a-z_]+\.)+?(?:h|layers)\.\d+\.")  # transformer.h.3. / model.layers.3.
KEEP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SPEC = re.compile(r"int(?P<bits>[48])(?:-g(?P<group>\d+))?(?P<sym>-sym)?")
FORMAT_DOC = {
    "tensors": "each quantized matrix NAME.weight is stored as NAME.qweight, NAME.scales and (asymmetric int4) "
    "NAME.zeros; a tied lm_head is not stored (it is transformer.word_embeddings); other tensors are kept",
    "recipe": "bits: the block matrices; head_bits: the embedding and lm_head (16: kept unquantized); "
    "group_size and symmetric: the int4 matrices (null when there are none); modules: the plan per matrix kind",
    "int8": "w[n, k] = scales[n] * qweight[n, k]; qweight int8 [N, K] in [-127, 127], scales float32 [N]",
    "int4": "w[n, k] = scales[n, k // g] * (q[n, k] - 8) + zeros[n, k // g] (zeros = 0 when symmetric); q in "
    "[0, 15], two per byte in qweight uint8 [N, padded_in / 2] (even k in the low nibble); scales and zeros "
    "float32 [N, padded_in / g]; columns past in_features are padding and meet zero activations",
}


@dataclass(frozen=True)
class QuantRecipe:
    """What to quantize and how. int8 is always symmetric per output channel; ``group_size`` is int4's."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    head_bits: int = 8
    method: str = "rtn"  # rtn: round to nearest; gptq: error-compensating rounding on calibration text

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if self.head_bits not in HEAD_BITS:
            raise ValueError(f"head bits must be one of {HEAD_BITS}, got {self.head_bits!r}")
        if self.method not in METHODS:
            raise ValueError(f"quantization method {self.method!r} is not supported; use one of {METHODS}")
        if self.method == "gptq" and self.bits != 4:
            raise ValueError("GPTQ rounds int4 matrices; use bits 4 with it (int8 is close to lossless already)")

    @classmethod
    def parse(cls, spec: str) -> QuantRecipe:
        """``int8``, ``int4``, ``int4-g128``, ``int4-g32-sym``... (int4 defaults to groups of 64, asymmetric)."""
        m = _SPEC.fullmatch(spec.strip().lower())
        if m is None or (m["bits"] == "8" and (m["group"] or m["sym"])):
            raise ValueError(f"quantization {spec!r} is not understood; use int8, int4, int4-g32/64/128[-sym]")
        return cls(bits=int(m["bits"]), group_size=int(m["group"] or 64), symmetric=bool(m["sym"]))

    @property
    def has_int4(self) -> bool:
        """Whether any matrix is int4 (``group_size`` and ``symmetric`` only matter then)."""
        return self.bits == 4 or self.head_bits == 4

    @property
    def name(self) -> str:
        name = "int8" if self.bits == 8 else f"int4-g{self.group_size}" + ("-sym" if self.symmetric else "")
        name += "-gptq" if self.method == "gptq" else ""
        return name if self.head_bits == 8 else f"{name}, head {'kept' if self.head_bits == 16 else 'int4'}"

    def canonical(self) -> QuantRecipe:
        """The same recipe with int4-only fields at their defaults when nothing is int4: compare these."""
        return self if self.has_int4 else dataclasses.replace(self, group_size=64, symmetric=False)

    def to_config(self, config: FalconConfig) -> dict:
        """The ``quantization_config`` block of config.json: recipe, per-kind plan and the format's description."""
        plans = plan_model(config, self)
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size if self.has_int4 else None,
            "symmetric": self.symmetric if self.has_int4 else None,
            "head_bits": self.head_bits,
            "modules": {kind: plan.describe() for kind, plan in plans.items()},
            "format": FORMAT_DOC,
        }

    @classmethod
    def from_config(cls, block: object) -> QuantRecipe:
        """Read a ``quantization_config`` block written by :meth:`to_config`; ValueError for anything else."""
        if not isinstance(block, dict):
            raise ValueError(f"quantization_config must be an object, got {block!r}")
        method = block.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(f"quantization method {method!r} is not supported (falconlm reads {QUANT_METHOD!r})")
        if block.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"quantization format_version {block.get('format_version')!r} is not {FORMAT_VERSION}")
        return cls(
            bits=block.get("bits"),
            group_size=block.get("group_size") or 64,
            symmetric=bool(block.get("symmetric")),
            head_bits=block.get("head_bits", 8),
            method=block.get("method", "rtn"),
        )


@dataclass(frozen=True)
class TensorPlan:
    """How one kind of matrix [out_features, in_features] is stored."""

    bits: int
    out_features: int
    in_features: int
    group: GroupPlan | None  # int4 only

    def quantize(self, w: torch.Tensor, symmetric: bool) -> QuantizedTensor:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise CheckpointError(f"expected a [{self.out_features}, {self.in_features}] matrix, got {list(w.shape)}")
        return quantize_int8(w) if self.bits == 8 else quantize_int4(w, self.group, symmetric)

    def stored_shapes(self, symmetric: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Suffix -> (dtype, shape) of the tensors that store this matrix."""
        n = self.out_features
        if self.bits == 8:
            return {"qweight": (torch.int8, (n, self.in_features)), "scales": (torch.float32, (n,))}
        g = self.group
        shapes = {"qweight": (torch.uint8, (n, g.padded_in // 2)), "scales": (torch.float32, (n, g.num_groups))}
        if not symmetric:
            shapes["zeros"] = (torch.float32, (n, g.num_groups))
        return shapes

    def describe(self) -> dict:
        d = {"bits": self.bits, "shape": [self.out_features, self.in_features]}
        if self.group is not None:
            d |= {"group_size": self.group.group_size, "padded_in_features": self.group.padded_in}
            if self.group.note:
                d["note"] = self.group.note
        return d


def plan_model(config: FalconConfig, recipe: QuantRecipe) -> dict[str, TensorPlan]:
    """Kind -> plan for every quantized matrix kind of ``config`` (blocks share shapes, so kinds suffice)."""
    h, v = config.hidden_size, config.vocab_size
    family = family_of(config)
    shapes = family.matrices(config)
    bits = dict.fromkeys(shapes, recipe.bits)
    if recipe.head_bits != 16:
        embedding = family.embedding.rpartition(".")[2]
        shapes[embedding] = (v, h)
        bits[embedding] = recipe.head_bits
        if not config.tie_word_embeddings:
            shapes["lm_head"] = (v, h)
            bits["lm_head"] = recipe.head_bits
    plans = {}
    for kind, (n, k) in shapes.items():
        group = plan_groups(k, recipe.group_size) if bits[kind] == 4 else None
        plans[kind] = TensorPlan(bits[kind], n, k, group)
    return plans


def module_kind(module_name: str) -> str:
    """``transformer.h.3.mlp.dense_h_to_4h`` -> ``mlp.dense_h_to_4h`` (``model.layers.3.`` likewise); the head
    modules by their last name."""
    layer = _LAYER_PREFIX.match(module_name)
    if layer is not None:
        return module_name[layer.end() :]
    return module_name.rpartition(".")[2]


def recipe_of(config: FalconConfig) -> QuantRecipe | None:
    """The recipe a quantized config was written with, None for a plain one."""
    block = config.extra.get("quantization_config")
    return None if block is None else QuantRecipe.from_config(block)


def keep_dtype(config: FalconConfig) -> torch.dtype:
    """The dtype for tensors that stay unquantized: the checkpoint's own, float32 when it does not say."""
    return KEEP_DTYPES.get(config.torch_dtype or "", torch.float32)


# ---- offline: checkpoint tensors -> stored tensors ----------------------------------------------------------
def quantize_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: FalconConfig,
    recipe: QuantRecipe,
    precomputed: dict[str, QuantizedTensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stored tensors of the quantized checkpoint, one source tensor at a time (kept tensors in
    :func:`keep_dtype`); a tied ``lm_head.weight`` and rotary buffers are dropped. ``precomputed`` maps module
    names to matrices already quantized (GPTQ's), which are stored instead of rounding the source."""
    if "quantization_config" in config.extra:
        raise ValueError("this checkpoint is already quantized; quantize the original checkpoint instead")
    plans = plan_model(config, recipe)
    keep = keep_dtype(config)
    expected = _quantized_module_names(config, plans)
    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        plan = plans.get(module_kind(module)) if leaf == "weight" else None
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if plan is None:
            yield name, tensor.to(keep)
            continue
        expected.discard(module)
        try:
            qt = (precomputed or {}).get(module) or plan.quantize(tensor, recipe.symmetric)
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
        yield f"{module}.qweight", qt.qweight
        yield f"{module}.scales", qt.scales
        if qt.zeros is not None:
            yield f"{module}.zeros", qt.zeros
    if expected:
        raise CheckpointError(f"missing tensor {min(expected)}.weight in the checkpoint")


def _quantized_module_names(config: FalconConfig, plans: dict[str, TensorPlan]) -> set[str]:
    family = family_of(config)
    kinds = family.matrices(config)
    names = {f"{family.layers}.{i}.{kind}" for i in range(config.num_hidden_layers) for kind in kinds}
    heads = {family.embedding.rpartition(".")[2]: family.embedding, "lm_head": "lm_head"}
    return names | {name for kind, name in heads.items() if kind in plans}


# ---- loading: stored tensors -> model -----------------------------------------------------------------------
def build_quantized_model(
    config: FalconConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str | torch.device,
    kernel: str | None = None,
) -> FalconForCausalLM:
    """A FalconForCausalLM in eval mode from stored tensors; CheckpointError when they do not match ``config``.

    ``tensors`` is emptied as it is read, so each stored matrix can be freed once its kernel has its copy.
    """
    recipe = recipe_of(config)
    if recipe is None:
        raise ValueError("the config has no quantization_config")
    device = torch.device(device)
    with torch.device("meta"), _SkipInit():
        model = build_model(config)
    left = tensors
    plans = plan_model(config, recipe)
    for name, module in _quantizable(model, plans):
        plan = plans[module_kind(name)]
        qt = _stored_tensor(name, plan, recipe.symmetric, left).to(device)
        bias = left.pop(f"{name}.bias", None)
        _swap(model, name, module, qt, bias, dtype, kernel)
    for name, param in list(model.named_parameters()):
        if not param.is_meta:  # a quantized module's bias, set above
            continue
        if name not in left:
            raise CheckpointError(f"missing tensor {name} in the quantized checkpoint")
        value = left.pop(name)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"shape mismatch for {name}: expected {list(param.shape)}, got {list(value.shape)}")
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(value.to(device, dtype), requires_grad=False))
    if left:
        raise CheckpointError(f"unexpected tensor {sorted(left)[0]} in the quantized checkpoint")
    if config.tie_word_embeddings and recipe.head_bits == 16:
        model.tie_weights()
    stray = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray:
        raise RuntimeError(f"{stray[0]} is still on the meta device after loading")
    return model.eval()


def _stored_tensor(name: str, plan: TensorPlan, symmetric: bool, left: dict[str, torch.Tensor]) -> QuantizedTensor:
    parts = {}
    for suffix, (dtype, shape) in plan.stored_shapes(symmetric).items():
        key = f"{name}.{suffix}"
        if key not in left:
            raise CheckpointError(f"missing tensor {key} in the quantized checkpoint")
        t = left.pop(key)
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise CheckpointError(
                f"{key} is {t.dtype} {list(t.shape)}, but quantization_config describes {dtype} {list(shape)}"
            )
        parts[suffix] = t
    group = plan.group.group_size if plan.group is not None else 0
    return QuantizedTensor(plan.bits, plan.in_features, group, parts["qweight"], parts["scales"], parts.get("zeros"))


# ---- in place: a built model -> quantized -------------------------------------------------------------------
@torch.no_grad()
def quantize_model(
    model: FalconForCausalLM, recipe: QuantRecipe, dtype: torch.dtype | None = None, kernel: str | None = None
) -> FalconForCausalLM:
    """Quantize ``model``'s matrices from its current weights and swap in quantized modules (in place).

    ``dtype`` is the compute dtype afterwards (default: the model's). Quantizing from float32 weights gives the
    same tensors as :func:`quantize_tensors` on the checkpoint they came from.
    """
    if is_quantized_model(model):
        raise ValueError("the model is already quantized")
    config = model.config
    ln = model.final_norm.weight
    dtype = dtype or ln.dtype
    plans = plan_model(config, recipe)
    for name, module in _quantizable(model, plans):
        plan = plans[module_kind(name)]
        qt = plan.quantize(module.weight.detach(), recipe.symmetric)
        bias = getattr(module, "bias", None)
        _swap(model, name, module, qt, None if bias is None else bias.detach(), dtype, kernel)
    model.to(dtype)
    block = recipe.to_config(config)
    model.config = dataclasses.replace(config, extra={**config.extra, "quantization_config": block})
    for module in model.modules():  # the inner model (transformer / model) keeps a reference too
        if getattr(module, "config", None) is config:
            module.config = model.config
    return model.eval()


def is_quantized_model(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def _quantizable(model: FalconForCausalLM, plans: dict[str, TensorPlan]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that ``plans`` quantizes, the embedding before a tied head."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module_kind(name) in plans:
            out.append((name, module))
    return out


def _swap(
    model: FalconForCausalLM,
    name: str,
    module: nn.Module,
    qt: QuantizedTensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    kernel: str | None,
) -> None:
    """Put the quantized module for ``name`` in place; a tied embedding and head share one set of tensors."""
    owner, _, leaf = name.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    qt = qt.to(dtype=dtype)  # scales and zeros in the compute dtype, shared by a tied embedding and head
    if isinstance(module, nn.Embedding):
        head = None
        if model.config.tie_word_embeddings:
            head = model.lm_head = QuantizedLinear(qt, None, dtype, _select(qt, kernel))
        setattr(parent, leaf, QuantizedEmbedding(qt, dtype, head))
    else:
        setattr(parent, leaf, QuantizedLinear(qt, bias, dtype, _select(qt, kernel)))


def _select(qt: QuantizedTensor, kernel: str | None) -> Kernel:
    return select_kernel(WeightSpec.of(qt), qt.qweight.device, kernel)
