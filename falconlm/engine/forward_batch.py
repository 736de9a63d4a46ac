"""ForwardBatch: everything one forward pass of the engine needs, as plain integers and no Request.

The runner describes a step's rows as a ForwardBatch, then runs the model from it alone (``ModelRunner.run_batch``).
That split lets tensor-parallel rank 0 send the description to the other ranks (``tp_runner.py``), which rebuild
the same attention context over their own caches and make the same model calls, without ever seeing a Request
(requests hold grammars and user data).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class ForwardBatch:
    """One forward pass over the step's flattened tokens.

    Per token: ``token_ids``, ``positions``, ``rope_lengths`` (empty unless the model's RoPE is dynamic) and
    ``kv_slots`` (empty for attention-free models). Per row (request): ``query_starts`` / ``query_lens`` (where
    its new tokens sit), ``context_lens`` (its length after the step), ``block_tables`` (its KV blocks),
    ``state_slots`` / ``fresh`` (its recurrent-state slot and whether that state starts from zero; empty for
    attention-only models). ``logits_rows``: the flat rows whose logits the runner takes (sampled rows first,
    then prompt-logprob rows).
    """

    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rope_lengths: list[int] = field(default_factory=list)
    kv_slots: list[int] = field(default_factory=list)
    query_starts: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    state_slots: list[int] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


FLAT_FIELDS = tuple(f.name for f in fields(ForwardBatch) if f.name != "block_tables")
