"""Weight-only quantization: int8 per output channel and int4 per group, fused kernels, quantized checkpoints.

Layout (imports point down; ``model/`` imports nothing from here):

* ``primitives.py``: quantize / dequantize / pack, and the group plan for widths a group size does not divide;
* ``kernels/``: the quantized matmul, one signature, chosen once per weight at load (``native``, ``cpu``,
  ``triton``, ``reference``);
* ``linear.py``: QuantizedLinear and QuantizedEmbedding, the modules that replace nn.Linear / nn.Embedding;
* ``convert.py``: QuantRecipe, the per-module plan, and the three rewrites (tensors, loading, a built model);
* ``gptq.py``: GPTQ's error-compensating int4 rounding, and the block-by-block calibration pass it needs;
* ``gptq_checkpoint.py``: hub GPTQ checkpoints (AutoGPTQ's packed int32 layout) read into the int4 format;
* ``io.py``: quantized checkpoint folders: write (``falconlm quantize``), detect, load or quantize on load; its
  loader is registered with ``falconlm.model.formats`` on import, so ``FalconForCausalLM.from_pretrained`` loads
  every folder (the model imports this package by name only, when it meets a quantized folder).
"""

from __future__ import annotations

from .convert import QuantRecipe, build_quantized_model, is_quantized_model, quantize_model
from .io import QuantizeReport, is_quantized, load_checkpoint, load_quantized, quantize_checkpoint

__all__ = [
    "QuantRecipe",
    "QuantizeReport",
    "build_quantized_model",
    "is_quantized",
    "is_quantized_model",
    "load_checkpoint",
    "load_quantized",
    "quantize_checkpoint",
    "quantize_model",
]
