"""``falconlm serve --task embed``: the flags reach the engine, a checkpoint's unsupported pooling is a one-line
error, and a real server process serves /v1/embeddings and refuses generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx

from falconlm.cli import build_parser, main
from falconlm.cli.serve import engine_args

from .conftest import free_port


def test_embedding_flags_become_engine_args(tmp_path):
    argv = ["serve", "--model", str(tmp_path), "--task", "embed", "--pooling", "mean", "--no-normalize"]
    args = engine_args(build_parser().parse_args(argv))
    assert (args.task, args.pooling, args.normalize) == ("embed", "mean", False)
    defaults = engine_args(build_parser().parse_args(["serve"]))
    assert (defaults.task, defaults.pooling, defaults.normalize) == ("generate", None, None)


def test_an_unsupported_sentence_transformers_pooling_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    modules = [{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert main(["serve", "--model", str(folder), "--task", "embed"]) == 2
    err = capsys.readouterr().err
    assert "pooling_mode_max_tokens is not supported" in err and "Traceback" not in err


def test_serve_task_embed_process(tiny_checkpoint):
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "falconlm", "serve", "--model", str(tiny_checkpoint), "--dtype", "float32"]
    command += ["--port", str(port), "--task", "embed", "--pooling", "mean", "--log-level", "warning"]
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
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["a fox", "a bear"]}, timeout=60)
        assert r.status_code == 200, r.text
        assert [len(d["embedding"]) for d in r.json()["data"]] == [64, 64]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and "embeddings only" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == tiny_checkpoint.name
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in proc.communicate()[1]
