"""Streaming text out of token ids: the incremental detokenizer and the stop-string matcher.

IncrementalDetokenizer re-decodes only a small window of recent tokens per step (vLLM's prefix/read
offsets), so each step costs O(1) and no emitted piece ends in a broken UTF-8 character. StopMatcher
holds back text that could begin a stop string until it knows whether the stop string completes.

Why the window stays correct (byte-level BPE, lossy UTF-8 decoding): once the decoded window ends in a
complete character, the decoder is back in its ground state, so later tokens never change earlier text.
When it ends in U+FFFD, everything before that last character is already final.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from falconlm.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Already-emitted tokens re-decoded as context in front of the pending ones.
_CONTEXT_TOKENS = 4
# Pending tokens allowed before the window is cut at a point where decoding restarts cleanly.
_MAX_PENDING = 8
# A UTF-8 character has at most 4 bytes, so an incomplete one spans at most 3 token boundaries.
_CUT_CANDIDATES = 4


class IncrementalDetokenizer:
    """Turn a stream of token ids into text pieces that never split a character.

    Invariant: ``"".join(add(...) pieces) + finish() == tokenizer.decode(token_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._finished = False
        # token_ids[_prefix_offset:_read_offset] are emitted (context); token_ids[_read_offset:] are pending.
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(token_ids[_prefix_offset:_read_offset])
        self._num_sent = 0  # characters of the pending tokens' text already emitted

    def add(self, token_ids: int | Sequence[int]) -> str:
        """Append ids; return the newly finalized text (may be "")."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add called after finish()")
        try:
            new_ids = [operator.index(token_ids)]  # type: ignore[arg-type]
        except TypeError:
            new_ids = [operator.index(i) for i in token_ids]  # type: ignore[union-attr]
        if not new_ids:
            return ""
        self.token_ids.extend(new_ids)
        window = self._decode(self._prefix_offset, len(self.token_ids))
        start = len(self._prefix_text) + self._num_sent
        if not window.endswith(_REPLACEMENT):
            piece = window[start:]
            self._set_window(len(self.token_ids))
        else:  # the last character may still change: emit everything before it
            stable = len(window) - 1
            piece = window[start:stable] if stable > start else ""
            self._num_sent += len(piece)
            if len(self.token_ids) - self._read_offset > _MAX_PENDING:
                self._cut_window(window)
        self.text += piece
        return piece

    def finish(self) -> str:
        """End the stream; return the text still held back (a trailing U+FFFD included)."""
        if self._finished:
            return ""
        self._finished = True
        window = self._decode(self._prefix_offset, len(self.token_ids))
        piece = window[len(self._prefix_text) + self._num_sent :]
        self.text += piece
        return piece

    def _decode(self, begin: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[begin:end], self.skip_special_tokens)

    def _set_window(self, read_offset: int, num_sent: int = 0) -> None:
        """Mark every token before ``read_offset`` as emitted; keep a few of them as decoding context."""
        self._read_offset = read_offset
        self._prefix_offset = max(0, read_offset - _CONTEXT_TOKENS)
        self._prefix_text = self._decode(self._prefix_offset, read_offset)
        self._num_sent = num_sent

    def _cut_window(self, window: str) -> None:
        """Move the read offset to a recent clean restart point, so a run of pending tokens stays short.

        A cut at ``j`` is clean when decoding both sides apart gives the same text as decoding them together
        (and the right side is not empty): a character straddling ``j`` would decode into extra U+FFFDs.
        """
        end = len(self.token_ids)
        emitted = len(self._prefix_text) + self._num_sent  # emitted characters of ``window``
        for cut in range(end - 1, max(self._read_offset, end - _CUT_CANDIDATES - 1), -1):
            head = self._decode(self._prefix_offset, cut)
            tail = self._decode(cut, end)
            if tail and head + tail == window and emitted >= len(head):
                self._set_window(cut, num_sent=emitted - len(head))
                return


class StopMatcher:
    """Cut streamed text at the earliest occurrence of any stop string.

    ``feed`` holds back text while it could be the start of a stop string; the stop string and anything
    after it are never returned. The result does not depend on how the text is split into pieces.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.stop = tuple(dict.fromkeys(s for s in stop if s))
        self.stopped = False
        self._held = ""
        self._max_len = max((len(s) for s in self.stop), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string has completed)."""
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        buffer = self._held + text
        cut = self._first_match(buffer)
        pending = self._first_candidate(buffer, len(buffer) if cut is None else cut)
        if cut is not None and pending is None:
            return self._stop(buffer, cut), True
        keep = len(buffer) if pending is None else pending
        self._held = buffer[keep:]
        return buffer[:keep], False

    def flush(self) -> str:
        """End of text: return what is held back (cut before a stop string that did complete)."""
        if self.stopped:
            return ""
        buffer, self._held = self._held, ""
        cut = self._first_match(buffer)
        return buffer if cut is None else self._stop(buffer, cut)

    def _stop(self, buffer: str, cut: int) -> str:
        self.stopped = True
        self._held = ""
        return buffer[:cut]

    def _first_match(self, buffer: str) -> int | None:
        """Start of the earliest complete stop string in ``buffer``."""
        found = [i for s in self.stop if (i := buffer.find(s)) >= 0]
        return min(found) if found else None

    def _first_candidate(self, buffer: str, limit: int) -> int | None:
        """Earliest start before ``limit`` whose rest of ``buffer`` is a proper prefix of a stop string."""
        for i in range(max(0, len(buffer) - self._max_len + 1), limit):
            rest = buffer[i:]
            if any(len(s) > len(rest) and s.startswith(rest) for s in self.stop):
                return i
        return None
