"""Falcon3 (the Llama layout) against transformers' LlamaForCausalLM, its judge, on tiny random checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from falconlm import FalconForCausalLM
from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.sampling_params import SamplingParams
from falconlm.model.checkpoint import CheckpointError
from falconlm.model.falcon3 import Falcon3ForCausalLM
from falconlm.model.falcon3_config import Falcon3Config
from falconlm.model.families import load_config
from falconlm.tokenizer import Tokenizer

from ..oracle import assert_greedy_agrees
from .falcon3_checkpoint import FIXTURES, VARIANTS, copy_checkpoint, make_falcon3_checkpoint
from .last_layer import last_layer_skip_case


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    variant = request.param
    return variant, make_falcon3_checkpoint(tmp_path_factory.mktemp(f"falcon3-{variant}"), variant)


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory) -> Path:
    return make_falcon3_checkpoint(tmp_path_factory.mktemp("falcon3-gqa"), "gqa")


def _reference(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()


def _ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_float32_logits_match_transformers(checkpoint):
    variant, path = checkpoint
    ours = FalconForCausalLM.from_pretrained(path)  # the family comes from config.json
    assert isinstance(ours, Falcon3ForCausalLM)
    ids = _ids(ours.config.vocab_size, (2, 40), seed=0)  # 40 positions: past max_position_embeddings when scaled
    diff = (ours(ids) - _reference(path)(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max |logit diff| {diff}"


def test_last_token_logits_match_transformers(checkpoint):
    """``last_token_only`` runs the last layer's attention output and MLP for each row's last token alone."""
    variant, path = checkpoint
    ours = FalconForCausalLM.from_pretrained(path)
    ids = _ids(ours.config.vocab_size, (2, 12), seed=1)
    logits = ours(ids, last_token_only=True)
    assert logits.shape == (2, 1, ours.config.vocab_size)
    diff = (logits - _reference(path)(ids).logits[:, -1:]).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max |logit diff| {diff}"


def test_the_last_layer_runs_only_the_rows_whose_output_is_read(gqa_checkpoint):
    model = FalconForCausalLM.from_pretrained(gqa_checkpoint)
    last_layer_skip_case(model, model.model.layers, "mlp.down_proj")


def test_head_is_tied_only_when_the_config_says_so(checkpoint):
    variant, path = checkpoint
    ours = Falcon3ForCausalLM.from_pretrained(path)
    tied = ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert tied == VARIANTS[variant].get("tie_word_embeddings", False) == ours.config.tie_word_embeddings
    assert ours.num_parameters() == ours.config.num_parameters()


def test_padded_batch_matches_transformers(gqa_checkpoint):
    ours, ref = Falcon3ForCausalLM.from_pretrained(gqa_checkpoint), _reference(gqa_checkpoint)
    ids = _ids(ours.config.vocab_size, (3, 11), seed=1)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for row, n in enumerate([11, 7, 4]):
        mask[row, 11 - n :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    expected = ref(ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4


def test_cached_decoding_equals_full_forward(gqa_checkpoint):
    ours = Falcon3ForCausalLM.from_pretrained(gqa_checkpoint)
    ids = _ids(ours.config.vocab_size, (2, 12), seed=2)
    full = ours(ids)
    cache = ours.new_kv_cache(2, 12)
    pieces = [ours(ids[:, :5], kv_cache=cache)]
    pieces += [ours(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 12)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4
    # The cache holds the two KV heads only, never a copy per query head (8 of them).
    assert cache.k.shape[2] == ours.config.num_key_value_heads == 2


# dynamic-rope: the engine hands the model each token's RoPE length (the context stays within its 16 positions).
@pytest.mark.parametrize("variant", ["gqa", "tied", "dynamic-rope"])
def test_greedy_generation_equals_transformers_generate(tmp_path, variant):
    path = make_falcon3_checkpoint(tmp_path, variant, seed=3)
    ours, ref = Falcon3ForCausalLM.from_pretrained(path), _reference(path)
    tok = Tokenizer.from_pretrained(path)
    prompt = tok.encode("Once upon a time" if variant == "dynamic-rope" else "Once upon a time there was a little fox")
    new = min(16, ours.config.max_position_embeddings - len(prompt))
    expected = ref.generate(
        torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    got = Engine(ours, tok).generate([prompt], [params])[0].token_ids
    assert got == expected


def test_bfloat16_engine_tokens_agree_with_transformers(gqa_checkpoint):
    """bfloat16 weights (the native matmul on CPU where it builds): greedy tokens equal transformers' bfloat16 ones,
    up to near-ties (``assert_greedy_agrees``)."""
    ours = Falcon3ForCausalLM.from_pretrained(gqa_checkpoint, dtype=torch.bfloat16)
    ref = LlamaForCausalLM.from_pretrained(gqa_checkpoint, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    tok = Tokenizer.from_pretrained(gqa_checkpoint)
    prompt = tok.encode("Once upon a time there was a little fox")
    got = Engine(ours, tok).generate([prompt], [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)])
    got = got[0].token_ids
    expected = (
        ref.eval()
        .generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ]
        .tolist()
    )
    assert_greedy_agrees(got, expected, prompt, ours, lambda ids: ref(ids).logits)


def test_batched_requests_each_equal_their_request_alone(gqa_checkpoint):
    """Continuous batching with chunked prefill (a 24-token step budget) and prefix caching (two prompts share a
    20-token prefix): each request gets the tokens it gets alone."""
    model = Falcon3ForCausalLM.from_pretrained(gqa_checkpoint)
    tok = Tokenizer.from_pretrained(gqa_checkpoint)
    shared = tok.encode("One day she met a big bear. The bear said hello")[:20]
    prompts = [shared + tok.encode(" and they"), tok.encode("Numbers like 123"), shared + tok.encode(" to the river")]
    prompts.append(tok.encode("Every day the fox ran to the river to drink water and look at the fish. One day"))
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 5, 12, 7)]
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=24, block_size=4, enable_prefix_caching=True)
    engine = Engine(model, tok, config)
    together = [out.token_ids for out in engine.generate(prompts, params)]
    assert engine.stats().num_prefix_hit_tokens > 0  # the shared prefix was reused
    for prompt, p, got in zip(prompts, params, together, strict=True):
        alone = Engine(model, tok, EngineConfig(max_num_seqs=1, enable_prefix_caching=False)).generate([prompt], [p])
        assert got == alone[0].token_ids


def test_saved_checkpoint_loads_in_transformers(gqa_checkpoint, tmp_path):
    ours = Falcon3ForCausalLM.from_pretrained(gqa_checkpoint)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForCausalLM"]
    ids = _ids(ours.config.vocab_size, (1, 9), seed=4)
    assert (_reference(tmp_path)(ids).logits - ours(ids)).abs().max().item() <= 1e-5


# ---- loading errors: the same as Falcon's ------------------------------------------------------------------------
def _edit_weights(folder: Path, edit) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
        (lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)), "unexpected tensor model.layers.0"),
        (
            lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)),
            "shape mismatch for model.layers.0.self_attn.k_proj.weight: expected (32, 64)",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_loader_reports_bad_tensors(gqa_checkpoint, tmp_path, edit, message):
    folder = copy_checkpoint(gqa_checkpoint, tmp_path / "bad")
    _edit_weights(folder, edit)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Falcon3ForCausalLM.from_pretrained(folder)


def test_from_pretrained_of_the_wrong_family_says_so(tiny_checkpoint):
    with pytest.raises(ValueError, match="FalconForCausalLM checkpoint, not a Falcon3 one"):
        Falcon3ForCausalLM.from_pretrained(tiny_checkpoint)


# ---- the published configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "layers", "parameters", "kv_bytes"),
    [
        # bfloat16 KV bytes per token: 2 (K, V) x 4 KV heads x 256 x layers x 2 bytes
        ("falcon3-1b-instruct", 18, 1_669_408_768, 2 * 4 * 256 * 18 * 2),
        ("falcon3-7b-base", 28, 7_455_550_464, 2 * 4 * 256 * 28 * 2),
    ],
)
def test_published_configs_load(name, layers, parameters, kv_bytes):
    config = load_config(FIXTURES / f"{name}.config.json")
    assert isinstance(config, Falcon3Config)
    assert (config.num_hidden_layers, config.head_dim, config.num_kv_groups) == (layers, 256, 4)
    assert config.rope_theta == 1000042 and config.rope_scaling is None and not config.tie_word_embeddings
    assert config.kv_cache_bytes_per_token(2) == kv_bytes
    with torch.device("meta"):
        model = Falcon3ForCausalLM(config)
    assert config.num_parameters() == model.num_parameters() == parameters


def test_config_round_trips_through_transformers():
    from transformers import LlamaConfig

    config = load_config(FIXTURES / "falcon3-7b-base.config.json")
    hf = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    assert (hf.head_dim, hf.num_key_value_heads, hf.intermediate_size) == (256, 4, 23040)
    back = Falcon3Config.from_dict(hf.to_dict())
    assert dataclasses.replace(back, extra={}) == dataclasses.replace(config, extra={})  # extra: HF's own keys


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"head_dim": 7}, "head_dim"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
    ],
)
def test_bad_configs_name_their_field(change, field):
    raw = {**json.loads((FIXTURES / "falcon3-1b-instruct.config.json").read_text()), **change}
    with pytest.raises(ValueError, match=field):
        Falcon3Config.from_dict(raw)
