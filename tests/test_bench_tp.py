"""benchmarks/bench_tp.py on a tiny checkpoint: both rank counts run under torchrun and the table comes out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from falconlm.model.config import FalconConfig
from falconlm.model.falcon import FalconForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_tp  # noqa: E402


def test_table_counts_tokens_equal_to_the_first_row():
    rows = [
        {"ranks": 1, "threads_per_rank": 2, "device": "cpu", "prefill_tok_s": 100.0, "decode_b1_tok_s": 10.0,
         "decode_b8_tok_s": 40.0, "peak_mib_per_rank": [900.0], "tokens_b1": [1, 2, 3, 4]},
        {"ranks": 2, "threads_per_rank": 1, "device": "cpu", "prefill_tok_s": 150.0, "decode_b1_tok_s": 12.5,
         "decode_b8_tok_s": 50.0, "peak_mib_per_rank": [500.0, 480.0], "tokens_b1": [1, 2, 9, 4]},
    ]  # fmt: skip
    text = bench_tp.render(rows, "tiny", threads=2, prefill=512)
    assert "2 threads in total" in text and "prefill 512 tok/s" in text
    assert "| 1 x 2 | 100 | 10.0 | 40.0 | 900 | 4/4 |" in text
    assert "| 2 x 1 | 150 | 12.5 | 50.0 | 500 / 480 | 3/4 |" in text


@pytest.mark.slow
def test_bench_tp_runs_one_and_two_ranks_on_a_tiny_model(tmp_path):
    config = FalconConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = FalconForCausalLM(config)
    model.init_weights(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_tp.py"), "--model", str(tmp_path / "tiny")]
    cmd += ["--dtype", "float32", "--prefill", "8", "--new-tokens", "4", "--repeats", "1", "--timeout", "120"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 x 2") or line.startswith("| 2 x 1")]
    assert len(rows) == 2, done.stdout
    assert rows[1].endswith("| 4/4 |"), done.stdout  # float32: 2 ranks pick the same greedy tokens as 1
    assert len(rows[1].split("|")[5].split("/")) == 2  # a peak RSS for each of the 2 ranks


def test_bad_rank_count_is_one_line(capsys):
    with pytest.raises(SystemExit, match="--ranks"):
        bench_tp.main(["--ranks", "4", "--threads", "2", "--model", "."])


@pytest.mark.slow
def test_tp_parity_passes_on_two_cpu_ranks(tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*launch, str(REPO_ROOT / "benchmarks" / "tp_parity.py"), "--out", str(tmp_path), "--steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "max |logit diff|" in line]
    assert len(lines) == 2 and all(line.startswith("ok ") and "greedy tokens equal" in line for line in lines)


def test_gpu_script_fails_fast_without_a_gpu():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_tp.sh")], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "needs at least one NVIDIA GPU" in done.stderr


def test_tp_plan_figures_follow_the_architecture(tmp_path):
    import tp_plan

    spec = [tp_plan.load_shape(name, tmp_path) for name in tp_plan.MODELS]  # no config files: the fallback
    assert all("no config file" in s.source for s in spec)
    if tp_plan.CONFIG_DIR.is_dir():  # the real configs agree with the fallback numbers
        real = [tp_plan.load_shape(name, tp_plan.CONFIG_DIR) for name in tp_plan.MODELS]
        assert [(r.hidden, r.layers, r.heads, r.kv_groups, r.vocab, r.ffn) for r in real] == [
            (s.hidden, s.layers, s.heads, s.kv_groups, s.vocab, s.ffn) for s in spec
        ]
    f40, f180 = spec
    assert 40e9 < f40.params < 42e9 and 175e9 < f180.params < 182e9
    plan = tp_plan.Plan(f40, "bf16", 8)
    matrices = (128 + 2 * 8) * 64 * 8192 + 8192 * 8192 + 2 * 8192 * 32768
    assert plan.layer_bytes() == 2 * matrices + 2 * (2 * 2 * 8192)  # two LayerNorms of weight + bias
    assert plan.kv_bytes_per_token() == 60 * 2 * 1 * 64 * 2  # one KV group per GPU: 15 KiB
    assert tp_plan.Plan(f180, "bf16", 8).kv_bytes_per_token() == 80 * 2 * 1 * 64 * 2
    assert tp_plan.Plan(f40, "int4", 8).gpu_bytes() < plan.gpu_bytes() / 3
    one = tp_plan.Plan(f40, "bf16", 1)  # 1 GPU: no collectives, only the bytes streamed
    assert one.decode_tok_s(1, 0, 1e12, 1e9, 1.0) == pytest.approx(1e12 / one.gpu_bytes())
    assert plan.decode_tok_s(1, 0, 1e12, 1e12, 1e-5) < 1e12 / plan.gpu_bytes()  # collectives cost time


def test_tp_plan_prints_its_table(capsys):
    import tp_plan

    tp_plan.main(["--gpus", "8"])
    out = capsys.readouterr().out
    assert out.startswith("COMPUTED, not measured")
    assert sum(line.startswith("| falcon-") for line in out.splitlines()) == 8
