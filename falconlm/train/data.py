"""Training data: text files tokenized once into memory-mapped token files, and deterministic random windows.

Each file becomes ``CACHE/<key>.bin`` (uint16 ids when the vocabulary fits, else uint32): its documents'
tokens, each document followed by EOS. The key hashes the file's path, size and mtime, the tokenizer and the
split mode, so an edited file or a different tokenizer is tokenized again.

Batches hold no state: the windows of a micro-batch are drawn from a generator seeded by
``(seed, stream, step, micro-batch index)``, so any step's data can be produced again, on any rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..tokenizer import Tokenizer
from .documents import iter_documents

CACHE_VERSION = 1
ENCODE_BATCH_DOCS = 512
TRAIN_STREAM, EVAL_STREAM = 0, 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, merges and EOS id."""
    digest = hashlib.sha256(tokenizer.backend.to_str().encode("utf-8"))
    digest.update(str(tokenizer.eos_token_id).encode())
    return digest.hexdigest()


def iter_token_chunks(path: str | Path, tokenizer: Tokenizer, doc_split: str = "eot") -> Iterator[np.ndarray]:
    """Token ids of a file, documents each followed by EOS, in chunks of a few hundred documents."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; name one in tokenizer_config.json")
    docs = iter_documents(path, doc_split)
    dtype = token_dtype(tokenizer.vocab_size)
    while batch := list(islice(docs, ENCODE_BATCH_DOCS)):
        encodings = tokenizer.backend.encode_batch(batch, add_special_tokens=False)
        ids = [i for enc in encodings for i in (*enc.ids, eos)]
        yield np.asarray(ids, dtype=dtype)


def tokenize_file(path: str | Path, tokenizer: Tokenizer, doc_split: str = "eot") -> np.ndarray:
    """All token ids of a file, in memory."""
    chunks = list(iter_token_chunks(path, tokenizer, doc_split))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=token_dtype(tokenizer.vocab_size))


def cached_token_file(
    path: str | Path,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    doc_split: str = "eot",
    progress: bool | None = None,
) -> np.ndarray:
    """The tokens of ``path`` as a read-only memory map, tokenizing into the cache on first use."""
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"data file not found: {src}")
    st = src.stat()
    key_text = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tokenizer_fingerprint(tokenizer)}|{doc_split}"
    key = hashlib.sha256(f"{key_text}|v{CACHE_VERSION}".encode()).hexdigest()[:32]
    cache = Path(cache_dir)
    bin_file, meta_file = cache / f"{key}.bin", cache / f"{key}.json"
    dtype = token_dtype(tokenizer.vocab_size)
    if not (bin_file.is_file() and meta_file.is_file()):
        cache.mkdir(parents=True, exist_ok=True)
        count = _write_tokens(src, tokenizer, bin_file, doc_split, progress)
        meta = {"source": str(src.resolve()), "tokens": count, "dtype": dtype.name, "doc_split": doc_split}
        _atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_file, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["tokens"],))


def _write_tokens(src: Path, tokenizer: Tokenizer, dest: Path, doc_split: str, progress: bool | None) -> int:
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    show = sys.stderr.isatty() if progress is None else progress
    count = 0
    with (
        tmp.open("wb") as fh,
        tqdm(desc=f"tokenizing {src.name}", unit=" tok", unit_scale=True, disable=not show) as bar,
    ):
        for chunk in iter_token_chunks(src, tokenizer, doc_split):
            fh.write(chunk.tobytes())
            count += len(chunk)
            bar.update(len(chunk))
    os.replace(tmp, dest)
    return count


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def split_tail(tokens: Sequence[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(heads, tails): the last ``fraction`` of each token array held out for validation."""
    heads, tails = [], []
    for t in tokens:
        cut = len(t) - round(len(t) * fraction)
        heads.append(t[:cut])
        tails.append(t[cut:])
    return heads, tails


def batch_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    """The generator for one micro-batch: a pure function of the seed, the stream and the indices."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *index]))


class TokenWindows:
    """Random windows of ``length`` consecutive tokens, each inside one token array."""

    def __init__(self, segments: Sequence[np.ndarray], length: int) -> None:
        self.length = length
        self.segments = [s for s in segments if len(s) >= length]
        starts = np.array([len(s) - length + 1 for s in self.segments], dtype=np.int64)
        self._ends = np.cumsum(starts)
        self._starts = starts

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.segments)

    def __bool__(self) -> bool:
        return bool(self.segments)

    def sample(self, rng: np.random.Generator, count: int) -> torch.Tensor:
        """``count`` windows [count, length] as int64, uniform over all window positions."""
        if not self.segments:
            raise ValueError(f"no data file holds {self.length} tokens (seq_len + 1)")
        picks = rng.integers(0, int(self._ends[-1]), size=count)
        seg = np.searchsorted(self._ends, picks, side="right")
        offsets = picks - (self._ends[seg] - self._starts[seg])
        rows = [
            np.asarray(self.segments[s][o : o + self.length], dtype=np.int64) for s, o in zip(seg, offsets, strict=True)
        ]
        return torch.from_numpy(np.stack(rows))

    def batch(self, seed: int, stream: int, index: tuple[int, ...], count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets [count, length - 1] for the micro-batch named by ``index``."""
        windows = self.sample(batch_rng(seed, stream, *index), count)
        return windows[:, :-1], windows[:, 1:]
