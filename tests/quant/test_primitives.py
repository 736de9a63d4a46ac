"""Pack/unpack round trips, quantization error bounds and the group plan for awkward widths."""

from __future__ import annotations

import pytest
import torch

from falconlm.quant.primitives import (
    GroupPlan,
    QuantizedTensor,
    pack_int4,
    plan_groups,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def test_pack_unpack_round_trip() -> None:
    q = torch.randint(0, 16, (7, 10), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # even column in the low nibble


def test_pack_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("width", "group", "expected"),
    [
        (4096, 128, GroupPlan(128, 4096, 4096)),
        (4544, 128, GroupPlan(64, 4544, 4544)),  # Falcon-7B's hidden size: groups of 64
        (4544, 64, GroupPlan(64, 4544, 4544)),
        (96, 64, GroupPlan(32, 96, 96)),
        (48, 32, GroupPlan(32, 48, 64)),  # no supported group divides 48: padding
        (200, 128, GroupPlan(128, 200, 256)),
    ],
)
def test_plan_groups(width: int, group: int, expected: GroupPlan) -> None:
    plan = plan_groups(width, group)
    assert (plan.group_size, plan.in_features, plan.padded_in) == (
        expected.group_size,
        expected.in_features,
        expected.padded_in,
    )
    assert (plan.note is None) == (plan == GroupPlan(group, width, width))


def test_plan_groups_rejects_unsupported_size() -> None:
    with pytest.raises(ValueError, match="group size 48 is not supported"):
        plan_groups(96, 48)


def test_int8_round_trip_error_is_half_a_step() -> None:
    w = torch.randn(33, 70)
    qt = quantize_int8(w)
    assert qt.qweight.dtype == torch.int8 and qt.scales.shape == (33,)
    err = (qt.dequantize() - w).abs()
    assert (err <= qt.scales[:, None] / 2 + 1e-7).all()
    assert qt.qweight.abs().max() == 127


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("width", "group"), [(128, 32), (4544, 128), (48, 32), (100, 64)])
def test_int4_round_trip(width: int, group: int, symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(20, width)
    plan = plan_groups(width, group)
    qt = quantize_int4(w, plan, symmetric)
    assert qt.qweight.shape == (20, plan.padded_in // 2)
    assert qt.scales.shape == (20, plan.num_groups)
    assert (qt.zeros is None) == symmetric
    deq = qt.dequantize()
    assert deq.shape == w.shape
    # Per group, the error stays within half a step (a step is |scale|); symmetric may clip the far side by one.
    step = qt.scales.abs().repeat_interleave(plan.group_size, dim=1)[:, :width]
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert ((deq - w).abs() <= bound).all()
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < 0.12


def test_int4_asymmetric_hits_group_extremes_exactly() -> None:
    w = torch.randn(4, 64)
    qt = quantize_int4(w, plan_groups(64, 32))
    deq = qt.dequantize().view(4, 2, 32)
    g = w.view(4, 2, 32)
    torch.testing.assert_close(deq.amin(2), g.amin(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(deq.amax(2), g.amax(2), rtol=0, atol=1e-6)


def test_constant_and_zero_rows_are_exact() -> None:
    w = torch.zeros(3, 64)
    w[1] = 0.25
    for qt in (quantize_int8(w), quantize_int4(w, plan_groups(64, 32)), quantize_int4(w, plan_groups(64, 64), True)):
        torch.testing.assert_close(qt.dequantize(), w, rtol=0, atol=0)


def test_rows_matches_dequantize() -> None:
    w = torch.randn(50, 96)
    ids = torch.tensor([[3, 0], [49, 3]])
    for qt in (quantize_int8(w), quantize_int4(w, plan_groups(96, 64))):
        rows = qt.rows(ids, torch.float32)
        assert rows.shape == (2, 2, 96)
        torch.testing.assert_close(rows, qt.dequantize()[ids])


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_int8(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="plan is for 64"):
        quantize_int4(torch.randn(2, 32), plan_groups(64, 32))


def test_quantized_tensor_to_casts_only_floats() -> None:
    qt = quantize_int4(torch.randn(16, 64), plan_groups(64, 32))
    half = qt.to(dtype=torch.bfloat16)
    assert half.qweight.dtype == torch.uint8 and half.scales.dtype == torch.bfloat16
    assert half.zeros is not None and half.zeros.dtype == torch.bfloat16
    assert isinstance(half, QuantizedTensor) and half.padded_in == 64
