"""Token logprobs in OpenAI's two shapes: chat's `content` list and completions' columns."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from genserve.engine.types import TokenLogprob


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes->unicode table, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenText:
    """id -> (text, UTF-8 bytes) for one tokenizer, cached: the same ids recur constantly."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per served model
    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_decoder()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)  # byte-level BPE: the token's exact bytes
        else:
            raw = self.tokenizer.decode([token_id]).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)


class TokenIds:
    """vLLM's `return_tokens_as_token_ids`: tokens named "token_id:<id>", bytes kept real."""

    def __init__(self, text: TokenText) -> None:
        self.text = text

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        return f"token_id:{token_id}", self.text(token_id)[1]


def namer(text: TokenText, as_ids: bool | None) -> TokenText | TokenIds:
    return TokenIds(text) if as_ids else text


def chat_logprobs(lps: Sequence[TokenLogprob], text: TokenText | TokenIds) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token, raw = text(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}

    content = [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in lps
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    lps: Sequence[TokenLogprob | None],
    token_ids: Sequence[int],
    text: TokenText | TokenIds,
    offset: int,
) -> dict:
    """The legacy columns. `lps[i]` is None only for an echoed prompt's first token."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, lp in zip(token_ids, lps, strict=True):
        piece = text(token_id)[0]
        tokens.append(piece)
        token_logprobs.append(None if lp is None else lp.logprob)
        top.append(None if lp is None else {text(t)[0]: v for t, v in lp.top})
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }
