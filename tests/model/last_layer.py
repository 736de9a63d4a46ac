"""The last layer's skip of unread rows (``forward_hidden``'s ``out_rows``), checked the same way for every family
whose decoder takes it."""

from __future__ import annotations

import torch
from torch import nn

from falconlm.model.causal_lm import KVCausalLM
from falconlm.model.dense import KVCache, build_dense_attention


def padded_prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 9, 6 and 3 tokens, their mask and generate()'s positions."""
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate([9, 6, 3]):
        mask[row, 9 - n :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _count_rows(module: nn.Module, seen: list[int]):
    """A hook that records how many token rows each call of ``module`` takes."""

    def hook(_module: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

    return module.register_forward_hook(hook)


def last_layer_skip_case(model: KVCausalLM, blocks: nn.ModuleList, mlp_in: str) -> None:
    """``forward_hidden`` with ``out_rows`` gives those rows of the full forward's states and stores the same
    K/V, while the last block's MLP (``mlp_in``, a Linear inside each block) takes those rows alone."""
    cfg = model.config
    ids, mask, positions = padded_prompts(cfg.vocab_size)
    rows = torch.tensor([8, 17, 26, 4])  # each prompt's last token, and one inside the first
    full_cache, cache = KVCache(cfg, 3, 9, torch.float32), KVCache(cfg, 3, 9, torch.float32)
    full_ctx = build_dense_attention(cfg, 9, mask, full_cache, torch.float32, ids.device, 3)
    full = model.forward_hidden(ids, positions, full_ctx)
    first, last = [], []
    hooks = [_count_rows(blocks[0].get_submodule(mlp_in), first), _count_rows(blocks[-1].get_submodule(mlp_in), last)]
    try:
        ctx = build_dense_attention(cfg, 9, mask, cache, torch.float32, ids.device, 3)
        picked = model.forward_hidden(ids, positions, ctx, out_rows=rows)
    finally:
        for hook in hooks:
            hook.remove()
    assert picked.shape == (4, cfg.hidden_size)
    torch.testing.assert_close(picked, full.reshape(27, -1)[rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.k, full_cache.k) and torch.equal(cache.v, full_cache.v)  # the last layer's K/V too
    assert (first, last) == ([27], [4])
