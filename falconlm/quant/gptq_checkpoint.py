"""Pre-quantized GPTQ checkpoints as published on model hubs (AutoGPTQ / transformers' "gptq" format), read into
falconlm's int4 format.

The format, per quantized linear ``NAME`` of K inputs and N outputs, with groups of g input columns:

* ``NAME.qweight`` int32 [K / 8, N]: eight 4-bit codes per word along the input dim, lowest bits first
  (code of input ``8 i + j`` in bits ``4 j .. 4 j + 3`` of word ``i``);
* ``NAME.qzeros`` int32 [K / g, N / 8]: eight 4-bit zero points per word along the output dim, same order,
  stored minus one (``checkpoint_format`` "gptq", the common one) or as they are ("gptq_v2");
* ``NAME.scales`` float16 [K / g, N]; ``NAME.g_idx`` int32 [K], the group of each input column;
* ``w[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``.

That is falconlm's ``scales * (q - 8) + zeros`` with ``zeros = scales * (8 - zero)``, as long as groups are runs
of g consecutive columns: act-order checkpoints (``desc_act``, a permuted ``g_idx``) and per-column scales
(``group_size`` -1) are refused with a clear error. The quantization settings come from config.json's
``quantization_config`` or from ``quantize_config.json``; embeddings, the head and LayerNorms stay as stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..model.checkpoint import CheckpointError
from ..model.config import FalconConfig
from .convert import BODY_KINDS, QuantRecipe, module_kind, plan_model
from .primitives import GROUP_SIZES, pack_int4

GPTQ_FORMATS = ("gptq", "gptq_v2")
CODES_PER_WORD = 8


def gptq_settings(folder: Path, config: FalconConfig) -> dict | None:
    """The GPTQ block of a checkpoint (config.json's ``quantization_config`` with ``quant_method`` "gptq", or
    ``quantize_config.json``), None when the checkpoint is not a GPTQ one."""
    block = config.extra.get("quantization_config")
    if isinstance(block, dict) and block.get("quant_method") == "gptq":
        return block
    file = folder / "quantize_config.json"
    if block is None and file.is_file():
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"cannot read {file}: {exc}") from None
        if isinstance(raw, dict) and "bits" in raw and "group_size" in raw:
            return raw
    return None


def gptq_recipe(settings: dict, config: FalconConfig) -> QuantRecipe:
    """The falconlm recipe a GPTQ checkpoint maps to; ValueError for settings falconlm cannot run exactly."""
    bits, group = settings.get("bits"), settings.get("group_size")
    if bits != 4:
        raise ValueError(f"GPTQ checkpoints with {bits} bits are not supported (only 4)")
    if group not in GROUP_SIZES:
        raise ValueError(f"GPTQ group_size {group} is not supported; falconlm runs groups of {GROUP_SIZES}")
    if settings.get("desc_act"):
        raise ValueError("act-order GPTQ checkpoints (desc_act) are not supported: their groups are not contiguous")
    fmt = settings.get("checkpoint_format", "gptq")
    if fmt not in GPTQ_FORMATS:
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; use one of {GPTQ_FORMATS}")
    recipe = QuantRecipe(bits=4, group_size=group, symmetric=False, head_bits=16, method="gptq")
    for kind, plan in plan_model(config, recipe).items():
        if plan.group is not None and plan.group.group_size != group:
            raise ValueError(f"{kind}: {plan.in_features} input columns are not whole groups of {group}")
    return recipe


def convert_gptq_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], settings: dict, kinds: Iterable[str] = BODY_KINDS
) -> Iterator[tuple[str, torch.Tensor]]:
    """falconlm's stored tensors from a GPTQ checkpoint's: each quantized linear (of the layer matrix ``kinds``)'s
    qweight / qzeros / scales / g_idx become qweight / scales / zeros; everything else passes through."""
    kinds = set(kinds)
    group = settings["group_size"]
    stored_minus_one = settings.get("checkpoint_format", "gptq") == "gptq"
    pending: dict[str, dict[str, torch.Tensor]] = {}
    parts = ("qweight", "qzeros", "scales", "g_idx")
    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        if leaf not in parts or module_kind(module) not in kinds:
            yield name, tensor
            continue
        got = pending.setdefault(module, {})
        got[leaf] = tensor
        if len(got) == len(parts):
            yield from _convert_linear(module, pending.pop(module), group, stored_minus_one)
    if pending:
        module, got = next(iter(pending.items()))
        missing = sorted(set(parts) - set(got))
        raise CheckpointError(f"GPTQ tensors of {module} are incomplete: missing {', '.join(missing)}")


def _convert_linear(
    module: str, t: dict[str, torch.Tensor], group: int, stored_minus_one: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    k, n = qweight.shape[0] * CODES_PER_WORD, qweight.shape[1]
    groups = k // group
    expected = {"qzeros": (groups, n // CODES_PER_WORD), "scales": (groups, n), "g_idx": (k,)}
    for leaf, shape in expected.items():
        if tuple(t[leaf].shape) != shape:
            raise CheckpointError(f"{module}.{leaf} is {list(t[leaf].shape)}, expected {list(shape)}")
    if not torch.equal(g_idx.to(torch.int64), torch.arange(k) // group):
        raise ValueError(f"{module}: g_idx is not contiguous groups of {group} (an act-order checkpoint)")
    codes = _unpack_words(qweight, dim=0).T.contiguous()  # [N, K] values 0..15
    zero = _unpack_words(qzeros, dim=1).to(torch.float32) + (1.0 if stored_minus_one else 0.0)  # [G, N]
    s = scales.to(torch.float32)  # [G, N]
    yield f"{module}.qweight", pack_int4(codes)
    yield f"{module}.scales", s.T.contiguous()
    yield f"{module}.zeros", (s * (8.0 - zero)).T.contiguous()


def _unpack_words(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding eight 4-bit values each (lowest bits first) -> uint8 values, unpacked along ``dim``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    w = words.to(torch.int32).unsqueeze(dim + 1)  # a new axis right after ``dim`` for the eight values
    shape = [1] * w.dim()
    shape[dim + 1] = CODES_PER_WORD
    values = (w >> shifts.view(shape)) & 0xF
    out_shape = list(words.shape)
    out_shape[dim] *= CODES_PER_WORD
    return values.reshape(out_shape).to(torch.uint8)
