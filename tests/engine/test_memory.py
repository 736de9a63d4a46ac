"""KV-pool sizing: capped by the free memory, refused when one full context does not fit, and context lengths
beyond the model's refused unless RoPE scaling stretches them."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from falconlm.cli import main
from falconlm.engine import engine as engine_module
from falconlm.engine import memory
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.memory import check_max_model_len, context_limit, kv_cache_blocks
from falconlm.model.config import RopeScaling, preset
from falconlm.model.falcon import FalconForCausalLM
from falconlm.tokenizer import Tokenizer

CPU = torch.device("cpu")
BLOCK = 4096  # bytes per block in these tests


def free_bytes(monkeypatch, amount: int) -> None:
    monkeypatch.setattr(memory, "free_memory", lambda device: amount)


def test_kv_pool_is_capped_by_the_free_memory(monkeypatch):
    free_bytes(monkeypatch, 100 * BLOCK)  # the default share (half, on CPU) holds 50 blocks
    assert kv_cache_blocks(BLOCK, 16, 16, 128, None, CPU) == 50  # not 16 seqs x 8 blocks
    free_bytes(monkeypatch, 10**12)
    assert kv_cache_blocks(BLOCK, 16, 16, 128, None, CPU) == 128  # max-num-seqs full contexts when they fit
    assert kv_cache_blocks(BLOCK, 16, 16, 128, 20 * BLOCK, CPU) == 20  # explicit bytes win


def test_max_seq_len_larger_than_the_kv_cache_can_hold_is_refused(monkeypatch):
    free_bytes(monkeypatch, 10 * BLOCK)  # 5 blocks of 16 tokens: less than one 128-token context
    with pytest.raises(ValueError, match=r"max seq len \(128\) is larger than the KV cache can hold \(80 tokens"):
        kv_cache_blocks(BLOCK, 16, 16, 128, None, CPU)
    with pytest.raises(ValueError, match="larger than the KV cache can hold"):
        kv_cache_blocks(BLOCK, 16, 16, 128, 7 * BLOCK, CPU)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/meminfo")
def test_free_memory_is_what_the_system_reports_as_available():
    with open("/proc/meminfo", encoding="ascii") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(memory.free_memory(CPU) - available) < 2**30


def test_max_model_len_beyond_the_model_is_refused_unless_rope_scaling_allows_it():
    plain = preset("tinystories-5m")  # 512 positions
    assert check_max_model_len(plain, None) == 512 and check_max_model_len(plain, 256) == 256
    with pytest.raises(ValueError, match="longer than the model supports"):
        check_max_model_len(plain, 513)
    with pytest.raises(ValueError, match="longer than the model supports"):
        check_max_model_len(plain, 1_000_000_000)
    linear = preset("tinystories-5m", rope_scaling=RopeScaling("linear", 4.0))
    assert context_limit(linear) == 2048 and check_max_model_len(linear, 2048) == 2048
    with pytest.raises(ValueError, match="2048 tokens, with its rope_scaling"):
        check_max_model_len(linear, 2049)
    dynamic = preset("tinystories-5m", rope_scaling=RopeScaling("dynamic", 2.0, 384))
    assert context_limit(dynamic) == 768


def test_huge_max_position_embeddings_is_refused_before_the_pool_is_allocated(tiny_checkpoint, monkeypatch):
    model = FalconForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    model.config.max_position_embeddings = 1_000_000_000
    free_bytes(monkeypatch, 8 * 2**30)
    allocated = []
    monkeypatch.setattr(engine_module, "ModelRunner", lambda *args: allocated.append(args))
    with pytest.raises(ValueError, match=r"max seq len \(1000000000\) is larger than the KV cache can hold"):
        Engine(model, Tokenizer.from_pretrained(tiny_checkpoint), EngineConfig())
    assert allocated == []


def test_max_model_len_1e9_is_one_line_exit_2(tiny_checkpoint, capsys):
    assert main(["serve", "--model", str(tiny_checkpoint), "--max-model-len", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert "longer than the model supports" in err and len(err.strip().splitlines()) == 1


def test_config_with_a_huge_context_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1_000_000_000}))
    free_bytes(monkeypatch, 8 * 2**30)
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"hi"}}\n')
    argv = ["batch", "run", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", str(model)]
    assert main([*argv, "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("falconlm batch: error: max seq len (1000000000) is larger than the KV cache can hold")
    assert not any("Traceback" in line for line in err)


def test_llm_refuses_a_max_model_len_beyond_the_model(tiny_checkpoint):
    from falconlm import LLM

    with pytest.raises(ValueError, match=r"max_model_len 1000000000 is longer than the model supports \(128 tokens"):
        LLM(tiny_checkpoint, dtype="float32", max_model_len=1_000_000_000)
    assert LLM(tiny_checkpoint, dtype="float32", max_model_len=64).engine.max_model_len == 64
