"""The constrained field types of the request models, and the schema rules that tie fields together.

Each range here is one SamplingParams (or the serving code) checks as well, so the OpenAPI schema states what
the server accepts. ``x-limit`` marks a bound only the running server knows (its model name, context,
vocabulary, ``--max-choices``, ``--max-logprobs``): ``openapi.py`` fills it in.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from .structured_output import one_constraint_rules

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as in OpenAI's API


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer, so take it as 5 (strings and booleans stay refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(**field: Any) -> Any:
    """An integer type with pydantic ``Field`` constraints that also takes 5.0 for 5. The constraints come before
    the validator: after it, pydantic would write them into the schema as ``ge``/``le`` instead of
    ``minimum``/``maximum``."""
    return Annotated[int, Field(**field), BeforeValidator(_integral)]


Int = _int()
Penalty = Annotated[float, Field(ge=-2, le=2)]
Seed = _int(ge=SEED_MIN, le=SEED_MAX)
Choices = _int(ge=1, json_schema_extra={"x-limit": "choices"})
MaxTokens = _int(ge=1, json_schema_extra={"x-limit": "max_tokens"})
TopLogprobs = _int(ge=0, le=20, json_schema_extra={"x-limit": "logprobs"})
TopK = _int(ge=-1)
NonNegative = _int(ge=0)
Text = Annotated[str, Field(json_schema_extra={"minLength": 1})]
TokenId = _int(json_schema_extra={"minimum": 0, "x-limit": "token_id"})
TokenIds = Annotated[list[TokenId], Field(json_schema_extra={"minItems": 1, "x-limit": "prompt_tokens"})]
Prompts = Annotated[list[Text], Field(json_schema_extra={"minItems": 1, "x-limit": "prompts"})]
TokenIdLists = Annotated[list[TokenIds], Field(json_schema_extra={"minItems": 1, "x-limit": "prompts"})]
ModelName = Annotated[str, Field(json_schema_extra={"x-limit": "model"})]
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(json_schema_extra={"x-limit": "logit_bias"})
]
NoOpInt = Annotated[Int | None, Field(json_schema_extra={"enum": [1, None]})]
EmptyText = Annotated[str | None, Field(json_schema_extra={"maxLength": 0})]
ChoiceList = Annotated[list[str], Field(json_schema_extra={"minItems": 1})]
EmptyList = Annotated[list[dict[str, Any]] | None, Field(json_schema_extra={"maxItems": 0})]
NoneChoice = Annotated[str | dict[str, Any] | None, Field(json_schema_extra={"enum": ["none", None]})]


def _absent_or_null(name: str) -> dict[str, Any]:
    return {"properties": {name: {"type": "null"}}}


def _only_with_true(field: str, flag: str) -> dict[str, Any]:
    """``field`` may be set only when ``flag`` is true."""
    return {"anyOf": [_absent_or_null(field), {"required": [flag], "properties": {flag: {"const": True}}}]}


def completion_rules(schema: dict[str, Any]) -> None:
    """stream_options only with stream; at most one structured-output constraint."""
    schema["allOf"] = [_only_with_true("stream_options", "stream"), *one_constraint_rules()]


def chat_rules(schema: dict[str, Any]) -> None:
    """stream_options only with stream; top_logprobs only with logprobs; at most one structured-output constraint."""
    schema["allOf"] = [
        _only_with_true("stream_options", "stream"),
        _only_with_true("top_logprobs", "logprobs"),
        *one_constraint_rules(),
    ]


def tokenize_rules(schema: dict[str, Any]) -> None:
    """Exactly one of prompt and messages."""
    prompt_only = {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}}
    messages_only = {
        "required": ["messages"],
        "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}},
    }
    schema["oneOf"] = [prompt_only, messages_only]
