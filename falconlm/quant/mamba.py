"""int8 / int4 weight-only quantization of Falcon-Mamba (Mamba-1) models, on load.

Quantized: each mixer's ``in_proj``, ``x_proj`` and ``out_proj`` (all but a sliver of the block weights). Kept in
the model dtype: ``dt_proj`` (rank-R input, R = hidden/16, a few percent of the weights, and Δ's exponent
amplifies its error), the conv1d, A_log, D, the norms, the embedding and the head. int8 is per output channel,
int4 per group along the input as for Falcon (``primitives.py``), through the same QuantizedLinear kernels.
Saving a quantized Mamba folder is not supported yet: quantize on load (``--quantize int8``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.checkpoint import load_model
from ..model.falcon_mamba import FalconMambaForCausalLM
from .convert import QuantRecipe
from .kernels import WeightSpec, select_kernel
from .linear import QuantizedLinear
from .primitives import plan_groups, quantize_int4, quantize_int8

MAMBA_QUANTIZED = ("in_proj", "x_proj", "out_proj")


@torch.no_grad()
def quantize_mamba_model(
    model: FalconMambaForCausalLM, recipe: QuantRecipe, kernel: str | None = None
) -> FalconMambaForCausalLM:
    """Swap each mixer's quantized matrices (:data:`MAMBA_QUANTIZED`) for QuantizedLinear modules, in place."""
    dtype = model.dtype
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for name in MAMBA_QUANTIZED:
            linear: nn.Linear = getattr(mixer, name)
            w = linear.weight.detach()
            if recipe.bits == 8:
                qt = quantize_int8(w)
            else:
                qt = quantize_int4(w, plan_groups(w.shape[1], recipe.group_size), recipe.symmetric)
            qt = qt.to(dtype=dtype)
            bias = None if linear.bias is None else linear.bias.detach()
            setattr(mixer, name, QuantizedLinear(qt, bias, dtype, select_kernel(WeightSpec.of(qt), w.device, kernel)))
    model.config.extra["quantization_config"] = {"quant_method": "falconlm-on-load", "recipe": recipe.name}
    return model.eval()


def load_mamba_quantized(
    folder: Path, dtype: torch.dtype, device: str | torch.device, recipe: QuantRecipe | None, kernel: str | None
) -> FalconMambaForCausalLM:
    if recipe is None:
        raise ValueError(
            f"{folder} is a quantized Falcon-Mamba folder; falconlm quantizes these on load only "
            "(load the original checkpoint with quantize='int8' or 'int4')"
        )
    model = load_model(folder, dtype=dtype, device=device)
    return quantize_mamba_model(model, recipe, kernel)  # type: ignore[arg-type]
