"""A Falcon3 checkpoint through every front end: LLM, the HTTP server, batch jobs, `falconlm info`, quantization."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from falconlm import LLM, FalconForCausalLM
from falconlm.batch.execute import RequestExecutor
from falconlm.batch.records import PendingRequest
from falconlm.cli import main
from falconlm.engine.async_engine import AsyncEngine
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.sampling_params import SamplingParams
from falconlm.model.falcon3 import Falcon3ForCausalLM
from falconlm.quant import load_quantized
from falconlm.quant.linear import QuantizedEmbedding, QuantizedLinear
from falconlm.server import ServerSettings
from falconlm.tokenizer import Tokenizer

from ..server.conftest import LiveServer
from .falcon3_checkpoint import make_falcon3_checkpoint

MODEL = "tiny-falcon3"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the fox."}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_falcon3_checkpoint(tmp_path_factory.mktemp("falcon3"), "gqa", seed=5)


def test_chat_template_renders_falcon3_turns_with_special_tokens_whole(checkpoint):
    tok = Tokenizer.from_pretrained(checkpoint)
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nTell me about the fox.\n<|assistant|>\n"
    ids = tok.encode(prompt)
    markers = [tok.token_to_id(m) for m in ("<|system|>", "<|user|>", "<|assistant|>")]
    assert [i for i in ids if i in markers] == markers  # each marker one special token, in order
    history = [*CHAT, {"role": "assistant", "content": "It runs."}, {"role": "user", "content": "Where?"}]
    assert "<|assistant|>\nIt runs.<|endoftext|>\n<|user|>\nWhere?\n" in tok.apply_chat_template(history)


def test_offline_llm_generates_and_chats(checkpoint):
    llm = LLM(model=checkpoint, dtype="float32", max_num_seqs=2)
    assert isinstance(llm.engine.model, Falcon3ForCausalLM)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    (out,) = llm.generate("Once upon a time", params)
    assert len(out.outputs[0].token_ids) == 6 and isinstance(out.outputs[0].text, str)
    (chat,) = llm.generate(llm.chat_prompt(CHAT), params)
    assert llm.tokenizer.token_to_id("<|assistant|>") in chat.prompt_token_ids
    assert len(chat.outputs[0].token_ids) == 6


def test_offline_llm_quantizes_on_load(checkpoint):
    llm = LLM(model=checkpoint, dtype="float32", max_num_seqs=2, quantize="int8")
    assert isinstance(llm.engine.model.lm_head, QuantizedLinear)
    (out,) = llm.generate(llm.chat_prompt(CHAT), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_info_names_the_family_and_whether_decode_is_fused(checkpoint, tmp_path, capsys):
    assert main(["info", "--model", str(checkpoint), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"] == "Falcon3 (Llama layout)" and "grouped-query" in facts["variant"]
    assert facts["kv_groups"] == 2 and facts["head_dim"] == 16 and facts["layers"] == 2
    assert facts["positions"] == "RoPE theta=1000042"  # Falcon3's theta, not rounded to 1.00004e+06
    assert facts["kv_cache_bytes_per_token"] == 2 * 2 * 16 * 2 * 4  # K and V, 2 KV heads, 2 layers, float32
    assert facts["fused_decode_step"].startswith("no (head_dim 16")  # the kernel's blocks take multiples of 32
    assert facts["parameters"] == Falcon3ForCausalLM.from_pretrained(checkpoint).num_parameters()
    wide = make_falcon3_checkpoint(tmp_path, "gqa", num_attention_heads=4, head_dim=32)
    assert main(["info", "--model", str(wide), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fused_decode_step"].startswith("yes")


@pytest.fixture(scope="module")
def server(checkpoint) -> LiveServer:
    engine = Engine(Falcon3ForCausalLM.from_pretrained(checkpoint), Tokenizer.from_pretrained(checkpoint))
    live = LiveServer(AsyncEngine(engine), ServerSettings(served_model_names=(MODEL,))).start()
    yield live
    live.stop()


def test_server_completions_and_chat(server):
    with server.http() as client:
        completion = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
        )
        chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 4})
    assert completion.status_code == 200, completion.text
    assert 1 <= completion.json()["usage"]["completion_tokens"] <= 5
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"


def test_batch_job_lines(checkpoint):
    model = Falcon3ForCausalLM.from_pretrained(checkpoint)
    engine = AsyncEngine(Engine(model, Tokenizer.from_pretrained(checkpoint), EngineConfig(max_num_seqs=2)))
    engine.start()
    try:
        executor = RequestExecutor(engine, ServerSettings(served_model_names=(MODEL,)))
        body = {"model": MODEL, "prompt": "The bear", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        done = asyncio.run(executor.execute(PendingRequest("a", 1, "/v1/completions", json.dumps(body))))
        chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
        chatted = asyncio.run(executor.execute(PendingRequest("c", 1, "/v1/chat/completions", json.dumps(chat))))
    finally:
        engine.shutdown(5.0)
    assert done.status == "done" and done.completion_tokens == 3
    assert json.loads(chatted.line)["response"]["body"]["object"] == "chat.completion"


# ---- quantization ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quantize_on_load_swaps_every_matrix_for_its_quantized_form(checkpoint, spec):
    # The reference kernel computes with the dequantized matrix (the CPU one also rounds the activations).
    quantized = load_quantized(checkpoint, quantize=spec, kernel="reference")
    assert isinstance(quantized, Falcon3ForCausalLM)
    swapped = {n: m for n, m in quantized.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in swapped if n.startswith("model.layers.")} == per_layer
    assert len(swapped) == 2 * len(per_layer) + 2  # every layer matrix, the embedding and the untied head
    # The same model with each matrix replaced by its dequantized form computes the same logits.
    dequantized = Falcon3ForCausalLM.from_pretrained(checkpoint)
    for name, module in swapped.items():
        dequantized.get_submodule(name).weight.data.copy_(module.weight)
    ids = torch.randint(0, dequantized.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, got = dequantized(ids), quantized(ids)
    assert (got - ref).abs().max().item() <= 1e-5
    plain = Falcon3ForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        assert not torch.equal(plain(ids), got)  # and it is quantized


@pytest.fixture(scope="module")
def quantized_folder(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("falcon3-q") / "int4"
    assert main(["quantize", "--model", str(checkpoint), "--out", str(out), "--bits", "4", "--group-size", "32"]) == 0
    return out


def test_quantize_cli_writes_llama_names(quantized_folder):
    config = json.loads((quantized_folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["bits"] == 4
    assert set(config["quantization_config"]["modules"]) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "embed_tokens", "lm_head",
    }  # fmt: skip


def test_quantized_falcon3_serves_valid_completions(quantized_folder):
    model = FalconForCausalLM.from_pretrained(quantized_folder)
    assert isinstance(model, Falcon3ForCausalLM)
    engine = Engine(model, Tokenizer.from_pretrained(quantized_folder), EngineConfig(max_num_seqs=4))
    live = LiveServer(AsyncEngine(engine), ServerSettings(served_model_names=("falcon3-int4",))).start()
    try:
        with live.http() as client:
            body = {"model": "falcon3-int4", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            chat = client.post("/v1/chat/completions", json={"model": "falcon3-int4", "messages": CHAT})
    finally:
        live.stop()
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert 1 <= response.json()["usage"]["completion_tokens"] <= 6
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_hub_gptq_falcon3_checkpoint_loads_to_the_weights_it_stores(checkpoint, tmp_path, monkeypatch):
    """An AutoGPTQ-packed Falcon3 (as tiiuae's -GPTQ-Int4 repos ship): every Llama matrix converts."""
    from ..quant import test_gptq_checkpoint as gptq

    kinds = tuple(Falcon3ForCausalLM.from_pretrained(checkpoint).config.matrix_shapes())
    monkeypatch.setattr(gptq, "BODY_KINDS", kinds)  # the writer quantizes these matrices
    expected = gptq.write_gptq_checkpoint(checkpoint, tmp_path / "gptq")
    assert len(expected) == 2 * len(kinds)
    exact = load_quantized(tmp_path / "gptq", kernel="reference")
    assert isinstance(exact, Falcon3ForCausalLM)
    for module, weight in expected.items():
        torch.testing.assert_close(exact.get_submodule(module).weight, weight, rtol=1e-6, atol=1e-7)


def test_gptq_calibration_refuses_falcon3_with_one_clear_error(checkpoint, tmp_path):
    from falconlm.quant import QuantRecipe, quantize_checkpoint

    calibration = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="GPTQ calibration runs on Falcon's block only; quantize Falcon3"):
        quantize_checkpoint(checkpoint, tmp_path / "q", QuantRecipe(bits=4, method="gptq"), calibration=calibration)
    assert not (tmp_path / "q").exists()  # refused before writing anything


def test_serve_checks_a_falcon3_context_length_before_starting(checkpoint, capsys):
    assert main(["serve", "--model", str(checkpoint), "--max-model-len", "4096"]) == 2
    err = capsys.readouterr().err
    assert "max_model_len 4096 is longer than the model supports (128 tokens" in err and len(err.splitlines()) == 1
