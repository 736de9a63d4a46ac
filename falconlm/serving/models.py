"""``/v1/models`` and the tokenizer endpoints (``/tokenize``, ``/detokenize``)."""

from __future__ import annotations

import asyncio

from ..engine.async_engine import AsyncEngine
from .errors import CONFLICTING_PARAMETERS, APIError, bad_request
from .inputs import chat_prompt, check_model, check_token_ids
from .protocol import DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse
from .settings import ServerSettings


class ModelServing:
    """What the served model is called, and how it tokenizes."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine, self.settings = engine, settings

    def _card(self, name: str) -> ModelCard:
        max_len = self.engine.max_model_len if self.engine.is_ready else None
        return ModelCard(id=name, root=self.settings.model_name, max_model_len=max_len)  # never the folder's path

    def models(self) -> ModelList:
        return ModelList(data=[self._card(name) for name in self.settings.served_model_names])

    def model(self, model_id: str) -> ModelCard:
        if model_id not in self.settings.served_model_names:
            raise APIError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return self._card(model_id)

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        check_model(request.model, self.settings)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("send exactly one of prompt and messages", "prompt", CONFLICTING_PARAMETERS)
        if request.messages is not None:
            ids = await chat_prompt(self.engine, request.messages, request.add_generation_prompt is not False)
        else:
            ids = await asyncio.to_thread(self.engine.tokenizer.encode, request.prompt or "")
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        check_model(request.model, self.settings)
        check_token_ids(request.tokens, self.engine.tokenizer.vocab_size, "tokens")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(request.tokens))
