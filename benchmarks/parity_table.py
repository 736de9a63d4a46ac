"""Parity with transformers, measured: every family's shape variants on small random checkpoints, float32.

For each variant it writes a random checkpoint with the transformers reference class (the test suite's builders in
``tests/``), loads it with ``FalconForCausalLM.from_pretrained`` (the family comes from config.json), and prints
the largest |logit difference| over a 24-token prompt (batch 2) and whether 16 greedy tokens through falconlm's
engine equal transformers' greedy tokens (its full forward at every step). The tests assert the same within 1e-4;
this prints the measured values.

    python benchmarks/parity_table.py [--device cuda]   # from the repository root, with the test extra installed

On CUDA both sides run on the GPU (float32, TF32 off), so the table is the GPU's parity.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_LEN, NEW_TOKENS = 24, 16


def _variants(tmp: Path):
    """(family, variant, folder, transformers model) for every shape that matters (issue list in the tests)."""
    import transformers

    from tests.conftest import VARIANTS as FALCON_VARIANTS
    from tests.conftest import make_hf_checkpoint
    from tests.model.falcon3_checkpoint import VARIANTS as FALCON3_VARIANTS
    from tests.model.falcon3_checkpoint import make_falcon3_checkpoint
    from tests.model.h1_checkpoints import save_hf_h1
    from tests.model.mamba_checkpoints import save_hf_mamba
    from tests.model.test_falcon_h1_parity import BASE as H1_BASE
    from tests.model.test_falcon_h1_parity import MULTIPLIERS, NORMS, SHAPES

    for name in sorted(FALCON_VARIANTS):
        folder = make_hf_checkpoint(tmp / f"falcon-{name}", name, initializer_range=0.2)
        yield "Falcon", name, folder, transformers.FalconForCausalLM.from_pretrained(folder)
    for name in FALCON3_VARIANTS:
        if name.endswith("-rope"):  # contexts of 16: the RoPE-scaling variants have their own tests
            continue
        folder = make_falcon3_checkpoint(tmp / f"falcon3-{name}", name)
        yield "Falcon3", name, folder, transformers.LlamaForCausalLM.from_pretrained(folder)
    for falcon, label in ((True, "B/C/Δ norms"), (False, "no norms (Mamba-1)")):
        folder = tmp / f"mamba-{falcon}"
        model = save_hf_mamba(folder, falcon=falcon)
        yield "Falcon-Mamba", label, folder, model
    norms = ("norm-before-gate", "norm-after-gate", "plain-gate")
    for (shape, fields), norm in zip(SHAPES.items(), norms, strict=True):
        folder = tmp / f"h1-{shape}"
        save_hf_h1(folder, **{**H1_BASE, **fields, **MULTIPLIERS, **NORMS[norm]})
        reference = transformers.FalconH1ForCausalLM.from_pretrained(folder)
        yield "Falcon-H1", f"{shape}, {norm}, multipliers != 1", folder, reference


def _reference_greedy(reference, ids: torch.Tensor) -> list[int]:
    """transformers' greedy tokens from its full forward at every step (no cache): its cached Falcon-H1 decode
    is wrong with more than one B/C group (transformers 4.57), and this oracle needs no cache at all."""
    seq = ids
    for _ in range(NEW_TOKENS):
        seq = torch.cat([seq, reference(seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, ids.shape[1] :].tolist()


def _engine_greedy(folder: Path, prompt: list[int], device: str) -> list[int]:
    from falconlm.engine.factory import EngineArgs, build_engine
    from falconlm.engine.sampling_params import SamplingParams

    engine = build_engine(EngineArgs(model=folder, dtype="float32", device=device, skip_tokenizer_init=True))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return list(engine.generate([prompt], [params])[0].token_ids)


def main() -> None:
    from falconlm.model.falcon import FalconForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    device = parser.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("parity_table: no CUDA device here; run --device cuda on a machine with an NVIDIA GPU")
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, variant, folder, reference in _variants(Path(tmp)):
            reference = reference.float().eval().to(device)
            ours = FalconForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
            vocab = reference.config.vocab_size
            ids = torch.randint(1, vocab, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).to(device)
            diff = (ours(ids) - reference(ids).logits).abs().max().item()
            want = _reference_greedy(reference, ids[:1])
            got = _engine_greedy(folder, ids[0].tolist(), device)
            rows.append((family, variant, diff, sum(a == b for a, b in zip(got, want, strict=True))))
            print(f"  {family} {variant}: {diff:.2e}", file=sys.stderr, flush=True)
    print(f"Parity on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print("| family | variant | max abs logit diff (fp32) | greedy tokens equal (engine vs transformers) |")
    print("|---|---|---:|---:|")
    for family, variant, diff, same in rows:
        print(f"| {family} | {variant} | {diff:.1e} | {same}/{NEW_TOKENS} |")


if __name__ == "__main__":
    main()
