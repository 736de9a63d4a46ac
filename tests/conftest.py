"""Shared test fixtures: the ../shared data folder and tiny random checkpoints."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# No GPU runs the Triton kernel here: its tests run it in Triton's interpreter, and triton reads this at import, so
# it is set before any test (or a library a test loads, such as transformers) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")


def shared_data_dir() -> Path | None:
    """The project's shared data folder (``../shared/data`` beside the checkout), if present."""
    root = Path(os.environ.get("FALCONLM_SHARED", REPO_ROOT.parent / "shared"))
    data = root / "data"
    return data if data.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``shared/data``; tests that need it skip with a clear reason when it is absent."""
    data = shared_data_dir()
    if data is None:
        pytest.skip("needs ../shared/data beside the checkout (or FALCONLM_SHARED); it is absent here")
    return data


@pytest.fixture(scope="session")
def falcon_tokenizer_dir(shared_data: Path) -> Path:
    """The real Falcon-7B tokenizer folder from shared data."""
    return shared_data / "falcon-tokenizer"


# ---- tiny random checkpoints, one per Falcon block shape ----------------------------------------------------------

TINY_BASE = {
    "vocab_size": 320,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

# falcon-spec §3.1: every block shape, with the traits that tend to break ports.
VARIANTS = {
    # sequential, biases, ALiBi, and a head count that is not a power of two
    "rw": {
        "multi_query": False,
        "parallel_attn": False,
        "bias": True,
        "alibi": True,
        "hidden_size": 48,
        "num_attention_heads": 6,
    },
    # multi-query, parallel, one LayerNorm
    "7b": {"multi_query": True, "parallel_attn": True},
    # grouped-query with ln_attn + ln_mlp
    "40b": {"new_decoder_architecture": True, "num_attention_heads": 8, "num_kv_heads": 2},
    # grouped-query with one LayerNorm, untied head, rope_theta 500042, explicit ffn width
    "11b": {
        "new_decoder_architecture": True,
        "num_attention_heads": 8,
        "num_kv_heads": 2,
        "num_ln_in_parallel_attn": 1,
        "tie_word_embeddings": False,
        "rope_theta": 500042.0,
        "ffn_hidden_size": 96,
    },
}

TOKENIZER_TEXT = (
    "Once upon a time there was a little fox who lived in the forest. Every day the fox ran to the river "
    "to drink water and look at the fish. One day she met a big bear. The bear said hello, and they became "
    "friends. They played together in the sun until the moon came up. Numbers like 123 and 4567 appear too, "
    "and so do emoji 🦊🐻 and accents: café, naïve, 東京. "
)


def make_tiny_tokenizer(out_dir: Path) -> None:
    """Train a small byte-level BPE tokenizer (vocab 320) into ``out_dir`` with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE["vocab_size"],
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 4, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')


def make_hf_checkpoint(out_dir: Path, variant: str, seed: int = 0, **overrides) -> Path:
    """Save a random transformers FalconForCausalLM of ``variant`` (plus a tiny tokenizer) into ``out_dir``."""
    import torch
    from transformers import FalconConfig as HFConfig
    from transformers import FalconForCausalLM as HFModel

    torch.manual_seed(seed)
    config = HFConfig(**{**TINY_BASE, **VARIANTS[variant], **overrides})
    model = HFModel(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    make_tiny_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def hf_checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    """(variant name, folder) of a tiny random transformers checkpoint, for each variant."""
    variant = request.param
    return variant, make_hf_checkpoint(tmp_path_factory.mktemp(f"hf-{variant}"), variant)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny falcon-7b-shaped checkpoint with a tokenizer, for engine and CLI tests."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny-7b"), "7b")


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the native kernel variants this run exercised (the ``isa`` fixture below)."""
    from falconlm import native

    if native.unavailable_reason("scalar") is not None:
        terminalreporter.write_line(f"native kernels: not tested ({native.unavailable_reason('scalar')})")
        return
    built = []
    for name in native.runnable_variants(with_base=True):
        lib = native.kernels(name)
        built.append(f"{name} ({lib.falcon_isa().decode()})" if lib is not None else f"{name} (build failed)")
    terminalreporter.write_line("native kernel variants tested: " + ", ".join(built))


# The native kernel variants this machine runs: a test that takes ``isa`` runs once per variant (the scalar
# reference everywhere, AVX2 / AVX-512 / NEON where the CPU has them); the run's summary names them.
from falconlm import native  # noqa: E402

# Each SIMD variant also runs as its "-base" build (without optional features such as VNNI) where the CPU has them.
RUNNABLE = native.runnable_variants(with_base=True) if native.unavailable_reason("scalar") is None else []
SIMD = [v for v in RUNNABLE if v != "scalar"]
NO_NATIVE = f"native kernels unavailable: {native.unavailable_reason('scalar')}"
NO_SIMD = "this CPU runs no SIMD variant of the native kernels"
needs_native = pytest.mark.skipif(not RUNNABLE, reason=NO_NATIVE)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's thread count (which the native kernels use too) set to ``count`` inside, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _select_variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, why_none: str) -> str:
    if request.param is None:
        pytest.skip(why_none)
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", request.param)
    return request.param


@pytest.fixture(params=RUNNABLE or [None])
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Selects one native variant for the test (``FALCONLM_NATIVE_ISA``)."""
    return _select_variant(request, monkeypatch, NO_NATIVE)


@pytest.fixture(params=SIMD or [None])
def simd_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each SIMD variant this CPU runs (the scalar one is the reference it is compared with)."""
    return _select_variant(request, monkeypatch, NO_SIMD)
