"""ServerSettings: what serving needs beyond the engine (names, limits), and the HTTP layer's keys and checks."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_LOGPROBS = 20


@dataclass(frozen=True)
class ServerSettings:
    """``served_model_names[0]`` is the name the server reports; a request may name any of them.

    ``bind_host`` is the address the server listens on: with ``allowed_hosts`` it decides which ``Host`` headers
    are answered (see ``browser.py``). ``allowed_origins`` lists the web front ends (``scheme://host[:port]``, or
    ``*``) whose pages may call the API.
    """

    served_model_names: tuple[str, ...] = ("falconlm",)
    model_path: str | None = None
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    retry_after_seconds: int = 1
    max_choices: int = 16  # n, and prompts in one completions request
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # top logprobs per token (completions' logprobs, chat's top_logprobs)
    state_dir: str | None = None  # enables /v1/files and /v1/batches (durable batch jobs)
    max_upload_bytes: int = 200 * 1024 * 1024
    max_state_bytes: int = 10 * 1024**3  # /v1/files uploads get 413 once the state directory holds this much
    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.max_choices < 1:
            raise ValueError(f"max_choices must be >= 1, got {self.max_choices}")
        if not 0 <= self.max_logprobs <= DEFAULT_MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {DEFAULT_MAX_LOGPROBS}], got {self.max_logprobs}")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
