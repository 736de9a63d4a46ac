"""Core benchmark: falconlm against transformers on the same random Falcon-7B-style checkpoint, same run.

Four shapes (``--model-size``), two Falcon-7B style (multi-query, parallel attention, vocab 65024, tied head):

* ``194m``: hidden 1024, 12 layers, 16 heads (about 194M parameters; in int4 it fits a large L3);
* ``1b``: hidden 2048, 24 layers, 32 heads (about 1.15B parameters, 2.3 GB in bf16: decode streams from memory);
* ``falcon3-1b``: Falcon3-1B's shape, the Llama layout (hidden 2048, 18 layers, 8 query heads of 256 on 4 KV heads,
  SwiGLU 8192, vocab 131072, untied head; about 1.67B parameters), against transformers' LlamaForCausalLM;
* ``rw-1b``: falcon-rw-1b's shape (sequential block with biases and ALiBi, hidden 2048, 24 layers, 32 heads with a
  KV head each, vocab 50304, tied head; about 1.31B parameters).

For each dtype it measures prefill of a 512-token prompt, greedy decode of 128 tokens at batch 1 and batch 8,
the peak RSS, and the achieved GB/s of weight reading at batch 1 against the machine's read bandwidth, measured
in the same run (the sum of a 1 GiB buffer with the same thread count, best of 5 before and 5 after the rest), and
in turn with it: rounds of a short batch-1 decode, each between two reads of the bandwidth (a machine shared with
other tenants may give twice as much in one second as in the next, so only probes right beside a decode bound it).
Decode tok/s include the 16-token prompt; GB/s is per decode step (the weights a step reads, all but an untied
input embedding, over one step's time: the 128-token run less a 1-token run of the same prompt, over the other 127
tokens), as llama-bench's decode excludes its prompt.
``int8`` and ``int4-g64`` (or any ``falconlm.quant`` recipe) measure falconlm's quantized weights with bf16
activations; transformers runs the float dtypes only. Each (implementation, dtype) runs in its own subprocess
so the peak RSS belongs to it alone.

    python benchmarks/bench_core.py [--model-size 194m|1b|falcon3-1b|rw-1b] [--threads 2]
                                    [--dtypes float32 bfloat16 int8] [--isa avx512|avx2-base|...] [--out bench-out]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

PROMPT_DECODE = 16  # prompt length for the decode rows
FLOAT_DTYPES = ("float32", "bfloat16")
ISAS = ("avx512", "avx512-base", "avx2", "avx2-base", "neon", "neon-base", "scalar")
# The benchmark shapes: overrides of the bench-194m preset (Falcon-7B layout), or a Falcon3Config's fields (sizes
# in FALCON3_SIZES), and how they are described.
MODEL_SIZES = {
    "194m": ({}, "hidden 1024, 12 layers, 16 heads, MQA, vocab 65024, tied head"),
    "1b": (
        {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32},
        "hidden 2048, 24 layers, 32 heads, MQA, vocab 65024, tied head",
    ),
    "falcon3-1b": (
        {
            "vocab_size": 131072, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 18,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
        },
        "Falcon3-1B shape: Llama layout, hidden 2048, 18 layers, 8 heads of 256 on 4 KV heads, SwiGLU 8192, "
        "vocab 131072, untied head",
    ),
    "rw-1b": (
        {
            "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "vocab_size": 50304,
            "multi_query": False, "parallel_attn": False, "bias": True, "alibi": True,
        },
        "falcon-rw-1b shape: sequential, biases, ALiBi, hidden 2048, 24 layers, 32 heads with a KV head each, "
        "vocab 50304, tied head",
    ),
}  # fmt: skip
FALCON3_SIZES = ("falcon3-1b",)
BANDWIDTH_BYTES = 1 << 30
PROBE_BYTES = 1 << 29  # the probe read in turn with the batch-1 decodes: smaller, read 3 times
IN_TURN_ROUNDS = 5  # batch-1 decodes timed in turn with the probe, per row
IN_TURN_TOKENS = 33  # tokens of each: 32 decode steps after the first (two runs of 16 steps)
IN_TURN_NOTE = (
    f"- in turn b1: {IN_TURN_ROUNDS} rounds (per round of the table), each a {IN_TURN_TOKENS}-token batch-1 decode "
    f"between two reads of the bandwidth (a probe process kept open beside the measured one, {PROBE_BYTES >> 20} "
    "MiB read 3 times, the best); the cell is the median of the rounds' GB/s as a share of the mean of their two "
    "probes, the shares' range, and the probes' range."
)


# ---- shared helpers (bench_quant, bench_serve and bench_llamacpp use these) -------------------------------------
def model_config(size: str = "194m"):
    """The FalconConfig (Falcon3Config for FALCON3_SIZES) of benchmark shape ``size`` (a key of MODEL_SIZES)."""
    from falconlm.model.config import preset
    from falconlm.model.falcon3_config import Falcon3Config

    if size in FALCON3_SIZES:
        return Falcon3Config(**MODEL_SIZES[size][0])
    return preset("bench-194m", **MODEL_SIZES[size][0])


def describe(size: str) -> str:
    """One line naming the shape, for table headers."""
    return f"bench-{size} ({MODEL_SIZES[size][1]})"


def checkpoint_folder(out: Path, size: str = "194m") -> Path:
    return out / f"bench-{size}"


def make_checkpoint(folder: Path, size: str = "194m") -> Path:
    """A random checkpoint of shape ``size``, made once and reused: float32 for 194m, bfloat16 for 1b (2.3 GB
    instead of 4.6; its float32 rows load the bf16 values widened)."""
    import torch

    from falconlm.model.falcon import FalconForCausalLM
    from falconlm.model.falcon3 import Falcon3ForCausalLM

    if (folder / "config.json").is_file():
        return folder
    print(f"  writing the random {describe(size)} checkpoint to {folder} ...", file=sys.stderr)
    torch.manual_seed(0)
    model = (Falcon3ForCausalLM if size in FALCON3_SIZES else FalconForCausalLM)(model_config(size))
    model.init_weights(seed=0)
    if size != "194m":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def quantized_folder(out: Path, variant: str, size: str = "194m") -> Path:
    """The bench checkpoint quantized as ``variant`` (a ``falconlm.quant`` recipe such as int8, int4-g64),
    written once with the default recipe (head int8)."""
    from falconlm.quant import QuantRecipe, quantize_checkpoint

    source = make_checkpoint(checkpoint_folder(out, size), size)
    folder = out / f"bench-{size}-{variant}"
    if not (folder / "config.json").is_file():
        quantize_checkpoint(source, folder, QuantRecipe.parse(variant), overwrite=True)
    return folder


# What an AVX2-only CPU gives torch as well: ATen's kernels, oneDNN (bfloat16 GEMMs widen, as without AVX512_BF16)
# and MKL capped at AVX2, so that transformers and falconlm's torch paths run as they would there.
AVX2_TORCH_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO_ROOT.parent / "shared" / "data" / "falcon-tokenizer"  # the real tokenizer, beside a checkout


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a measured worker: ``threads`` OpenMP threads, and this checkout's falconlm first on the
    path, so that the worker measures the code beside the script, not another installed copy."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}


def apply_isa(isa: str | None) -> None:
    """Force one native kernel variant (``FALCONLM_NATIVE_ISA``) for this process and its workers; call it
    before anything imports torch or falconlm. ``avx2-base`` (AVX2 + FMA, no AVX-VNNI) on a bigger x86 CPU also
    caps torch at AVX2, so the whole run (transformers included) stands in for an AVX2-only machine such as a
    Zen 2/3 EPYC; ``avx2`` caps torch the same way but keeps AVX-VNNI in falconlm's kernels where the CPU has it."""
    if isa:
        os.environ["FALCONLM_NATIVE_ISA"] = isa
    if isa in ("avx2", "avx2-base"):
        os.environ.update(AVX2_TORCH_CAPS)


def native_variant() -> str:
    """Which native kernel variant runs here (as built), or why none does."""
    from falconlm import native

    lib = native.kernels()
    return lib.falcon_isa().decode() if lib is not None else f"none ({native.unavailable_reason()})"


def bandwidth_reader(threads: int, nbytes: int) -> Callable[[int], float]:
    """A memory read-bandwidth probe over an ``nbytes`` buffer (far beyond any cache) with ``threads`` threads: the
    returned function answers the best GB/s of that many reads, each both a torch float32 sum and the native
    kernels' plain integer sum (``falcon_read_words``; a torch sum alone sometimes read slower than falconlm's
    weights stream, so it was no bound). The buffer sits in transparent huge pages where the engine puts its
    weights there too (``falconlm.engine.huge_pages``), so both read memory the same way."""
    import torch

    from falconlm import native
    from falconlm.engine.huge_pages import huge_page_copy, wanted

    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    if wanted():
        buf = huge_page_copy(buf)
    buf.sum()  # fault the pages in
    reads = [buf.sum]
    lib = native.kernels()
    if lib is not None:
        reads.append(lambda: lib.falcon_read_words(buf.data_ptr(), nbytes // 8, threads))

    def read(repeats: int) -> float:
        return nbytes / min(best_time(r, repeats=repeats) for r in reads) / 1e9

    return read


def read_bandwidth(threads: int, nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """The machine's memory read bandwidth in GB/s: :func:`bandwidth_reader`'s best of ``repeats`` reads."""
    return bandwidth_reader(threads, nbytes)(repeats)


def serve_probes(threads: int) -> None:
    """The probe process of :class:`ReadProbe`: one line with the read bandwidth (best of 3) per line read."""
    read = bandwidth_reader(threads, PROBE_BYTES)
    for _ in sys.stdin:
        print(f"{read(3):.2f}", flush=True)


class ReadProbe:
    """The read bandwidth now, in GB/s, from a process of its own that stays open across a measurement: the
    measured process's peak RSS stays its own, and no process start sits between a probe and the decode it
    brackets. :meth:`read` answers None once the probe process has failed."""

    def __init__(self, threads: int):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", "--threads", str(threads)]
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=worker_env(threads),
        )

    def read(self) -> float | None:
        try:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            return float(self.process.stdout.readline())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ReadProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_in_turn(step_seconds: Callable[[], float | None], weight_bytes: int, threads: int) -> list[list]:
    """IN_TURN_ROUNDS rounds of [bandwidth before, GB/s of one batch-1 decode step, bandwidth after]: each round
    calls ``step_seconds`` (a short decode, timed per step; None if it failed, and the round is left out) between
    two probe reads, and counts ``weight_bytes`` read per step."""
    rounds = []
    with ReadProbe(threads) as probe:
        probe.read()  # the probe process has started and read once before the first round
        for _ in range(IN_TURN_ROUNDS):
            before = probe.read()
            seconds = step_seconds()
            after = probe.read()
            if seconds:
                rounds.append([before, weight_bytes / seconds / 1e9, after])
    return rounds


def in_turn_share(row: dict) -> str:
    """A row's batch-1 GB/s in turn with the probe (``in_turn_b1``) as a table cell: the median of the rounds'
    shares of the mean of their two probes, the shares' range, and the probes' range (``97% (89-104%) of 52-70``);
    "-" without a round whose probes both read."""
    rounds = [(before, gb_s, after) for before, gb_s, after in row.get("in_turn_b1") or [] if before and after]
    if not rounds:
        return "-"
    shares = sorted(100 * gb_s / ((before + after) / 2) for before, gb_s, after in rounds)
    probes = [p for before, _, after in rounds for p in (before, after)]
    return (
        f"{statistics.median(shares):.0f}% ({shares[0]:.0f}-{shares[-1]:.0f}%) of {min(probes):.0f}-{max(probes):.0f}"
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options every bench script shares."""
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="194m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=ISAS, default=None, help="force a native kernel variant")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where checkpoints are cached")


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """The options of the scripts whose rows run :func:`worker` (``bench_core.py``, ``bench_llamacpp.py``)."""
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--num-scheduler-steps", type=int, default=16, help="falconlm's most decode steps per schedule (default 16)"
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def best_time(fn, repeats: int = 1) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def stored_bytes(model) -> int:
    """Bytes of every parameter and buffer, each storage once (a tied head shares the embedding's)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def step_bytes(model) -> int:
    """The bytes a decode step reads: :func:`stored_bytes` less an untied input embedding's, of which a step reads
    one row per token (Falcon3's 131072 x 2048 table is a sixth of its 1B shape; a tied one is the head, read)."""

    def storages(module) -> dict[int, int]:
        return {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*module.parameters(), *module.buffers()]
        }

    embedding, head = storages(model.get_input_embeddings()), storages(model.lm_head)
    return stored_bytes(model) - sum(n for ptr, n in embedding.items() if ptr not in head)


# ---- one measurement ---------------------------------------------------------------------------------------------
def worker(
    impl: str, variant: str, out: Path, size: str, threads: int, prefill: int, new_tokens: int, steps: int = 16
) -> dict:
    """Run one implementation with one dtype or quantization recipe; return its measurements."""
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    dtype = {"float32": torch.float32}.get(variant, torch.bfloat16)
    folder = checkpoint_folder(out, size)
    gen = torch.Generator().manual_seed(0)
    if impl == "falconlm":
        from falconlm.engine.engine import Engine, EngineConfig
        from falconlm.engine.sampling_params import SamplingParams
        from falconlm.model.falcon import FalconForCausalLM
        from falconlm.quant import load_quantized

        if variant in FLOAT_DTYPES:
            model = FalconForCausalLM.from_pretrained(folder, dtype=dtype)
        else:
            model = load_quantized(quantized_folder(out, variant, size), dtype=dtype)
        vocab = model.config.vocab_size

        class _NoText:  # token ids only: the benchmark measures the engine, not detokenization
            eos_token_id = None

            def decode(self, ids, skip_special_tokens=False):
                return ""

        config = EngineConfig(
            max_num_seqs=8, max_num_batched_tokens=prefill, enable_prefix_caching=False, num_scheduler_steps=steps
        )
        engine = Engine(model, _NoText(), config)

        def run_prefill(ids):
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            engine.generate(ids.tolist(), [params] * ids.shape[0])

        def run_decode(ids, new_tokens=new_tokens):
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            outs = engine.generate(ids.tolist(), [params] * ids.shape[0])
            assert all(len(o.token_ids) == new_tokens for o in outs)
    else:
        from transformers import AutoModelForCausalLM  # FalconForCausalLM, or LlamaForCausalLM for Falcon3

        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()
        vocab = model.config.vocab_size

        def run_prefill(ids):
            model(ids, logits_to_keep=1)

        def run_decode(ids, new_tokens=new_tokens):
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            assert out.shape[1] == ids.shape[1] + new_tokens

    weight_bytes = step_bytes(model)
    long_prompt = torch.randint(0, vocab, (1, prefill), generator=gen)
    run_prefill(long_prompt)  # warm-up at the measured shape (oneDNN builds its kernels per shape)
    prefill_s = best_time(lambda: run_prefill(long_prompt), repeats=3)
    result = {"impl": impl, "dtype": variant, "prefill_tok_s": prefill / prefill_s}
    for batch in (1, 8):
        ids = torch.randint(0, vocab, (batch, PROMPT_DECODE), generator=gen)
        if batch == 1:
            run_decode(ids[:, :4])  # warm-up
        seconds = best_time(lambda ids=ids: run_decode(ids), repeats=2)
        result[f"decode_b{batch}_tok_s"] = batch * new_tokens / seconds
        if batch == 1:  # one decode step: the whole run less its prompt and first token, over the other tokens
            first = best_time(lambda ids=ids: run_decode(ids, 1), repeats=2)
            result["decode_step_s_b1"] = (seconds - first) / (new_tokens - 1)
            one_row = ids
    result["gb_s_b1"] = weight_bytes / result["decode_step_s_b1"] / 1e9
    result["weights_mib"] = stored_bytes(model) / 2**20
    result["peak_rss_mib"] = peak_rss_mib()

    def step_seconds() -> float:  # as decode_step_s_b1, over a shorter run
        first = best_time(lambda: run_decode(one_row, 1))
        return (best_time(lambda: run_decode(one_row, IN_TURN_TOKENS)) - first) / (IN_TURN_TOKENS - 1)

    result["in_turn_b1"] = decode_in_turn(step_seconds, weight_bytes, threads)
    if impl == "falconlm":
        result["native"] = native_variant()
    return result


def measure(impl: str, variant: str, args: argparse.Namespace) -> dict:
    """Run :func:`worker` in a subprocess of its own (its own peak RSS, ``args.threads`` OpenMP threads)."""
    cmd = [sys.executable, __file__, "--worker", impl, variant, "--model-size", args.model_size]
    cmd += ["--threads", str(args.threads), "--prefill", str(args.prefill), "--new-tokens", str(args.new_tokens)]
    cmd += ["--out", str(args.out), "--num-scheduler-steps", str(args.num_scheduler_steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.threads))
    if done.returncode != 0:
        sys.exit(f"bench_core: the {impl} {variant} worker failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  measured {impl} {variant}: {row['decode_b1_tok_s']:.1f} tok/s at batch 1", file=sys.stderr)
    return row


def prepare(variants: list[str], out: Path, size: str) -> None:
    """Write the checkpoint and the quantized folders first, outside the measured processes."""
    make_checkpoint(checkpoint_folder(out, size), size)
    for variant in variants:
        if variant not in FLOAT_DTYPES:
            quantized_folder(out, variant, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--dtypes", nargs="+", default=list(FLOAT_DTYPES), help="float32, bfloat16, int8, int4-g64")
    add_decode_args(parser)
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_isa(args.isa)
    if args.probe:
        serve_probes(args.threads)
        return
    if args.worker:
        impl, variant = args.worker
        steps = args.num_scheduler_steps
        row = worker(impl, variant, args.out, args.model_size, args.threads, args.prefill, args.new_tokens, steps)
        print(json.dumps(row))
        return
    prepare(args.dtypes, args.out, args.model_size)
    bandwidth = read_bandwidth(args.threads)
    print(f"  memory read bandwidth: {bandwidth:.1f} GB/s", file=sys.stderr)
    rows = []
    for variant in args.dtypes:
        for impl in ("transformers", "falconlm") if variant in FLOAT_DTYPES else ("falconlm",):
            rows.append(measure(impl, variant, args))
    bandwidth = max(bandwidth, read_bandwidth(args.threads))  # a shared machine may have been busy at the start
    print(render(rows, args.threads, args.model_size, bandwidth, args.prefill))


FMA_PROBE_STEPS = 20_000_000  # rounds of the probe's chains per thread: tens of ms per call


def fma_peak(threads: int, repeats: int = 5) -> float | None:
    """The float32 multiply-add rate of ``threads`` threads in GMAC/s, with the chosen native variant's vectors
    (``falcon_fma_probe``: independent FMA chains, nothing read from memory), best of ``repeats``: the bound of
    float32 work such as bfloat16 weights widened on a CPU without bfloat16 arithmetic. None without the kernels."""
    from falconlm import native

    lib = native.kernels()
    if lib is None:
        return None
    macs = threads * FMA_PROBE_STEPS * lib.falcon_fma_probe_chains() * 16
    seconds = best_time(lambda: lib.falcon_fma_probe(FMA_PROBE_STEPS, 1.0, 0.0, threads), repeats=repeats)
    return macs / seconds / 1e9


class TokenMacs(NamedTuple):
    """Weight multiply-adds of one token of a benchmark shape (attention's scores and values left out)."""

    layers: int  # the decoder layers' weight matrices
    head: int  # the LM head
    last_layer_after_qkv: int  # the last layer's attention-out and MLP: a row whose logits nobody reads skips them


def weight_macs_per_token(size: str = "194m") -> TokenMacs:
    """What a token of shape ``size`` costs in matmuls (:class:`TokenMacs`)."""
    import torch

    from falconlm.model.falcon import FalconForCausalLM
    from falconlm.model.falcon3 import Falcon3ForCausalLM

    falcon3 = size in FALCON3_SIZES
    with torch.device("meta"):
        model = (Falcon3ForCausalLM if falcon3 else FalconForCausalLM)(model_config(size))
    blocks = model.model.layers if falcon3 else model.transformer.h
    qkv = [f"self_attn.{n}_proj" for n in "qkv"] if falcon3 else ["self_attention.query_key_value"]
    last = blocks[-1]
    layers = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    last_rest = sum(m.weight.numel() for m in last.modules() if isinstance(m, torch.nn.Linear))
    last_rest -= sum(last.get_submodule(name).weight.numel() for name in qkv)
    return TokenMacs(layers, model.config.vocab_size * model.config.hidden_size, last_rest)


def served_weight_macs(prompt_tokens: int, output_tokens: int, requests: int, per_token: TokenMacs) -> int:
    """The weight multiply-adds a served load needs: every prompt token, and every output token but each
    request's last (it is never fed back), runs the layers, except that a prompt token other than its request's
    last needs only its K/V from the last layer (its logits are never read: falconlm's fused step and llama.cpp
    skip the rest, torch's forward computes it anyway); every output token takes one row of the head."""
    rows = prompt_tokens + output_tokens - requests
    unread = prompt_tokens - requests
    return rows * per_token.layers - unread * per_token.last_layer_after_qkv + output_tokens * per_token.head


def served_weight_rate(
    prompt_tokens: int,
    output_tokens: int,
    requests: int,
    seconds: float,
    per_token: TokenMacs,
    peak: float | None,
) -> tuple[float, str]:
    """A served load's weight multiply-adds per second in GMAC/s (``per_token``: weight_macs_per_token's),
    and that rate's share of the FMA peak ``peak`` as a table cell ("-" without a peak)."""
    macs = served_weight_macs(prompt_tokens, output_tokens, requests, per_token)
    gmac_s = macs / max(seconds, 1e-9) / 1e9
    return gmac_s, f"{100 * gmac_s / peak:.0f}%" if peak else "-"


def fma_line(peak: float | None, threads: int) -> str:
    if peak is None:
        return "float32 FMA peak: not measured (no native kernels)"
    return (
        f"float32 FMA peak, measured in this run: {peak:.1f} GMAC/s ({threads} threads, independent multiply-add "
        "chains of the native variant's vectors, best of 5)"
    )


def bandwidth_line(bandwidth: float, threads: int) -> str:
    return (
        f"memory read bandwidth, measured in this run: {bandwidth:.1f} GB/s (torch float32 and native integer sums "
        f"of a {BANDWIDTH_BYTES >> 30} GiB buffer, {threads} threads, best of 5 before and 5 after the measurements)"
    )


def render(rows: list[dict], threads: int, size: str, bandwidth: float, prefill: int = 512) -> str:
    native = next((r["native"] for r in rows if "native" in r), None)
    lines = [
        f"{describe(size)}, {threads} threads" + (f", falconlm native kernels: {native}" if native else ""),
        bandwidth_line(bandwidth, threads),
        "",
        f"| dtype | impl | prefill {prefill} tok/s | decode b1 tok/s | decode b8 tok/s | GB/s b1 | % of read bw "
        "| % of read bw in turn b1 (median, range; probes GB/s) | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["impl"], r["dtype"]): r for r in rows}
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['impl']} | {r['prefill_tok_s']:.0f} | {r['decode_b1_tok_s']:.1f} | "
            f"{r['decode_b8_tok_s']:.1f} | {r['gb_s_b1']:.1f} | {100 * r['gb_s_b1'] / bandwidth:.0f}% | "
            f"{in_turn_share(r)} | {r['peak_rss_mib']:.0f} |"
        )
        ref_dtype = r["dtype"] if r["dtype"] in FLOAT_DTYPES else "bfloat16"
        ref = by_key.get(("transformers", ref_dtype))
        if r["impl"] == "falconlm" and ref is not None:
            ratio = [r[k] / ref[k] for k in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")]
            lines.append(
                f"| {r['dtype']} | ratio falconlm/transformers {ref_dtype} | {ratio[0]:.2f}x | {ratio[1]:.2f}x | "
                f"{ratio[2]:.2f}x | | | | |"
            )
    lines.append("")
    lines.append(IN_TURN_NOTE)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
