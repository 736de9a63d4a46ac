"""Scheduler: continuous batching, chunked prefill, preemption and finishing, driven by a fake runner.

The fake runner stands in for the model. It keeps a fake KV cache in which each slot holds the token prefix
it encodes, checks before sampling that a row's block table reads back exactly ``all_token_ids``, and samples
from a pure function of the sequence so that outputs never depend on how requests were batched.
Past 400 lines on purpose: one flat scenario per scheduling rule, mirroring ``engine/scheduler.py``.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from falconlm.engine.kv_cache_manager import KVCacheManager
from falconlm.engine.request import FINISH_REASON, Request, RequestStatus
from falconlm.engine.sampling_params import SamplingParams
from falconlm.engine.scheduler import ModelRunnerOutput, QueueFullError, Scheduler, SchedulerOutput

BLOCK = 4
ENGINE_DIR = Path(__file__).resolve().parents[2] / "falconlm" / "engine"


def fake_model(token_ids: list[int]) -> int:
    """Next token as a function of the whole sequence, never 0 (kept free for EOS tests)."""
    return sum((i + 1) * t for i, t in enumerate(token_ids)) % 97 + 3


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_model(tokens))
    return tokens[len(prompt) :]


def make_request(
    request_id: str,
    prompt: list[int] | int,
    max_tokens: int | None = 4,
    max_model_len: int = 1024,
    eos: int | None = None,
    **params: object,
) -> Request:
    """A request; an int prompt means that many tokens, distinct per request id (so no prefix is shared)."""
    base = 100 * sum(map(ord, request_id))
    tokens = list(range(base, base + prompt)) if isinstance(prompt, int) else prompt
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens, **params), eos, 0.0, max_model_len)


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 256, **kwargs: object) -> Scheduler:
    manager = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=kwargs.pop("caching", True))
    return Scheduler(manager, max_num_seqs, budget, **kwargs)


class FakeRunner:
    """Writes fake KV for each row, checks the table reads back the sequence, samples from ``next_token``."""

    def __init__(self, scheduler: Scheduler, next_token: Callable[[Request], int] | None = None) -> None:
        self.scheduler = scheduler
        self.next_token = next_token or (lambda request: fake_model(request.all_token_ids))
        self.kv: dict[int, tuple[int, ...]] = {}

    def slot(self, request: Request, position: int) -> int:
        return request.block_ids[position // BLOCK] * BLOCK + position % BLOCK

    def step(self) -> tuple[SchedulerOutput, list]:
        out = self.scheduler.schedule()
        pool = self.scheduler.kv_cache_manager.block_pool
        for row in out.scheduled:
            request = row.request
            assert row.start == request.num_computed_tokens
            assert row.sample == (row.start + row.num_tokens == request.num_tokens)
            assert len(request.block_ids) * BLOCK >= row.start + row.num_tokens
            for position in range(row.start, row.start + row.num_tokens):
                block_id = request.block_ids[position // BLOCK]
                assert pool.ref_count(block_id) == 1, "writing into a shared block"
                assert pool.block_to_hash[block_id] is None, "overwriting a cached block"
                self.kv[self.slot(request, position)] = tuple(request.all_token_ids[: position + 1])
        request_ids, sampled = [], []
        for row in out.scheduled:
            if row.sample:
                request = row.request
                tokens = request.all_token_ids
                for position in range(request.num_tokens):
                    assert self.kv[self.slot(request, position)] == tuple(tokens[: position + 1])
                request_ids.append(request.request_id)
                sampled.append(self.next_token(request))
        runner_output = ModelRunnerOutput(request_ids, sampled, [None] * len(sampled))
        return out, self.scheduler.update_from_output(out, runner_output)

    def run(self, max_steps: int = 10_000) -> list[SchedulerOutput]:
        outs = []
        while self.scheduler.has_unfinished():
            assert len(outs) < max_steps, "no progress"
            outs.append(self.step()[0])
        return outs


def rows(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(r.request.request_id, r.start, r.num_tokens, r.sample) for r in out.scheduled]


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.block_pool.ref_counts)


# ---- basic lifecycle ------------------------------------------------------------------------------------------


def test_one_request_prefills_then_decodes_to_max_tokens() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 10, max_tokens=5)
    scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    out, updates = runner.step()
    assert rows(out) == [("a", 0, 10, True)]
    assert out.num_batched_tokens == 10
    assert [(u.request.request_id, u.finished) for u in updates] == [("a", False)]
    outs = runner.run()
    assert [rows(o) for o in outs] == [[("a", 10 + i, 1, True)] for i in range(4)]
    assert request.output_token_ids == expected_output(request.prompt_token_ids, 5)
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert FINISH_REASON[request.status] == "length"
    assert scheduler.get_request("a") is None
    assert_all_blocks_free(scheduler)


def test_request_added_while_others_decode_joins_the_next_step() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 6, max_tokens=10))
    runner.step()
    runner.step()
    scheduler.add_request(make_request("b", 5, max_tokens=2))
    out, updates = runner.step()
    assert rows(out) == [("a", 7, 1, True), ("b", 0, 5, True)]
    assert [u.request.request_id for u in updates] == ["a", "b"]


def test_chunked_prefill_samples_only_on_the_last_chunk() -> None:
    scheduler = make_scheduler(budget=32)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 100, max_tokens=2))
    chunks = [runner.step() for _ in range(4)]
    assert [rows(out) for out, _ in chunks] == [
        [("a", 0, 32, False)],
        [("a", 32, 32, False)],
        [("a", 64, 32, False)],
        [("a", 96, 4, True)],
    ]
    assert [len(updates) for _, updates in chunks] == [0, 0, 0, 1]
    runner.run()
    assert_all_blocks_free(scheduler)


def test_decodes_and_a_prefill_chunk_share_one_step() -> None:
    scheduler = make_scheduler(budget=20)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 8, max_tokens=10))
    scheduler.add_request(make_request("b", 8, max_tokens=10))
    runner.step()
    scheduler.add_request(make_request("c", 50, max_tokens=10))
    out, _ = runner.step()
    assert rows(out) == [("a", 8, 1, True), ("b", 8, 1, True), ("c", 0, 18, False)]
    assert out.num_batched_tokens == 20
    out, _ = runner.step()
    assert rows(out) == [("a", 9, 1, True), ("b", 9, 1, True), ("c", 18, 18, False)]


def test_prefix_hit_skips_cached_blocks_but_computes_the_last_token() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    prompt = list(range(1, 17))  # exactly four full blocks
    scheduler.add_request(make_request("a", prompt, max_tokens=1))
    runner.run()
    b = make_request("b", prompt, max_tokens=2)
    scheduler.add_request(b)
    out, _ = runner.step()
    assert rows(out) == [("b", 12, 4, True)]
    assert b.num_cached_tokens == 12
    runner.run()
    assert b.output_token_ids == expected_output(b.prompt_token_ids, 2)
    assert scheduler.kv_cache_manager.num_prefix_hit_tokens == 12


# ---- admission limits ------------------------------------------------------------------------------------------


def test_waiting_requests_are_admitted_fifo() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(scheduler)
    for name in "abc":
        scheduler.add_request(make_request(name, 5, max_tokens=2))
    order = []
    for out in runner.run():
        order.extend(r.request.request_id for r in out.scheduled if r.start == 0)
    assert order == ["a", "b", "c"]


def test_max_num_seqs_is_respected() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeRunner(scheduler)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", 3 + i, max_tokens=3))
    outs = runner.run()
    assert max(len(out.scheduled) for out in outs) == 2
    assert len(outs) == 9  # three waves of two, the fifth alone; each wave is 3 steps


def test_admission_stops_at_the_first_request_that_does_not_fit() -> None:
    scheduler = make_scheduler(num_blocks=6)
    scheduler.add_request(make_request("a", 16, max_tokens=2))  # 4 blocks
    scheduler.add_request(make_request("b", 12, max_tokens=2))  # 3 blocks: does not fit beside a
    scheduler.add_request(make_request("c", 4, max_tokens=2))  # would fit, but FIFO waits for b
    out, _ = FakeRunner(scheduler).step()
    assert rows(out) == [("a", 0, 16, True)]
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]


def test_queue_full_raises() -> None:
    scheduler = make_scheduler(max_waiting=2)
    scheduler.add_request(make_request("a", 3))
    scheduler.add_request(make_request("b", 3))
    with pytest.raises(QueueFullError):
        scheduler.add_request(make_request("c", 3))
    FakeRunner(scheduler).step()  # both admitted: the queue has room again
    scheduler.add_request(make_request("c", 3))


def test_duplicate_request_id_raises() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request(make_request("a", 3))


# ---- preemption ------------------------------------------------------------------------------------------------


def test_newest_running_request_is_preempted_when_blocks_run_out() -> None:
    scheduler = make_scheduler(num_blocks=6)
    runner = FakeRunner(scheduler)
    requests = [make_request(name, [ord(name)] * 6, max_tokens=8) for name in "abc"]
    for request in requests:
        scheduler.add_request(request)
    runner.step()  # 2 blocks each: the pool is full
    runner.step()
    runner.step()  # 8 tokens each, every block full
    out, _ = runner.step()  # a and b need a third block: c (newest) gives its blocks up
    assert out.preempted_ids == ["c"]
    assert rows(out) == [("a", 8, 1, True), ("b", 8, 1, True)]
    c = requests[2]
    assert c.status == RequestStatus.PREEMPTED
    assert (c.num_computed_tokens, c.block_ids) == (0, [])
    assert scheduler.waiting[0] is c
    runner.run()
    for request in requests:
        assert request.output_token_ids == expected_output(request.prompt_token_ids, 8)
        assert request.status == RequestStatus.FINISHED_LENGTH
    assert scheduler.num_preemptions >= 1
    assert_all_blocks_free(scheduler)


def test_newest_request_preempts_itself_and_nobody_is_admitted_that_step() -> None:
    scheduler = make_scheduler(num_blocks=4)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 7, max_tokens=3))
    scheduler.add_request(make_request("b", [9] * 8, max_tokens=3))
    runner.step()
    scheduler.add_request(make_request("c", 2, max_tokens=1))
    out, _ = runner.step()  # a (8 tokens) still fits; b's 9th token needs a block that is not there
    assert out.preempted_ids == ["b"]
    assert rows(out) == [("a", 7, 1, True)]
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    runner.run()
    assert_all_blocks_free(scheduler)


def test_preempted_requests_resume_in_arrival_order() -> None:
    scheduler = make_scheduler(num_blocks=4)
    runner = FakeRunner(scheduler)
    for name, prompt_len in zip("abc", (8, 4, 3), strict=True):
        scheduler.add_request(make_request(name, prompt_len, max_tokens=4))
    runner.step()  # 2 + 1 + 1 blocks: the pool is full
    out, _ = runner.step()  # a's 9th token takes c's block; b's 5th finds none left, and b is now the newest
    assert out.preempted_ids == ["c", "b"]
    assert rows(out) == [("a", 8, 1, True)]
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    runner.run()
    assert_all_blocks_free(scheduler)


# ---- finishing -------------------------------------------------------------------------------------------------


def test_eos_finishes_and_frees_unless_ignored() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler, next_token=lambda request: 0)
    scheduler.add_request(make_request("a", 5, max_tokens=4, eos=0))
    scheduler.add_request(make_request("b", 5, max_tokens=4, eos=0, ignore_eos=True))
    _, updates = runner.step()
    assert [(u.request.request_id, u.new_token_ids, u.finished) for u in updates] == [
        ("a", [0], True),
        ("b", [0], False),
    ]
    a = updates[0].request
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert a.block_ids == []
    assert scheduler.num_running == 1
    runner.run()
    assert updates[1].request.output_token_ids == [0, 0, 0, 0]
    assert_all_blocks_free(scheduler)


def test_stop_token_sets_stop_reason() -> None:
    script = iter([5, 9, 5])
    scheduler = make_scheduler()
    request = make_request("a", 5, max_tokens=10, stop_token_ids=[9])
    scheduler.add_request(request)
    FakeRunner(scheduler, next_token=lambda _: next(script)).run()
    assert request.output_token_ids == [5, 9]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 9
    assert_all_blocks_free(scheduler)


def test_max_model_len_caps_unbounded_max_tokens() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 10, max_tokens=None, max_model_len=13)
    scheduler.add_request(request)
    FakeRunner(scheduler).run()
    assert request.num_output_tokens == 3
    assert request.num_tokens == 13
    assert request.status == RequestStatus.FINISHED_LENGTH


def test_abort_frees_blocks_of_waiting_and_running_requests() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(scheduler)
    a, b = make_request("a", 9, max_tokens=8), make_request("b", 9, max_tokens=8)
    scheduler.add_request(a)
    scheduler.add_request(b)
    runner.step()
    assert (a.status, b.status) == (RequestStatus.RUNNING, RequestStatus.WAITING)
    scheduler.abort_requests(["b", "a", "unknown"])
    for request in (a, b):
        assert request.status == RequestStatus.FINISHED_ABORTED
        assert request.block_ids == []
    assert not scheduler.has_unfinished()
    assert (scheduler.num_running, scheduler.num_waiting) == (0, 0)
    assert_all_blocks_free(scheduler)


def test_abort_between_schedule_and_update_is_skipped() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 5))
    out = scheduler.schedule()
    scheduler.abort_requests(["a"])
    assert scheduler.update_from_output(out, ModelRunnerOutput(["a"], [7], [None])) == []
    assert_all_blocks_free(scheduler)


def test_finish_requests_needs_a_finished_status() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 5))
    with pytest.raises(ValueError):
        scheduler.finish_requests(["a"], RequestStatus.RUNNING)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert scheduler.get_request("a") is None


def test_prompt_too_long_for_the_pool_is_aborted_not_stuck() -> None:
    scheduler = make_scheduler(num_blocks=4)
    scheduler.add_request(make_request("big", 17))  # 5 blocks > the whole pool
    scheduler.add_request(make_request("ok", 5, max_tokens=2))
    out, _ = FakeRunner(scheduler).step()
    assert [r.request_id for r in out.aborted] == ["big"]
    assert out.aborted[0].status == RequestStatus.FINISHED_ABORTED
    assert rows(out) == [("ok", 0, 5, True)]


def test_request_outgrowing_the_pool_alone_is_aborted_not_stuck() -> None:
    scheduler = make_scheduler(num_blocks=4)
    request = make_request("grow", 15, max_tokens=10)
    scheduler.add_request(request)
    outs = FakeRunner(scheduler).run(max_steps=50)
    assert outs[-1].aborted == [request]
    assert request.num_output_tokens == 2  # tokens 16 and 17: the 17th has no block to go to
    assert_all_blocks_free(scheduler)


def test_prompt_filling_max_model_len_is_aborted() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 8, max_model_len=8))
    out = scheduler.schedule()
    assert [r.request_id for r in out.aborted] == ["a"]
    assert out.scheduled == []


# ---- everything at once -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_matches_unbatched_generation(caching: bool) -> None:
    rng = random.Random(1234 + caching)
    scheduler = make_scheduler(num_blocks=14, max_num_seqs=5, budget=24, caching=caching)
    runner = FakeRunner(scheduler)
    shared = [rng.randrange(1, 50) for _ in range(12)]
    pending = []
    for i in range(30):
        prompt = shared[: rng.randrange(0, 13)] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
        pending.append(make_request(f"r{i}", prompt, max_tokens=rng.randrange(1, 15)))
    requests = list(pending)
    aborted = set()
    for step in range(2000):
        if pending and rng.random() < 0.5:
            scheduler.add_request(pending.pop(0))
        if step % 37 == 5 and scheduler.running:
            victim = rng.choice(scheduler.running).request_id
            scheduler.abort_requests([victim])
            aborted.add(victim)
        if not pending and not scheduler.has_unfinished():
            break
        runner.step()
        assert scheduler.num_running <= 5
    assert not scheduler.has_unfinished()
    for request in requests:
        if request.request_id in aborted:
            assert request.status == RequestStatus.FINISHED_ABORTED
        else:
            assert request.status == RequestStatus.FINISHED_LENGTH
            assert request.output_token_ids == expected_output(request.prompt_token_ids, request.max_tokens)
    assert scheduler.num_preemptions > 0
    if caching:
        assert scheduler.kv_cache_manager.num_prefix_hit_tokens > 0
    assert_all_blocks_free(scheduler)


# ---- guard: the policy half never imports torch ---------------------------------------------------------------


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (TYPE_CHECKING blocks included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_policy_modules_never_import_torch() -> None:
    todo = ["request", "block_pool", "kv_cache_manager", "scheduler", "scheduler_output"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for module in _imported_modules(ENGINE_DIR / f"{name}.py", "falconlm.engine"):
            assert module.split(".")[0] != "torch", f"falconlm.engine.{name} imports {module}"
            if module.startswith("falconlm."):
                assert module.startswith("falconlm.engine"), f"falconlm.engine.{name} imports {module}"
                leaf = module.removeprefix("falconlm.engine.")
                if "." not in leaf and (ENGINE_DIR / f"{leaf}.py").is_file():
                    todo.append(leaf)
    assert {"request", "block_pool", "kv_cache_manager", "scheduler", "sampling_params"} <= seen


def test_guard_sees_relative_and_type_checking_imports(tmp_path: Path) -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch.nn\nfrom .request import Request\n"
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert {"torch.nn", "falconlm.engine.request"} <= _imported_modules(path, "falconlm.engine")
