"""Decode runs in the scheduler (``Scheduler.schedule(num_steps)``, ``update_from_output``): when a schedule may run
several model steps, that it has KV slots for all of them, and that the tokens of a run land as step-by-step
decoding would have left them. A fake runner samples from a pure function of each sequence (test_scheduler.py's)."""

from __future__ import annotations

import pytest

from falconlm.engine.request import Request, RequestStatus
from falconlm.engine.scheduler import ModelRunnerOutput, Scheduler, SchedulerOutput

from .test_scheduler import BLOCK, assert_all_blocks_free, expected_output, fake_model, make_request, make_scheduler


def run_step(scheduler: Scheduler, num_steps: int, stop_early: bool = True) -> tuple[SchedulerOutput, list]:
    """One schedule asking for ``num_steps``; each sampled row then gets a token for every step granted (up to
    a stop token, as the runner does, unless not ``stop_early``)."""
    out = scheduler.schedule(num_steps)
    ids, first, later = [], [], []
    for row in out.scheduled:
        request = row.request
        assert len(request.block_ids) * BLOCK >= row.start + row.num_tokens + out.num_steps - 1, "no slot for a step"
        if row.sample:
            tokens, chosen = list(request.all_token_ids), []
            for _ in range(out.num_steps):
                chosen.append(fake_model(tokens))
                tokens.append(chosen[-1])
                if stop_early and request.stops_at(chosen[-1]):
                    break
            ids.append(request.request_id)
            first.append(chosen[0])
            later.append(chosen[1:])
    runner_output = ModelRunnerOutput(ids, first, [None] * len(ids), {}, later, [[None] * len(t) for t in later])
    return out, scheduler.update_from_output(out, runner_output)


def test_a_decoding_request_runs_several_steps_per_schedule_up_to_its_max_tokens() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 6, max_tokens=12)
    scheduler.add_request(request)
    out, _ = run_step(scheduler, 8)
    assert out.num_steps == 1  # a prompt chunk runs one step
    out, updates = run_step(scheduler, 8)
    assert out.num_steps == 8
    assert [len(u.new_token_ids) for u in updates] == [8] and updates[0].logprobs == [None] * 8
    assert request.num_computed_tokens == request.num_tokens - 1 == 6 + 8  # every token's KV but the last
    out, updates = run_step(scheduler, 8)
    assert out.num_steps == 3  # 12 - 9 tokens left
    assert updates[0].finished and request.status == RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == expected_output(request.prompt_token_ids, 12)
    assert_all_blocks_free(scheduler)


def test_no_run_while_a_request_waits_or_is_in_its_prompt() -> None:
    scheduler = make_scheduler(budget=8, max_num_seqs=1)
    a, b = make_request("a", 3, max_tokens=6), make_request("b", 20, max_tokens=3)
    scheduler.add_request(a)
    scheduler.add_request(b)
    assert run_step(scheduler, 8)[0].num_steps == 1  # a's prompt
    assert run_step(scheduler, 8)[0].num_steps == 1  # a decodes, b waits for its seat
    while not a.is_finished:
        run_step(scheduler, 8)
    steps = []
    while scheduler.has_unfinished():
        steps.append(run_step(scheduler, 8)[0].num_steps)
    assert steps == [1, 1, 1, 2]  # b's prompt in three chunks of 8, then its last two tokens in one run
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 3)


def test_every_running_request_must_decode_in_the_step_and_be_able_to_run_ahead() -> None:
    scheduler = make_scheduler(budget=12)
    plain, penalized = make_request("a", 4, max_tokens=8), make_request("b", 4, max_tokens=8, repetition_penalty=1.2)
    scheduler.add_request(plain)
    scheduler.add_request(penalized)
    assert [run_step(scheduler, 4)[0].num_steps for _ in range(3)] == [1, 1, 1]  # b's tokens depend on its output
    assert not penalized.runs_ahead and plain.runs_ahead
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert run_step(scheduler, 4)[0].num_steps == 4


def test_a_run_without_room_in_the_cache_is_one_step_and_preempts_nobody() -> None:
    scheduler = make_scheduler(num_blocks=3)  # 12 slots: a 9-token prompt and three more tokens
    request = make_request("a", 9, max_tokens=8)
    scheduler.add_request(request)
    run_step(scheduler, 8)
    out, _ = run_step(scheduler, 8)  # position 9 fits, 9 + 8 do not
    assert out.num_steps == 1 and not out.preempted_ids
    assert run_step(scheduler, 2)[0].num_steps == 2  # positions 10 and 11 fit


@pytest.mark.parametrize("stop_early", [True, False])
def test_a_stop_token_inside_a_run_finishes_the_request_and_drops_what_follows(stop_early: bool) -> None:
    prompt = list(range(30, 36))
    tokens = expected_output(prompt, 10)
    stop = tokens[3]
    assert stop not in tokens[:3]  # the fourth token is the first stop: the run's third step
    scheduler = make_scheduler()
    request = Request("a", prompt, make_request("x", 1, max_tokens=10, stop_token_ids=[stop]).sampling_params,
                      None, 0.0, 1024)  # fmt: skip
    scheduler.add_request(request)
    run_step(scheduler, 8)
    out, updates = run_step(scheduler, 8, stop_early)
    assert out.num_steps == 8 and updates[0].finished and updates[0].new_token_ids == tokens[1:4]
    assert request.output_token_ids == tokens[:4] and request.stop_reason == stop
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert_all_blocks_free(scheduler)
