"""What every Falcon-family language model shares around its own decoder: the head, loading and saving.

A family's ``*ForCausalLM`` holds its decoder under the family's own module name (``transformer``, ``model``,
``backbone``, as in the Hugging Face checkpoints) and a ``lm_head``; the class attributes below name the parts
the shared code reaches for. The engine talks to every family through the same four names: ``config``,
``final_norm``, ``forward_hidden`` and ``compute_logits``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .attention import AttentionContext
from .dense import KVCache, dense_inputs
from .norms import RMSNorm

Model = TypeVar("Model", bound="CausalLM")


def token_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Token rows ``rows`` (flat indices over the B x T tokens) of ``x`` [B, T, ...] as [1, R, ...]; ``x`` itself
    for None. A forward's last layer takes only the rows whose output is read (``out_rows``)."""
    return x if rows is None else x.flatten(0, 1).index_select(0, rows).unsqueeze(0)


class CausalLM(nn.Module):
    """A decoder plus its language-model head, tied to the input embedding when ``tie_word_embeddings``."""

    config: Any
    lm_head: nn.Linear
    decoder_name: ClassVar[str]  # the decoder's attribute: "transformer", "model", "backbone"
    embeddings_name: ClassVar[str]  # the token embedding's attribute inside the decoder
    final_norm_name: ClassVar[str]  # the last norm's attribute inside the decoder
    family_label: ClassVar[str]  # for messages: "Falcon3", "Falcon-H1"...
    loads_any_family: ClassVar[bool] = False  # from_pretrained returns whatever family the folder holds

    @property
    def decoder(self) -> nn.Module:
        """The decoder: embedding, blocks and final norm (``transformer``, ``model`` or ``backbone``)."""
        return getattr(self, self.decoder_name)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self.decoder, self.embeddings_name)

    @property
    def final_norm(self) -> nn.Module:
        """The last norm: its weight gives the activations' dtype and device (cheap on quantized models)."""
        return getattr(self.decoder, self.final_norm_name)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype."""
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``hidden`` [..., H]: all of them, or with ``rows`` only those token rows of the flattened
        [B * T, H] states (e.g. each sequence's last), as [R, vocab]."""
        if rows is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        return self.lm_head(hidden)

    def _logits(self, hidden: torch.Tensor, last_token_only: bool) -> torch.Tensor:
        return self.compute_logits(hidden[:, -1:] if last_token_only else hidden)

    def num_parameters(self) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())

    def init_weights(self, seed: int | None = None) -> None:
        """Random initialisation for training from scratch: matrices, embeddings and convolutions drawn from
        N(0, initializer_range), biases zero, norms at identity; then each module's own parameters
        (:meth:`_init_own`), in module order."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                module.weight.data.copy_(torch.empty(module.weight.shape).normal_(0.0, std, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.data.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.data.fill_(1.0)
                module.bias.data.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.data.fill_(1.0)
            self._init_own(module)

    def _init_own(self, module: nn.Module) -> None:
        """Initialise what only this family has in ``module`` (nothing by default)."""

    @classmethod
    def from_pretrained(
        cls: type[Model],
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        quantize: Any = None,
    ) -> Model:
        """Load a checkpoint folder straight into ``dtype`` on ``device``: a plain Hugging Face one (shard by
        shard), one written by ``falconlm quantize``, or a hub GPTQ one (``formats.py``); its family is read
        from config.json (``families.py``) and must be this class's unless ``loads_any_family``.

        ``quantize`` (``"int8"``, ``"int4"``, ``"int4-g128"``... or a ``falconlm.quant.QuantRecipe``) quantizes a
        plain folder on load.
        """
        from .formats import load_pretrained

        model = load_pretrained(path, dtype, device, quantize)
        if not cls.loads_any_family and not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__} checkpoint, not a {cls.family_label} one")
        return model  # type: ignore[return-value]

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write config.json and safetensors weights (sharded above ``max_shard_bytes``)."""
        from .checkpoint import save_model

        save_model(self, path, max_shard_bytes=max_shard_bytes)


class KVCausalLM(CausalLM):
    """A causal LM whose every layer attends: a KV cache is all the state it keeps between calls."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_token_only: bool = False,
    ) -> torch.Tensor:
        """The HF-style call: logits [B, T, vocab] (or [B, 1, vocab] with ``last_token_only``).

        ``attention_mask`` [B, past + T] marks real tokens with 1 and left padding with 0; ``kv_cache`` is read
        and extended by T positions. A thin wrapper over :meth:`forward_hidden` and :meth:`compute_logits` with
        a dense attention context (``dense.py``).
        """
        positions, attention = dense_inputs(
            self.config, input_ids, attention_mask, position_ids, kv_cache, self.dtype, self._attention_dropout()
        )
        B, T = input_ids.shape
        # Each row's last token alone, where a row has more than one (at T = 1 that is every token already)
        last_rows = torch.arange(T - 1, B * T, T, device=input_ids.device) if last_token_only and T > 1 else None
        hidden = self.forward_hidden(input_ids, positions, attention, out_rows=last_rows)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.compute_logits(hidden)
        return logits if last_rows is None else logits[:, None]

    def _attention_dropout(self) -> float:
        """Dropout on the attention probabilities in the dense call (none unless a family trains with it)."""
        return 0.0

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionContext,
        rope_lengths: torch.Tensor | None = None,
        out_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H] after the final norm for ``input_ids`` at ``positions`` (both [B, T]);
        ``rope_lengths`` [B, T]: per-token sequence lengths for dynamic RoPE scaling. ``out_rows`` (flat indices
        over the B x T tokens): only those rows' states, [R, H]; the last layer then stores every row's K/V but
        runs its attention output and MLP for these rows alone, as llama.cpp does (their logits are all that
        anyone reads; on bench-194m that is 7% of a prompt's weight work)."""
        hidden = self.decoder(input_ids, positions, attention, rope_lengths, out_rows)
        return hidden if out_rows is None else hidden[0]

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache sized for ``batch_size`` rows of up to ``max_len`` positions, in the model's dtype and device."""
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)
