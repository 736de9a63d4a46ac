"""Training: tokenizer trainer, trainer (loss, checkpoints, resume, DDP, HF parity), perplexity, CLI."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from falconlm.cli import main
from falconlm.model.config import FalconConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.tokenizer import Tokenizer
from falconlm.train import SPECIAL_TOKENS, TrainArgs, perplexity, train, train_tokenizer
from falconlm.train.data import TokenWindows, cached_token_file, tokenize_file
from falconlm.train.optim import CosineSchedule, param_groups
from falconlm.train.perplexity import windows
from falconlm.train.state import STATE_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "vocab_size": 300,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
SMALL_RUN = {"batch_size": 8, "seq_len": 32, "lr": 3e-3, "warmup": 3, "threads": 2, "progress": False}


def _corpus(n_stories: int = 300, seed: int = 0) -> str:
    """Simple, learnable stories separated by <|endoftext|> lines, like the TinyStories files."""
    rng = random.Random(seed)
    names, animals = ["Lily", "Tom", "Ben", "Mia", "Sam"], ["cat", "dog", "fox", "bird", "frog"]
    places, feelings = ["park", "forest", "river", "garden"], ["happy", "sad", "tired", "excited"]
    stories = []
    for _ in range(n_stories):
        name, animal, place = rng.choice(names), rng.choice(animals), rng.choice(places)
        stories.append(
            f"Once upon a time, {name} went to the {place}. {name} saw a little {animal}. "
            f'The {animal} was {rng.choice(feelings)}. {name} said, "Hello, {animal}!" '
            f"They played in the {place} all day and {name} was {rng.choice(feelings)}.\n"
        )
    return "<|endoftext|>\n".join(stories) + "<|endoftext|>\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def corpus(workdir) -> Path:
    path = workdir / "stories.txt"
    path.write_text(_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(workdir, corpus) -> Path:
    return train_tokenizer([corpus], 300, workdir / "tok", progress=False)


@pytest.fixture(scope="module")
def config_file(workdir) -> Path:
    path = workdir / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def trained(workdir, corpus, tok_dir, config_file):
    """A 30-step run with checkpoints every 10 steps and validation every 10 steps."""
    args = TrainArgs(
        out=workdir / "run30",
        data=[corpus],
        tokenizer=tok_dir,
        config=config_file,
        steps=30,
        eval_every=10,
        save_every=10,
        log_every=1,
        **SMALL_RUN,
    )
    return train(args)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return FalconForCausalLM.from_pretrained(path).state_dict()


# ---- tokenizer -----------------------------------------------------------------------------------------
def test_tokenizer_round_trips_and_keeps_special_ids(tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer.from_pretrained(tok_dir)
    hf = AutoTokenizer.from_pretrained(tok_dir)
    assert isinstance(hf, PreTrainedTokenizerFast)
    for text in [
        "Hello, world! It's 2024.",
        "emoji 🦊🐻‍❄️ and CJK 東京タワー",
        "runs:   \t\t\n\n\n  end  ",
        " leading space",
        "café naïve",
        "\x00\x05 control bytes",
    ]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.encode(special) == [i]
        assert tok.encode(f"a{special}b")[1:-1] == [i]
    assert tok.eos_token_id == tok.bos_token_id == hf.eos_token_id == 11
    assert tok.vocab_size == 300


def test_tokenizer_rejects_tiny_vocab(tmp_path, corpus):
    with pytest.raises(ValueError, match="at least 268"):
        train_tokenizer([corpus], 100, tmp_path)


# ---- pieces ------------------------------------------------------------------------------------------------
def test_data_cache_and_deterministic_windows(tmp_path, corpus, tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    tokens = cached_token_file(corpus, tok, tmp_path / "cache", progress=False)
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)
    assert (tokens == 11).sum() == 300  # one EOS per story
    assert np.array_equal(tokens, tokenize_file(corpus, tok))
    (bin_file,) = (tmp_path / "cache").glob("*.bin")
    mtime = bin_file.stat().st_mtime_ns
    cached_token_file(corpus, tok, tmp_path / "cache", progress=False)
    assert bin_file.stat().st_mtime_ns == mtime  # reused, not tokenized again
    win = TokenWindows([tokens], 33)
    x1, y1 = win.batch(0, 0, (5, 1), 4)
    x2, y2 = win.batch(0, 0, (5, 1), 4)
    x3, _ = win.batch(0, 0, (5, 2), 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (4, 32)


def test_schedule_and_decay_groups():
    s = CosineSchedule(lr=1.0, min_lr=0.1, warmup=4, total=20)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and abs(s(19) - 0.1) < 0.01 and s(20) == pytest.approx(0.1)
    model = FalconForCausalLM(FalconConfig(**TINY))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # the tied head counted once


# ---- the trainer -------------------------------------------------------------------------------------------
def test_training_lowers_loss_and_checkpoint_reloads(trained):
    out = trained.out
    assert trained.step == 30 and len(trained.losses) == 30
    first, last = np.mean(trained.losses[:5]), np.mean(trained.losses[-5:])
    assert last < first - 1.0, (first, last)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        STATE_FILE,
        "metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))
    assert {"loss", "lr", "tokens", "tokens_per_s"} <= records[0].keys()
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state["step"] == 30 and state["tokens"] == 30 * 8 * 32
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 11 and config["vocab_size"] == 300
    reloaded = FalconForCausalLM.from_pretrained(out)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained.model.eval()(x))


def test_resume_reproduces_uninterrupted_run(tmp_path, corpus, tok_dir, config_file):
    common = dict(
        data=[corpus],
        tokenizer=tok_dir,
        config=config_file,
        steps=20,
        dropout=0.1,
        seed=3,
        eval_every=0,
        log_every=1,
        **SMALL_RUN,
    )
    full = train(TrainArgs(out=tmp_path / "full", **common))

    def interrupt_at_7(step: int, loss: float) -> None:
        if step == 7:  # Ctrl-C: the trainer finishes the step, saves and stops
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "pieces"
    part = train(TrainArgs(out=out, save_every=5, **common), on_step=interrupt_at_7)
    assert part.interrupted and part.step == 7
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 7
    part = train(TrainArgs(out=out, resume=True, stop_after=10))  # settings come from the checkpoint
    assert part.step == 10 and not part.interrupted
    rest = train(TrainArgs(out=out, resume=True))
    assert rest.step == 20
    assert rest.losses == full.losses[10:]
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
    with pytest.raises(ValueError, match="--lr"):
        train(TrainArgs(out=out, resume=True, lr=0.5))
    with pytest.raises(ValueError, match="--resume"):
        train(TrainArgs(out=out, **common))


def test_bf16_autocast_trains(tmp_path, corpus, tok_dir, config_file):
    result = train(
        TrainArgs(
            out=tmp_path,
            data=[corpus],
            tokenizer=tok_dir,
            config=config_file,
            steps=3,
            bf16=True,
            **SMALL_RUN,
        )
    )
    assert all(math.isfinite(x) for x in result.losses) and result.val_loss is not None
    assert next(result.model.parameters()).dtype == torch.float32


def test_checkpoint_matches_transformers(trained):
    from transformers import FalconForCausalLM as HFModel

    hf = HFModel.from_pretrained(trained.out, torch_dtype=torch.float32).eval()
    ours = FalconForCausalLM.from_pretrained(trained.out)
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4


def test_ddp_two_processes_match_gradient_accumulation(tmp_path, corpus, tok_dir, config_file):
    """2 gloo ranks x accumulation 1 see the same micro-batches as 1 process x accumulation 2.

    Observed bitwise equal on CPU; the 1e-6 tolerance leaves room for a different float reduction order.
    """
    run = {
        "steps": 4,
        "batch_size": 4,
        "seq_len": 32,
        "lr": 3e-3,
        "warmup": 1,
        "eval_every": 0,
        "log_every": 1,
        "threads": 1,
    }
    single = train(
        TrainArgs(
            out=tmp_path / "single",
            data=[corpus],
            tokenizer=tok_dir,
            config=config_file,
            grad_accum=2,
            progress=False,
            **run,
        )
    )
    cli = f"train --config {config_file} --data {corpus} --tokenizer {tok_dir} --out {tmp_path / 'ddp'}".split()
    for key, value in run.items():
        cli += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "falconlm"]
    proc = subprocess.run([*launch, *cli], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [r["loss"] for r in records]
    assert ddp_losses == pytest.approx(single.losses, abs=1e-6)
    assert records[-1]["tokens"] == single.tokens == 4 * 4 * 32 * 2
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# ---- perplexity --------------------------------------------------------------------------------------------
def test_windows_score_every_token_once():
    for n, context, stride in [(10, 4, 2), (100, 64, 16), (5, 64, 32), (64, 64, 1)]:
        spans = windows(n, context, stride)
        scored = [t for w in spans for t in range(w.first_scored, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.begin <= context and w.first_scored > w.begin for w in spans)


def test_perplexity_equals_direct_nll(trained):
    model = FalconForCausalLM.from_pretrained(trained.out)
    tok = Tokenizer.from_pretrained(trained.out)
    ids = tok.encode(_corpus(3, seed=9))[:64]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    direct = F.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])).item()
    whole = perplexity(model, ids, context=64, progress=False)
    assert whole.tokens == len(ids) - 1
    assert whole.nll == pytest.approx(direct, abs=1e-5) and whole.ppl == pytest.approx(math.exp(direct), rel=1e-5)
    sliding = perplexity(model, ids, context=32, stride=8, batch_size=3, progress=False)
    assert sliding.tokens == len(ids) - 1
    assert sliding.nll == pytest.approx(direct, rel=0.05)


# ---- CLI ---------------------------------------------------------------------------------------------------
def _cli(command: str) -> int:
    return main(command.split())


def test_cli_train_tokenizer_train_eval_ppl_and_init_from(tmp_path, corpus, config_file, capsys):
    assert _cli(f"train-tokenizer --input {corpus} --vocab-size 300 --out {tmp_path / 't'}") == 0
    out = tmp_path / "model"
    run = "--steps 4 --batch-size 4 --seq-len 32 --threads 2 --log-every 1"
    assert _cli(f"train --config {config_file} --data {corpus} --tokenizer {tmp_path / 't'} --out {out} {run}") == 0
    assert "step 4: train loss" in capsys.readouterr().out
    assert _cli(f"eval-ppl --model {out} --data {corpus} --max-tokens 200 --context 32 --stride 16 --json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 199 and result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    # continued pretraining from the checkpoint (its tokenizer files were copied beside the weights)
    tuned = tmp_path / "tuned"
    assert _cli(f"train --init-from {out} --data {corpus} --tokenizer {out} --out {tuned} {run} --dropout 0.1") == 0
    first = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    again = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert again < first[0] - 0.2  # starts where the first run ended, not from scratch
    assert json.loads((tuned / "config.json").read_text())["hidden_dropout"] == 0.1


def test_cli_missing_data_file_exits_2(tmp_path, config_file, tok_dir, capsys):
    missing = tmp_path / "nope.txt"
    assert _cli(f"train --config {config_file} --data {missing} --tokenizer {tok_dir} --out {tmp_path / 'o'}") == 2
    err = capsys.readouterr().err
    assert "nope.txt" in err and len(err.strip().splitlines()) == 1
    assert _cli(f"eval-ppl --model {tmp_path} --data {missing}") == 2
