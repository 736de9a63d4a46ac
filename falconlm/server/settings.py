"""ServerSettings: what the HTTP layer needs to know beyond the engine (names, keys, limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """``served_model_names[0]`` is the name the server reports; a request may name any of them."""

    served_model_names: tuple[str, ...] = ("falconlm",)
    model_path: str | None = None
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    retry_after_seconds: int = 1
    max_choices: int = 128  # prompts x n in one request
    state_dir: str | None = None  # enables /v1/files and /v1/batches (durable batch jobs)
    max_upload_bytes: int = 200 * 1024 * 1024
    max_state_bytes: int = 10 * 1024**3  # /v1/files uploads get 413 once the state directory holds this much

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
