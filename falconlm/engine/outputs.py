"""What generation returns: vLLM's offline shapes (RequestOutput holding CompletionOutputs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampler import TokenLogprobs


@dataclass
class CompletionOutput:
    """One generated sequence. ``finish_reason`` is "stop" (EOS, stop token or string) or "length"."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it, None for EOS/length
    logprobs: list[TokenLogprobs] | None = None
    # with SamplingParams.prompt_logprobs: one entry per prompt token (None for the first), from its first token on
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All completions of one prompt. ``.text`` etc. read the first completion, for the common n=1 case."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def prompt_logprobs(self) -> list[TokenLogprobs | None] | None:
        """With ``SamplingParams.prompt_logprobs``: each prompt token's logprobs (None for the first)."""
        return self.outputs[0].prompt_logprobs
