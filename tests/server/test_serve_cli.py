"""``falconlm serve``: option parsing, and SIGTERM letting the running request finish before exit 0."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from falconlm.cli import main
from falconlm.cli.serve import is_loopback, memory_amount, read_api_keys

from .conftest import free_port


@pytest.mark.parametrize(
    ("text", "value"),
    [("0.5", 0.5), ("1.0", 1.0), ("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1000000", 1_000_000), ("2k", 2000)],
)
def test_kv_cache_memory_accepts_bytes_and_fractions(text, value):
    assert memory_amount(text) == value


@pytest.mark.parametrize("text", ["1.5", "0.0", "lots", "-3", "0"])
def test_kv_cache_memory_rejects_nonsense(text):
    with pytest.raises(argparse.ArgumentTypeError):
        memory_amount(text)


def test_api_key_file_and_loopback(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha\n\n  beta  \n")
    assert read_api_keys(argparse.Namespace(api_key=None, api_key_file=keys)) == ("alpha", "beta")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_api_keys(argparse.Namespace(api_key=None, api_key_file=tmp_path / "empty"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_the_api_key_may_come_from_the_environment(tmp_path, monkeypatch):
    none = argparse.Namespace(api_key=None, api_key_file=None)
    monkeypatch.delenv("FALCONLM_API_KEY", raising=False)
    assert read_api_keys(none) == ()
    monkeypatch.setenv("FALCONLM_API_KEY", " secret ")
    assert read_api_keys(none) == ("secret",)
    assert read_api_keys(argparse.Namespace(api_key="given", api_key_file=None)) == ("given",)  # the option wins
    keys = tmp_path / "keys"
    keys.write_text("alpha\n")
    assert read_api_keys(argparse.Namespace(api_key=None, api_key_file=keys)) == ("alpha",)
    monkeypatch.setenv("FALCONLM_API_KEY", "  ")
    with pytest.raises(ValueError, match="FALCONLM_API_KEY is set but empty"):
        read_api_keys(none)


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--api-key", "a", "--api-key-file", "b"])
    assert exit_info.value.code == 2


def test_sigterm_finishes_the_running_request_then_exits_0(tiny_checkpoint):
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "falconlm",
        "serve",
        "--model",
        str(tiny_checkpoint),
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--api-key",
        "k",
        "--shutdown-timeout",
        "20",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.1)
        body = {"prompt": "Once upon a time", "max_tokens": 120, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            headers = {"Authorization": "Bearer k"}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        assert proc.wait(timeout=60) == 0, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2]
    stderr = proc.communicate()[1]
    assert "Traceback" not in stderr
