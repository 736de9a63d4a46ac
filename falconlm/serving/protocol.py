"""OpenAI API objects as pydantic models, named after OpenAI's (vLLM's layout).

Request fields follow the order of the API reference; falconlm's extensions (vLLM's names) sit in a marked
block. Requests are strict (no "5" for 5, no true for 1; 5.0 is 5, as in JSON Schema) and ignore unknown fields.
Field ranges (``request_types``) are in the OpenAPI schema; ``SamplingParams`` checks them again: each request's
``to_sampling_params()`` builds one, and its ValueError names the field. Fields falconlm does not implement are
declared so that a value other than their no-op is refused by name.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling_params import SamplingParams
from . import request_types as rt
from .structured_output import request_constraint, response_format_rules


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _RequestModel(OpenAIBaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _now() -> int:
    return int(time.time())


# ---- shared pieces ----------------------------------------------------------------------------------------------


class StreamOptions(_RequestModel):
    include_usage: bool | None = False


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


_TOKEN_KEY = re.compile(r"0|[1-9][0-9]{0,9}")


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys: plain decimal strings ("5_0", " 5" or "05" are refused)."""
    if bias is None:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise ValueError(f"logit_bias keys must be token ids (decimal integers as strings), got {key!r}")
        out[int(key)] = value
    return out


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _sampling_params(
    request: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """The SamplingParams of either request: the sampling fields both share (nulls take the API's defaults),
    with ``max_tokens`` and ``logprobs`` already read the way each endpoint defines them."""
    request.check_unsupported()
    return SamplingParams(
        n=_or(request.n, 1),
        max_tokens=max_tokens,
        temperature=_or(request.temperature, 1.0),
        top_p=_or(request.top_p, 1.0),
        top_k=_or(request.top_k, 0),
        min_p=_or(request.min_p, 0.0),
        repetition_penalty=_or(request.repetition_penalty, 1.0),
        presence_penalty=_or(request.presence_penalty, 0.0),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        ignore_eos=_or(request.ignore_eos, False),
        logprobs=logprobs,
        logit_bias=_logit_bias(request.logit_bias),
        skip_special_tokens=_or(request.skip_special_tokens, True),
        structured_output=request_constraint(request),
    )


_NO_OP = "is not supported by this server"


class JsonSchemaFormat(_RequestModel):
    """``response_format.json_schema``: the schema the output must validate against (always enforced, strict or
    not; see ``serving/structured_output.py``)."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_RequestModel):
    """``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema`` (JSON valid by a schema)."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=response_format_rules)
    type: Annotated[str, Field(json_schema_extra={"enum": ["text", "json_object", "json_schema"]})]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsOptions(_RequestModel):
    """vLLM's ``structured_outputs`` (extra_body): at most one of its constraints."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: rt.Text | None = None
    grammar: rt.Text | None = None
    choice: rt.ChoiceList | None = None
    json_object: bool | None = None
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class _SamplingRequest(_RequestModel):
    """What completions and chat share: the sampling fields, and the OpenAI fields falconlm refuses."""

    model: rt.ModelName | None = None
    frequency_penalty: rt.Penalty | None = 0.0
    logit_bias: rt.LogitBias | None = None
    n: rt.Choices | None = 1
    presence_penalty: rt.Penalty | None = 0.0
    seed: rt.Seed | None = None
    stop: rt.Text | list[rt.Text] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    user: str | None = None
    # ---- falconlm extensions (vLLM's names) ----
    top_k: rt.TopK | None = 0
    min_p: Annotated[float, Field(ge=0, le=1)] | None = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] | None = 1.0
    stop_token_ids: list[rt.NonNegative] | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    # structured output: OpenAI's response_format, or one of vLLM's extra_body constraints
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: rt.Text | None = None
    guided_grammar: rt.Text | None = None
    guided_choice: rt.ChoiceList | None = None
    structured_outputs: StructuredOutputsOptions | None = None

    def check_unsupported(self) -> None:
        """ValueError naming the first field that asks for something falconlm does not do."""


# ---- completions --------------------------------------------------------------------------------------------------


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``. ``suffix`` and ``best_of`` (other than null or 1) are refused."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=rt.completion_rules)

    prompt: rt.Text | rt.Prompts | rt.TokenIds | rt.TokenIdLists
    best_of: rt.NoOpInt = None
    echo: bool | None = False
    logprobs: rt.TopLogprobs | None = None
    max_tokens: rt.MaxTokens | None = 16
    suffix: rt.EmptyText = None

    def check_unsupported(self) -> None:
        if self.suffix:
            raise ValueError(f"suffix {_NO_OP} (no fill-in-the-middle); leave it out")
        if self.best_of is not None and self.best_of != 1:
            raise ValueError(f"best_of {_NO_OP} except as 1; ask for n choices instead")

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """``default_max_tokens`` fills in when the request sent ``max_tokens: null`` (the rest of the context)."""
        return _sampling_params(self, _or(self.max_tokens, default_max_tokens), self.logprobs)


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- chat completions ---------------------------------------------------------------------------------------------


def _text_part_schema(schema: dict[str, Any]) -> None:
    schema["properties"]["type"] = {"type": "string", "enum": ["text"]}
    schema["properties"]["text"] = {"type": "string"}
    schema["required"] = ["type", "text"]


class ChatContentPart(_RequestModel):
    """Only text parts are served (the tokenizer refuses others with a 400)."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_text_part_schema)
    type: str
    text: str | None = None


CHAT_ROLES = ("system", "user", "assistant")  # the roles the tokenizer's chat rendering accepts


class ChatMessage(_RequestModel):
    role: Annotated[str, Field(json_schema_extra={"enum": list(CHAT_ROLES)})]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plain dict the tokenizer's chat template expects (it checks roles and part types)."""
        content = self.content
        if isinstance(content, list):
            content = [part.model_dump(exclude_none=True) for part in content]
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``. Tools and functions are refused (until the server can call them)."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=rt.chat_rules)

    messages: Annotated[list[ChatMessage], Field(json_schema_extra={"minItems": 1})]
    logprobs: bool | None = False
    max_completion_tokens: rt.MaxTokens | None = None
    max_tokens: rt.MaxTokens | None = None
    top_logprobs: rt.TopLogprobs | None = None
    tools: rt.EmptyList = None
    tool_choice: rt.NoneChoice = None
    functions: rt.EmptyList = None
    function_call: rt.NoneChoice = None
    # ---- falconlm extensions (vLLM's names) ----
    add_generation_prompt: bool | None = True

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_unsupported(self) -> None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ValueError(f"{name} {_NO_OP} yet (no tool calling); leave it out")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ValueError(f"{name} {_NO_OP} yet (no tool calling); leave it out or send 'none'")

    def check_supported(self) -> None:
        """ValueError for fields that parse but that falconlm does not serve."""
        self.check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """``default_max_tokens`` fills in when neither max_tokens nor max_completion_tokens is set."""
        self.check_supported()
        logprobs = _or(self.top_logprobs, 0) if self.logprobs else None
        return _sampling_params(self, _or(self.requested_max_tokens, default_max_tokens), logprobs)


class ChatCompletionTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatCompletionTopLogprob] = Field(default_factory=list)


class ChatCompletionLogprobs(OpenAIBaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer --------------------------------------------------------------------------------------------


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "falconlm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeRequest(_RequestModel):
    """``POST /tokenize``: either ``prompt`` or chat ``messages`` (rendered by the chat template)."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=rt.tokenize_rules)

    model: rt.ModelName | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage] | None, Field(json_schema_extra={"minItems": 1})] = None
    add_generation_prompt: bool | None = True


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_RequestModel):
    """``POST /detokenize``."""

    model: rt.ModelName | None = None
    tokens: list[rt.TokenId]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
