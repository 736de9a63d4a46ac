"""Falcon-Mamba through the front ends: LLM, quantized (int8 / int4 on the mixer matrices) on load, and the HTTP
server with its metrics."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from falconlm.default_model import default_model_path
from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.factory import EngineArgs, build_engine
from falconlm.engine.sampling_params import SamplingParams
from falconlm.llm import LLM
from falconlm.model.falcon_mamba import FalconMambaForCausalLM
from falconlm.model.formats import load_pretrained
from falconlm.quant.linear import QuantizedLinear
from falconlm.server import ServerSettings
from tests.oracle import uncached_greedy
from tests.server.conftest import LiveServer

from .mamba_checkpoints import save_hf_mamba


@pytest.fixture(scope="module")
def mamba_folder(tmp_path_factory):
    """A random Falcon-Mamba with the embedded model's tokenizer (vocabulary 4096, eos 11)."""
    folder = tmp_path_factory.mktemp("mamba-tok")
    save_hf_mamba(folder, vocab_size=4096, hidden_size=64, eos_token_id=11, bos_token_id=11, pad_token_id=11)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, folder / name)
    return folder


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_mamba_generates_its_own_greedy_tokens(mamba_folder, quantize):
    plain = load_pretrained(mamba_folder, torch.float32, "cpu")
    model = load_pretrained(mamba_folder, torch.float32, "cpu", quantize)
    assert isinstance(model, FalconMambaForCausalLM)
    mixer = model.backbone.layers[0].mixer
    assert all(isinstance(getattr(mixer, n), QuantizedLinear) for n in ("in_proj", "x_proj", "out_proj"))
    assert isinstance(mixer.dt_proj, torch.nn.Linear) and not isinstance(mixer.dt_proj, QuantizedLinear)
    ids = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(model(ids).flatten(), plain(ids).flatten(), dim=0)
    assert cosine > (0.999 if quantize == "int8" else 0.95), float(cosine)
    llm = LLM(mamba_folder, dtype="float32", quantize=quantize, max_num_seqs=4)
    prompt = llm.tokenizer.encode("The state of the art")
    out = llm.engine.generate([prompt], [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)])[0]
    assert out.token_ids == uncached_greedy(model, prompt, 6)
    assert isinstance(out.text, str) and out.finish_reason == "length"


def test_llm_text_in_text_out(mamba_folder):
    llm = LLM(mamba_folder, dtype="float32", max_num_seqs=2)
    outs = llm.generate(["Hello there", "A much longer prompt about state space models"], SamplingParams(max_tokens=5))
    assert len(outs) == 2 and all(len(o.outputs[0].token_ids) <= 5 for o in outs)


def test_server_serves_completions_and_reports_prefix_cache_off(mamba_folder):
    engine = AsyncEngine(build_engine(EngineArgs(model=mamba_folder, dtype="float32", quantize="int8", max_num_seqs=3)))
    engine.start()
    assert engine.wait_ready(30)
    server = LiveServer(engine, ServerSettings(served_model_names=("mamba",))).start()
    try:
        body = {"model": "mamba", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        replies = [httpx.post(f"{server.url}/v1/completions", json=body, timeout=60) for _ in range(2)]
        for reply in replies:
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
        assert replies[0].json()["choices"][0]["text"] == replies[1].json()["choices"][0]["text"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert "falconlm_prefix_cache_enabled 0.0" in metrics
        assert "falconlm_state_slots_total 3.0" in metrics
    finally:
        server.stop()
        engine.shutdown(timeout=1)


def test_quantized_checkpoint_written_and_served(mamba_folder, tmp_path):
    from falconlm.quant import QuantRecipe, quantize_checkpoint

    out = tmp_path / "mamba-int4"
    quantize_checkpoint(mamba_folder, out, QuantRecipe.parse("int4"))
    on_load = load_pretrained(mamba_folder, torch.float32, "cpu", "int4")
    stored = load_pretrained(out, torch.float32, "cpu")
    assert isinstance(stored.backbone.layers[1].mixer.out_proj, QuantizedLinear)
    ids = torch.randint(0, 4096, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(stored(ids), on_load(ids))
    llm = LLM(out, dtype="float32", max_num_seqs=2)
    text = llm.generate(["Stored and served"], SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0].text
    assert isinstance(text, str)


def test_batch_job_lines(mamba_folder):
    import asyncio
    import json

    from falconlm.batch.execute import RequestExecutor
    from falconlm.batch.records import PendingRequest

    engine = AsyncEngine(build_engine(EngineArgs(model=mamba_folder, dtype="float32", max_num_seqs=2)))
    engine.start()
    try:
        executor = RequestExecutor(engine, ServerSettings(served_model_names=("mamba",)))
        lines = []
        for i, prompt in enumerate(["The bear", "A longer line about the river and the hills"]):
            body = {"model": "mamba", "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
            lines.append(asyncio.run(executor.execute(PendingRequest(f"l{i}", 1, "/v1/completions", json.dumps(body)))))
    finally:
        engine.shutdown(5.0)
    assert [(line.status, line.completion_tokens) for line in lines] == [("done", 3), ("done", 3)]
