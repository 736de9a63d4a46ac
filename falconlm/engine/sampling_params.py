"""Per-request sampling settings, shaped like vLLM's offline ``SamplingParams``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

_MAX_LOGPROBS = 20
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


def _real(name: str, value: object) -> float:
    """``value`` as a finite float, or ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _integer(name: str, value: object) -> int:
    """``value`` as an int, or ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


@dataclass
class StructuredOutputParams:
    """A constraint on a request's output; exactly one kind is set.

    ``json_schema``: the output is JSON that validates against this schema. ``json_object``: any JSON object.
    ``regex``: the output matches this regular expression. ``grammar``: the output is in this grammar.
    ``choice``: the output is exactly one of these strings.
    """

    json_schema: dict | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    def __post_init__(self) -> None:
        self.json_object = _flag("json_object", self.json_object)
        kinds = [
            name
            for name, value in (
                ("json_schema", self.json_schema),
                ("json_object", self.json_object or None),
                ("regex", self.regex),
                ("grammar", self.grammar),
                ("choice", self.choice),
            )
            if value is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "structured output takes exactly one of json_schema, json_object, regex, grammar, choice; "
                f"got {kinds or 'none'}"
            )
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"json_schema must be an object, got {type(self.json_schema).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        if self.choice is not None:
            if (
                not isinstance(self.choice, (list, tuple))
                or not self.choice
                or not all(isinstance(c, str) for c in self.choice)
            ):
                raise ValueError("choice must be a non-empty list of strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint is set: ``json_schema``, ``json_object``, ``regex``, ``grammar`` or ``choice``."""
        for name in ("json_schema", "regex", "grammar", "choice"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


@dataclass
class SamplingParams:
    """How to pick tokens for one request; validated on construction.

    ``top_k`` of 0 or -1 turns top-k off. ``logprobs`` is the number of top
    logprobs to return per position (0 = only the chosen token's); ``prompt_logprobs`` the same for each prompt
    token after the first (computed inside the engine step; such a request skips the prefix cache). ``stop`` is
    normalized to a ``list[str]`` and ``stop_token_ids`` to a ``list[int]``. ``structured_output`` constrains the
    output (JSON schema, regex, grammar or choice) through the grammar mask in the sampler.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    structured_output: StructuredOutputParams | None = None

    def __post_init__(self) -> None:
        self.n = _integer("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        self.temperature = _real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature:g}")
        self.top_p = _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p:g}")
        self.top_k = _integer("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or >= 1, got {self.top_k}")
        self.min_p = _real("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p:g}")
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty:g}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value:g}")
            setattr(self, name, value)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _flag("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _flag("skip_special_tokens", self.skip_special_tokens)
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= _MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {_MAX_LOGPROBS}] or None, got {self.logprobs}")
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs)
            if not 0 <= self.prompt_logprobs <= _MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {_MAX_LOGPROBS}] or None, got {self.prompt_logprobs}")
        if self.logit_bias is not None:
            self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputParams):
            raise ValueError(f"structured_output must be a StructuredOutputParams, got {self.structured_output!r}")

    @property
    def greedy(self) -> bool:
        """True when the request always takes the most likely token."""
        return self.temperature == 0 or self.top_k == 1

    @staticmethod
    def _normalize_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in items):
            raise ValueError("stop strings must be non-empty")
        return list(items)

    @staticmethod
    def _normalize_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of ints, got {ids!r}")
        out = [_integer("stop_token_ids", i) for i in ids]
        if any(i < 0 for i in out):
            raise ValueError(f"stop_token_ids must be >= 0, got {ids!r}")
        return out

    @staticmethod
    def _normalize_logit_bias(bias: object) -> dict[int, float]:
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id to float, got {bias!r}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            token = _integer("logit_bias token id", key)
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
            amount = _real("logit_bias value", value)
            if not -100 <= amount <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {amount:g}")
            out[token] = amount
        return out
