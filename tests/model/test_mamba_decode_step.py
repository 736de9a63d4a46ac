"""The Mamba decode step's fast paths agree with the plain ones: states updated in place (consecutive slots) or
gathered and written back (any slots), decode rows mixed with prefill runs, derived constants refreshed when a
parameter changes, decays floored away from subnormals, and the engine's bfloat16 kernel binding."""

from __future__ import annotations

import pytest
import torch

from falconlm.engine.kernels import bind_weight_kernels
from falconlm.model.falcon import FalconLinear
from falconlm.model.falcon_mamba import RecurrentBatch
from falconlm.model.formats import load_pretrained
from falconlm.model.selective_scan import selective_scan_reference, selective_state_update
from falconlm.native import kernels

from .mamba_checkpoints import save_hf_mamba


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mamba-step")
    save_hf_mamba(folder, falcon=True)
    return load_pretrained(folder, torch.float32, "cpu")


def _prefilled(model, prompts: torch.Tensor, slots: list[int], num_slots: int):
    """States with row i of ``prompts`` run into slot ``slots[i]``."""
    states = model.new_states(num_slots)
    for row, slot in enumerate(slots):
        n = prompts.shape[1]
        model.forward_hidden(prompts[row : row + 1], None, RecurrentBatch(states, [slot], [0], [n], [True]))
    return states


def _decode(model, states, tokens: list[int], slots: list[int]) -> torch.Tensor:
    batch = RecurrentBatch(states, slots, list(range(len(slots))), [1] * len(slots), [False] * len(slots))
    return model.forward_hidden(torch.tensor([tokens]), None, batch)[0]


@torch.no_grad()
def test_scattered_slots_equal_consecutive_slots(model):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (3, 6), generator=g)
    steps = torch.randint(0, model.config.vocab_size, (4, 3), generator=g)
    view_states = _prefilled(model, prompts, [1, 2, 3], 5)  # slots 1..3: updated in place
    gathered_states = _prefilled(model, prompts, [4, 0, 2], 5)  # scattered: gathered and written back
    for tokens in steps.tolist():
        a = _decode(model, view_states, tokens, [1, 2, 3])
        b = _decode(model, gathered_states, tokens, [4, 0, 2])
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for got, want in ((gathered_states.ssm[:, [4, 0, 2]], view_states.ssm[:, 1:4]),):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert view_states.ssm[:, [0, 4]].abs().sum() == 0  # untouched slots stay zero


@torch.no_grad()
def test_decode_rows_mixed_with_a_prefill_run_equal_them_apart(model):
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (2, 5), generator=g)
    new_prompt = torch.randint(0, model.config.vocab_size, (7,), generator=g).tolist()
    apart = _prefilled(model, prompts, [0, 1], 3)
    alone_steps = _decode(model, apart, [11, 12], [0, 1])
    alone_run = model.forward_hidden(torch.tensor([new_prompt]), None, RecurrentBatch(apart, [2], [0], [7], [True]))
    mixed = _prefilled(model, prompts, [0, 1], 3)
    tokens = [11, *new_prompt, 12]  # decode row, a 7-token run, decode row
    batch = RecurrentBatch(mixed, [0, 2, 1], [0, 1, 8], [1, 7, 1], [False, True, False])
    assert not batch.steps_only
    hidden = model.forward_hidden(torch.tensor([tokens]), None, batch)[0]
    torch.testing.assert_close(hidden[[0, 8]], alone_steps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[1:8], alone_run[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed.ssm, apart.ssm, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_derived_constants_follow_the_parameters(tmp_path):
    save_hf_mamba(tmp_path, falcon=True)
    model = load_pretrained(tmp_path, torch.float32, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    before = model(ids)
    for layer in model.backbone.layers:
        layer.mixer.A_log.add_(0.5)
        layer.mixer.conv1d.weight.mul_(-1)
    after = model(ids)
    fresh = load_pretrained(tmp_path, torch.float32, "cpu")
    for mine, theirs in zip(model.backbone.layers, fresh.backbone.layers, strict=True):
        theirs.mixer.A_log.copy_(mine.mixer.A_log)
        theirs.mixer.conv1d.weight.copy_(mine.mixer.conv1d.weight)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh(ids), atol=1e-6, rtol=1e-6)


def test_decay_floor_keeps_huge_steps_exact_and_finite():
    g = torch.Generator().manual_seed(3)
    d, n = 16, 8
    A = -torch.exp(torch.randn(d, n, generator=g))
    u, B, C = torch.randn(1, d, generator=g), torch.randn(1, n, generator=g), torch.randn(1, n, generator=g)
    dt = torch.full((1, d), 500.0)  # exp(dt A) underflows far below the floor
    D = torch.randn(d, generator=g)
    state = torch.randn(1, n, d, generator=g)
    y_ref, h_ref = selective_scan_reference(u, dt, A, B[0:1], C[0:1], D, state[0])
    y = selective_state_update(state, u, dt, A, B, C, D)
    assert torch.isfinite(state).all()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[0], h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(kernels() is None, reason="the native kernels are not built here")
@torch.no_grad()
def test_binding_the_bf16_matmul_keeps_the_head_tied_and_the_logits(tmp_path):
    save_hf_mamba(tmp_path, falcon=True)
    model = load_pretrained(tmp_path, torch.bfloat16, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    before = model(ids).float()
    assert bind_weight_kernels(model) > 0
    assert isinstance(model.lm_head, FalconLinear) and model.lm_head.matmul is not None
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert model.backbone.layers[0].mixer.in_proj.matmul is not None
    after = model(ids).float()
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.8
