"""The benchmark scripts' helpers that need no measurement: shapes, tables, the GGUF staging folder, the
toolchain check (the measurements themselves are run by hand, see README, Performance)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_core
import bench_llamacpp


def test_bench_1b_shape():
    config = bench_core.model_config("1b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 24, 32)
    assert config.num_kv_groups == 1 and config.tie_word_embeddings and config.vocab_size == 65024
    assert 1.10e9 < config.num_parameters() < 1.20e9
    assert 1.8e8 < bench_core.model_config("194m").num_parameters() < 2.0e8


def test_bench_rw_1b_shape():
    config = bench_core.model_config("rw-1b")  # falcon-rw-1b's layout and size
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 24, 32)
    assert config.alibi and config.bias and not config.parallel_attn and config.num_kv_groups == 32
    assert config.tie_word_embeddings and config.vocab_size == 50304
    assert 1.30e9 < config.num_parameters() < 1.32e9


def test_weight_multiply_adds_of_a_served_load():
    c = bench_core.model_config("194m")
    head_dim = c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * (c.hidden_size + 2 * head_dim)  # fused QKV, one K/V head (multi-query)
    per_layer += c.hidden_size * c.hidden_size + 2 * c.hidden_size * 4 * c.hidden_size  # dense, MLP in and out
    macs = bench_core.weight_macs_per_token("194m")
    assert macs.layers == c.num_hidden_layers * per_layer
    assert macs.head == c.vocab_size * c.hidden_size
    after_qkv = c.hidden_size * c.hidden_size + 2 * c.hidden_size * 4 * c.hidden_size
    assert macs.last_layer_after_qkv == after_qkv
    # 2 requests of 5 prompt tokens and 3 output tokens: 5 + 2 tokens through the layers each, but 4 prompt
    # tokens each skip the last layer after its QKV; 3 head rows each
    want = 14 * macs.layers - 8 * after_qkv + 6 * macs.head
    assert bench_core.served_weight_macs(10, 6, 2, macs) == want


def test_isa_is_passed_through(monkeypatch):
    environ: dict[str, str] = {}
    monkeypatch.setattr(bench_core.os, "environ", environ)  # the real one must not force a variant on later tests
    bench_core.apply_isa(None)
    assert environ == {}
    bench_core.apply_isa("avx512")
    assert environ == {"FALCONLM_NATIVE_ISA": "avx512"}
    environ.clear()
    bench_core.apply_isa("avx2")  # the stand-in for an AVX2-only CPU caps torch too, for transformers' sake
    assert environ == {"FALCONLM_NATIVE_ISA": "avx2", **bench_core.AVX2_TORCH_CAPS}
    assert environ["ONEDNN_MAX_CPU_ISA"] == "AVX2" and environ["ATEN_CPU_CAPABILITY"] == "avx2"
    environ.clear()
    bench_core.apply_isa("avx2-base")  # the same caps, and falconlm's AVX2 build without AVX-VNNI
    assert environ == {"FALCONLM_NATIVE_ISA": "avx2-base", **bench_core.AVX2_TORCH_CAPS}


def test_the_decode_options_reach_the_worker(monkeypatch):
    """bench_core's and bench_llamacpp's parsers both take the worker's options, and measure() passes them on."""
    parser = argparse.ArgumentParser()
    bench_core.add_common_args(parser)
    bench_core.add_decode_args(parser)
    args = parser.parse_args(["--num-scheduler-steps", "1", "--new-tokens", "64"])
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"decode_b1_tok_s": 1.0}\n', stderr="")

    monkeypatch.setattr(bench_core.subprocess, "run", run)
    assert bench_core.measure("falconlm", "int8", args) == {"decode_b1_tok_s": 1.0}
    (cmd,) = commands
    assert cmd[cmd.index("--num-scheduler-steps") + 1] == "1" and cmd[cmd.index("--new-tokens") + 1] == "64"


def _llamacpp_args() -> argparse.Namespace:
    """bench_llamacpp's settings for one round of its table, as its command line gives them by default."""
    return argparse.Namespace(
        model_size="194m",
        threads=2,
        prefill=512,
        new_tokens=128,
        repetitions=3,
        llamacpp_version="0.3.36",
        ggml="ggml 0.25.3",
        rounds=1,
        num_scheduler_steps=16,
    )


def _row(impl: str, dtype: str, b1: float) -> dict:
    return {
        "impl": impl,
        "dtype": dtype,
        "prefill_tok_s": 500.0,
        "decode_b1_tok_s": b1,
        "decode_b8_tok_s": 8 * b1,
        "gb_s_b1": b1 * 0.4,
        "weights_mib": 400.0,
        "peak_rss_mib": 700.0,
    }


def test_core_table_reports_bandwidth_share_and_ratios():
    rows = [_row("transformers", "bfloat16", 20.0), _row("falconlm", "bfloat16", 40.0), _row("falconlm", "int8", 60.0)]
    text = bench_core.render(rows, threads=2, size="1b", bandwidth=32.0)
    assert "bench-1b" in text and "32.0 GB/s" in text
    assert "| bfloat16 | falconlm | 500 | 40.0 | 320.0 | 16.0 | 50% | - | 700 |" in text
    assert "| int8 | ratio falconlm/transformers bfloat16 | 1.00x | 3.00x | 3.00x | | | | |" in text


def test_core_table_sets_batch_1_against_the_bandwidth_read_in_turn_with_it():
    """A shared machine's bandwidth swings from second to second: each row also gives the median share of its
    batch-1 decodes timed in turn with the probe, each against the mean of the probes right before and after it."""
    row = _row("falconlm", "int8", 60.0)  # 24 GB/s at batch 1
    row["in_turn_b1"] = [[28.0, 24.0, 36.0], [30.0, 27.0, 30.0], [20.0, 33.0, 40.0], [None, 50.0, 30.0]]
    text = bench_core.render([row], threads=2, size="1b", bandwidth=60.0)
    assert "| int8 | falconlm | 500 | 60.0 | 480.0 | 24.0 | 40% | 90% (75-110%) of 20-40 | 700 |" in text
    assert "between two reads of the bandwidth" in text
    row["in_turn_b1"] = [[28.0, 24.0, None]]  # no round whose probes both read: no share
    assert "| 40% | - | 700 |" in bench_core.render([row], threads=2, size="1b", bandwidth=60.0)


class _Probe:
    """ReadProbe's stand-in: its reads answer ``values`` in order."""

    def __init__(self, values):
        self.values = iter(values)

    def __call__(self, threads):
        return self

    def read(self):
        return next(self.values)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_decode_in_turn_brackets_each_decode_with_two_probe_reads(monkeypatch):
    reads = [99.0] + [float(v) for v in range(2 * bench_core.IN_TURN_ROUNDS)]  # the first read is a warm-up
    monkeypatch.setattr(bench_core, "ReadProbe", _Probe(reads))
    steps = iter([0.5, None] + [0.25] * bench_core.IN_TURN_ROUNDS)  # a decode that failed leaves its round out
    rounds = bench_core.decode_in_turn(lambda: next(steps), 10**9, threads=2)
    assert rounds[0] == [0.0, 2.0, 1.0]
    assert rounds[1:] == [[2.0 * i, 4.0, 2.0 * i + 1] for i in range(2, bench_core.IN_TURN_ROUNDS)]


def test_the_read_probe_runs_in_a_process_of_its_own():
    with bench_core.ReadProbe(1) as probe:
        assert probe.process.pid != os.getpid()
        assert all(gb_s is not None and gb_s > 0.1 for gb_s in (probe.read(), probe.read()))
        probe.process.kill()
        probe.process.wait()
        assert probe.read() is None  # a probe process that died answers None
    assert probe.process.returncode is not None


def test_staging_folder_for_the_converter(tmp_path):
    folder, tokenizer = tmp_path / "bench", tmp_path / "tok"
    folder.mkdir()
    tokenizer.mkdir()
    (folder / "config.json").write_text(json.dumps({"multi_query": True, "num_kv_heads": 16}))
    (folder / "model.safetensors").write_bytes(b"weights")
    (tokenizer / "tokenizer.json").write_text("{}")
    staging = bench_llamacpp.stage_checkpoint(folder, tmp_path / "hf", tokenizer)
    assert json.loads((staging / "config.json").read_text())["num_kv_heads"] == 1
    assert (staging / "model.safetensors").is_symlink() and (staging / "model.safetensors").read_bytes() == b"weights"
    assert (staging / "tokenizer.json").is_file() and not (folder / "tokenizer.json").exists()
    assert json.loads((folder / "config.json").read_text())["num_kv_heads"] == 16  # the checkpoint is untouched


def test_missing_cmake_is_one_line(monkeypatch):
    monkeypatch.setattr(bench_llamacpp.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        bench_llamacpp.check_toolchain()
    assert str(stop.value).startswith("bench_llamacpp: cmake not found") and "\n" not in str(stop.value)


def test_llamacpp_table_pairs_formats(monkeypatch):
    monkeypatch.setattr(bench_llamacpp, "cpu_summary", lambda: "CPU: test")
    falcon = {"transformers": _row("transformers", "bfloat16", 20.0), "int8": _row("falconlm", "int8", 60.0)}
    falcon["int8"]["native"] = "avx2"
    llama = {
        "q8_0": {
            "model_bytes": 200 * 2**20,
            "build": "CPU",
            "prefill_tok_s": 1000.0,
            "decode_b1_tok_s": 30.0,
            "decode_b8_tok_s": 120.0,
            "gb_s_b1": 6.3,
            "in_turn_b1": [[28.0, 6.3, 32.0]],
        }
    }
    args = _llamacpp_args()
    text = bench_llamacpp.render(falcon, llama, args, bandwidth=30.0)
    assert "| q8_0 | llama.cpp | 200 | 1000 | 30.0 | 120.0 | 6.3 | 21% | 21% (21-21%) of 28-32 |" in text
    assert "| int8 | falconlm | 400 | 500 | 60.0 | 480.0 | 24.0 | 80% | - |" in text
    assert "| falconlm int8 / llama.cpp q8_0 | 0.50x | 2.00x | 4.00x |" in text
    assert "| falconlm int8 / transformers bf16 | 1.00x | 3.00x | 3.00x |" in text
    assert "native kernels: avx2" in text
    assert "llama.cpp from llama-cpp-python 0.3.36 (ggml 0.25.3; CPU)" in text


def test_the_vendored_llamacpp_is_named_by_its_ggml_version(tmp_path):
    (tmp_path / "ggml").mkdir()
    assert bench_llamacpp.ggml_version(tmp_path) == "ggml version unknown"
    lines = ["set(GGML_VERSION_MAJOR 0)", "set(GGML_VERSION_MINOR 25)", "set(GGML_VERSION_PATCH 3)"]
    (tmp_path / "ggml" / "CMakeLists.txt").write_text("\n".join(["project(ggml)", *lines]))
    assert bench_llamacpp.ggml_version(tmp_path) == "ggml 0.25.3"


def test_a_crashing_llamacpp_measurement_leaves_its_cell_empty_and_says_so(tmp_path, monkeypatch):
    """llama.cpp 0.3.36 crashes in q8_0 prompt processing on a Xeon with AMX: the run goes on without that cell."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = '{"model_size": 1048576, "build_commit": "abc", "backends": "CPU", "n_prompt": 0, "n_gen": 128, '
    record += '"avg_ts": 25.0, "samples_ts": [24.0, 26.0]}'
    tools = {
        "llama-bench": f"case \"$*\" in *'-p 512'*) kill -SEGV $$;; esac\necho '{record}'",
        "llama-batched-bench": """echo '{"pl": 8, "tg": 128, "t": 16.0, "speed_tg": 64.0}'""",
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"0" * 10)
    args = _llamacpp_args()
    monkeypatch.setattr(bench_core, "ReadProbe", _Probe([30.0] + [31.0, 33.0] * bench_core.IN_TURN_ROUNDS))
    row = bench_llamacpp.llama_bench(bin_dir, gguf, args)
    assert row["in_turn_b1"] == [[31.0, 2**20 * 25.0 / 1e9, 33.0]] * bench_core.IN_TURN_ROUNDS  # -n 33 -r 1 each
    assert "prefill_tok_s" not in row and row["decode_b1_tok_s"] == 26.0 and row["decode_b8_tok_s"] == 64.0
    assert row["failed"] == ["llama-bench -p 512 -n 0 exited with -11"]
    assert row["build"] == "abc, CPU"  # a source with git metadata names its commit
    monkeypatch.setattr(bench_llamacpp, "cpu_summary", lambda: "CPU: test")
    falcon = {"int8": _row("falconlm", "int8", 60.0)}
    text = bench_llamacpp.render(falcon, {"q8_0": row}, args, bandwidth=30.0)
    assert "| q8_0 | llama.cpp | 1 | - | 26.0 | 64.0 | 0.0 | 0% | 0% (0-0%) of 31-33 |" in text
    assert "| falconlm int8 / llama.cpp q8_0 | - | " in text
    assert "- llama.cpp q8_0: llama-bench -p 512 -n 0 exited with -11; its cell is empty." in text


def test_table_rounds_pair_each_format_in_time_and_keep_each_sides_best(tmp_path, monkeypatch):
    """Transformers once; then each round measures every format's falconlm row and then its llama.cpp row (a variant
    two formats share, once a round). A row keeps its fastest batch-1 round, with that round's GB/s, the fastest
    prefill and batch 8 of any round, and every round's decodes in turn with the probe; a crash another round made
    up for is not reported."""
    order = []
    b1 = {
        "bfloat16": [40.0, 50.0],
        "int8": [70.0, 60.0],
        "bf16": [30.0, 20.0],
        "f16": [25.0, 35.0],
        "q8_0": [45.0, 55.0],
    }

    def measure(impl, variant, args):
        order.append((impl, variant))
        n = order.count((impl, variant))
        rate = 10.0 if impl == "transformers" else b1[variant][n - 1]
        return {**_row(impl, variant, rate), "prefill_tok_s": 100.0 * n, "in_turn_b1": [[rate, rate, rate]]}

    def llama_bench(bin_dir, gguf, args):
        fmt = gguf.stem
        order.append(("llama.cpp", fmt))
        n = order.count(("llama.cpp", fmt))
        row = {"model_bytes": 2**20, "build": "x", "failed": [], "failed_cells": [], "in_turn_b1": [[n, n, n]]}
        row |= {"decode_b1_tok_s": b1[fmt][n - 1], "gb_s_b1": b1[fmt][n - 1] / 1000, "decode_b8_tok_s": 8.0 * n}
        if fmt == "q8_0" and n == 1:  # round 1's prompt run crashed; round 2's did not
            row["failed"], row["failed_cells"] = ["llama-bench -p 512 -n 0 exited with -11"], ["prefill_tok_s"]
        elif fmt != "f16":  # f16's prompt run crashed in every round
            row["prefill_tok_s"] = 300.0 + n
        else:
            row["failed"], row["failed_cells"] = ["llama-bench -p 512 -n 0 exited with -11"], ["prefill_tok_s"]
        return row

    monkeypatch.setattr(bench_llamacpp, "measure", measure)
    monkeypatch.setattr(bench_llamacpp, "llama_bench", llama_bench)
    args = argparse.Namespace(formats=["bf16", "f16", "q8_0"], rounds=2, no_falconlm=False)
    ggufs = {fmt: tmp_path / f"{fmt}.gguf" for fmt in args.formats}
    falcon, llama = bench_llamacpp.core_rows(tmp_path, ggufs, args)
    one_round = [("falconlm", "bfloat16"), ("llama.cpp", "bf16"), ("llama.cpp", "f16")]
    one_round += [("falconlm", "int8"), ("llama.cpp", "q8_0")]
    assert order == [("transformers", "bfloat16"), *one_round, *one_round]
    assert falcon["bfloat16"]["decode_b1_tok_s"] == 50.0
    assert falcon["bfloat16"]["in_turn_b1"] == [[40.0, 40.0, 40.0], [50.0, 50.0, 50.0]]  # both rounds' decodes
    assert falcon["int8"]["decode_b1_tok_s"] == 70.0 and falcon["int8"]["gb_s_b1"] == 70.0 * 0.4
    assert falcon["int8"]["prefill_tok_s"] == 200.0  # round 2's, though round 1 had the faster batch 1
    assert llama["bf16"]["decode_b1_tok_s"] == 30.0 and llama["bf16"]["in_turn_b1"] == [[1, 1, 1], [2, 2, 2]]
    assert llama["bf16"]["prefill_tok_s"] == 302.0 and llama["bf16"]["decode_b8_tok_s"] == 16.0
    assert llama["q8_0"]["prefill_tok_s"] == 302.0 and llama["q8_0"]["failed"] == []
    assert llama["f16"]["failed"] == ["llama-bench -p 512 -n 0 exited with -11"] and "prefill_tok_s" not in llama["f16"]
    assert falcon["transformers"]["decode_b1_tok_s"] == 10.0


def test_serving_rounds_pair_the_servers_in_time_and_keep_each_sides_best(tmp_path, monkeypatch):
    """Each round runs every format's falconlm server and then llama-server; a row is that side's best round."""
    import bench_serve

    folder = tmp_path / "bench-194m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    monkeypatch.setattr(bench_serve, "ensure_tokenizer", lambda folder, source: None)
    order, rates = [], {("falconlm", "bf16"): [90.0, 120.0], ("llama-server", "bf16"): [80.0, 70.0]}

    def serve_once(name, fmt, bin_dir, ggufs, folder, prompts, args, round_no):
        order.append((name, fmt))
        runs_so_far = order.count((name, fmt))
        assert round_no == runs_so_far  # each round's log has its own name
        rate = rates[name, fmt][runs_so_far - 1]
        return {
            "output_throughput": rate, "ttft_ms": {"median": 1000.0 / rate}, "tpot_ms": {"median": 50.0},
            "total_prompt_tokens": 9600, "total_output_tokens": 6144, "completed": 48, "duration_s": 6144 / rate,
            "failed": 0, "server_cpu_s": 2 * 6144 / rate, "client_cpu_s": 1.5 if name == "falconlm" else None,
        }  # fmt: skip

    monkeypatch.setattr(bench_llamacpp, "serve_once", serve_once)
    args = argparse.Namespace(
        out=tmp_path, model_size="194m", tokenizer=tmp_path, num_requests=48, prompt_len=200, max_tokens=128,
        concurrency=16, threads=2, serve_rounds=2,
    )  # fmt: skip
    text = bench_llamacpp.serve_rows(tmp_path, {"bf16": tmp_path / "m.gguf"}, args, peak=100.0)
    assert order == [("falconlm", "bf16"), ("llama-server", "bf16")] * 2
    assert "| falconlm bfloat16 | 120.0 |" in text and "| 8 | 50 | 102.4 / 1.5 | 0 |" in text  # round 2's own
    assert "| llama-server bf16 | 80.0 |" in text and "| 153.6 / - | 0 |" in text
    assert "- bf16: 90.0 / 80.0, 120.0 / 70.0" in text and "best of 2 rounds" in text


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads Linux /proc")
def test_process_cpu_seconds_counts_work_and_reads_none_for_a_gone_process():
    import bench_serve

    before = bench_serve.process_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    after = bench_serve.process_cpu_seconds(os.getpid())
    assert before is not None and after is not None and after >= before + 0.03
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert bench_serve.process_cpu_seconds(child.pid) is None


def test_engine_replay_keeps_the_closed_loop_and_splits_the_steps(tiny_checkpoint):
    """The engine-only replay keeps at most `concurrency` requests in flight, decodes max_tokens for every one,
    and times every step as either a prompt step or a decode-only step."""
    import bench_replay

    from falconlm.engine.factory import EngineArgs, build_engine

    engine = build_engine(EngineArgs(model=tiny_checkpoint, dtype="float32", max_num_seqs=4, skip_tokenizer_init=True))
    prompts = [[5 + i, 6, 7, 8, 9, 10, 11][: 3 + i % 4] for i in range(5)]
    result = bench_replay.replay(engine, prompts, concurrency=2, max_tokens=3)
    assert result.output_tokens == 5 * 3 and result.requests == 5 and result.most_in_flight == 2
    assert result.prompt_tokens == sum(map(len, prompts)) and result.seconds > 0
    prompt_steps, decode_steps = result.steps["prompt"][0], result.steps["decode"][0]
    assert prompt_steps >= 1 and decode_steps >= 1 and prompt_steps + decode_steps == engine.num_steps
    assert "execute" not in vars(engine.runner)  # the timing wrapper is gone afterwards
    args = argparse.Namespace(model_size="194m", quantize=None, threads=2, prompt_len=5, concurrency=2, max_tokens=3,
                              max_num_batched_tokens=128)  # fmt: skip
    text = bench_replay.render(result, args, peak=100.0)
    assert f"| {prompt_steps} / " in text and f"| {decode_steps} / " in text and "engine only" in text


def test_mamba_table_has_ratios_per_dtype_contexts_and_state_bytes():
    import bench_mamba

    def row(impl: str, dtype: str, scale: float) -> dict:
        rates = {"prefill_tok_s": 100.0, "decode_b1_tok_s": 5.0, "decode_b8_tok_s": 20.0}
        return {"impl": impl, "dtype": dtype, **{k: v * scale for k, v in rates.items()}, "weights_mib": 760}

    rows = [row("transformers", "float32", 1), row("falconlm", "float32", 4), row("transformers", "bfloat16", 1)]
    rows.append(row("falconlm", "bfloat16", 3) | {"decode_b8_tok_s": 120.0})
    result = {
        "shape": "200m",
        "parameters": 199_000_000,
        "threads": 2,
        "throughput": rows,
        "context_dtype": "bfloat16",
        "contexts": [128, 1536],
        "decode_ms_per_token": {"falcon-mamba": [40.0, 40.5], "falcon (bench-194m)": [30.0, 45.0]},
        "state_bytes_per_sequence": 20 * 2048 * (3 * 4 + 16 * 4),
        "falcon_kv_bytes_per_token": 12 * 2 * 64 * 4,
    }
    text = bench_mamba.render(result)
    assert "| float32 | ratio falconlm/transformers | 4.00x | 4.00x | 4.00x | |" in text
    assert "| bfloat16 | ratio falconlm/transformers | 3.00x | 3.00x | 6.00x | |" in text
    assert "| bfloat16 | falconlm | 300 | 15.0 | 120.0 | 760 |" in text
    assert "| falcon-mamba | 40.00 | 40.50 |" in text
    assert "Falcon-Mamba 2.97 MiB at any context" in text and "9.00 MiB at 1536" in text
    assert 1.9e8 < bench_mamba_parameters() < 2.1e8


def bench_mamba_parameters() -> int:
    import bench_mamba

    from falconlm.model.mamba_config import FalconMambaConfig

    return FalconMambaConfig(**bench_mamba.SHAPES["200m"], expand=2, conv_kernel=4).num_parameters()
