"""Incremental detokenizing with exact stop strings.

Decoding one token at a time is wrong for byte-level BPE: a character can span tokens, and
some tokenizers change a token's text by what precedes it. So we decode a short window of
previous tokens plus the new ones and emit only the text beyond what the window alone gives,
holding back an incomplete character (U+FFFD) until its last byte arrives. Text that could be
the start of a stop string is held back too, so a stop string is never half-sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first output token


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(slots=True)
class DetokenizeResult:
    text: str  # new text that is safe to send
    stopped: bool  # a stop string was found; text ends just before it


@dataclass(slots=True)
class IncrementalDetokenizer:
    decoder: Decoder
    prompt_tail: list[int]  # the prompt's last tokens, context for the first output token
    stop: tuple[str, ...] = ()
    _ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # start of the decode window in _ids
    _read: int = 0  # end of what has been turned into text
    _text: str = ""  # all text decoded so far (sent or held back)
    _sent: int = 0  # characters of _text already sent

    def __post_init__(self) -> None:
        self._ids = list(self.prompt_tail[-CONTEXT_TOKENS:])
        self._read = len(self._ids)

    def push(self, token_id: int) -> DetokenizeResult:
        self._ids.append(token_id)
        prefix_text = self.decoder.decode(
            self._ids[self._prefix : self._read], skip_special_tokens=True
        )
        full = self.decoder.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix_text):
            return self._emit(final=False)  # incomplete character: wait for more bytes
        self._text += full[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: everything not yet sent, up to any stop string, including
        a character whose bytes never completed (as U+FFFD, as a whole decode would give)."""
        if self._read < len(self._ids):
            prefix_text = self.decoder.decode(self._ids[self._prefix : self._read], True)
            full = self.decoder.decode(self._ids[self._prefix :], True)
            self._text += full[len(prefix_text) :]
            self._read = len(self._ids)
        return self._emit(final=True).text

    def _emit(self, final: bool) -> DetokenizeResult:
        cut = self._find_stop()
        if cut is not None:
            out = self._text[self._sent : cut]
            self._sent = len(self._text)
            return DetokenizeResult(out, stopped=True)
        end = len(self._text) if final else len(self._text) - self._held_back()
        end = max(end, self._sent)
        out = self._text[self._sent : end]
        self._sent = end
        return DetokenizeResult(out, stopped=False)

    def _find_stop(self) -> int | None:
        # Only text not yet sent can hold a new match, plus a margin for a stop string that
        # straddles the boundary of what was sent (held-back text guarantees none was sent).
        hits = [i for i in (self._text.find(s, self._sent) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text) - self._sent), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best
