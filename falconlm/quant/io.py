"""Quantized checkpoint folders: write one from a plain checkpoint, tensor by tensor; load one (or quantize on load).

A quantized folder is a Hugging Face-style folder: ``config.json`` with a ``quantization_config`` block
(:meth:`QuantRecipe.to_config`), safetensors weights (``model.safetensors`` or shards plus an index) and the
tokenizer files of its source. Source weights are read with the checkpoint loader's bounded-chunk reader, one
tensor at a time, so peak memory is the quantized model plus one source tensor and its float32 row blocks.

:func:`load_quantized` is registered with the model's checkpoint formats (``falconlm.model.formats``) for
falconlm's own method, for GPTQ and for quantizing on load, so ``FalconForCausalLM.from_pretrained`` loads a
quantized folder and ``quantize=`` works wherever a model loads. Hub GPTQ checkpoints are converted as they are
read (:mod:`falconlm.quant.gptq_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..model.checkpoint import SAFE_FILE, SAFE_INDEX, CheckpointError, _find_weights, _open_shard, _Source
from ..model.config import FalconConfig
from ..model.falcon import FalconForCausalLM
from ..model.families import family_of, load_config
from ..model.formats import ON_LOAD, quant_method, register_format
from .convert import (
    QUANT_METHOD,
    QuantRecipe,
    build_quantized_model,
    module_kind,
    plan_model,
    quantize_tensors,
    recipe_of,
)
from .gptq import calibrate_blocks, gptq_quantize
from .gptq_checkpoint import convert_gptq_tensors, gptq_recipe, gptq_settings
from .primitives import QuantizedTensor

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
MAX_SHARD_BYTES = 2 << 30  # safetensors copies a shard while writing it: this bounds that copy
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_checkpoint` did."""

    out: Path
    recipe: QuantRecipe
    notes: list[str]  # module kinds whose grouping differs from the recipe's, and why
    source_bytes: int
    output_bytes: int
    seconds: float


def is_quantized(path: str | Path) -> bool:
    """Whether ``path``'s config.json carries a ``quantization_config`` block (any method; loading says which
    ones are supported), or AutoGPTQ's own ``quantize_config.json`` sits beside it."""
    return quant_method(Path(path)) is not None


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | QuantRecipe | None = None,
    kernel: str | None = None,
) -> FalconForCausalLM:
    """Alias of ``FalconForCausalLM.from_pretrained`` (kept for existing callers), which loads any folder.

    ``kernel`` forces the matmul kernel of a quantized model (``cpu``, ``triton``, ``reference``)."""
    if kernel is not None and (quantize is not None or is_quantized(path)):
        return load_quantized(path, dtype, device, quantize, kernel)
    return FalconForCausalLM.from_pretrained(path, dtype=dtype, device=device, quantize=quantize)


def load_quantized(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | QuantRecipe | None = None,
    kernel: str | None = None,
) -> FalconForCausalLM:
    """Load a quantized folder, or quantize a plain one on the fly with ``quantize`` (``"int8"``, ``"int4"``,
    ``"int4-g128"``, a :class:`QuantRecipe`...). Both give the same model for the same weights and recipe.

    ``kernel`` forces a matmul kernel (``cpu``, ``triton``, ``reference``); by default the fastest that fits.
    """
    folder = Path(path)
    config = load_config(folder)
    recipe = QuantRecipe.parse(quantize) if isinstance(quantize, str) else quantize
    gptq = gptq_settings(folder, config)
    if gptq is not None:  # a hub GPTQ checkpoint: converted to falconlm's int4 format as it is read
        if recipe is not None:
            raise ValueError(f"{folder} is already quantized (GPTQ); load it without quantizing")
        stored = gptq_recipe(gptq, config)
        kinds = family_of(config).matrices(config)
        tensors = dict(convert_gptq_tensors(iter_checkpoint_tensors(folder), gptq, kinds))
        return build_quantized_model(_with_recipe(config, stored), tensors, dtype, device, kernel)
    stored = recipe_of(config)
    if stored is not None:
        if recipe is not None and recipe.canonical() != stored.canonical():
            raise ValueError(
                f"{folder} is already quantized ({stored.name}); quantizing it again as {recipe.name} is not "
                "supported: load it without quantizing, or quantize the original checkpoint"
            )
        tensors = dict(iter_checkpoint_tensors(folder))
    elif recipe is None:
        raise ValueError(f"{folder} is not quantized; give a quantization such as 'int8' or 'int4'")
    else:
        tensors = dict(quantize_tensors(iter_checkpoint_tensors(folder), config, recipe))
        config = _with_recipe(config, recipe)
    return build_quantized_model(config, tensors, dtype, device, kernel)


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    recipe: QuantRecipe,
    progress: bool | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
    calibration: torch.Tensor | None = None,
) -> QuantizeReport:
    """Write the quantized form of checkpoint folder ``src`` into ``out`` (see the module docstring).

    ``progress``: a bar over the source bytes; None means "if stderr is a terminal". A GPTQ recipe needs
    ``calibration`` token ids [samples, length] and loads the whole model in float32 first (:func:`gptq_matrices`).
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    config = load_config(src)
    if "quantization_config" in config.extra or gptq_settings(src, config) is not None:
        raise ValueError(f"{src} is already quantized; quantize the original checkpoint instead")
    if (recipe.method == "gptq") != (calibration is not None):
        raise ValueError("GPTQ needs calibration text, and only GPTQ uses it")
    if recipe.method == "gptq" and not isinstance(config, FalconConfig):
        raise ValueError(
            f"GPTQ calibration runs on Falcon's block only; quantize {family_of(config).title} "
            "with round to nearest (int8, int4)"
        )
    _check_out(src, out, overwrite)
    _, shards, _ = _find_weights(src)
    total = sum(f.stat().st_size for f in shards)
    show = (sys.stderr is not None and sys.stderr.isatty()) if progress is None else progress
    precomputed = gptq_matrices(src, config, recipe, calibration, show) if calibration is not None else None
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"quantize {recipe.name}", disable=not show) as bar:
        stored = quantize_tensors(iter_checkpoint_tensors(src, bar.update), config, recipe, precomputed)
        output_bytes = write_shards(stored, out, max_shard_bytes)
    _with_recipe(config, recipe).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    notes = [f"{kind}: {p.group.note}" for kind, p in plan_model(config, recipe).items() if p.group and p.group.note]
    return QuantizeReport(out, recipe, notes, total, output_bytes, time.perf_counter() - start)


def gptq_matrices(
    src: Path, config: FalconConfig, recipe: QuantRecipe, calibration: torch.Tensor, show: bool
) -> dict[str, QuantizedTensor]:
    """The decoder blocks' int4 matrices by GPTQ (see :mod:`falconlm.quant.gptq`), by module name. The head and
    embedding are left to round-to-nearest, as GPTQ implementations do."""
    if int(calibration.max()) >= config.vocab_size:
        raise ValueError(f"calibration token id {int(calibration.max())} is outside the vocabulary")
    if calibration.shape[1] > config.max_position_embeddings:
        raise ValueError(f"calibration windows of {calibration.shape[1]} tokens exceed the model's context")
    model = FalconForCausalLM.from_pretrained(src, dtype=torch.float32)
    plans = plan_model(config, recipe)
    out: dict[str, QuantizedTensor] = {}

    def quantize(name: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        qt = gptq_quantize(weight, hessian, plans[module_kind(name)].group, recipe.symmetric)
        out[name] = qt
        return qt.dequantize()

    with tqdm(total=config.num_hidden_layers, unit="block", desc="GPTQ", disable=not show) as bar:
        calibrate_blocks(model, calibration, quantize, bar.update)
    return out


def iter_checkpoint_tensors(folder: Path, on_bytes=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor in its stored dtype) for every tensor of a checkpoint folder, one at a time."""
    _, shards, _ = _find_weights(folder)
    buffer = bytearray(CHUNK_BYTES)
    for file in shards:
        with _open_shard(file, buffer) as sources:
            for name, src in sources.items():
                yield name, _read(src)
                if on_bytes is not None:
                    on_bytes(src.nbytes)


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> int:
    """Write safetensors shards of at most ``max_shard_bytes`` as tensors arrive (plus an index when there
    are several); returns the bytes of tensor data written."""
    out.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    shard_bytes = total = 0

    def flush() -> None:
        part = out / f".part-{len(parts):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, part, metadata={"format": "pt"})
        parts.append((part, list(shard)))
        shard.clear()

    for name, t in tensors:
        if name in seen:
            raise CheckpointError(f"tensor {name} appears twice")
        seen.add(name)
        if shard and shard_bytes + t.nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = t
        shard_bytes += t.nbytes
        total += t.nbytes
    if shard or not parts:
        flush()
    n = len(parts)
    files = [SAFE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (part, _), file in zip(parts, files, strict=True):
        part.replace(out / file)
    if n > 1:
        weight_map = {name: file for (_, names), file in zip(parts, files, strict=True) for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return total


def _read(src: _Source) -> torch.Tensor:
    out: torch.Tensor | None = None
    for start, chunk in src.chunks():
        if out is None:
            out = torch.empty(src.shape, dtype=chunk.dtype)
        out.view(-1)[start : start + chunk.numel()].copy_(chunk)
    return out if out is not None else torch.empty(src.shape)


def _with_recipe(config: FalconConfig, recipe: QuantRecipe) -> FalconConfig:
    return dataclasses.replace(config, extra={**config.extra, "quantization_config": recipe.to_config(config)})


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} is not a folder")
    if out.resolve() == src.resolve():
        raise ValueError("the output folder must differ from the model folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} is not empty (pass --overwrite to replace its contents)")
    if out.is_dir() and overwrite:
        for old in out.iterdir():
            if old.is_file() and (old.suffix in (".safetensors", ".bin") or old.name.endswith(".index.json")):
                old.unlink()


for _method in (QUANT_METHOD, "gptq", ON_LOAD):  # what FalconForCausalLM.from_pretrained finds in a folder
    register_format(_method, load_quantized)
