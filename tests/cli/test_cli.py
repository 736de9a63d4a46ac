"""The falconlm command: happy paths and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from falconlm import native
from falconlm.cli import main

from ..conftest import needs_native


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "falconlm", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def test_generate_streams_prompt_and_continuation(tiny_checkpoint):
    done = _run(
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "Once upon a time",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Once upon a time") and len(done.stdout) > len("Once upon a time\n")
    assert "Traceback" not in done.stderr


def test_generate_is_greedy_deterministic_and_reads_stdin(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--max-tokens", "8", "--temperature", "0", "--no-echo"]
    assert main([*args, "The fox"]) == 0
    first = capsys.readouterr().out
    done = _run(*args, "-", stdin="The fox")
    assert done.returncode == 0 and done.stdout == first


def test_chat_answers_each_turn_and_exits(tiny_checkpoint):
    done = _run(
        "chat",
        "--model",
        str(tiny_checkpoint),
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        stdin="hello\nhow are you\n/exit\nnever read\n",
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) >= 2


def test_info_json(tiny_checkpoint, capsys):
    assert main(["info", "--model", str(tiny_checkpoint), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["kv_groups"] == 1 and facts["layers"] == 2 and facts["size_on_disk_bytes"] > 0
    # "prompts": what quantized prompt batches take, said only where the native kernels run
    prompts = {"prompts"} if native.unavailable_reason() is None else set()
    assert set(facts["native_kernels"]) == {"chosen", "avx512", "avx2", "neon", "scalar"} | prompts
    assert facts["native_kernels"]["scalar"] == "runs"  # the plain C++ reference runs on every CPU


def test_info_says_when_native_kernels_are_off(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("FALCONLM_NATIVE", "0")
    assert main(["info", "--model", str(tiny_checkpoint)]) == 0
    assert "none (FALCONLM_NATIVE is off); torch paths everywhere" in capsys.readouterr().out


@needs_native
def test_info_names_the_forced_variant_and_why_others_do_not_run(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("FALCONLM_NATIVE_ISA", "scalar")
    assert main(["info", "--model", str(tiny_checkpoint)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("native kernels"))
    other_arch = "neon: not an aarch64 CPU" if native.machine() == "x86_64" else "avx512: not an x86_64 CPU"
    assert line.split()[2] == "scalar;" and other_arch in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "--model", "/no/such/dir", "hi"], "does not exist"),
        (["generate", "--temperature", "-1", "--model", "{ckpt}", "hi"], "temperature"),
        (["generate", "--max-tokens", "abc", "hi"], "invalid int"),
        (["generate", "--dtype", "int3", "hi"], "invalid choice"),
        (["info", "--model", "{empty}"], "config.json"),
        (["generate", "--model", "{empty}", "hi"], "config.json"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(ckpt=tiny_checkpoint, empty=empty) for a in args]
    done = _run(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0] and "Traceback" not in done.stderr


def test_group_size_zero_is_refused_not_replaced_by_the_default(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "-m", str(tmp_path), "-o", str(tmp_path / "q"), "--bits", "4", "--group-size", "0"])
    assert exc.value.code == 2 and "--group-size" in capsys.readouterr().err
