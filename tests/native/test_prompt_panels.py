"""Prompt chunks through the fused step (``falcon_prompt_layers``): where the CPU has no bfloat16 arithmetic and the
panel GEMM is the prompt GEMM (AVX2), a bfloat16 model's prompt chunks run as rows of the fused step, one per token,
its matmuls through the same weight panels, rather than through the torch forward; so do an int8 / int4 model's
wherever no AMX GEMM takes them. Here the path is forced on in every variant this CPU runs, and checked: it is
taken, it stays as close to float32 activations as the torch path, a prompt's scores are the same bits however
the scheduler cuts it into chunks (each row is summed alone), and the rows whose logits nobody reads stop in the
last layer once their K/V are stored, without changing any bit of what is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from falconlm.engine.engine import Engine, EngineConfig
from falconlm.engine.fused_decode import FusedDecoder, fused_decoder
from falconlm.engine.kernels import bf16_prompt_path
from falconlm.engine.sampling_params import SamplingParams
from falconlm.model.falcon import FalconForCausalLM
from falconlm.native import ops
from falconlm.tokenizer import Tokenizer

from ..conftest import make_hf_checkpoint, needs_native
from .fused_calls import counting, model_in

pytestmark = needs_native

PROMPT = [(11 * j) % 250 + 3 for j in range(23)]
SCORED = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)


# head_dim 32 (the fused step's blocks); 40b has a LayerNorm per branch, 7b one, rw (falcon-rw: sequential, biases,
# ALiBi) two in turn
HIDDEN = {"7b": 128, "40b": 256, "rw": 192}


@pytest.fixture(scope="module", params=sorted(HIDDEN))
def checkpoint(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(f"panels-{request.param}")
    return make_hf_checkpoint(folder, request.param, hidden_size=HIDDEN[request.param])


@pytest.fixture(scope="module", params=sorted(HIDDEN))
def long_checkpoint(request, tmp_path_factory) -> Path:
    """The same layouts with room for prompts past PART_KEYS (512) positions."""
    folder = tmp_path_factory.mktemp(f"long-{request.param}")
    return make_hf_checkpoint(folder, request.param, hidden_size=HIDDEN[request.param], max_position_embeddings=1024)


def _scores(model: FalconForCausalLM, folder: Path, budget: int) -> tuple[list[int], list, list]:
    """Greedy tokens, their logprobs and the prompt's logprobs of PROMPT through an engine with ``budget`` tokens
    per step."""
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=budget, block_size=4, enable_prefix_caching=False)
    out = Engine(model, Tokenizer.from_pretrained(folder), config).generate([PROMPT], [SCORED])[0]
    return out.token_ids, out.logprobs, out.prompt_logprobs


def _prompt_values(scores: tuple[list[int], list, list]) -> torch.Tensor:
    """The prompt positions' logprobs (of the prompt's own tokens) as a tensor."""
    assert [entry.token_id for entry in scores[2][1:]] == PROMPT[1:]
    return torch.tensor([entry.logprob for entry in scores[2][1:]])


def _forced(monkeypatch: pytest.MonkeyPatch, model: FalconForCausalLM) -> list[int]:
    """Prompt chunks through the fused step from now on, whatever this CPU's prompt GEMM; the rows of each call."""
    monkeypatch.setattr(FusedDecoder, "takes_prompts", lambda self: True)
    return counting(model, "_prompt_fn")


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_prompt_chunks_run_fused_as_close_to_float32_as_the_torch_path(
    isa: str, checkpoint: Path, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FusedDecoder, "takes_prompts", lambda self: False)
    exact = _prompt_values(_scores(model_in(checkpoint, weights, torch.float32), checkpoint, 64))
    model = model_in(checkpoint, weights)
    through_torch = _prompt_values(_scores(model, checkpoint, 10))
    calls = _forced(monkeypatch, model)
    fused = _scores(model, checkpoint, 10)
    assert calls == [10, 10, 3]  # the prompt's chunks, a row per token; decode steps keep the row blocks
    error, torch_error = float((_prompt_values(fused) - exact).abs().max()), float((through_torch - exact).abs().max())
    assert error < 0.1, error
    assert error <= 1.5 * torch_error + 1e-3, (error, torch_error)


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_a_prompt_cut_into_any_chunks_scores_the_same_bits(
    isa: str, checkpoint: Path, weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every budget cuts the prompt differently, and those that leave a last chunk of one token (2, 11) make it a
    # decode-shaped row, which still goes with the prompt chunks, through the fused step.
    model = model_in(checkpoint, weights)
    calls = _forced(monkeypatch, model)
    whole = _scores(model, checkpoint, len(PROMPT))
    assert calls == [len(PROMPT)]
    for budget in range(2, len(PROMPT)):
        assert _scores(model, checkpoint, budget) == whole, f"prompt cut into chunks of {budget}"
    calls.clear()
    _scores(model, checkpoint, 11)
    assert calls == [11, 11, 1]


def test_prompts_run_fused_where_the_torch_path_would_take_the_same_kernels(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bf16 = fused_decoder(model_in(checkpoint, "bf16").transformer)
    quantized = fused_decoder(model_in(checkpoint, "int8").transformer)
    assert bf16.bf16_weights and not quantized.bf16_weights
    # falcon-rw's prompts keep the torch forward everywhere (forced on, they pass the tests above)
    rw = "rw" in checkpoint.name
    for panels, amx in ((True, False), (False, True)):
        monkeypatch.setattr(ops, "prompt_panels", lambda panels=panels: panels)
        monkeypatch.setattr(ops, "bf16_matrix_hardware", lambda amx=amx: amx)
        assert bf16.takes_prompts() == (panels and not rw)  # bfloat16: where the panel GEMM is the prompt GEMM
        assert quantized.takes_prompts() == (not amx and not rw)  # int8 / int4: unless AMX's GEMM takes prompts


def test_the_log_line_names_the_bfloat16_prompt_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "bf16_hardware", lambda: False)
    monkeypatch.setattr(ops, "prompt_panels", lambda: True)
    assert "weight panels" in bf16_prompt_path()
    monkeypatch.setattr(ops, "prompt_panels", lambda: False)
    assert "float32 GEMM on widened weights" in bf16_prompt_path()
    monkeypatch.setattr(ops, "bf16_hardware", lambda: True)
    assert "the CPU's bfloat16 arithmetic" in bf16_prompt_path()


@pytest.mark.parametrize("path", ["panels", "deterministic"])
@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_only_the_rows_whose_logits_are_read_finish_the_last_layer_and_they_keep_their_bits(
    isa: str, long_checkpoint: Path, weights: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three prompts cut into chunks of 10 tokens (so some chunks end inside a prompt and output nothing), one of
    # them past PART_KEYS (512) positions, whose last rows are attended in parts. Prompt chunks go through
    # falcon_prompt_layers (forced on) or, under --deterministic, with the decode rows through falcon_decode_layers.
    prompts = [PROMPT, PROMPT[:9], [(7 * j) % 250 + 3 for j in range(530)]]
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)] * len(prompts)
    checkpoint = long_checkpoint
    model = model_in(checkpoint, weights)
    monkeypatch.setattr(FusedDecoder, "takes_prompts", lambda self: True)
    decoder = fused_decoder(model.transformer)
    entry = "_prompt_fn" if path == "panels" else "_fn"
    native = getattr(decoder, entry)
    calls: list[tuple[int, int]] = []  # (rows, rows read: -1 for all) of each call
    every_row = False

    def counted(*args):
        calls.append((args[4], args[-1]))
        return native(*args[:-2], None, -1) if every_row else native(*args)

    setattr(decoder, entry, counted)

    def run() -> list[tuple[list[int], list]]:
        config = EngineConfig(
            max_num_seqs=4, max_num_batched_tokens=10, block_size=4, enable_prefix_caching=False,
            deterministic=path == "deterministic",
        )  # fmt: skip
        outs = Engine(model, Tokenizer.from_pretrained(checkpoint), config).generate(prompts, params)
        return [(out.token_ids, out.logprobs) for out in outs]

    pruned = run()
    assert any(n_out == 0 for _, n_out in calls)  # a chunk that ends inside its prompt: none of its rows read
    if path == "panels":
        assert all(0 <= n_out < rows for rows, n_out in calls)  # every chunk's other rows stopped at their K/V
        assert sum(n_out for _, n_out in calls) == len(prompts)  # a prompt's last token only
    every_row = True
    assert run() == pruned  # the same tokens and logprobs, bit for bit: the K/V every row stored included
