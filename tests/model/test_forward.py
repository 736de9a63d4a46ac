"""One model forward for both callers: the HF-style call is ``forward_hidden`` + ``compute_logits`` with a dense
attention context, and the engine's paged context through the same forward gives the same logits."""

from __future__ import annotations

import pytest
import torch

from falconlm import FalconForCausalLM
from falconlm.model.dense import KVCache, build_dense_attention
from falconlm.model.paged_attention import PagedKVCache

from .last_layer import last_layer_skip_case, padded_prompts
from .paged_step import paged_step


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_hf_call_equals_forward_hidden_and_compute_logits(hf_checkpoint):
    variant, path = hf_checkpoint
    model = FalconForCausalLM.from_pretrained(path)
    cfg = model.config
    ids, mask, positions = padded_prompts(cfg.vocab_size)
    cache, twin = model.new_kv_cache(3, 10), KVCache(cfg, 3, 10, torch.float32)
    prompt_logits = model(ids, attention_mask=mask, kv_cache=cache)
    ctx = build_dense_attention(cfg, 9, mask, twin, torch.float32, ids.device, 3)
    assert torch.equal(prompt_logits, model.compute_logits(model.forward_hidden(ids, positions, ctx))), variant
    assert cache.length == 9
    twin.length = 9  # forward_hidden leaves the count to its caller
    step, step_mask = ids[:, -1:] + 1, torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    step_logits = model(step, attention_mask=step_mask, kv_cache=cache, last_token_only=True)
    ctx = build_dense_attention(cfg, 1, step_mask, twin, torch.float32, ids.device, 3)
    hidden = model.forward_hidden(step, positions[:, -1:] + 1, ctx)
    assert torch.equal(step_logits, model.compute_logits(hidden)), variant
    assert torch.equal(cache.k, twin.k) and cache.length == 10


def test_the_last_layer_runs_only_the_rows_whose_output_is_read(hf_checkpoint):
    _, path = hf_checkpoint
    model = FalconForCausalLM.from_pretrained(path)
    last_layer_skip_case(model, model.transformer.h, "mlp.dense_h_to_4h")


def test_compute_logits_rows_are_rows_of_the_flattened_states(tiny_checkpoint):
    model = FalconForCausalLM.from_pretrained(tiny_checkpoint)
    hidden = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([4, 9, 0])
    full = model.compute_logits(hidden)
    assert full.shape == (2, 5, model.config.vocab_size)
    picked = model.compute_logits(hidden, rows)
    assert picked.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(picked, full.reshape(10, -1)[rows])


def test_paged_context_through_the_same_forward_matches_the_hf_call(hf_checkpoint):
    """Two prompts flattened into one step over a paged cache, then a decode step of both: the logits of each
    row's last token equal the HF-style call on that row alone."""
    variant, path = hf_checkpoint
    model = FalconForCausalLM.from_pretrained(path)
    cfg = model.config
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (7, 5)]
    tables = [[0, 1, 2], [3, 4, 5]]
    cache = PagedKVCache.allocate(cfg.num_hidden_layers, 6, 4, cfg.num_kv_groups, cfg.head_dim, torch.float32, "cpu")
    got = paged_step(model, cache, tables, prompts, [0, 0])
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(got[row], model(torch.tensor([prompt]))[0, -1], atol=1e-4, rtol=1e-4)
    following = [[int(got[row].argmax())] for row in range(2)]
    got = paged_step(model, cache, tables, following, [len(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        whole = torch.tensor([prompt + following[row]])
        torch.testing.assert_close(got[row], model(whole)[0, -1], atol=1e-4, rtol=1e-4, msg=variant)


def test_decode_rows_apart_in_a_step_with_a_prompt_chunk_match_the_hf_call(hf_checkpoint):
    """A step whose decode rows are not side by side (rows 0 and 2 decode, row 1 adds a chunk of 3): each row's
    last logits still equal the HF-style call on that row alone."""
    variant, path = hf_checkpoint
    model = FalconForCausalLM.from_pretrained(path)
    cfg = model.config
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (6, 4, 9)]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    cache = PagedKVCache.allocate(cfg.num_hidden_layers, 9, 4, cfg.num_kv_groups, cfg.head_dim, torch.float32, "cpu")
    paged_step(model, cache, tables, prompts, [0, 0, 0])
    added = [[11], [12, 13, 14], [15]]
    got = paged_step(model, cache, tables, added, [len(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        whole = torch.tensor([prompt + added[row]])
        torch.testing.assert_close(got[row], model(whole)[0, -1], atol=1e-4, rtol=1e-4, msg=variant)


def test_grouped_decode_attention_takes_any_layout_sdpa_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's SDPA kernels return [B, G, heads per group, d] in another memory layout than the CPU's (a view of
    a transposed buffer): the grouped decode path must still give every head its own row."""
    import torch.nn.functional as F

    from falconlm.model import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    expected = attention.sdpa(q, k, v, None, is_causal=False)
    plain = F.scaled_dot_product_attention

    def other_layout(*args, **kwargs) -> torch.Tensor:
        out = plain(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides of [B, P, G, d]

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", other_layout)
    assert torch.equal(attention.sdpa(q, k, v, None, is_causal=False), expected)


def test_cuda_attention_leaves_out_cudnn_and_cpu_attention_keeps_torch_choice() -> None:
    """On CUDA, SDPA runs without the cuDNN backend, which compiles a graph for every new key length (a decode
    step's grows by one); flash, memory-efficient and math stay allowed. Elsewhere torch's own choice stands."""
    from falconlm.model.attention import sdpa_backends

    flags = torch.backends.cuda
    before = (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled())
    with sdpa_backends(torch.device("cuda")):
        assert not flags.cudnn_sdp_enabled()
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled() and flags.math_sdp_enabled()
    assert (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled()) == before
    with sdpa_backends(torch.device("cpu")):
        assert (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled()) == before


def test_every_attention_call_asks_for_its_device_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import nullcontext

    from falconlm.model import attention

    asked: list[torch.device] = []
    monkeypatch.setattr(attention, "sdpa_backends", lambda device: asked.append(device) or nullcontext())
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    attention.sdpa(q, k, v, None, is_causal=False)  # the grouped decode path
    attention.sdpa(torch.randn(1, 4, 3, 8), k, v, None, is_causal=True)  # the general one
    assert asked == [q.device, q.device]
