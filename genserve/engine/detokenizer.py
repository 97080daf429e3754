"""Incremental detokenizing with exact stop strings.

Decoding one token at a time is wrong for byte-level BPE: a character can span tokens, and
some tokenizers change a token's text by what precedes it. So we decode a short window of
previous tokens plus the new ones and emit only the text beyond what the window alone gives,
holding back an incomplete character (U+FFFD) until its last byte arrives. Text that could be
the start of a stop string is held back too, so a stop string is never half-sent.

vLLM's two detokenizing controls live here too: `include_stop` keeps a matched stop string at
the end of the text (the cut moves past it), and `skip_special` (on by default) drops special
tokens' text from every decode.
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


class StopMatcher:
    """Finds stop strings in text fed piece by piece, in time linear in the text.

    One Knuth-Morris-Pratt automaton per stop string: its state is the length of the longest
    prefix of the stop string that the text fed so far ends with, which is exactly the text to
    hold back for it. Each character fed moves each state in amortized O(1) (searching the
    unsent text and re-testing every prefix per token was cubic: 480 tokens with four 20-40k
    character stop strings took 4.6 s). `work` counts state moves, for tests.
    """

    __slots__ = ("stops", "matched", "_fail", "_state", "_fed", "work")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.matched: str | None = None  # the stop string of the match feed last reported
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)
        self._fed = 0  # characters fed so far
        self.work = 0

    def feed(self, text: str) -> int | None:
        """Feed more text; the index (in all text fed) where the earliest match starts (the
        first such stop in `stops` order at a tie), its stop string then in `matched`."""
        first: int | None = None
        for k, stop in enumerate(self.stops):
            end = self._advance(k, stop, text)
            if end is not None and (first is None or end - len(stop) + 1 < first):
                first, self.matched = end - len(stop) + 1, stop
        self._fed += len(text)
        return first

    def _advance(self, k: int, stop: str, text: str) -> int | None:
        state, fail = self._state[k], self._fail[k]
        for i, ch in enumerate(text):
            while state and stop[state] != ch:
                state = fail[state - 1]
                self.work += 1
            if stop[state] == ch:
                state += 1
            self.work += 1
            if state == len(stop):
                self._state[k] = state
                return self._fed + i
        self._state[k] = state
        return None

    def held_back(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        return max((s for s in self._state), default=0)


def _failure(s: str) -> list[int]:
    """KMP: fail[i] = length of the longest proper prefix of s[: i + 1] that is its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


@dataclass(slots=True)
class IncrementalDetokenizer:
    decoder: Decoder
    prompt_tail: list[int]  # the prompt's last tokens, context for the first output token
    stop: tuple[str, ...] = ()
    include_stop: bool = False  # a matched stop string stays at the end of the text
    skip_special: bool = True  # special tokens' text is left out
    _ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # start of the decode window in _ids
    _read: int = 0  # end of what has been turned into text
    _text: str = ""  # all text decoded so far (sent or held back)
    _sent: int = 0  # characters of _text already sent
    _stops: StopMatcher | None = None
    # Where the text ends once a stop string is found: where it starts in _text (its end, with
    # include_stop).
    _cut: int | None = None

    def __post_init__(self) -> None:
        self._ids = list(self.prompt_tail[-CONTEXT_TOKENS:])
        self._read = len(self._ids)
        self._stops = StopMatcher(self.stop) if self.stop else None

    def push(self, token_id: int) -> DetokenizeResult:
        self._ids.append(token_id)
        prefix_text = self.decoder.decode(self._ids[self._prefix : self._read], self.skip_special)
        full = self.decoder.decode(self._ids[self._prefix :], self.skip_special)
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix_text):
            return self._emit(final=False)  # incomplete character: wait for more bytes
        self._add_text(full[len(prefix_text) :])
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: everything not yet sent, up to any stop string, including
        a character whose bytes never completed (as U+FFFD, as a whole decode would give)."""
        if self._read < len(self._ids):
            prefix_text = self.decoder.decode(
                self._ids[self._prefix : self._read], self.skip_special
            )
            full = self.decoder.decode(self._ids[self._prefix :], self.skip_special)
            self._add_text(full[len(prefix_text) :])
            self._read = len(self._ids)
        return self._emit(final=True).text

    def _add_text(self, text: str) -> None:
        if self._stops is not None and self._cut is None:
            start = self._stops.feed(text)
            if start is not None and self.include_stop:
                start += len(self._stops.matched or "")
            self._cut = start
        self._text += text

    def _emit(self, final: bool) -> DetokenizeResult:
        # Held-back text guarantees no match began in text already sent.
        if self._cut is not None:
            out = self._text[self._sent : self._cut]
            self._sent = len(self._text)
            return DetokenizeResult(out, stopped=True)
        held = self._stops.held_back() if self._stops is not None else 0
        end = len(self._text) if final else len(self._text) - held
        end = max(end, self._sent)
        out = self._text[self._sent : end]
        self._sent = end
        return DetokenizeResult(out, stopped=False)
