"""Which replica serves a request: prefix-aware rendezvous hashing with bounded loads.

Why this scheme:

- Each replica has its own prefix cache, so requests that start alike should meet on one replica. The routing key
  is the first :data:`PREFIX_CHARS` characters of the request's text (a completion's first prompt, a chat's
  messages as role and content, an embedding's first input), not the whole request: a shared system prompt or
  few-shot preamble then sends every request that starts with it to the same replica, whatever follows.
- Rendezvous (highest-random-weight) hashing ranks the replicas per key by ``hash(key, replica)``. A replica that
  leaves (unhealthy, restarting) moves only the keys it held, and they come back to it when it returns; no ring
  or virtual nodes to tune. The hash is BLAKE2b, so the choice is the same in every process and every run.
- Bounded loads: the first replica in the key's ranking takes the request unless it is overloaded, when the next
  one in the ranking is tried, and so on. A replica is overloaded when it has at least ``floor`` requests in
  flight (its batch is full: below that another sequence in its batch costs little, and its cache hit is worth
  more) and more than ``load_factor`` times the mean in-flight count. One hot prefix thus spills over to the other
  replicas instead of queueing on one while they idle. When every replica is overloaded, the least loaded wins.
- Requests without text (``GET /v1/models``, ``/detokenize``, a body that is not JSON) go to the least loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

PREFIX_CHARS = 256  # about 50-100 tokens: enough to tell system prompts apart, short enough to be shared


def _text_of(value: object) -> str | None:
    """A prompt's text: a string, the first of a list of strings, or token ids (as their decimal spelling)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, int):
            return " ".join(str(token) for token in value if isinstance(token, int))
        return _text_of(first)
    return None


def _message_text(message: object) -> str:
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts: their text
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return f"{message.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e"


def prefix_key(path: str, body: bytes, chars: int = PREFIX_CHARS) -> bytes | None:
    """The routing key of a request to ``path`` with JSON ``body``: its text's first ``chars`` characters, with
    the model name; None when it has no text."""
    if not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    if path.endswith("/chat/completions"):
        messages = payload.get("messages")
        text = "".join(_message_text(m) for m in messages) if isinstance(messages, list) else None
    elif path.endswith("/completions"):
        text = _text_of(payload.get("prompt"))
    elif path.endswith("/embeddings"):
        text = _text_of(payload.get("input"))
    elif path == "/tokenize":
        text = _text_of(payload.get("prompt"))
        if text is None and isinstance(payload.get("messages"), list):
            text = "".join(_message_text(m) for m in payload["messages"])
    else:
        text = None
    if not text:
        return None
    return f"{payload.get('model', '')}\x1d{text[:chars]}".encode("utf-8", "surrogatepass")


def rendezvous_order(key: bytes, replicas: Sequence[int]) -> list[int]:
    """``replicas`` ranked for ``key``, best first (highest random weight)."""

    def weight(replica: int) -> bytes:
        return hashlib.blake2b(key, digest_size=8, salt=replica.to_bytes(8, "little")).digest()

    return sorted(replicas, key=weight, reverse=True)


def choose_replica(key: bytes | None, in_flight: Mapping[int, int], floor: int = 16, load_factor: float = 1.5) -> int:
    """The replica for a request with routing ``key`` among the ready replicas (``in_flight``: replica -> its
    requests in flight). See the module docstring for the rule."""
    if not in_flight:
        raise ValueError("no replica to choose from")
    least_loaded = min(in_flight, key=lambda r: (in_flight[r], r))
    if key is None:
        return least_loaded
    mean = (sum(in_flight.values()) + 1) / len(in_flight)  # counting this request
    for replica in rendezvous_order(key, list(in_flight)):
        load = in_flight[replica]
        if load < floor or load + 1 <= load_factor * mean:
            return replica
    return least_loaded
