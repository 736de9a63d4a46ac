"""``falconlm batch run|status|cancel`` in-process: per-line errors, duplicates, empty and all-bad files, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falconlm.batch.store import StateLock
from falconlm.cli import batch as batch_cli
from falconlm.cli import build_parser, main


def request_line(custom_id: str, prompt: str = "Once upon a time", url: str = "/v1/completions", **body) -> str:
    if url == "/v1/chat/completions":
        payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], **body}
    else:
        payload = {"model": "gpt-4o-mini", "prompt": prompt, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": payload})


BAD_LINES = [
    "{this is not json",
    json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),  # no custom_id
    json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/moderations", "body": {"input": "x"}}),
    json.dumps({"custom_id": "odd", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "foo": 1}}),
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_args(tmp_path: Path, checkpoint: Path, source: Path) -> list[str]:
    return [
        "batch",
        "run",
        str(source),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--errors",
        str(tmp_path / "err.jsonl"),
        "--state",
        str(tmp_path / "state"),
        "--model",
        str(checkpoint),
        "--dtype",
        "float32",
    ]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads a model."""

    def refuse(_args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(batch_cli, "_start_engine", refuse)


def test_run_answers_valid_lines_and_reports_each_bad_line_once(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    lines = [
        request_line("a", max_tokens=4, temperature=0),
        BAD_LINES[0],
        request_line("b", "The fox", max_tokens=3, temperature=0),
        request_line("chat", "hello", url="/v1/chat/completions", max_tokens=3, temperature=0, n=2),
        BAD_LINES[1],
        request_line("a", "a duplicate"),
        "",
        BAD_LINES[2],
        request_line("long", "fox " * 400, max_tokens=2),  # fails when it runs: longer than the context
        BAD_LINES[3],
        request_line("neg", temperature=-1),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 0
    out, err = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "err.jsonl")
    assert [o["custom_id"] for o in out] == ["a", "b", "chat"]
    assert all(o["error"] is None and o["response"]["status_code"] == 200 for o in out)
    assert out[0]["response"]["body"]["usage"]["completion_tokens"] == 4
    assert len(out[2]["response"]["body"]["choices"]) == 2
    codes = [(e["custom_id"], e["error"]["code"]) for e in err]
    assert codes == [
        (None, "invalid_json"),
        (None, "missing_custom_id"),
        ("a", "duplicate_custom_id"),
        ("emb", "invalid_url"),
        ("long", "invalid_request_error"),
        ("odd", "unsupported_field"),
        ("neg", "invalid_body"),
    ]
    assert all(e["response"] is None for e in err)

    assert main(["batch", "status", "--state", str(tmp_path / "state"), "--json"]) == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert (status["status"], status["total"], status["completed"], status["failed"]) == ("completed", 10, 3, 7)

    # Running the same command again recomputes nothing and rewrites the same files.
    before = (tmp_path / "out.jsonl").read_bytes(), (tmp_path / "err.jsonl").read_bytes()
    monkeypatch.setattr(batch_cli, "_start_engine", lambda _: pytest.fail("the model was loaded"))
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 0
    assert ((tmp_path / "out.jsonl").read_bytes(), (tmp_path / "err.jsonl").read_bytes()) == before


def test_empty_file(tmp_path, tiny_checkpoint, no_model):
    source = tmp_path / "in.jsonl"
    source.write_text("")
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 0
    assert (tmp_path / "out.jsonl").read_text() == "" and (tmp_path / "err.jsonl").read_text() == ""


def test_a_file_of_only_bad_lines(tmp_path, tiny_checkpoint, no_model):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(BAD_LINES * 3) + "\n")
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 0
    assert (tmp_path / "out.jsonl").read_text() == ""
    errors = read_jsonl(tmp_path / "err.jsonl")
    assert len(errors) == 12
    assert all(e["error"]["message"].startswith(f"line {i}: ") for i, e in enumerate(errors, 1))


def _interrupted(_args):
    """An engine start-up cut short by Ctrl-C, after the input was ingested."""
    raise KeyboardInterrupt


def test_interrupted_job_resumes_refuses_a_changed_input_and_cancels(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(request_line(f"r{i}", max_tokens=2, temperature=0) for i in range(5)) + "\n")

    monkeypatch.setattr(batch_cli, "_start_engine", _interrupted)
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.undo()

    lock = StateLock(tmp_path / "state")
    assert lock.acquire()
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 2
    assert "is running the jobs in" in capsys.readouterr().err
    lock.release()

    source.write_text(source.read_text() + request_line("extra") + "\n")
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 2
    assert "changed since job" in capsys.readouterr().err

    assert main(["batch", "cancel", "--state", str(tmp_path / "state")]) == 0
    assert "cancelled batch_" in capsys.readouterr().out
    errors = read_jsonl(tmp_path / "err.jsonl")
    assert [e["error"]["code"] for e in errors] == ["batch_cancelled"] * 5
    assert main(["batch", "status", "--state", str(tmp_path / "state")]) == 0
    assert "cancelled" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["batch", "run", "/no/such.jsonl", "-o", "{tmp}/o.jsonl"], "does not exist"),
        (["batch", "run", "{tmp}/in.jsonl", "-o", "{tmp}/in.jsonl"], "is the input file"),
        (["batch", "run", "{tmp}/in.jsonl", "-o", "{tmp}/nodir/o.jsonl"], "does not exist"),
        (["batch", "status", "--state", "{tmp}/nothing"], "no batch jobs"),
        (["batch", "run", "-o", "{tmp}/o.jsonl"], "no input file"),
        (["batch", "run", "--ray", "{tmp}/in.jsonl", "{tmp}/in.jsonl", "-o", "{tmp}/o.jsonl"], "two inputs"),
    ],
)
def test_bad_usage_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    (tmp_path / "in.jsonl").write_text("")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "address", "source"),
    [
        (["--ray", "{tmp}/in.jsonl"], "", "{tmp}/in.jsonl"),  # a bare --ray before the input
        (["--ray", "{tmp}/data"], "", "{tmp}/data"),  # an existing file of any name
        (["{tmp}/in.jsonl", "--ray", "10.0.0.5:6379"], "10.0.0.5:6379", "{tmp}/in.jsonl"),
        (["--ray", "auto", "{tmp}/in.jsonl"], "auto", "{tmp}/in.jsonl"),
        (["{tmp}/in.jsonl", "--ray"], "", "{tmp}/in.jsonl"),
    ],
)
def test_ray_takes_an_address_never_the_input(tmp_path, argv, address, source):
    (tmp_path / "data").write_text("")
    args = build_parser().parse_args(
        ["batch", "run", *(a.replace("{tmp}", str(tmp_path)) for a in argv), "-o", str(tmp_path / "o.jsonl")]
    )
    batch_cli._input_after_ray(args)
    assert args.ray == address and args.input == Path(source.replace("{tmp}", str(tmp_path)))


def test_output_is_required(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["batch", "run", str(tmp_path / "in.jsonl")])
    assert exc.value.code == 2 and "--output" in capsys.readouterr().err


def test_unwritable_output_is_refused_before_any_work(tmp_path, tiny_checkpoint, capsys, no_model):
    source = tmp_path / "in.jsonl"
    source.write_text(request_line("a") + "\n")
    (tmp_path / "out.jsonl").mkdir()  # a folder where the results should go
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()  # nothing was ingested, let alone computed

    (tmp_path / "out.jsonl").rmdir()
    (tmp_path / "err.jsonl").mkdir()
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 2
    assert "err.jsonl is a folder" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_rerun_after_cancel_keeps_work_already_done(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from falconlm.batch.records import Result
    from falconlm.batch.store import Store

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(request_line(f"r{i}", max_tokens=2, temperature=0) for i in range(4)) + "\n")

    monkeypatch.setattr(batch_cli, "_start_engine", _interrupted)
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 130  # ingested, nothing run
    monkeypatch.undo()
    store = Store(tmp_path / "state")
    (job,) = store.list_jobs()
    marker = '{"custom_id":"r1","done":"before the cancel"}'
    store.commit_results(job.id, [Result("r1", "done", marker)])  # finished before the cancel
    store.close()
    assert main(["batch", "cancel", "--state", str(tmp_path / "state")]) == 0
    assert main(run_args(tmp_path, tiny_checkpoint, source)) == 0
    assert "resuming cancelled job" in capsys.readouterr().err
    out = (tmp_path / "out.jsonl").read_text().splitlines()
    assert marker in out  # kept, not recomputed
    assert sorted(json.loads(line)["custom_id"] for line in out) == ["r0", "r1", "r2", "r3"]
    assert (tmp_path / "err.jsonl").read_text() == ""
    store = Store(tmp_path / "state")
    assert [(j.id, j.status, j.completed) for j in store.list_jobs()] == [(job.id, "completed", 4)]
    store.close()


@pytest.mark.parametrize("option", ["--max-in-flight", "--max-num-seqs"])
def test_zero_in_flight_is_refused_not_replaced_by_the_default(tmp_path, capsys, option):
    (tmp_path / "in.jsonl").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["batch", "run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), option, "0"])
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
