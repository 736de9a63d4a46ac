"""Structured output: a request's constraint compiled into a grammar, and the grammar state that walks its tokens.

The grammar engine is llguidance (MIT): ``benchmarks/bench_grammar_engines.py`` compares it with xgrammar and
outlines-core on Falcon's 65k vocabulary and says why it was chosen.

- :class:`GrammarCompiler` (one per engine) turns a :class:`StructuredOutputParams` into a :class:`Grammar`.
  Compiling validates: a schema feature the engine cannot enforce, an invalid regex or grammar raises a
  ValueError that says which part. Grammars are cached in an LRU keyed by the canonical constraint (its JSON with
  sorted keys), so a schema is compiled once however many requests use it.
- :class:`GrammarState` (one per sequence; n > 1 children each get their own) lives on the ``Request`` and
  advances there as each sampled token is appended, inside the engine step. Preemption recomputes the KV cache
  only: the sampled tokens, and so the grammar state, stay as they are.
- :func:`grammar_bitmask` fills the allowed-token bitmask of a step's rows; the sampler applies it.

The end-of-text token is allowed only where the grammar may end, and consuming it ends the grammar: the request
then finishes with finish_reason "stop" (also with ``ignore_eos``). JSON is generated compactly (no whitespace
between tokens of the structure), which keeps small models from wandering into endless whitespace, and objects
that list their ``properties`` take no others unless the schema says so (see :func:`closed_objects`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import torch
from llguidance.gbnf_to_lark import any_to_lark

from ..tokenizer import Tokenizer
from .sampling_params import StructuredOutputParams

logger = logging.getLogger(__name__)

# JSON output without free whitespace: ',' and ':' as separators, as json.dumps(separators=(",", ":")) writes.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
# Schema keywords whose values are maps from names to schemas (their keys are names, not keywords).
_NAME_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_UNIMPLEMENTED = "Unimplemented keys: "


def canonical_key(constraint: StructuredOutputParams) -> str:
    """The cache key of a constraint: its kind and value as JSON with sorted keys."""
    value: Any = True if constraint.kind == "json_object" else getattr(constraint, constraint.kind)
    return json.dumps([constraint.kind, value], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def closed_objects(schema: Any, in_all_of: bool = False) -> Any:
    """A copy of ``schema`` where each object schema with ``properties`` and no rule for other keys gets
    ``additionalProperties: false`` (OpenAI's strict mode asks for it; xgrammar's strict mode does the same).
    Its outputs are a subset of the original's, so they still validate. ``allOf`` branches are left open: closing
    each would leave only the keys every branch names."""
    if isinstance(schema, list):
        return [closed_objects(item, in_all_of) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _NAME_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key in ("const", "enum", "default", "examples"):
            out[key] = value  # values, not schemas
        else:
            out[key] = closed_objects(value, key == "allOf")
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if "properties" in out and not in_all_of and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def grammar_text(constraint: StructuredOutputParams) -> str:
    """The llguidance grammar of a constraint (not yet checked)."""
    matcher = llguidance.LLMatcher
    if constraint.json_schema is not None:
        return matcher.grammar_from_json_schema(closed_objects(constraint.json_schema), defaults=_JSON_OPTIONS)
    if constraint.json_object:
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if constraint.regex is not None:
        return matcher.grammar_from_regex(constraint.regex)
    if constraint.choice is not None:
        alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in constraint.choice)
        return matcher.grammar_from_lark(f"start: {alternatives}")
    assert constraint.grammar is not None
    try:  # Lark as llguidance reads it, or llama.cpp's GBNF (converted)
        lark = any_to_lark(constraint.grammar)
    except Exception as exc:  # the converter raises its own error types
        raise ValueError(f"grammar cannot be enforced: it reads as neither Lark nor GBNF ({exc})") from exc
    return matcher.grammar_from_lark(lark)


def _schema_path(schema: Any, keyword: str, path: str = "") -> str | None:
    """The JSON pointer of the first subschema that uses ``keyword``, or None."""
    if isinstance(schema, dict):
        if keyword in schema:
            return path or "/"
        for key, value in schema.items():
            if key in _NAME_MAPS and isinstance(value, dict):
                for name, sub in value.items():
                    found = _schema_path(sub, keyword, f"{path}/{key}/{name}")
                    if found is not None:
                        return found
            elif isinstance(value, (dict, list)):
                found = _schema_path(value, keyword, f"{path}/{key}")
                if found is not None:
                    return found
    elif isinstance(schema, list):
        for i, item in enumerate(schema):
            found = _schema_path(item, keyword, f"{path}/{i}")
            if found is not None:
                return found
    return None


def describe_error(constraint: StructuredOutputParams, error: str) -> str:
    """A one-paragraph message for a grammar the engine refused: the kind, the part and the engine's reason."""
    first = error.strip().splitlines()[0] if error.strip() else "invalid"
    kind = constraint.kind
    if kind == "json_schema" and first.startswith(_UNIMPLEMENTED):
        try:
            keywords = json.loads(first.removeprefix(_UNIMPLEMENTED))
        except ValueError:
            keywords = []
        if keywords:
            where = _schema_path(constraint.json_schema, keywords[0])
            names = ", ".join(repr(k) for k in keywords)
            return (
                f"json_schema uses {names} at {where or '/'}, a JSON Schema feature that cannot be enforced "
                "while generating; remove it from the schema"
            )
    if kind == "json_schema":
        return f"json_schema cannot be enforced: {first}"
    if kind == "regex":
        detail = " ".join(line.strip() for line in error.strip().splitlines() if line.strip().startswith("error:"))
        return f"regex {constraint.regex!r} cannot be enforced: {detail or first}"
    return f"{kind} cannot be enforced: {first}"


class Grammar:
    """A compiled constraint: a matcher in its start state, copied for each sequence that uses it."""

    def __init__(self, key: str, matcher: llguidance.LLMatcher, end_token_id: int) -> None:
        self.key = key
        self._start = matcher
        self._end_token_id = end_token_id

    def new_state(self) -> GrammarState:
        return GrammarState(self._start.deep_copy(), self._end_token_id)


class GrammarState:
    """One sequence's place in its grammar; :meth:`accept` advances it by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, end_token_id: int) -> None:
        self._matcher = matcher
        self._end_token_id = end_token_id

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; True when it ends the sequence: the end token, allowed only where the
        grammar is complete, or a token off the grammar (never sampled under the mask; logged). Either way the
        token is not part of the text."""
        if not self._matcher.consume_token(token_id):
            logger.warning("a constrained sequence sampled a token outside its grammar: %s", self._matcher.get_error())
            return True
        return token_id == self._end_token_id

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed tokens into ``row`` (int32, one bit per token id, contiguous, on the CPU)."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary; thread-safe, with an LRU of ``cache_size`` grammars.

    ``vocab_size`` is the model's (the width of its logits), which may exceed the tokenizer's; the tokenizer's
    vocabulary is read once, when the first constraint is compiled. ``num_compiled`` counts the compilations
    (cache misses that succeeded)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.num_compiled = 0
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def compile(self, constraint: StructuredOutputParams) -> Grammar:
        """The grammar of ``constraint``, from the cache when it was compiled before; ValueError naming the part
        the engine cannot enforce."""
        key = canonical_key(constraint)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
            matcher = self._new_matcher(constraint)
            grammar = Grammar(key, matcher, self._tokenizer.eos_token_id)
            self.num_compiled += 1
            self._cache[key] = grammar
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return grammar

    def _new_matcher(self, constraint: StructuredOutputParams) -> llguidance.LLMatcher:
        tokenizer = self._llguidance_tokenizer()
        text = grammar_text(constraint)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            raise ValueError(describe_error(constraint, messages[0] if messages else ""))
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        matcher.compute_bitmask()  # builds the lexer now (its tables are shared by every copy), not in a step
        if matcher.is_error():
            raise ValueError(describe_error(constraint, matcher.get_error()))
        return matcher

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            backend = getattr(self._tokenizer, "backend", None)
            eos = getattr(self._tokenizer, "eos_token_id", None)
            if backend is None or eos is None:
                raise ValueError(
                    "structured_output needs the model's tokenizer with an end-of-text token (this model has none)"
                )
            self._ll_tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        return self._ll_tokenizer


def grammar_bitmask(states: Sequence[GrammarState | None], vocab_size: int) -> torch.Tensor | None:
    """The int32 bitmask ``[rows, ceil(vocab_size / 32)]`` of allowed tokens (bit ``t % 32`` of word ``t // 32``),
    all ones for rows without a grammar; None when no row has one."""
    if all(state is None for state in states):
        return None
    bitmask = torch.full((len(states), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for row, state in enumerate(states):
        if state is not None:
            state.fill_bitmask(bitmask[row])
    return bitmask
