"""``falconlm quantize``: the folder it writes, its report, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falconlm.cli import main


def test_quantize_writes_a_loadable_folder(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q4"
    argv = ["quantize", "--model", str(tiny_checkpoint), "--out", str(out), "--bits", "4", "--group-size", "128"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "note: self_attention.query_key_value: 64 is not a multiple of 128: groups of 64" in printed.out
    assert "wrote" in printed.out and "int4-g128" in printed.out and printed.err == ""  # no bar off a terminal
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {f.name for f in out.iterdir()}
    assert main(["info", "--model", str(out), "--json"]) == 0


def test_quantize_int8_sym_default(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert main(["quantize", "-m", str(tiny_checkpoint), "-o", str(tmp_path / "q8"), "--bits", "8"]) == 0
    block = json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]
    assert block["bits"] == 8 and block["symmetric"] is None and block["group_size"] is None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--bits", "8", "--group-size", "64"], "--group-size applies to int4 only"),
        (["--bits", "8", "--sym"], "--sym applies to int4 only"),
        (["--bits", "4", "--group-size", "48"], "group size must be one of (32, 64, 128), got 48"),
        (["--bits", "3"], "invalid choice: 3"),
    ],
)
def test_bad_options_are_one_line_exit_2(tiny_checkpoint: Path, tmp_path: Path, capsys, extra, needle) -> None:
    argv = ["quantize", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o"), *extra]
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


def test_bad_folders_are_one_line_exit_2(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q"
    assert main(["quantize", "-m", str(tiny_checkpoint), "-o", str(out), "--bits", "4"]) == 0
    capsys.readouterr()
    cases = [
        (["-m", str(tmp_path / "nope"), "-o", str(tmp_path / "x")], "does not exist"),
        (["-m", str(tiny_checkpoint), "-o", str(out)], "is not empty (pass --overwrite"),
        (["-m", str(tiny_checkpoint), "-o", str(tiny_checkpoint)], "must differ from the model folder"),
        (["-m", str(out), "-o", str(tmp_path / "again")], "is already quantized"),
    ]
    for args, needle in cases:
        assert main(["quantize", *args, "--bits", "4"]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.startswith("falconlm quantize: error:") and err.count("\n") == 1
    assert main(["quantize", "-m", str(tiny_checkpoint), "-o", str(out), "--bits", "8", "--overwrite"]) == 0


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors exit from inside the parser
        return int(exc.code)
