"""Token logprobs in OpenAI's two shapes: chat's `content` list and completions' columns."""

from __future__ import annotations

from collections.abc import Sequence

from genserve.engine.types import TokenLogprob
from genserve.runtime.tokens import TokenText


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


# vLLM's stand-in for -inf, which JSON cannot spell (its clamp_prompt_logprobs).
LOWEST_LOGPROB = -9999.0


def prompt_logprobs(
    lps: Sequence[TokenLogprob | None], prompt: Sequence[int], text: TokenText | TokenIds, k: int
) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first (it has no context),
    else {token id: {logprob, rank, decoded_token}} for the prompt's token and the k most
    likely. A prompt cut short (an aborted request) has nulls where it was not scored."""
    if len(lps) != len(prompt):
        lps = [None] * len(prompt)

    def entry(token_id: int, logprob: float, rank: int | None) -> dict:
        value = max(logprob, LOWEST_LOGPROB)
        return {"logprob": value, "rank": rank, "decoded_token": text(token_id)[0]}

    out: list[dict[str, dict] | None] = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        scored = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (t, v) in enumerate(lp.top[:k], start=1):
            scored.setdefault(str(t), entry(t, v, rank))
        out.append(scored)
    return out


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
        top.append(None if lp is None else completion_top(lp, text))
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def completion_top(lp: TokenLogprob, text: TokenText | TokenIds) -> dict[str, float]:
    """One position's `top_logprobs`: the k most likely tokens and the token itself (sampled,
    or the prompt's when echoed), as OpenAI and vLLM send them: up to k+1 entries."""
    out = {text(t)[0]: v for t, v in lp.top}
    if all(t != lp.token_id for t, _ in lp.top):
        # setdefault: a token whose text another top token shares keeps that one's entry
        out.setdefault(text(lp.token_id)[0], lp.logprob)
    return out
