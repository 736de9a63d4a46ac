"""``POST /v1/embeddings`` request and response objects, in OpenAI's shape (falconlm's extensions in a marked block,
vLLM's names)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import request_types as rt
from .protocol import OpenAIBaseModel, _RequestModel

MAX_EMBEDDING_INPUTS = 2048  # inputs in one request, as OpenAI allows

EmbeddingTexts = Annotated[list[rt.Text], Field(json_schema_extra={"minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS})]
EmbeddingTokenIdLists = Annotated[
    list[rt.TokenIds], Field(json_schema_extra={"minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS})
]
Dimensions = rt._int(ge=1, json_schema_extra={"x-limit": "dimensions"})
TruncatePromptTokens = rt._int(ge=1)


class EmbeddingRequest(_RequestModel):
    """``POST /v1/embeddings``. ``input``: a string, strings, token ids or lists of token ids (each at most the
    model's context, in tokens). ``dimensions`` keeps the first d components (renormalised when normalising)."""

    input: rt.Text | rt.TokenIds | EmbeddingTexts | EmbeddingTokenIdLists
    model: rt.ModelName | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    user: str | None = None
    # ---- falconlm extensions (vLLM's names) ----
    truncate_prompt_tokens: TruncatePromptTokens | None = None  # keep each input's last k tokens
    normalize: bool | None = None  # L2-normalise (default: the model's pooling config)


class EmbeddingData(OpenAIBaseModel):
    """One input's embedding: floats, or with ``encoding_format: base64`` the little-endian float32 bytes."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
