"""One rank's Falcon-Mamba or Falcon-H1: which builder a config takes, and filling a rank's model with slices.

:func:`build_recurrent_rank_model` picks the family's builder (``mamba.py`` for Mamba-1 / Falcon-Mamba, ``h1.py``
for Falcon-H1). :func:`fill_from_full` copies each parameter's slice (the ``tp_shards`` the parallel layers
record) out of an unsharded model; :func:`load_recurrent_shard` loads a checkpoint folder as this rank's model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.families import load_config
from ..model.formats import load_pretrained
from ..model.h1_config import FalconH1Config
from ..model.mamba_config import FalconMambaConfig
from .h1 import build_h1_rank_model
from .layers import parameter_shards
from .mamba import build_mamba_rank_model
from .state import ParallelState


def is_recurrent_config(config: object) -> bool:
    """Whether this package's recurrent builders serve ``config`` (Falcon-Mamba / Mamba-1, Falcon-H1)."""
    return isinstance(config, (FalconMambaConfig, FalconH1Config))


def build_recurrent_rank_model(config: FalconMambaConfig | FalconH1Config, state: ParallelState) -> nn.Module:
    """This rank's model for the full model's ``config``, parameters not yet filled."""
    if isinstance(config, FalconMambaConfig):
        return build_mamba_rank_model(config, state)
    if isinstance(config, FalconH1Config):
        return build_h1_rank_model(config, state)
    raise TypeError(f"{type(config).__name__} is not a Falcon-Mamba or Falcon-H1 config")


def fill_from_full(rank_model: nn.Module, full_model: nn.Module) -> nn.Module:
    """Give every parameter of ``rank_model`` its slice of ``full_model``'s same-named parameter (replicated ones
    whole), on ``rank_model``'s device and in the full model's dtype; a tied head follows its embedding."""
    shards = parameter_shards(rank_model)
    full = dict(full_model.named_parameters())
    with torch.no_grad():
        for name, param in list(rank_model.named_parameters()):
            value = full[name]
            if name in shards:
                value = shards[name].take(value)
            if tuple(value.shape) != tuple(param.shape):
                got, want = list(value.shape), list(param.shape)
                raise ValueError(f"{name}: this rank's slice is {got}, its model wants {want}")
            owner, _, leaf = name.rpartition(".")
            module = rank_model.get_submodule(owner)
            setattr(module, leaf, nn.Parameter(value.to(param.device).clone().contiguous(), requires_grad=False))
    if hasattr(rank_model, "tie_weights"):
        rank_model.tie_weights()
    return rank_model.eval()


def load_recurrent_shard(path: str | Path, state: ParallelState, dtype: torch.dtype = torch.float32) -> nn.Module:
    """This rank's Falcon-Mamba / Falcon-H1 from the checkpoint folder ``path``, in ``dtype`` on
    ``state.device``, in eval mode (its ``config`` the per-rank one).

    The whole checkpoint is read on the CPU and this rank's slices copied out of it."""
    config = load_config(path)
    if not is_recurrent_config(config):
        raise ValueError(f"{path} is not a Falcon-Mamba or Falcon-H1 checkpoint")
    full = load_pretrained(path, dtype, "cpu")
    with torch.device(state.device):
        rank_model = build_recurrent_rank_model(config, state)
    return fill_from_full(rank_model, full)
