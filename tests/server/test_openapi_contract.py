"""schemathesis against the server's own OpenAPI document, every check, on a live key-less server on 127.0.0.1
with /v1/files and /v1/batches: no 5xx, every status and body as documented, valid requests accepted and
invalid ones refused. The budget is small; the schema's bounds (model name, context, vocabulary) keep the
generated requests inside what the tiny model serves, so they reach the engine."""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from falconlm.serving.errors import CONTEXT_LENGTH_PHRASE  # noqa: E402
from falconlm.serving.structured_output import REFUSAL_PHRASE  # noqa: E402

from .conftest import LiveServer, ServerFactory  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The only 400s a schema-valid request may get (see schemathesis.toml): its prompt plus max_tokens is over the
# context, it names a batch input file that does not exist, or its structured-output constraint (a JSON Schema,
# regex or grammar) is one the grammar engine cannot compile. No schema states these.
RUNTIME_REFUSALS = (CONTEXT_LENGTH_PHRASE, "no batch input file", REFUSAL_PHRASE)
MAX_EXAMPLES = 6


@schemathesis.check
def valid_requests_are_refused_only_for_runtime_limits(ctx, response, case) -> bool | None:
    """Stricter than positive_data_acceptance as configured: a schema-valid request's 400 must be a runtime one."""
    meta = case.meta
    if meta is None or response.status_code != 400 or not meta.generation.mode.is_positive:
        return None
    if any(component.mode.is_negative for component in meta.components.values()):
        return None  # one part was made invalid on purpose
    message = response.json()["error"]["message"]
    if not any(phrase in message for phrase in RUNTIME_REFUSALS):
        raise AssertionError(f"a schema-valid request got 400: {message}")
    return None


@pytest.fixture(scope="module")
def contract_server(start_server: ServerFactory, tmp_path_factory) -> LiveServer:
    return start_server(settings={"state_dir": str(tmp_path_factory.mktemp("state"))})


def _failures(schema) -> list[str]:
    """Run every phase (examples, coverage, fuzzing, stateful) like ``st run``; one line per failed check."""
    from schemathesis.engine import Status, events, from_schema

    found: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished) and event.status == Status.FAILURE:
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    if node.status == Status.FAILURE and node.failure_info is not None:
                        failure = node.failure_info.failure
                        sample = node.failure_info.code_sample
                        found.append(f"{event.label}: {node.name}: {failure.title}: {failure.message}\n{sample}")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            found.append(f"schemathesis error: {event}")
    return found


def test_every_route_matches_its_documented_contract(contract_server: LiveServer):
    settings = (ROOT / "schemathesis.toml").read_text(encoding="utf-8")
    config = schemathesis.Config.from_str(f'base-url = "{contract_server.url}"\n{settings}')
    config.projects.override.checks.update(included_check_names=["all"])
    config.projects.override.generation.update(max_examples=MAX_EXAMPLES, deterministic=True)
    schema = schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json", config=config)
    failures = _failures(schema)
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    with contract_server.http() as http:  # the generated requests reached the engine
        metrics = http.get("/metrics").text
    assert 'falconlm_requests_total{finish_reason="length"}' in metrics
