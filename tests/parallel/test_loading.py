"""The shard loader reads each rank's slices exactly (safetensors, several shard files, .bin), converts dtypes,
reports bad checkpoints as the unsharded loader does, and gives each rank its heads' ALiBi slopes. Loading a
plain model runs no collective, so one process can stand in for every rank here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from falconlm.model.checkpoint import CheckpointError
from falconlm.model.config import FalconConfig
from falconlm.model.falcon import FalconForCausalLM
from falconlm.model.positions import alibi_slopes, head_alibi_slopes
from falconlm.parallel import ParallelState
from falconlm.parallel.falcon import rank_config, split_falcon
from falconlm.parallel.layers import parameter_shards
from falconlm.parallel.loading import load_sharded

from .models import write_falcon, write_falcon3


def _rank(rank: int, world: int) -> ParallelState:
    return ParallelState(rank, world, torch.device("cpu"))


def _check_slices(folder: Path, world: int, dtype: torch.dtype = torch.float32) -> None:
    full = dict(FalconForCausalLM.from_pretrained(folder).named_parameters())
    for rank in range(world):
        model = load_sharded(folder, _rank(rank, world), dtype)
        shards = parameter_shards(model)
        for name, param in model.named_parameters():
            want = full[name] if name not in shards else shards[name].take(full[name])
            assert param.dtype == dtype
            torch.testing.assert_close(param.detach(), want.detach().to(dtype), rtol=0, atol=0, msg=name)
        assert shards, "nothing was sharded"


@pytest.mark.parametrize("world", [2, 3])
def test_slices_are_exact(tmp_path: Path, world: int) -> None:
    _check_slices(write_falcon(tmp_path / "7b", "7b"), world)  # multi-query: two row ranges per fused QKV
    _check_slices(write_falcon3(tmp_path / "f3", "gqa"), world, torch.bfloat16)


def test_several_files_and_bin(tmp_path: Path) -> None:
    folder = write_falcon(tmp_path / "many", "11b")
    model = FalconForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    _check_slices(tmp_path / "sharded", 2)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((folder / "config.json").read_text())
    torch.save(load_file(folder / "model.safetensors"), binary / "pytorch_model.bin")
    _check_slices(binary, 3)


def _edited(src: Path, out: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, out / "model.safetensors")
    return out


def test_bad_checkpoints_fail_as_unsharded(tmp_path: Path) -> None:
    src = write_falcon(tmp_path / "src", "40b")
    name = "transformer.h.1.mlp.dense_4h_to_h.weight"
    cases = {
        "missing tensor transformer.h.1.mlp": lambda t: t.pop(name),
        "unexpected tensor transformer.h.9.extra": lambda t: t.update({"transformer.h.9.extra": torch.zeros(2)}),
        "shape mismatch for transformer.h.1.mlp": lambda t: t.update({name: t[name][:, :-1].contiguous()}),
    }
    for i, (message, edit) in enumerate(cases.items()):
        folder = _edited(src, tmp_path / f"bad{i}", edit)
        with pytest.raises(CheckpointError, match=message):
            FalconForCausalLM.from_pretrained(folder)
        with pytest.raises(CheckpointError, match=message):
            load_sharded(folder, _rank(1, 2))


def test_world_of_one_is_the_plain_loader(tmp_path: Path) -> None:
    folder = write_falcon(tmp_path / "rw", "rw")
    model = load_sharded(folder, _rank(0, 1))
    assert type(model) is FalconForCausalLM and not parameter_shards(model)


@pytest.mark.parametrize("world", [2, 3])
def test_alibi_slopes_follow_global_heads(world: int) -> None:
    config = FalconConfig(hidden_size=48, num_attention_heads=6, alibi=True, parallel_attn=False, multi_query=False)
    ranks = [rank_config(config, split_falcon(config, _rank(r, world))) for r in range(world)]
    assert sum(c.num_attention_heads for c in ranks) == 6 and all(c.head_dim == 8 for c in ranks)
    torch.testing.assert_close(torch.cat([head_alibi_slopes(c) for c in ranks]), alibi_slopes(6), rtol=0, atol=0)
    assert json.dumps(ranks[1].alibi_heads) == json.dumps([ranks[0].num_attention_heads, 6])


def test_fused_decode_step_refuses_a_shard(tmp_path: Path) -> None:
    """The engine's fused native decode step runs whole layers without collectives: never on a rank's shard,
    even when the shard's shapes agree with its rank config."""
    from falconlm.engine import fused_decode

    folder = write_falcon(tmp_path / "7b", "7b", hidden_size=128, num_attention_heads=4)  # head_dim 32
    whole = FalconForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    why = fused_decode.unsupported(whole.transformer)
    assert why is None or "tensor parallel" not in why
    shard = load_sharded(folder, _rank(0, 2), torch.bfloat16)
    assert "tensor parallel" in fused_decode.unsupported(shard.transformer)
