"""CLI error paths: one readable line and exit 2 (130 for Ctrl-C), never a traceback or SIGABRT."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from falconlm.batch.store import StateLock
from falconlm.cli import main
from falconlm.cli import serve as serve_cli


def one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_port_out_of_range_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "99999"])
    assert exc.value.code == 2
    one_line_error(capsys, "a port is 1 to 65535")


def test_locked_state_dir_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys):
    lock = StateLock(tmp_path)  # another process holds it (flock locks are per open file, so this conflicts)
    assert lock.acquire()
    try:
        assert main(["serve", "--model", str(tiny_checkpoint), "--state-dir", str(tmp_path)]) == 2
    finally:
        lock.release()
    one_line_error(capsys, "is in use by another process")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"]])
def test_cuda_device_without_cuda_is_one_line_exit_2(tiny_checkpoint, capsys, command):
    assert main([*command, "--model", str(tiny_checkpoint), "--device", "cuda"]) == 2
    one_line_error(capsys, "device 'cuda' is not available")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_batch_run_on_cuda_without_cuda_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"custom_id":"a","method":"POST","url":"/v1/completions","body":{}}\n')
    argv = ["batch", "run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--model", str(tiny_checkpoint), "--device", "cuda"]) == 2
    one_line_error(capsys, "device 'cuda' is not available")
    assert not (tmp_path / "out.jsonl.state").exists()


def test_unknown_device_is_one_line_exit_2(tiny_checkpoint, capsys):
    assert main(["generate", "hi", "--model", str(tiny_checkpoint), "--device", "tpu9"]) == 2
    one_line_error(capsys, "not a device name torch knows")


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["info"]])
def test_deeply_nested_config_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys, command):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main([*command, "--model", str(model)]) == 2
    one_line_error(capsys, "nested too deeply")


def test_ctrl_c_in_serve_start_up_exits_130_without_traceback(tiny_checkpoint, capsys, monkeypatch):
    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_cli, "_check_start", interrupted)
    assert main(["serve", "--model", str(tiny_checkpoint)]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_import_falconlm_cli_does_not_import_torch():
    """The command's own Ctrl-C handler is in place before torch loads (a Ctrl-C there is quiet)."""
    code = "import sys, falconlm, falconlm.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(sys.platform != "linux", reason="watches /proc/PID/maps")
def test_sigint_while_torch_loads_exits_quietly(tiny_checkpoint):
    """SIGINT once the process is loading torch (inside the command, not a fixed delay): no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "falconlm", "serve", "--model", str(tiny_checkpoint), "--port", str(port)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell may ignore it
    )
    try:
        maps = Path(f"/proc/{proc.pid}/maps")
        while proc.poll() is None:
            try:
                if "libtorch" in maps.read_text():
                    break
            except OSError:
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
