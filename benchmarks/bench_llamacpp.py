"""llama.cpp against falconlm (and transformers) on the same random bench checkpoint, all measured in one run.

1. llama.cpp's source ships inside the llama-cpp-python source package (``vendor/llama.cpp``): it is fetched with
   ``pip download --no-deps --no-binary :all: llama-cpp-python`` and ``llama-bench``, ``llama-batched-bench``,
   ``llama-quantize`` and ``llama-server`` are built with cmake (Release, native CPU flags, or AVX2 + FMA only
   with ``--isa avx2-base``; no curl or OpenSSL) into ``$FALCONLM_CACHE_DIR/llamacpp/<version>`` (default
   ``~/.cache/falconlm``), once per version and instruction set;
2. the bench checkpoint of ``bench_core.py`` is converted with llama.cpp's ``convert_hf_to_gguf.py`` (from a
   staging folder beside it: the config with ``"num_kv_heads": 1`` for a multi-query model, links to the
   weights, Falcon's real tokenizer copied in) to bf16 and f16 GGUFs, then ``llama-quantize`` makes q8_0 and
   q4_0; all are cached in ``<out>/bench-<size>-gguf``;
3. ``llama-bench`` (prefill 512, 128 decoded tokens, batch 1) and ``llama-batched-bench`` (8 sequences of a
   16-token prompt, 128 new tokens each) measure each GGUF; falconlm bf16 / int8 / int4-g64 and transformers
   bf16 are measured by ``bench_core.py``'s worker (through the serving engine; same prompt lengths). Each
   format's falconlm and llama.cpp rows run back to back, in ``--rounds`` rounds (each side's best);
4. the machine's read bandwidth and float32 FMA peak are measured too, and one table gives tok/s, GB/s at
   batch 1, % of the bandwidth and the ratios, with the CPU's model name and SIMD flags.

``--serve`` also starts ``llama-server`` and ``falconlm serve`` in turn on 127.0.0.1 with the same weights and
drives both with falconlm's load generator (``falconlm.bench``), the load of ``bench_serve.py``. Each server's
row also gives the rate of weight multiply-adds its output took (GMAC/s) and that rate's share of the machine's
float32 FMA peak, measured in the same run (``bench_core.fma_peak``): on a CPU without bfloat16 arithmetic, bf16
weights are widened to float32, so that peak bounds every bf16 server there.

    python benchmarks/bench_llamacpp.py [--model-size 194m|1b] [--threads 2] [--isa avx512|avx2-base|...]
                                        [--formats bf16 f16 q8_0 q4_0] [--llamacpp-version 0.3.36] [--serve]
                                        [--serve-rounds 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import (
    IN_TURN_NOTE,
    IN_TURN_TOKENS,
    PROMPT_DECODE,
    REPO_ROOT,
    SHARED_TOKENIZER,
    add_common_args,
    add_decode_args,
    apply_isa,
    bandwidth_line,
    checkpoint_folder,
    decode_in_turn,
    describe,
    fma_line,
    fma_peak,
    in_turn_share,
    measure,
    prepare,
    read_bandwidth,
    served_weight_rate,
    weight_macs_per_token,
)

TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-server")
FORMATS = ("bf16", "f16", "q8_0", "q4_0")
# falconlm's weights for each llama.cpp format: the same bytes per weight, or as near as the formats allow.
PAIRS = {"bf16": "bfloat16", "f16": "bfloat16", "q8_0": "int8", "q4_0": "int4-g64"}
SIMD_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "amx_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "bf16", "sve",
)  # fmt: skip


def fail(message: str) -> None:
    """Stop with one readable line."""
    sys.exit(f"bench_llamacpp: {message}")


def cache_root() -> Path:
    return Path(os.environ.get("FALCONLM_CACHE_DIR", Path.home() / ".cache" / "falconlm")) / "llamacpp"


# ---- llama.cpp: source and build ---------------------------------------------------------------------------------
def check_toolchain() -> None:
    """cmake, a C compiler and a C++ compiler, or one line saying which is missing."""
    if shutil.which("cmake") is None:
        fail("cmake not found: install it (e.g. apt-get install cmake) to build llama.cpp")
    for kind, env, names in (("C", "CC", ("cc", "gcc", "clang")), ("C++", "CXX", ("c++", "g++", "clang++"))):
        if not any(shutil.which(n) for n in ((os.environ[env],) if os.environ.get(env) else names)):
            fail(f"no {kind} compiler found: set {env}, or install {names[1]} or {names[2]}, to build llama.cpp")


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", version))


def find_source(version: str | None, refresh: bool) -> Path:
    """``vendor/llama.cpp`` of llama-cpp-python ``version`` (the newest cached one, or the registry's latest)."""
    root = cache_root()
    cached = sorted((p.name for p in root.glob("*") if (p / "src").is_dir()), key=_version_key) if root.is_dir() else []
    if version is None and cached and not refresh:
        version = cached[-1]
    if version is None or not (root / version / "src").is_dir():
        version = download_source(root, version)
    return root / version / "src"


def download_source(root: Path, version: str | None) -> str:
    """Fetch the llama-cpp-python sdist and unpack its vendored llama.cpp into ``root/<version>/src``."""
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"  pip download --no-binary :all: {spec} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(downloads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"pip download of {spec} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    sdists = [p for p in downloads.glob("llama_cpp_python-*.tar.gz") if not version or f"-{version}.tar" in p.name]
    if not sdists:
        fail(f"pip download of {spec} gave no source package in {downloads}")
    sdist = max(sdists, key=lambda p: _version_key(p.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")))
    version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
    target = root / version
    staging = target / "unpack"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(staging, filter="data")
        except TypeError:  # Python before 3.10.12 has no extraction filters
            tar.extractall(staging)
    vendored = next(staging.glob("*/vendor/llama.cpp"), None)
    if vendored is None or not (vendored / "CMakeLists.txt").is_file():
        fail(f"{sdist.name} holds no vendor/llama.cpp")
    vendored.rename(target / "src")
    shutil.rmtree(staging)
    return version


# llama.cpp's CPU flags for a forced falconlm variant, so both sides use the same instruction set: an AVX2 + FMA
# build (no AVX-512, no AVX-VNNI) stands in for an AVX2-only server on an AVX-512 machine, against falconlm's
# avx2-base build; falconlm's avx2 build uses AVX-VNNI where the CPU has it, and llama.cpp then does too.
_AVX2_FLAGS = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX512=OFF",
]
LLAMACPP_ISA_FLAGS = {
    "avx2-base": [*_AVX2_FLAGS, "-DGGML_AVX_VNNI=OFF"],
    "avx2": [*_AVX2_FLAGS, "-DGGML_AVX_VNNI=ON"],
}


def build_tools(src: Path, threads: int, isa: str | None = None) -> Path:
    """Build the llama.cpp tools once per version (and per forced instruction set); returns their folder."""
    flags = LLAMACPP_ISA_FLAGS.get(isa or "", ["-DGGML_NATIVE=ON"])
    build = src.parent / ("build" if flags == ["-DGGML_NATIVE=ON"] else f"build-{isa}")
    bin_dir = build / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    check_toolchain()
    gitlink = src / ".git"
    if gitlink.is_file():  # the sdist keeps the submodule's gitlink; its target is missing, which makes ninja loop
        gitlink.unlink()
    log = build.with_name(build.name + ".log")
    print(f"  building llama.cpp ({src.parent.name}) into {build}; log in {log} ...", file=sys.stderr)
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *flags]
    configure += ["-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    configure += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    configure += ["-G", "Ninja"] if shutil.which("ninja") else []
    compile_ = ["cmake", "--build", str(build), "-j", str(threads), "--target", *TOOLS]
    with log.open("w") as out:
        for step, cmd in (("configure", configure), ("compile", compile_)):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                fail(f"the llama.cpp build failed at the cmake {step} step; see {log}")
    return bin_dir


def ggml_version(src: Path) -> str:
    """The version of the ggml library inside a llama.cpp source tree (the vendored one has no git commit to name)."""
    cmake = src / "ggml" / "CMakeLists.txt"
    text = cmake.read_text() if cmake.is_file() else ""
    parts = [re.search(rf"set\(GGML_VERSION_{part} (\d+)\)", text) for part in ("MAJOR", "MINOR", "PATCH")]
    return "ggml " + ".".join(m.group(1) for m in parts) if all(parts) else "ggml version unknown"


# ---- GGUF files --------------------------------------------------------------------------------------------------
def stage_checkpoint(folder: Path, staging: Path, tokenizer: Path) -> Path:
    """A folder convert_hf_to_gguf.py reads: the config (``num_kv_heads`` 1 for a multi-query model), links to
    the weights, and the real Falcon tokenizer copied in."""
    staging.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    if config.get("multi_query") and not config.get("new_decoder_architecture"):
        config["num_kv_heads"] = 1  # the converter reads num_kv_heads as the number of K/V heads stored
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for weights in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        link = staging / weights.name
        if not link.exists():
            link.symlink_to(weights.resolve())
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    if not (tokenizer / "tokenizer.json").is_file():
        fail(f"no tokenizer.json in {tokenizer}; pass --tokenizer DIR (Falcon's tokenizer files)")
    for name in names:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, staging / name)
    return staging


def make_ggufs(src: Path, bin_dir: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Each requested format's GGUF, converted or quantized once and cached."""
    folder = checkpoint_folder(args.out, args.model_size)
    gguf_dir = args.out / f"bench-{args.model_size}-gguf"
    files = {fmt: gguf_dir / f"bench-{args.model_size}-{fmt}.gguf" for fmt in args.formats}
    needed = set(args.formats) | ({"bf16"} if {"q8_0", "q4_0"} & set(args.formats) else set())
    for fmt in ("bf16", "f16"):
        target = gguf_dir / f"bench-{args.model_size}-{fmt}.gguf"
        if fmt in needed and not target.is_file():
            staging = stage_checkpoint(folder, gguf_dir / "hf", args.tokenizer)
            print(f"  converting {folder} to {target.name} ...", file=sys.stderr)
            cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(staging), "--outtype", fmt]
            cmd += ["--outfile", str(target.with_suffix(".part"))]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)])}
            run_tool(cmd, f"convert_hf_to_gguf.py ({fmt})", env=env)
            target.with_suffix(".part").rename(target)
    for fmt in ("q8_0", "q4_0"):
        if fmt in files and not files[fmt].is_file():
            print(f"  llama-quantize {fmt} ...", file=sys.stderr)
            source = gguf_dir / f"bench-{args.model_size}-bf16.gguf"
            part = files[fmt].with_suffix(".part")
            run_tool([str(bin_dir / "llama-quantize"), str(source), str(part), fmt.upper(), str(args.threads)], fmt)
            part.rename(files[fmt])
    return files


def run_tool(cmd: list[str], what: str, env: dict | None = None) -> str:
    """Run one llama.cpp tool; its stdout, or one line with the end of its error output."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        missing = next((line for line in lines if "ModuleNotFoundError" in line), None)
        if missing:
            fail(f"{what}: {missing.strip()} (pip install it into this Python)")
        fail(f"{what} exited with {done.returncode}: {lines[-1] if lines else '(no output)'}")
    return done.stdout + done.stderr


# ---- llama.cpp measurements --------------------------------------------------------------------------------------
def llama_bench(bin_dir: Path, gguf: Path, args: argparse.Namespace) -> dict:
    """Prefill 512 and decode 128 at batch 1 (llama-bench, one call each), and 8 sequences decoding
    (llama-batched-bench). A measurement whose tool crashes leaves its cell empty and is named in ``failed``
    (llama.cpp 0.3.36's q8_0 prompt processing crashes on a Xeon with AMX), so the rest of the run stands."""
    row: dict = {"model_bytes": gguf.stat().st_size, "build": "?", "failed": [], "failed_cells": []}

    def bench_cmd(prompt: int, new: int, repetitions: int) -> list[str]:
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(args.threads), "-p", str(prompt)]
        return [*cmd, "-n", str(new), "-r", str(repetitions), "-o", "jsonl"]

    for key, prompt, new in (("prefill_tok_s", args.prefill, 0), ("decode_b1_tok_s", 0, args.new_tokens)):
        out = peer_tool(bench_cmd(prompt, new, args.repetitions), f"llama-bench -p {prompt} -n {new}", row, key)
        tests = [json.loads(line) for line in (out or "").splitlines() if line.startswith("{")]
        for t in tests:  # the best repetition, as bench_core keeps falconlm's best run
            commit, backends = t["build_commit"], t["backends"]  # commit "unknown": a source without git metadata
            row.update(model_bytes=t["model_size"], build=backends if commit == "unknown" else f"{commit}, {backends}")
            row[key] = max(t.get("samples_ts") or [t["avg_ts"]])
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(args.threads), "-tb", str(args.threads)]
    context = max(4096, 8 * (PROMPT_DECODE + args.new_tokens))  # a run that does not fit is skipped silently
    cmd += ["-c", str(context), "-npp", str(PROMPT_DECODE), "-ntg", str(args.new_tokens), "-npl", "8"]
    cmd += ["--output-format", "jsonl"]
    lines = (peer_tool(cmd, "llama-batched-bench", row, "decode_b8_tok_s") or "").splitlines()
    batched = [json.loads(line) for line in lines if line.startswith("{") and '"speed_tg"' in line]
    if batched:  # the whole run, 8 prompts of 16 tokens included: what bench_core times for falconlm
        b = batched[-1]
        row["decode_b8_tok_s"] = b["pl"] * b["tg"] / b["t"]
    if "decode_b1_tok_s" in row:
        row["gb_s_b1"] = row["model_bytes"] * row["decode_b1_tok_s"] / 1e9
        steps = bench_cmd(0, IN_TURN_TOKENS, 1)
        row["in_turn_b1"] = decode_in_turn(lambda: llama_step_seconds(steps), row["model_bytes"], args.threads)
    return row


def llama_step_seconds(cmd: list[str]) -> float | None:
    """The seconds of one decode step in one short ``llama-bench`` run; None if it failed."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    tests = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return 1 / tests[-1]["avg_ts"] if done.returncode == 0 and tests and tests[-1].get("avg_ts") else None


def peer_tool(cmd: list[str], what: str, row: dict, cell: str) -> str | None:
    """One llama.cpp measurement for ``row``'s ``cell``: its output, or None (``what`` with its exit status added to
    the row's ``failed``, the cell to its ``failed_cells``) when the tool crashes or fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout + done.stderr
    row["failed"].append(f"{what} exited with {done.returncode}")
    row["failed_cells"].append(cell)
    print(f"  {row['failed'][-1]}: its cells stay empty", file=sys.stderr)
    return None


# ---- rounds ------------------------------------------------------------------------------------------------------
BEST_OF = ("prefill_tok_s", "decode_b8_tok_s")  # cells a row takes from its best round each (batch 1: see best_row)


def core_rows(bin_dir: Path, ggufs: dict[str, Path], args: argparse.Namespace) -> tuple[dict, dict]:
    """The table's measurements: transformers once, then ``args.rounds`` rounds, each measuring every format's pair
    back to back (falconlm's variant, then llama.cpp's format; a variant two formats share, once a round). A shared
    machine's speed drifts over minutes (its read bandwidth has moved from 41 to 85 GB/s between rows of one run), so
    rows measured far apart compare minutes more than engines. Each row is its best over the rounds (best_row)."""
    falcon_runs: dict[str, list[dict]] = {}
    llama_runs: dict[str, list[dict]] = {}
    if not args.no_falconlm:
        falcon_runs["transformers"] = [measure("transformers", "bfloat16", args)]
    for _ in range(args.rounds):
        measured: set[str] = set()
        for fmt in args.formats:
            variant = PAIRS[fmt]
            if not args.no_falconlm and variant not in measured:
                falcon_runs.setdefault(variant, []).append(measure("falconlm", variant, args))
                measured.add(variant)
            row = llama_bench(bin_dir, ggufs[fmt], args)
            llama_runs.setdefault(fmt, []).append(row)
            print(f"  measured llama.cpp {fmt}: {row.get('decode_b1_tok_s', float('nan')):.1f} tok/s at batch 1",
                  file=sys.stderr)  # fmt: skip
    return {k: best_row(v) for k, v in falcon_runs.items()}, {k: best_row(v) for k, v in llama_runs.items()}


def best_row(rounds: list[dict]) -> dict:
    """One row from a measurement's rounds: the round with the fastest batch 1 (with its GB/s), the fastest
    prefill and batch 8 of any round, every round's decodes in turn with the probe, and the failures of cells no
    round filled."""
    have_b1 = [r for r in rounds if "decode_b1_tok_s" in r] or rounds
    row = dict(max(have_b1, key=lambda r: r.get("decode_b1_tok_s", 0.0)))
    row["in_turn_b1"] = [one for r in rounds for one in r.get("in_turn_b1") or []]
    for key in BEST_OF:
        values = [r[key] for r in rounds if key in r]
        if values:
            row[key] = max(values)
    failures = [(m, c) for r in rounds for m, c in zip(r.get("failed", []), r.get("failed_cells", []), strict=True)]
    if "failed" in row:
        row["failed"] = list(dict.fromkeys(m for m, c in failures if c not in row))
        row["failed_cells"] = list(dict.fromkeys(c for m, c in failures if c not in row))
    return row


# ---- the report --------------------------------------------------------------------------------------------------
def cpu_summary() -> str:
    """The CPU's model name, its count, and the SIMD flags that matter here."""
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        pass
    flags = set(info.get("Flags", "").split())
    if not flags and Path("/proc/cpuinfo").is_file():
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
        flags = set(match.group(1).split()) if match else set()
    name = info.get("Model name", "unknown CPU")
    have = [f for f in SIMD_FLAGS if f in flags]
    about = [info.get("Architecture", "?"), f"{info.get('CPU(s)', '?')} CPUs"]
    about += [f"{k} {info[k]}" for k in ("L2 cache", "L3 cache") if k in info]
    return f"CPU: {name} ({', '.join(about)}); SIMD flags: {' '.join(have) or 'none of ' + ' '.join(SIMD_FLAGS)}"


def render(falcon: dict[str, dict], llama: dict[str, dict], args: argparse.Namespace, bandwidth: float) -> str:
    cols = ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")
    native = next((r["native"] for r in falcon.values() if "native" in r), "unknown")
    build = next(iter(llama.values()))["build"] if llama else "-"
    lines = [
        f"{describe(args.model_size)}, random weights, {args.threads} threads",
        cpu_summary(),
        bandwidth_line(bandwidth, args.threads),
        f"falconlm native kernels: {native}; llama.cpp from llama-cpp-python {args.llamacpp_version} "
        f"({args.ggml}; {build})",
        "",
        f"| weights | engine | MiB | prefill {args.prefill} tok/s | decode b1 tok/s | decode b8 tok/s | GB/s b1 "
        "| % of read bw | % of read bw in turn b1 (median, range; probes GB/s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict, key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f}" if key in row else "-"

    def line(weights: str, engine: str, row: dict, mib: float) -> str:
        share = f"{100 * row['gb_s_b1'] / bandwidth:.0f}%" if "gb_s_b1" in row else "-"
        return (
            f"| {weights} | {engine} | {mib:.0f} | {cell(row, cols[0], 0)} | {cell(row, cols[1], 1)} | "
            f"{cell(row, cols[2], 1)} | {cell(row, 'gb_s_b1', 1)} | {share} | {in_turn_share(row)} |"
        )

    entries = [("bf16", "transformers", falcon.get("transformers"))]
    for variant, weights in (("bfloat16", "bf16"), ("int8", "int8"), ("int4-g64", "int4 g64")):
        entries.append((weights, "falconlm", falcon.get(variant)))
        for fmt, pair in PAIRS.items():
            if pair == variant and fmt in llama:
                entries.append((fmt, "llama.cpp", llama[fmt]))
    for weights, engine, row in entries:
        if row is not None:
            mib = row["model_bytes"] / 2**20 if "model_bytes" in row else row["weights_mib"]
            lines.append(line(weights, engine, row, mib))
    lines += ["", "| ratio | prefill | decode b1 | decode b8 |", "|---|---:|---:|---:|"]
    ref = falcon.get("transformers")
    for fmt, variant in PAIRS.items():
        ours = falcon.get(variant)
        if ours is not None and fmt in llama:
            ratios = " | ".join(
                f"{ours[c] / llama[fmt][c]:.2f}x" if c in llama[fmt] else "-" for c in cols
            )  # fmt: skip
            lines.append(f"| falconlm {variant} / llama.cpp {fmt} | {ratios} |")
    for variant in ("bfloat16", "int8", "int4-g64"):
        if ref is not None and variant in falcon:
            ratios = " | ".join(f"{falcon[variant][c] / ref[c]:.2f}x" for c in cols)
            lines.append(f"| falconlm {variant} / transformers bf16 | {ratios} |")
    lines += [
        "",
        f"- falconlm and transformers: `bench_core.py`'s worker; decode b1/b8 is {args.new_tokens} greedy tokens "
        f"after a {PROMPT_DECODE}-token prompt (1 or 8 sequences), prompt included in the time; GB/s b1 is per "
        f"decode step (the {args.new_tokens}-token run less a 1-token run of the same prompt, over the other "
        f"{args.new_tokens - 1} tokens); MiB and GB/s count each stored weight once (falconlm int8/int4 keep the "
        "tied head in int8).",
        f"- rounds: {args.rounds}, each measuring every format's falconlm and llama.cpp rows back to "
        "back; a row is its round with the fastest batch 1 (with that round's GB/s), the fastest prefill and batch 8 "
        "of any round, and every round's decodes in turn with the probe; transformers once.",
        f"- llama.cpp: `llama-bench -t {args.threads} -p {args.prefill} -n {args.new_tokens} -r {args.repetitions}` "
        "(best repetition; decode from an empty context), "
        f"`llama-batched-bench -npp {PROMPT_DECODE} -ntg {args.new_tokens} -npl 8` "
        "(tok/s over the whole run, prompts included); MiB is llama-bench's model size; each decode in turn with "
        f"the probe is one `llama-bench -p 0 -n {IN_TURN_TOKENS} -r 1`.",
        IN_TURN_NOTE,
    ]
    failures = [(fmt, failure) for fmt, row in llama.items() for failure in row.get("failed", [])]
    lines += [f"- llama.cpp {fmt}: {failure}; its cell is empty." for fmt, failure in failures]
    return "\n".join(lines)


# ---- serving (optional) ------------------------------------------------------------------------------------------
def serve_rows(bin_dir: Path, ggufs: dict[str, Path], args: argparse.Namespace, peak: float | None) -> str:
    """llama-server and falconlm serve under bench_serve.py's load, same weights; with each server's rate of weight
    multiply-adds and its share of the float32 FMA peak ``peak`` (GMAC/s). ``args.serve_rounds`` rounds, each
    running every format's pair back to back (falconlm, then llama-server): a shared machine's speed drifts over
    minutes, so each side's best round, both measured near each other in time, is the row."""
    import bench_serve

    folder = checkpoint_folder(args.out, args.model_size)
    bench_serve.ensure_tokenizer(folder, args.tokenizer)
    prompts = bench_serve.make_requests(folder, args.num_requests, args.prompt_len, seed=0)
    formats = [fmt for fmt in ("bf16", "q8_0", "q4_0") if fmt in ggufs]
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_no in range(1, args.serve_rounds + 1):
        for fmt in formats:
            for name in ("falconlm", "llama-server"):
                d = serve_once(name, fmt, bin_dir, ggufs, folder, prompts, args, round_no)
                runs.setdefault((name, fmt), []).append(d)
                print(f"  served {name} {fmt}: {d['output_throughput']:.1f} tok/s", file=sys.stderr)
    per_token = weight_macs_per_token(args.model_size)
    lines = [
        "",
        f"serving: {args.num_requests} requests, {args.concurrency} concurrent streaming clients, {args.prompt_len} "
        f"prompt tokens, max_tokens {args.max_tokens}, {args.threads} threads; best of {args.serve_rounds} rounds",
        "",
        "| server, weights | output tok/s | weight GMAC/s | % of FMA peak | TTFT p50 ms | TPOT p50 ms "
        "| CPU s server / client | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("falconlm", "llama-server"):
        for fmt in formats:
            d = max(runs[name, fmt], key=lambda r: r["output_throughput"])
            ttft, tpot = d["ttft_ms"]["median"], d["tpot_ms"]["median"]
            gmac_s, share = served_weight_rate(
                d["total_prompt_tokens"], d["total_output_tokens"], d["completed"], d["duration_s"], per_token, peak
            )  # fmt: skip
            label = PAIRS[fmt] if name == "falconlm" else fmt
            failed = sum(r["failed"] for r in runs[name, fmt])
            cpu = " / ".join("-" if d.get(k) is None else f"{d[k]:.1f}" for k in ("server_cpu_s", "client_cpu_s"))
            lines.append(
                f"| {name} {label} | {d['output_throughput']:.1f} | {gmac_s:.1f} | {share} | "
                f"{ttft or float('nan'):.0f} | {tpot or float('nan'):.0f} | {cpu} | {failed} |"
            )
    lines += ["", "Each round, output tok/s (falconlm / llama-server):", ""]
    for fmt in formats:
        pairs = zip(runs["falconlm", fmt], runs["llama-server", fmt], strict=True)
        rounds = ", ".join(f"{a['output_throughput']:.1f} / {b['output_throughput']:.1f}" for a, b in pairs)
        lines.append(f"- {fmt}: {rounds}")
    lines += [
        "",
        "- weight GMAC/s: the multiply-adds of the weight matrices the load needs (layers for every prompt token and "
        "every output token but each request's last, the LM head for every output token; attention's own products "
        "left out) over the run's time; % of FMA peak: against the float32 FMA peak above, the bound of bfloat16 "
        "weights on a CPU without bfloat16 arithmetic (int8 / int4 dot products have other bounds); CPU s: what the "
        "server process (all its threads) and the load generator each used during the load, on the same cores; "
        "failed: over every round.",
    ]
    return "\n".join(lines)


def serve_once(
    name: str,
    fmt: str,
    bin_dir: Path,
    ggufs: dict[str, Path],
    folder: Path,
    prompts: list[list[int]],
    args: argparse.Namespace,
    round_no: int = 1,
) -> dict:
    """One server (``falconlm`` or ``llama-server``) with ``fmt``'s weights under the load: its result as a dict,
    with the CPU seconds the server process and this process (the load generator) used during the load."""
    from bench_serve import free_port, process_cpu_seconds, stop_server, wait_healthy

    from falconlm.bench import run_benchmark

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.out / f"bench_llamacpp_{name}_{fmt}_round{round_no}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if name == "llama-server":
        cmd = [str(bin_dir / "llama-server"), "-m", str(ggufs[fmt]), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.concurrency)]
        cmd += ["-c", str(args.concurrency * (args.prompt_len + args.max_tokens + 16))]
    else:
        cmd = [sys.executable, "-m", "falconlm", "serve", "--model", str(folder), "--dtype", "bfloat16"]
        cmd += ["--max-num-seqs", str(args.concurrency), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--num-scheduler-steps", str(args.num_scheduler_steps)]
        cmd += ["--quantize", PAIRS[fmt]] if PAIRS[fmt] != "bfloat16" else []
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    try:
        wait_healthy(url, proc, log, timeout=600)
        run_benchmark(url, concurrency=1, num_requests=1, prompts=[prompts[0][:16]], max_tokens=4)
        server_start, client_start = process_cpu_seconds(proc.pid), time.process_time()
        result = run_benchmark(
            url, concurrency=args.concurrency, num_requests=len(prompts), prompts=prompts,
            max_tokens=args.max_tokens, extra_body={"ignore_eos": True},  # both servers: max_tokens each
        )  # fmt: skip
        client_cpu, server_end = time.process_time() - client_start, process_cpu_seconds(proc.pid)
    finally:
        stop_server(proc)
    server_cpu = None if server_start is None or server_end is None else server_end - server_start
    return result.to_dict() | {"server_cpu_s": server_cpu, "client_cpu_s": client_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    add_decode_args(parser)
    parser.add_argument("--repetitions", type=int, default=3, help="llama-bench repetitions per test")
    parser.add_argument("--llamacpp-version", default=None, help="llama-cpp-python version (default: newest cached)")
    parser.add_argument("--refresh", action="store_true", help="download the registry's latest llama-cpp-python")
    parser.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER, help="Falcon's tokenizer files")
    parser.add_argument("--no-falconlm", action="store_true", help="measure llama.cpp only")
    parser.add_argument("--prepare-only", action="store_true", help="build, write checkpoints and GGUFs, then stop")
    parser.add_argument("--serve", action="store_true", help="also compare llama-server with falconlm serve")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--serve-rounds", type=int, default=2, help="rounds of the serving pairs (best of each side)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the table's pairs (best of each side)")
    args = parser.parse_args()
    if args.serve_rounds < 1 or args.rounds < 1:
        parser.error("--rounds and --serve-rounds must be at least 1")
    apply_isa(args.isa)
    src = find_source(args.llamacpp_version, args.refresh)
    args.llamacpp_version, args.ggml = src.parent.name, ggml_version(src)
    bin_dir = build_tools(src, args.threads, args.isa)
    variants = [] if args.no_falconlm else sorted({PAIRS[f] for f in args.formats}, key=list(PAIRS.values()).index)
    prepare(variants, args.out, args.model_size)
    ggufs = make_ggufs(src, bin_dir, args)
    if args.prepare_only:
        print(f"  ready: {', '.join(str(p) for p in ggufs.values())}", file=sys.stderr)
        return
    bandwidth = read_bandwidth(args.threads)
    print(f"  memory read bandwidth: {bandwidth:.1f} GB/s", file=sys.stderr)
    peak = fma_peak(args.threads)
    falcon, llama = core_rows(bin_dir, ggufs, args)
    bandwidth = max(bandwidth, read_bandwidth(args.threads))  # a shared machine may have been busy at the start
    if peak is not None:  # the same kernels, so measured again only where measured at all
        peak = max(peak, fma_peak(args.threads))
    report = render(falcon, llama, args, bandwidth) + "\n" + fma_line(peak, args.threads)
    if args.serve:
        report += "\n" + serve_rows(bin_dir, ggufs, args, peak)
    print(report)


if __name__ == "__main__":
    main()
