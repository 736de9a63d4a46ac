"""Native CPU kernels: one C++ source for every instruction set, compiled on first use, called through ctypes.

The kernels (``csrc/``) are written once against a thin vector layer (``csrc/simd.h``) and built as one library
per *variant*:

* ``avx512``: x86 with AVX-512 F/BW/VL, plus VNNI (vpdpbusd) and BF16 (vdpbf16ps) where the CPU has them;
* ``avx2``: x86 with AVX2 and FMA, plus AVX-VNNI where present;
* ``neon``: 64-bit ARM, plus the dot-product instructions (sdot) and the int8 matrix multiply (smmla) where present;
* ``scalar``: plain C++, built everywhere; the reference the others are tested against.

The library holds the bf16 matmul, the int8 / int4 matmuls, decode attention over a paged cache, a row-wise
argmax and the fused decode step; it works on raw buffers and shapes only. The best variant this CPU runs is
used unless ``FALCONLM_NATIVE_ISA`` names another; ``FALCONLM_NATIVE=0`` turns all of it off, and every caller
then keeps its torch path. A library is compiled once per source version and flags into
``$FALCONLM_CACHE_DIR/native`` (default ``~/.cache/falconlm/native``). It links OpenMP by its usual soname, which
resolves to the runtime torch has already loaded: the kernels share torch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
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

# Every exported function and its ctypes argument types (all return void unless listed in RESULTS).
FUNCTIONS: dict[str, tuple] = {
    "falcon_isa": (),
    "falcon_qlinear": (_P, _C, _I, _I, _I, _I, _I, _I, _C, _P, _P, _I, _P, _C, _C),
    "falcon_qrows": (_P, _P, _C, _I, _I, _I, _P, _I, _P, _C),
    "falcon_qdequant_t": (_P, _P, _C, _I, _I, _I, _I, _I, _P, _C),
    "falcon_linear_bf16": (_P, _I, _I, _I, _P, _I, _P, _C),
    "falcon_gemm_bf16": (_P, _I, _I, _I, _P, _I, _P, _C),
    "falcon_argmax_rows": (_P, _C, _I, _I, _I, _P, _C),
    "falcon_decode_attention": (_P, _C, *(_I,) * 4, _P, _P, *(_I,) * 4, _P, _I, _P, ctypes.c_float, _P, _C, _P, _I),
    "falcon_decode_layers": (_P, _P, _P, _P, _I, _P, _P, _C, _P, _I),
    "falcon_prompt_layers": (_P, _P, _P, _P, _I, _P, _P, _C, _P, _I),
    "falcon_final_norm": (_P, _I, _I, _P, _P, ctypes.c_double, _P, _C),
    "falcon_decode_run": (_P, _P, _P, _P, _I, _I, _P, _C),
    "falcon_struct_layout": (_P,),
    "falcon_read_words": (_P, _I, _C),
    "falcon_fma_probe": (_I, ctypes.c_float, ctypes.c_float, _C),
    "falcon_fma_probe_chains": (),
    "falcon_stream_ahead": (_P,),
}
RESULTS = {
    "falcon_decode_run": ctypes.c_int64,
    "falcon_isa": ctypes.c_char_p,
    "falcon_struct_layout": _I,
    "falcon_read_words": ctypes.c_uint64,
    "falcon_fma_probe": ctypes.c_double,
    "falcon_fma_probe_chains": _I,
}


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the machine it is for, the CPU features it needs, its compiler flags, and the
    optional features that add flags (``/proc/cpuinfo`` names on x86, HWCAP names on ARM)."""

    name: str
    arch: str | None  # "x86_64", "aarch64", or None for any
    requires: tuple[str, ...]
    flags: tuple[str, ...]
    optional: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def compile_flags(self, features: frozenset[str]) -> tuple[str, ...]:
        extra = [flag for feature, flags in self.optional if feature in features for flag in flags]
        return (*self.flags, *extra)


VARIANTS = (
    Variant(
        "avx512",
        "x86_64",
        ("avx512f", "avx512bw", "avx512vl", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"),
        (("avx512_vnni", ("-mavx512vnni",)), ("avx512_bf16", ("-mavx512bf16",))),
    ),
    Variant("avx2", "x86_64", ("avx2", "fma"), ("-mavx2", "-mfma", "-mf16c"), (("avx_vnni", ("-mavxvnni",)),)),
    # -march picks the ISA level; dotprod needs armv8.2-a, and the later flag wins, so i8mm's flag names dotprod
    # too (every CPU with i8mm, an Armv8.6 feature, has dotprod, mandatory since Armv8.4).
    Variant(
        "neon",
        "aarch64",
        ("asimd",),
        ("-march=armv8-a",),
        (("asimddp", ("-march=armv8.2-a+dotprod",)), ("i8mm", ("-march=armv8.2-a+dotprod+i8mm",))),
    ),
    Variant("scalar", None, (), ()),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
# "<variant>-base" builds a variant without its optional features (AVX2 without AVX-VNNI, AVX-512 without VNNI and
# BF16, NEON without dotprod and i8mm): the code a CPU that has only the required ones runs. On a CPU with more,
# tests run those paths too, and benchmarks stand in for the smaller CPU with them.
BASE = "-base"


def _split_name(name: str) -> tuple[str, bool]:
    """(variant name, whether its optional features are left out) of a name such as ``avx2-base``."""
    return (name[: -len(BASE)], True) if name.endswith(BASE) else (name, False)


def threads_for(work: int) -> int:
    """Threads for a kernel call of ``work`` multiply-adds: torch's count, or 1 when the call is too small to
    repay waking the other threads (an OpenMP fork and join costs a few microseconds)."""
    return 1 if work < SERIAL_WORK else torch.get_num_threads()


def enabled() -> bool:
    """False when ``FALCONLM_NATIVE`` is 0 / false / off."""
    return switch(os.environ.get("FALCONLM_NATIVE", "1"))


@functools.lru_cache(maxsize=8)
def switch(value: str) -> bool:
    """False for an environment switch's "off" spellings (0, false, off, no)."""
    return value.strip().lower() not in ("0", "false", "off", "no")


def machine() -> str:
    """This machine's architecture: ``x86_64``, ``aarch64`` or what the platform says."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature names: x86 flags from ``/proc/cpuinfo``; on ARM the HWCAP bits (``getauxval``), else
    the cpuinfo ``Features`` line; empty where neither exists."""
    if machine() == "aarch64":
        from_hwcap = _arm_hwcap_features()
        if from_hwcap:
            return from_hwcap
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


_ARM_HWCAP = {"asimd": 1 << 1, "asimddp": 1 << 20, "asimdhp": 1 << 10}  # AT_HWCAP bits (Linux arm64)
_ARM_HWCAP2 = {"i8mm": 1 << 13, "bf16": 1 << 14}  # AT_HWCAP2 bits


def _arm_hwcap_features() -> frozenset[str]:
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return frozenset()
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    hwcap, hwcap2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2
    names = {n for n, bit in _ARM_HWCAP.items() if hwcap & bit} | {n for n, bit in _ARM_HWCAP2.items() if hwcap2 & bit}
    return frozenset(names)


def variant_unavailable(name: str) -> str | None:
    """Why variant ``name`` cannot run on this machine, or None when it can (nothing is built to find out)."""
    base_name, _ = _split_name(name)
    if base_name not in VARIANT_NAMES:
        return f"unknown variant {name!r} (choose from {', '.join(VARIANT_NAMES)}, or one of them + {BASE!r})"
    variant = _variant(base_name)
    if variant.arch is not None and variant.arch != machine():
        return f"not an {variant.arch} CPU"
    missing = [f for f in variant.requires if f not in cpu_features()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


def _variant(name: str) -> Variant:
    return next(v for v in VARIANTS if v.name == name)


def _optional_present(variant: Variant) -> list[str]:
    """The optional features of ``variant`` that this CPU has (what its full build uses and its base build not)."""
    return [feature for feature, _ in variant.optional if feature in cpu_features()]


def runnable_variants(with_base: bool = False) -> list[str]:
    """The variants this CPU runs, fastest first (``scalar`` always last); ``with_base`` adds each one's
    ``-base`` build after it where the CPU has optional features that the base build leaves out."""
    out = []
    for v in VARIANTS:
        if variant_unavailable(v.name) is None:
            out.append(v.name)
            if with_base and _optional_present(v):
                out.append(v.name + BASE)
    return out


def new_ground(name: str) -> bool:
    """Whether forcing variant ``name`` here runs another build than the default choice: it runs on this CPU,
    and it is neither the default variant nor a ``-base`` build of it where the CPU has none of its optional
    features (``avx2-base`` on an AVX2-only CPU is the very build ``avx2`` makes there)."""
    if variant_unavailable(name) is not None:
        return False
    family, base = _split_name(name)
    if family != runnable_variants()[0]:
        return True
    return base and bool(_optional_present(_variant(family)))


def chosen_variant() -> str:
    """``FALCONLM_NATIVE_ISA`` when set, else the fastest variant this CPU runs."""
    return _chosen(os.environ.get("FALCONLM_NATIVE_ISA", ""))


def chosen_family() -> str:
    """The chosen variant's name without ``-base`` (``avx2`` for ``avx2-base``): the code paths it shares."""
    return _split_name(chosen_variant())[0]


@functools.lru_cache(maxsize=8)
def _chosen(forced: str) -> str:  # read on every kernel call: kept to a dictionary lookup
    return forced.strip().lower() or runnable_variants()[0]


def unavailable_reason(variant: str | None = None) -> str | None:
    """Why the kernels (of ``variant``, default the chosen one) cannot be used here, or None when they can."""
    if not enabled():
        return "FALCONLM_NATIVE is off"
    why = variant_unavailable(variant or chosen_variant())
    if why is not None:
        return why
    if _compiler() is None:
        return "no C++ compiler (set CXX or install g++)"
    return None


def status() -> dict[str, str]:
    """The chosen variant (with the optional CPU features it uses) and, for each variant, ``runs`` or why not.
    Nothing is built to find out."""
    why = unavailable_reason()
    if why is None:
        name, base = _split_name(chosen_variant())
        extras = [] if base else _optional_present(_variant(name))
        out = {"chosen": chosen_variant() + (f" (with {', '.join(extras)})" if extras else "")}
    else:
        out = {"chosen": f"none ({why}); torch paths everywhere"}
    for v in VARIANTS:
        out[v.name] = variant_unavailable(v.name) or "runs"
    return out


def describe() -> str:
    """One line for logs: which variant runs (as built), and why the others do not."""
    why = unavailable_reason()
    if why is not None:
        return f"native kernels off: {why}; torch paths everywhere"
    chosen = chosen_variant()
    lib = kernels()
    built = lib.falcon_isa().decode() if lib is not None else "build failed, torch paths everywhere"
    others = [f"{v.name}: {variant_unavailable(v.name) or 'also runs'}" for v in VARIANTS if v.name != chosen]
    return f"native kernels: {chosen} ({built}); " + "; ".join(others)


def kernels(variant: str | None = None) -> ctypes.CDLL | None:
    """The kernel library of ``variant`` (default the chosen one), built first if needed; None when unavailable."""
    if not enabled():
        return None
    return _load(variant or chosen_variant())


@functools.cache
def _load(name: str) -> ctypes.CDLL | None:
    why = unavailable_reason(name)
    if why is not None:
        if os.environ.get("FALCONLM_NATIVE_ISA"):  # a forced variant that cannot run deserves a word (once)
            warnings.warn(f"falconlm: FALCONLM_NATIVE_ISA={name}: {why}; using torch", stacklevel=3)
        return None
    try:
        variant_name, base = _split_name(name)
        path = _build(_variant(variant_name), frozenset() if base else cpu_features(), name)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"falconlm: native {name} kernels unavailable, using torch ({exc})", stacklevel=3)
        return None
    for fn, argtypes in FUNCTIONS.items():
        getattr(lib, fn).argtypes = list(argtypes)
        getattr(lib, fn).restype = RESULTS.get(fn)
    return lib


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir() -> Path:
    root = os.environ.get("FALCONLM_CACHE_DIR") or Path.home() / ".cache" / "falconlm"
    return Path(root) / "native"


def build_command(variant: Variant, compiler: str, features: frozenset[str]) -> list[str]:
    """The compiler command (without output) that builds ``variant`` for a CPU with ``features``."""
    return [compiler, *COMMON_FLAGS, *variant.compile_flags(features), *map(str, sorted(SOURCES.glob("*.cpp")))]


def _build(variant: Variant, features: frozenset[str] | None = None, name: str | None = None) -> Path:
    """The library of ``variant`` for a CPU with ``features`` (default this one's), compiled now unless a build of
    these exact sources and flags exists; ``name`` (default the variant's) names the file."""
    compiler = _compiler()
    assert compiler is not None
    command = build_command(variant, compiler, cpu_features() if features is None else features)
    sources = b"".join(p.read_bytes() for p in sorted(SOURCES.iterdir()) if p.suffix in (".cpp", ".h"))
    key = hashlib.sha256(sources + " ".join(command).encode() + torch.__version__.encode())
    out_dir = cache_dir()
    target = out_dir / f"kernels-{name or variant.name}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # built aside, then renamed: safe between processes
    os.close(fd)
    try:
        done = subprocess.run([*command, "-o", tmp], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"{Path(compiler).name} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
