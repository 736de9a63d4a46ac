"""Small native CPU kernels: compiled on first use with the system C++ compiler, called through ctypes.

Three libraries, each built only where the CPU has what it needs:

* ``quant_gemm`` (AVX-512 VNNI): the int8 / int4 weight matmuls of ``falconlm.quant.kernels.vnni``;
* ``bf16_gemm`` (AVX-512 BF16): bfloat16 matmuls for decode-sized batches, a row-wise argmax and decode-step
  attention read straight from the KV cache (``falconlm.native.ops``);
* ``decode`` (both): every layer of a quantized model's decode step in one call (``falconlm.native.decode``).

A library is compiled once per source version into ``$FALCONLM_CACHE_DIR/native`` (default
``~/.cache/falconlm/native``) and reused. When the compiler, a CPU feature or the build is missing,
:func:`library` returns None and every caller keeps its torch path, so nothing here is ever required.
``FALCONLM_NATIVE=0`` turns all of it off (the tests use it to compare both paths).

The libraries link OpenMP by its usual soname, which resolves to the runtime torch has already loaded: the
kernels share torch's threads rather than starting a pool of their own.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch  # loaded first: its OpenMP runtime is the one the libraries bind to

SOURCES = Path(__file__).resolve().parent / "csrc"
BUILD_TIMEOUT_S = 300
SERIAL_WORK = 1 << 17
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(frozen=True)
class LibrarySpec:
    """One library: its source, the CPU features it needs (``/proc/cpuinfo`` names), compiler flags, and the
    ctypes signature of each exported function (all return void)."""

    source: str
    features: tuple[str, ...]
    flags: tuple[str, ...]
    functions: dict[str, tuple]


LIBRARIES = {
    "quant_gemm": LibrarySpec(
        "quant_gemm.cpp",
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"),
        {"falcon_qlinear": (_P, _C, _I, _I, _I, _I, _I, _I, _C, _P, _P, _I, _P, _C, _C)},
    ),
    "bf16_gemm": LibrarySpec(
        "bf16_gemm.cpp",
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"),
        {
            "falcon_linear_bf16": (_P, _I, _I, _I, _P, _I, _P, _C),
            "falcon_argmax_rows": (_P, _C, _I, _I, _I, _P, _C),
            "falcon_decode_attention": (_P, _C, *(_I,) * 4, _P, _P, *(_I,) * 4, _P, _I, _P, ctypes.c_float, _P, _C),
        },
    ),
    "decode": LibrarySpec(
        "decode.cpp",
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mfma"),
        {"falcon_decode_layers": (_P, _P, _P, _P, _I, _P, _P, _C)},
    ),
}


def threads_for(work: int) -> int:
    """Threads for a kernel call of ``work`` multiply-adds: torch's count, or 1 when the call is too small to
    repay waking the other threads (an OpenMP fork and join costs a few microseconds)."""
    return 1 if work < SERIAL_WORK else torch.get_num_threads()


def enabled() -> bool:
    """False when ``FALCONLM_NATIVE`` is 0 / false / off."""
    return _switch(os.environ.get("FALCONLM_NATIVE", "1"))


@functools.lru_cache(maxsize=8)
def _switch(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "off", "no")


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def unavailable_reason(name: str) -> str | None:
    """Why library ``name`` cannot be used here, or None when it can be built or loaded."""
    spec = LIBRARIES[name]
    if not enabled():
        return "FALCONLM_NATIVE is off"
    missing = [f for f in spec.features if f not in cpu_features()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C++ compiler (set CXX or install g++)"
    return None


def status() -> dict[str, str]:
    """Each library's state here, ``available`` or why not (nothing is built to find out)."""
    return {name: unavailable_reason(name) or "available" for name in LIBRARIES}


def library(name: str) -> ctypes.CDLL | None:
    """Library ``name`` loaded with its signatures set, building it first if needed; None when unavailable."""
    if not enabled():
        return None
    return _load(name)


@functools.cache
def _load(name: str) -> ctypes.CDLL | None:
    why = unavailable_reason(name)
    if why is not None:
        return None
    spec = LIBRARIES[name]
    try:
        path = _build(spec)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"falconlm: native {name} kernels unavailable, using torch ({exc})", stacklevel=3)
        return None
    for fn, argtypes in spec.functions.items():
        getattr(lib, fn).argtypes = list(argtypes)
        getattr(lib, fn).restype = None
    return lib


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir() -> Path:
    root = os.environ.get("FALCONLM_CACHE_DIR") or Path.home() / ".cache" / "falconlm"
    return Path(root) / "native"


def _build(spec: LibrarySpec) -> Path:
    """The compiled library for ``spec``, compiled now unless a build of this exact source and flags exists."""
    source = SOURCES / spec.source
    compiler = _compiler()
    assert compiler is not None
    command = [compiler, *COMMON_FLAGS, *spec.flags]
    headers = b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(command).encode() + torch.__version__.encode())
    out_dir = cache_dir()
    target = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # built aside, then renamed: safe between processes
    os.close(fd)
    try:
        done = subprocess.run(
            [*command, str(source), "-o", tmp], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if done.returncode != 0:
            raise OSError(f"{Path(compiler).name} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
