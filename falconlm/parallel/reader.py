"""Reading one rank's slices of checkpoint tensors, never a whole tensor (safetensors) where a slice suffices.

A safetensors tensor is row-major at a known byte offset, so a slice along dim 0 is one contiguous byte range,
read straight into the destination; a slice along a later dim is read a block of outer rows at a time through a
bounded buffer. ``.bin`` shards are loaded with ``weights_only=True`` and memory-mapped (best effort: only the
pages of the slices are touched). Header checks and error messages are the unsharded loader's
(``falconlm.model.checkpoint``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..model.checkpoint import (
    _DTYPES,
    CheckpointError,
    _find_weights,
    _read_at,
    _safetensors_sources,
    _torch_load,
)
from .layers import Shard

BUFFER_BYTES = 4 << 20  # column slices pass through a buffer this big (a rank's memory is its share plus this)


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: a safetensors file and byte offset, or a loaded (mmapped) .bin tensor."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0
    tensor: torch.Tensor | None = None


class CheckpointReader:
    """The tensors of a checkpoint folder, by name, read in slices (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.source, self.files, self.listed = _find_weights(folder)
        self.tensors: dict[str, StoredTensor] = {}
        self._handles: dict[Path, BinaryIO] = {}
        self._buffer = bytearray(BUFFER_BYTES)
        for file in self.files:
            for name, stored in self._index(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name} appears again in {file}")
                self.tensors[name] = stored

    def _index(self, file: Path) -> dict[str, StoredTensor]:
        if file.suffix != ".safetensors":
            return {n: StoredTensor(file, t.dtype, tuple(t.shape), tensor=t) for n, t in _torch_load(file).items()}
        fh = self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        _safetensors_sources(file, fh, self._buffer)  # the unsharded loader's checks and errors
        (header_len,) = struct.unpack("<Q", _read_at(fh, 0, bytearray(8), file))
        header = json.loads(_read_at(fh, 8, bytearray(header_len), file))
        header.pop("__metadata__", None)
        base = 8 + header_len
        return {
            name: StoredTensor(file, _DTYPES[info["dtype"]], tuple(info["shape"]), base + info["data_offsets"][0])
            for name, info in header.items()
        }

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        self.tensors.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, name: str, shard: Shard | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` (its ``shard`` only, None for all of it) in ``dtype`` (default: as stored)."""
        stored = self.tensors[name]
        dtype = dtype or stored.dtype
        if shard is None:
            shard = Shard.whole(0, stored.shape[0]) if stored.shape else None
        if stored.tensor is not None:
            t = stored.tensor if shard is None else shard.take(stored.tensor)
            return t.to(dtype, copy=True)
        if shard is None:  # a 0-d tensor
            return self._read_flat(stored, 0, 1, dtype).view(())
        if shard.full != stored.shape[shard.dim]:
            raise ValueError(f"{name}: a slice of {shard.full} along dim {shard.dim}, the tensor has {stored.shape}")
        outer = math.prod(stored.shape[: shard.dim])
        inner = math.prod(stored.shape[shard.dim + 1 :])
        parts = [self._read_range(stored, outer, inner, a, b, dtype) for a, b in shard.ranges]
        out_shape = list(stored.shape)
        out_shape[shard.dim] = shard.size
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.view(out_shape)

    def _read_range(
        self, stored: StoredTensor, outer: int, inner: int, a: int, b: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """[outer, b - a, inner] elements: a contiguous range when ``outer`` is 1, else outer rows in blocks."""
        if outer == 1:
            return self._read_flat(stored, a * inner, (b - a) * inner, dtype).view(1, b - a, inner)
        row = math.prod(stored.shape) // outer  # elements per outer row
        mid_full = row // inner
        out = torch.empty(outer, b - a, inner, dtype=dtype)
        per_block = max(1, len(self._buffer) // (row * stored.dtype.itemsize))
        for r0 in range(0, outer, per_block):
            r1 = min(outer, r0 + per_block)
            block = self._read_flat(stored, r0 * row, (r1 - r0) * row, stored.dtype, use_buffer=True)
            out[r0:r1].copy_(block.view(r1 - r0, mid_full, inner)[:, a:b])
        return out

    def _read_flat(
        self, stored: StoredTensor, start: int, count: int, dtype: torch.dtype, use_buffer: bool = False
    ) -> torch.Tensor:
        """``count`` elements from element ``start`` of the stored tensor, as a flat tensor in ``dtype``."""
        fh, size = self._handles[stored.file], stored.dtype.itemsize
        offset = stored.offset + start * size
        if use_buffer:  # a view into the shared buffer, valid until the next read
            if count * size > len(self._buffer):
                self._buffer = bytearray(count * size)
            view = memoryview(self._buffer)[: count * size]
            _read_at(fh, offset, view, stored.file)
            return torch.frombuffer(self._buffer, dtype=torch.uint8)[: count * size].view(stored.dtype)
        if dtype == stored.dtype:  # straight into the result
            out = torch.empty(count, dtype=dtype)
            if count:
                _read_at(fh, offset, memoryview(out.view(torch.uint8).numpy()), stored.file)
            return out
        out = torch.empty(count, dtype=dtype)
        step = len(self._buffer) // size
        for i in range(0, count, step):
            n = min(step, count - i)
            chunk = self._read_flat(stored, start + i, n, stored.dtype, use_buffer=True)
            out[i : i + n].copy_(chunk)
        return out
