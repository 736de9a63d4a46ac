"""Hugging Face checkpoint folders in and out: stream shards into the target dtype, write safetensors.

Loading builds the model on the meta device and fills each parameter tensor by tensor (falcon-spec §5).
Safetensors files are read with plain positioned reads in bounded chunks, never memory-mapped, so peak memory
stays near the model's size in the target dtype. ``.bin`` shards go through
``torch.load(weights_only=True, mmap=True)``: their touched pages count as resident until the shard is done,
so the memory bound there is best effort. Assumes a little-endian host, as the safetensors format does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from .falcon import FalconForCausalLM
from .families import build_model, load_config

logger = logging.getLogger(__name__)

SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CHUNK_BYTES = 16 << 20
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPES |= {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
_DTYPES |= {"BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_INIT_FNS = {"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_"}
Chunks = Iterator[tuple[int, torch.Tensor]]  # (element offset, flat chunk in the source dtype)


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt or does not fit the model's config."""


@dataclass
class _Source:
    """One stored tensor, read on demand in flat chunks."""

    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Chunks]


class _SkipInit(TorchFunctionMode):
    """Skip random init on the meta device: useless there, and it imports torch._dynamo (~1 s, ~80 MB)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _INIT_FNS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


# ---- loading ---------------------------------------------------------------------------------
def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> FalconForCausalLM:
    """Load a checkpoint folder into its family's model (``families.py``) in ``dtype`` on ``device``, in eval mode.

    ``progress``: show a bar over shards and bytes (only when there are several shards); None means "if
    stderr is a terminal".
    """
    folder = Path(path)
    config = load_config(folder)
    source, shards, listed = _find_weights(folder)
    with torch.device("meta"), _SkipInit():
        model = build_model(config)
    expected = dict(model.named_parameters())  # a tied head appears once, as the embedding
    if listed is not None:  # an index: report a missing tensor before reading any shard
        _check_missing([name for name in expected if name not in listed], source)
    tied = config.tie_word_embeddings
    filled: set[str] = set()
    head_file: Path | None = None
    buffer = bytearray(CHUNK_BYTES)
    tty = sys.stderr is not None and sys.stderr.isatty()
    show = len(shards) > 1 and (tty if progress is None else progress)
    total = sum(f.stat().st_size for f in shards)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not show) as bar:
        for i, file in enumerate(shards):
            bar.set_postfix_str(f"shard {i + 1}/{len(shards)}")
            left = file.stat().st_size
            with _open_shard(file, buffer) as tensors:
                _check_names(tensors, expected, filled, tied, file)
                for name, src in tensors.items():
                    if name == "lm_head.weight" and tied:
                        head_file = file
                    elif name in expected:
                        _set_parameter(model, name, _materialize(src, dtype, device))
                        filled.add(name)
                    bar.update(src.nbytes)
                    left -= src.nbytes
            bar.update(max(left, 0))  # headers and padding
    _check_missing([name for name in expected if name not in filled], source)
    model.tie_weights()
    stray = [name for name, b in model.named_buffers() if b.is_meta]
    if stray:  # a buffer added to the model must be computed after loading, not left on the meta device
        raise RuntimeError(f"buffer {stray[0]} is still on the meta device after loading")
    if head_file is not None:
        _warn_if_head_differs(model, head_file, buffer)
    return model.eval()


def _check_missing(missing: list[str], source: Path) -> None:
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]} in {source}{more}")


def _find_weights(folder: Path) -> tuple[Path, list[Path], set[str] | None]:
    """The weights' entry file, its shard files and (for an index) the tensor names it lists.

    Safetensors wins over .bin.
    """
    for single, index in ((SAFE_FILE, SAFE_INDEX), (BIN_FILE, BIN_INDEX)):
        if (folder / single).is_file():
            return folder / single, [folder / single], None
        if (folder / index).is_file():
            return folder / index, *_index_shards(folder / index)
    raise CheckpointError(f"no weights ({SAFE_FILE} or {BIN_FILE}, or their index) in {folder}")


def _index_shards(index: Path) -> tuple[list[Path], set[str]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index} is not a valid checkpoint index: {exc!r}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    root = index.parent.resolve()
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        file = (index.parent / name).resolve()
        if file.parent != root:
            raise CheckpointError(f"{index} names a shard outside its folder: {name!r}")
        if not file.is_file():
            raise CheckpointError(f"shard {name} listed in {index} is missing")
        shards.append(file)
    return shards, set(weight_map)


def _check_names(
    tensors: dict[str, _Source], expected: dict[str, nn.Parameter], filled: set[str], tied: bool, file: Path
) -> None:
    """Fail before reading data if a shard holds a tensor the model lacks, twice, or of the wrong shape."""
    for name, src in tensors.items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and tied):
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name} in {file}")
        if name in filled:
            raise CheckpointError(f"tensor {name} appears again in {file}")
        want = tuple(expected[name].shape)
        if src.shape != want:
            raise CheckpointError(f"shape mismatch for {name}: expected {want}, got {src.shape} (in {file})")


def _materialize(src: _Source, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    out = torch.empty(src.shape, dtype=dtype, device=device)
    flat = out.view(-1)
    for start, chunk in src.chunks():
        flat[start : start + chunk.numel()].copy_(chunk)
    return out


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value))


def _warn_if_head_differs(model: FalconForCausalLM, file: Path, buffer: bytearray) -> None:
    """A tied model ignores a stored head (the embedding wins); say so when it is not the same matrix."""
    emb = model.get_input_embeddings().weight.detach()
    with _open_shard(file, buffer) as tensors:
        src = tensors["lm_head.weight"]
        same = src.shape == tuple(emb.shape)
        flat = emb.view(-1)
        for start, chunk in src.chunks() if same else ():
            part = flat[start : start + chunk.numel()]
            if not torch.equal(chunk.to(part.device, part.dtype), part):
                same = False
                break
    if not same:
        logger.warning(
            "lm_head.weight in %s differs from the embedding; the model ties them, so the embedding is used",
            file,
        )


@contextmanager
def _open_shard(file: Path, buffer: bytearray) -> Iterator[dict[str, _Source]]:
    if file.suffix == ".safetensors":
        with open(file, "rb", buffering=0) as fh:
            yield _safetensors_sources(file, fh, buffer)
    else:
        state = _torch_load(file)
        yield {
            name: _Source(tuple(t.shape), t.nbytes, lambda t=t: iter([(0, t.reshape(-1))])) for name, t in state.items()
        }
        del state


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, tensors only (weights_only), memory-mapped (zip format, torch >= 1.6)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a usable state dict
        raise CheckpointError(f"cannot read {file}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors")
    return state


def _safetensors_sources(file: Path, fh: BinaryIO, buffer: bytearray) -> dict[str, _Source]:
    """Parse and check a safetensors header; each source reads its bytes through ``buffer``."""
    size = os.fstat(fh.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{file} is truncated: {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", _read_at(fh, 0, bytearray(8), file))
    if header_len > size - 8:
        raise CheckpointError(
            f"{file} is truncated or corrupt: header length {header_len} runs past the end of the file ({size} bytes)"
        )
    try:
        header = json.loads(_read_at(fh, 8, bytearray(header_len), file))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + header_len
    sources = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: bad header entry for {name}: {info!r}") from exc
        ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        if not ok or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{file}: bad header entry for {name}: {info!r}")
        if base + end > size:
            raise CheckpointError(f"{file} is truncated: data of {name} ends at byte {base + end}, the file has {size}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(
                f"{file}: {name} has {end - begin} bytes, expected {numel * dtype.itemsize} "
                f"for {info['dtype']} {list(shape)}"
            )
        reader = _chunk_reader(fh, file, buffer, base + begin, numel, dtype)
        sources[name] = _Source(shape, end - begin, reader)
    return sources


def _chunk_reader(
    fh: BinaryIO, file: Path, buffer: bytearray, offset: int, numel: int, dtype: torch.dtype
) -> Callable[[], Chunks]:
    def chunks() -> Chunks:
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
        per_chunk = len(buffer) // dtype.itemsize
        for start in range(0, numel, per_chunk):
            nbytes = min(per_chunk, numel - start) * dtype.itemsize
            _read_at(fh, offset + start * dtype.itemsize, memoryview(buffer)[:nbytes], file)
            yield start, raw[:nbytes].view(dtype)

    return chunks


def _read_at(fh: BinaryIO, offset: int, out: bytearray | memoryview, file: Path) -> bytearray | memoryview:
    """Fill ``out`` from ``offset`` of the file."""
    fh.seek(offset)
    view, done = memoryview(out), 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{file} is truncated: unexpected end of file at byte {offset + done}")
        done += n
    return out


# ---- saving ----------------------------------------------------------------------------------
def save_model(model: FalconForCausalLM, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors weights, ``model-0000i-of-0000n`` shards above ``max_shard_bytes``.

    A tied head is not written (the embedding stands for it); an untied one is.
    """
    out = Path(path)
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    dataclasses.replace(model.config, torch_dtype=dtype).save_pretrained(out)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, t in state.items():
        if max_shard_bytes is not None and shards[-1] and shard_bytes + t.nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += t.nbytes
    for old in out.iterdir():  # stale weights from an earlier save would shadow or mix with these
        if old.name in (SAFE_FILE, SAFE_INDEX) or _SHARD_NAME.fullmatch(old.name):
            old.unlink()
    n = len(shards)
    files = [SAFE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, names in zip(files, shards, strict=True):
        save_file(_writable({name: state[name] for name in names}), out / file, metadata={"format": "pt"})
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in state.values())},
            "weight_map": {name: file for file, names in zip(files, shards, strict=True) for name in names},
        }
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _writable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own."""
    seen: set[int] = set()
    result = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        result[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return result
