"""The tensor-parallel step messages, in one process: what rank 0 broadcasts is what a follower reads back, and a
failed collective is one readable TensorParallelError that breaks the channel."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from falconlm.engine import tp_runner
from falconlm.engine.forward_batch import ForwardBatch
from falconlm.engine.tp_runner import (
    FORWARD,
    KEEPALIVE,
    PLAN,
    STOP,
    RunnerPlan,
    StepChannel,
    TensorParallelError,
)
from falconlm.parallel import ParallelState

CPU = torch.device("cpu")


def _batch() -> ForwardBatch:
    return ForwardBatch(
        token_ids=[5, 6, 7, 8],
        positions=[0, 1, 2, 9],
        rope_lengths=[4, 4, 4, 12],
        kv_slots=[32, 33, 34, 77],
        query_starts=[0, 3],
        query_lens=[3, 1],
        context_lens=[3, 10],
        block_tables=[[2], [3, 4, 4000]],
        logits_rows=[2, 3, 0, 1],
        state_slots=[1, 0],
        fresh=[True, False],
    )


def test_what_rank_0_sends_is_what_a_follower_reads(monkeypatch) -> None:
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "broadcast", lambda t, src, group=None: sent.append(t.clone()))
    driver = StepChannel(ParallelState(0, 2, CPU))
    plan = RunnerPlan("hybrid", 123, 16, 7, True)
    driver.send_plan(plan)
    driver.send_forward(_batch())
    driver.send_forward(ForwardBatch(token_ids=[1], query_starts=[0], query_lens=[1], state_slots=[2], fresh=[False]))
    driver.send_keepalive()
    driver.send_stop()

    replay = iter(sent)
    monkeypatch.setattr(dist, "broadcast", lambda t, src, group=None: t.copy_(next(replay)))
    follower = StepChannel(ParallelState(1, 2, CPU))
    assert follower.receive() == (PLAN, plan)
    kind, batch = follower.receive()
    expected = _batch()
    expected.block_tables = [[2, 0, 0], [3, 4, 4000]]  # padded with 0, as the runner pads them
    assert kind == FORWARD and batch == expected
    kind, batch = follower.receive()
    assert kind == FORWARD and batch.token_ids == [1] and batch.fresh == [False] and batch.block_tables == []
    assert follower.receive() == (KEEPALIVE, None)
    assert follower.receive() == (STOP, None)
    assert next(replay, None) is None  # nothing left over: both sides agree on every message's size


def test_a_failed_collective_is_one_line_and_breaks_the_channel(monkeypatch) -> None:
    monkeypatch.setattr(tp_runner, "_failed", False)  # restored after the test

    def closed(t, src, group=None):
        raise RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234. "
            "This is typically caused by a remote worker crashing.\nmore detail"
        )

    monkeypatch.setattr(dist, "broadcast", closed)
    channel = StepChannel(ParallelState(1, 2, CPU, timeout_s=7))
    with pytest.raises(TensorParallelError) as info:
        channel.receive()
    message = str(info.value)
    assert (
        "\n" not in message
        and "within 7s" in message
        and message.endswith("Connection closed by peer [127.0.0.1]:1234.")
    )
    assert channel.broken and tp_runner.group_failed()
    with pytest.raises(TensorParallelError, match="already failed"):
        channel.receive()
