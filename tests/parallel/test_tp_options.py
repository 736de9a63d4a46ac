"""The tensor-parallel options in one process: sizes that do not match the launch, refused settings, and what
``falconlm info`` says about N ranks. Nothing here starts a process group."""

from __future__ import annotations

import json

from falconlm.cli import main


def test_a_size_that_is_not_the_world_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert main(["generate", "hi", "--tensor-parallel-size", "2"]) == 2  # no torchrun
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "torchrun --nproc-per-node 2" in err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["batch", "run", "x.jsonl", "-o", "y.jsonl", "--tensor-parallel-size", "2"]) == 2
    assert "this world has 3" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started 2 processes but the command asks for 1
    assert main(["generate", "hi"]) == 2
    assert "this world has 2" in capsys.readouterr().err


def test_embed_task_with_tensor_parallel_is_refused(capsys) -> None:
    assert main(["serve", "--task", "embed", "--tensor-parallel-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--task embed" in err


def test_info_shows_the_rank_plan_and_the_fused_step_off(capsys) -> None:
    assert main(["info", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert "tensor_parallel" not in alone
    assert main(["info", "--json", "--tensor-parallel-size", "3"]) == 0
    facts = json.loads(capsys.readouterr().out)
    heads = facts["attention_heads"]
    shares = [heads // 3 + (1 if r < heads % 3 else 0) for r in range(3)]
    assert facts["tensor_parallel"].endswith("query heads per rank: " + ", ".join(map(str, shares)))
    assert "--nproc-per-node 3" in facts["tensor_parallel"]
    assert facts["fused_decode_step"].startswith("no (tensor parallel")
