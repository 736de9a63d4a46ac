"""Checkpoint load and save against transformers' FalconForCausalLM: formats, dtypes, errors, peak memory."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FalconConfig as HFConfig
from transformers import FalconForCausalLM as HFModel

from falconlm.model import checkpoint
from falconlm.model.checkpoint import CheckpointError, load_model, save_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPES = {
    # 40b-style grouped-query, tied head.
    "tied": dict(new_decoder_architecture=True, num_kv_heads=2),
    # 7b-style multi-query with biases, untied head.
    "untied": dict(new_decoder_architecture=False, multi_query=True, bias=True, tie_word_embeddings=False),
}
FORMATS = {
    "safe": dict(safe_serialization=True),
    "safe-sharded": dict(safe_serialization=True, max_shard_size="50KB"),
    "bin": dict(safe_serialization=False),
    "bin-sharded": dict(safe_serialization=False, max_shard_size="50KB"),
}


def _hf_model(kind: str) -> HFModel:
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **SHAPES[kind])
    model = HFModel(cfg).eval()
    with torch.no_grad():  # random LayerNorms and biases too, so nothing passes by being 0 or 1
        for p in model.parameters():
            p.normal_()
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[HFModel, dict[str, Path]]]:
    """Per shape: the HF model and one saved folder per format."""
    out = {}
    for kind in SHAPES:
        model = _hf_model(kind)
        dirs = {}
        for fmt, kwargs in FORMATS.items():
            dirs[fmt] = tmp_path_factory.mktemp(f"{kind}-{fmt}")
            model.save_pretrained(dirs[fmt], **kwargs)
        out[kind] = (model, dirs)
    return out


def _assert_same(ours: torch.nn.Module, hf_model: HFModel, dtype: torch.dtype = torch.float32) -> None:
    theirs, mine = hf_model.state_dict(), ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    for name, t in theirs.items():
        assert mine[name].dtype == dtype, name
        assert torch.equal(mine[name], t.to(dtype)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("kind", list(SHAPES))
def test_loads_every_format(hf, kind: str, fmt: str, dtype: torch.dtype) -> None:
    hf_model, dirs = hf[kind]
    if fmt.endswith("sharded"):
        assert len(list(dirs[fmt].glob("*-of-*"))) > 1
    model = load_model(dirs[fmt], dtype=dtype)
    _assert_same(model, hf_model, dtype)
    assert not model.training
    emb, head = model.transformer.word_embeddings.weight, model.lm_head.weight
    assert (head is emb) == (kind == "tied")


def test_small_chunks_and_bf16_source(hf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_model = _hf_model("untied")
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    hf_model.float()
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)  # every tensor crosses several chunk boundaries
    model = load_model(tmp_path, dtype=torch.float32)
    for name, t in hf_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], t.to(torch.bfloat16).float()), name


@pytest.mark.parametrize("shard", [None, 40_000])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_save_round_trip(hf, tmp_path: Path, kind: str, shard: int | None) -> None:
    hf_model, dirs = hf[kind]
    save_model(load_model(dirs["safe"]), tmp_path, max_shard_bytes=shard)
    files = sorted(p.name for p in tmp_path.glob("model*"))
    if shard is None:
        assert files == ["model.safetensors"]
        stored = set(load_file(tmp_path / "model.safetensors"))
    else:
        assert len(files) > 2 and "model.safetensors.index.json" in files
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        stored = set(index["weight_map"])
        assert set(index["weight_map"].values()) == {f for f in files if f.endswith("safetensors")}
        assert index["metadata"]["total_size"] == sum(t.nbytes for n, t in hf_model.state_dict().items() if n in stored)
    assert ("lm_head.weight" in stored) == (kind == "untied")
    _assert_same(load_model(tmp_path), hf_model)
    _assert_same(HFModel.from_pretrained(tmp_path), hf_model)
    save_model(load_model(tmp_path), tmp_path)  # re-saving single-file clears the old shards
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_save_bf16(hf, tmp_path: Path) -> None:
    hf_model, dirs = hf["untied"]
    save_model(load_model(dirs["bin-sharded"], dtype=torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_same(load_model(tmp_path, dtype=torch.bfloat16), hf_model, torch.bfloat16)
    _assert_same(HFModel.from_pretrained(tmp_path, dtype="auto"), hf_model, torch.bfloat16)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, edit) -> Path:
    """Rewrite a single-file safetensors checkpoint through ``edit(state_dict)``."""
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("size", [4, 20, 5000, -100])
def test_truncated_file(hf, tmp_path: Path, size: int) -> None:
    folder = _copy(hf["tied"][1]["safe"], tmp_path / "ckpt")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*truncated"):
        load_model(folder)


def test_corrupt_bin_and_missing_shard(hf, tmp_path: Path) -> None:
    folder = _copy(hf["tied"][1]["bin"], tmp_path / "bin")
    file = folder / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"cannot read {re.escape(str(file))}"):
        load_model(folder)
    folder = _copy(hf["tied"][1]["bin-sharded"], tmp_path / "bin-sharded")
    next(folder.glob("pytorch_model-*-of-*.bin")).unlink()
    with pytest.raises(CheckpointError, match=r"shard pytorch_model-\d+-of-\d+\.bin listed in .* is missing"):
        load_model(folder)


def test_corrupt_header(hf, tmp_path: Path) -> None:
    folder = _copy(hf["tied"][1]["safe"], tmp_path / "ckpt")
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8] = ord("x")  # the header's opening brace
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*corrupt"):
        load_model(folder)


def test_wrong_byte_count(hf, tmp_path: Path) -> None:
    folder = _copy(hf["tied"][1]["safe"], tmp_path / "ckpt")
    file = folder / "model.safetensors"
    header = json.dumps({"transformer.ln_f.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 128]}})
    file.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(256))
    with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*transformer.ln_f.weight has 128 bytes"):
        load_model(folder)


def test_missing_tensor(hf, tmp_path: Path) -> None:
    name = "transformer.h.1.mlp.dense_4h_to_h.weight"
    folder = _edit(_copy(hf["tied"][1]["safe"], tmp_path / "ckpt"), lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor {re.escape(name)} in .*model.safetensors"):
        load_model(folder)


def test_missing_tensor_in_index(hf, tmp_path: Path) -> None:
    folder = _copy(hf["untied"][1]["safe-sharded"], tmp_path / "ckpt")
    index = folder / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    del raw["weight_map"]["lm_head.weight"]
    index.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"missing tensor lm_head\.weight in .*index\.json"):
        load_model(folder)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_unexpected_tensor(hf, tmp_path: Path, kind: str) -> None:
    name = "transformer.h.0.extra.weight"
    folder = _edit(_copy(hf[kind][1]["safe"], tmp_path / "ckpt"), lambda sd: sd.update({name: torch.ones(3)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {re.escape(name)} in .*model.safetensors"):
        load_model(folder)


def test_wrong_shape(hf, tmp_path: Path) -> None:
    name = "transformer.word_embeddings.weight"
    folder = _edit(_copy(hf["tied"][1]["safe"], tmp_path / "ckpt"), lambda sd: sd.update({name: sd[name][:127]}))
    with pytest.raises(
        CheckpointError, match=re.escape(f"shape mismatch for {name}: expected (128, 64), got (127, 64)")
    ):
        load_model(folder)


def test_no_config_or_weights(hf, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"no config.json in {tmp_path}")):
        load_model(tmp_path)
    shutil.copy(hf["tied"][1]["safe"] / "config.json", tmp_path)
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"no weights (model.safetensors or pytorch_model.bin, or their index) in {tmp_path}"),
    ):
        load_model(tmp_path)


def test_ignorable_tensors_and_tied_head(hf, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf_model, dirs = hf["tied"]
    folder = _copy(dirs["safe"], tmp_path / "ckpt")

    def add(sd: dict[str, torch.Tensor]) -> None:
        sd["transformer.h.0.self_attention.rotary_emb.inv_freq"] = torch.ones(8)
        sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()

    _edit(folder, add)
    with caplog.at_level(logging.WARNING):
        _assert_same(load_model(folder), hf_model)
    assert "differs" not in caplog.text
    _edit(folder, lambda sd: sd.update({"lm_head.weight": torch.zeros(128, 64)}))
    with caplog.at_level(logging.WARNING):
        _assert_same(load_model(folder), hf_model)  # the embedding wins
    assert "lm_head.weight" in caplog.text and "differs" in caplog.text


def test_prefers_safetensors_and_progress(hf, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf_model, dirs = hf["tied"]
    folder = _copy(dirs["safe-sharded"], tmp_path / "ckpt")
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    _assert_same(load_model(folder, progress=True), hf_model)
    assert "shard 8/8" in capsys.readouterr().err
    load_model(folder, progress=False)
    assert capsys.readouterr().err == ""


PEAK_SCRIPT = """
import json, sys, torch
from falconlm.model.checkpoint import load_model

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

before = status("VmRSS:")
model = load_model(sys.argv[1], dtype=torch.bfloat16)
peak = status("VmHWM:")
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "size": size}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmRSS/VmHWM")
def test_peak_memory_fp32_to_bf16(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    make = """
        import sys, torch
        from falconlm.model.config import preset
        from falconlm.model.falcon import FalconForCausalLM
        torch.manual_seed(0)
        FalconForCausalLM(preset("bench-194m", num_hidden_layers=2)).save_pretrained(sys.argv[1])
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(make), str(tmp_path)], check=True, env=env)
    assert (tmp_path / "model.safetensors").stat().st_size > 300e6  # fp32 on disk
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ratio = (result["peak"] - result["before"]) / result["size"]
    print(f"peak load memory: {ratio:.3f}x the bf16 model ({result['size'] / 1e6:.0f} MB)")
    assert ratio <= 1.3
