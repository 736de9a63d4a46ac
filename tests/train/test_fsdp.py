"""``falconlm train --fsdp``: 2 gloo ranks with FSDP2 follow 1 process step by step, and save full checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from falconlm.cli import main
from falconlm.model.falcon import FalconForCausalLM
from falconlm.train import TrainArgs, TrainResult, train, train_tokenizer
from falconlm.train.state import STATE_FILE

from .test_train import _corpus

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "vocab_size": 300,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}
# 2 ranks x 1 micro-batch take the micro-batches 1 process x 2 takes; 3 eval batches do not split evenly over 2
RUN = {
    "steps": 4,
    "batch_size": 4,
    "seq_len": 32,
    "lr": 3e-3,
    "warmup": 1,
    "eval_every": 0,
    "eval_batches": 3,
    "log_every": 1,
    "threads": 1,
    "val_fraction": 0.05,
}
TOL = 1e-5  # float32: only the order of the gradient reduction differs


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("fsdp")
    corpus = work / "stories.txt"
    corpus.write_text(_corpus(), encoding="utf-8")
    config = work / "config.json"
    config.write_text(json.dumps(TINY))
    return {"work": work, "corpus": corpus, "config": config, "tok": train_tokenizer([corpus], 300, work / "tok")}


def _torchrun(cli: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.Popen(
        [*launch, "-m", "falconlm", *cli], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, so a timeout takes the ranks down with torchrun
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(cli[:2])} did not finish in 240 s")
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(setup) -> TrainResult:
    """The reference: 1 process taking both micro-batches of each step (accumulation 2)."""
    return train(_args(setup, setup["work"] / "single", grad_accum=2, progress=False, **RUN))


def _args(setup: dict[str, Path], out: Path, **kw) -> TrainArgs:
    return TrainArgs(out=out, data=[setup["corpus"]], tokenizer=setup["tok"], config=setup["config"], **kw)


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process_through_a_resume(setup, single, capsys):
    """Steps 1-2 with --fsdp, a --resume under --fsdp for steps 3-4, against 1 process with accumulation 2.

    The losses, the validation loss, the saved weights and the saved AdamW moments must all agree; the saved
    folder is an ordinary checkpoint (`falconlm generate` runs on it).
    """
    out = setup["work"] / "fsdp"
    cli = f"train --fsdp --config {setup['config']} --data {setup['corpus']} --tokenizer {setup['tok']} --out {out}"
    cli_args = [*cli.split(), "--stop-after", "2"]
    for key, value in RUN.items():
        cli_args += [f"--{key.replace('_', '-')}", str(value)]
    _torchrun(cli_args)
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 2
    _torchrun(["train", "--fsdp", "--resume", "--out", str(out), "--threads", "1"])

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == pytest.approx(single.losses, abs=TOL)
    assert records[-1]["tokens"] == single.tokens
    assert single.val_loss is not None and records[-1]["val_loss"] == pytest.approx(single.val_loss, abs=TOL)

    assert _max_diff(_weights(out), _weights(setup["work"] / "single")) <= TOL

    state = torch.load(out / STATE_FILE, weights_only=True)
    reference = torch.load(setup["work"] / "single" / STATE_FILE, weights_only=True)
    assert state["optimizer_layout"] == "name" and reference["optimizer_layout"] == "index"
    names = [n for n, p in single.model.named_parameters() if p.dim() >= 2]
    names += [n for n, p in single.model.named_parameters() if p.dim() < 2]
    for i, name in enumerate(names):  # position i of the single run's optimizer is parameter `name`
        for moment in ("exp_avg", "exp_avg_sq"):
            want = reference["optimizer"]["state"][i][moment]
            assert (state["optimizer"]["state"][name][moment] - want).abs().max().item() <= TOL, (name, moment)

    assert main(["generate", "Once upon", "--model", str(out), "--max-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once upon")


@pytest.mark.slow
def test_resume_switches_between_one_process_and_fsdp(setup, single):
    """1 process to step 2, --fsdp on 2 ranks to step 3 (from torch's positional optimizer state), 1 process
    again to step 4 (from the named state FSDP saved): the same losses and weights as the uninterrupted run."""
    out = setup["work"] / "switch"
    first = train(_args(setup, out, grad_accum=2, progress=False, stop_after=2, **RUN))
    _torchrun(["train", "--fsdp", "--resume", "--out", str(out), "--threads", "1", "--stop-after", "3"])
    last = train(TrainArgs(out=out, resume=True, progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert first.losses == single.losses[:2]
    assert records[2]["loss"] == pytest.approx(single.losses[2], abs=TOL)
    assert last.losses == pytest.approx(single.losses[3:], abs=TOL)
    assert _max_diff(_weights(out), _weights(setup["work"] / "single")) <= TOL


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return FalconForCausalLM.from_pretrained(path).state_dict()


def test_fsdp_needs_several_processes(setup):
    args = _args(setup, setup["work"] / "alone", fsdp=True)
    with pytest.raises(ValueError, match="--fsdp shards over several processes"):
        train(args)
