"""Pure sampling over a batch with per-row parameters: (logits, rows) -> tokens (+ logprobs).

A pipeline of small functions, each with OpenAI's or vLLM's definition of its parameter:
logit_bias -> bans (min_tokens, bad_words, allowed_token_ids) -> penalties -> grammar -> greedy or
temperature -> min_p -> top_k -> top_p -> draw. Temperature, min_p, top_k, top_p and the
inverse-CDF draw run for all sampled rows of a step in a few batched tensor ops, none of which
sorts a vocabulary; only the uniform numbers are drawn per row, from the row's own
torch.Generator (one per step; a top_p row whose first draw fell outside its nucleus draws a
second). Every batched op works within a row, so a row's token depends only on its own
logits and generator, never on the rows beside it (rule 4).

On a CPU with genserve's native kernels built, rows without top_k or min_p draw in C
(sample.c: one row per thread, a few passes over its logits, no torch dispatch; the same
nucleus and the same two uniforms as below); the others take the torch path below. A row
takes the same path alone or batched: it depends on its own numbers only.

Device: every tensor a step builds lives on the logits' device (penalty counts, logit_bias and
grammar masks arrive there from the worker); only the uniforms come from the rows' CPU
generators (a seed draws the same numbers on any device). Results leave the device through
`to_host` once per step (greedy and drawn tokens, finite flags, logprobs packed together);
the few other syncs (ties at a top_k boundary, whether top_p rows' first draws are in their
nuclei, the top_p bucket sort) go through it too, so a test can count them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from genserve.engine.types import SamplingParams, TokenLogprob
from genserve.model import native

NEG_INF = float("-inf")
GREEDY_BELOW = 1e-5
RowErrors = dict[int, Exception]  # row index -> what failed it


class Constraint(Protocol):
    def apply(self, logits_row: torch.Tensor) -> None:
        """Set the logits of tokens that may not come next to -inf, in place."""


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """One row of a step: the request's own SamplingParams (the one record of its sampling
    fields) and the state sampling reads beside them, kept by the worker per request."""

    params: SamplingParams
    generator: torch.Generator | None = None
    # token ids that may not be drawn this step: EOS before min_tokens, a bad word's last token
    suppress: tuple[int, ...] = ()
    allowed: torch.Tensor | None = None  # [V] bool: the only ids that may be drawn
    counts: torch.Tensor | None = None  # [V] how often each token was generated so far
    seen: torch.Tensor | None = None  # [V] bool: in the prompt or generated so far
    constraint: Constraint | None = None  # a grammar: what may come next
    # logit_bias as (token ids, values), built once per request; None: built from params
    bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def bias_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bias is not None:
            return self.bias
        return bias_tensors(self.params.logit_bias, device)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 (vLLM's threshold) dividing by the temperature overflows to inf/NaN;
        # the distribution is a spike on the argmax anyway.
        return self.params.temperature < GREEDY_BELOW or self.params.top_k == 1


@dataclass(frozen=True, slots=True)
class SampleOutput:
    tokens: list[int]  # -1 for a row in errors
    logprobs: list[TokenLogprob | None]
    errors: RowErrors = field(default_factory=dict)  # rows that failed, each alone


def bias_tensors(
    bias: tuple[tuple[int, float], ...], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """logit_bias as (ids, values) on `device` (the logits'), built once per request."""
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device)
    return ids, torch.tensor([v for _, v in bias], dtype=torch.float32, device=device)


def to_host(t: torch.Tensor) -> list:
    """The sampler's device -> host copies all pass here: on an accelerator each one waits for
    the device (a sync), so a step makes as few as it can (tests count them)."""
    return t.tolist()


# -- logit processors ---------------------------------------------------------------------
def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """OpenAI: the bias is added to the logit; -100 in effect bans a token, +100 forces it.

    One indexed add for the whole batch: a Python loop per entry per row per step cost 30 ms
    per row at 8,192 entries. Each row's entries are distinct token ids (parse_logit_bias
    merges duplicates), so every logit gets one addition, the same alone or in a batch.
    """
    parts = [(i, r.bias_tensors(logits.device)) for i, r in enumerate(rows) if r.params.logit_bias]
    if not parts:
        return
    ids = torch.cat([t for _, (t, _) in parts])
    values = torch.cat([v for _, (_, v) in parts]).to(logits.dtype)
    which = torch.cat([torch.full_like(t, i) for i, (t, _) in parts])
    logits.index_put_((which.to(logits.device), ids.to(logits.device)),
                      values.to(logits.device), accumulate=True)  # fmt: skip


def apply_penalties(row: torch.Tensor, r: SamplingRow) -> None:
    """OpenAI's presence/frequency penalties over generated tokens; vLLM's (HF's) repetition
    penalty over prompt and generated tokens (divide positive logits, multiply negative)."""
    p = r.params
    if r.counts is not None and (p.presence_penalty or p.frequency_penalty):
        row -= r.counts * p.frequency_penalty + (r.counts > 0).to(row.dtype) * p.presence_penalty
    if r.seen is not None and p.repetition_penalty != 1.0:
        penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row.copy_(torch.where(r.seen, penalized, row))


def apply_bans(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Suppressed ids (EOS before min_tokens, bad words' last tokens) to -inf, then every id
    outside a row's allowed_token_ids: one indexed write and one masked fill for the batch,
    whatever the number of ids. -inf stays -inf through the penalties that follow."""
    banned = [(i, t) for i, r in enumerate(rows) for t in r.suppress]
    if banned:
        which, ids = zip(*banned, strict=True)
        at = (_index(list(which), logits.device), _index(list(ids), logits.device))
        logits.index_put_(at, torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device))
    limited = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not limited:
        return
    allowed = torch.stack([rows[i].allowed for i in limited])
    if len(limited) == len(rows):
        logits.masked_fill_(~allowed, NEG_INF)
        return
    idx = _index(limited, logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, NEG_INF)


def apply_masks(row: torch.Tensor, r: SamplingRow) -> None:
    if r.constraint is not None:
        r.constraint.apply(row)


def _changes_logits(r: SamplingRow) -> bool:
    p = r.params
    penalized = r.counts is not None and bool(p.presence_penalty or p.frequency_penalty)
    repeated = r.seen is not None and p.repetition_penalty != 1.0
    banned = bool(r.suppress) or r.allowed is not None
    return bool(p.logit_bias or penalized or repeated or banned or r.constraint is not None)


def _batched(out: torch.Tensor, rows: list[SamplingRow]) -> None:
    """What runs for every row of a step in a few ops: logit_bias, then the bans."""
    apply_logit_bias(out, rows)
    apply_bans(out, rows)


def process(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, RowErrors]:
    """Bias, bans, penalties and masks on a copy; a row whose processing raises is reported in
    the errors (by row index) and the others go on (a grammar past its limits fails one
    request)."""
    errors: RowErrors = {}
    if not any(_changes_logits(r) for r in rows):
        return logits, errors  # nothing to change: no copy (nothing downstream writes to it)
    out = logits.clone()
    try:
        _batched(out, rows)
        batched = True
    except Exception:  # noqa: BLE001 - redone row by row below, to find the row at fault
        out, batched = logits.clone(), False
    for i, r in enumerate(rows):
        try:
            if not batched:
                _batched(out[i : i + 1], [r])
            apply_penalties(out[i], r)
            apply_masks(out[i], r)
        except Exception as e:  # noqa: BLE001 - this row's request fails, not the batch
            errors[i] = e
    return out, errors


# -- truncation on one row, as defined (the batched draw below gives the same distribution) --
def min_p_mask(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """vLLM: drop tokens whose probability is below min_p times the top token's."""
    return min_p_drop(logits.softmax(-1), min_p)


def min_p_drop(probs: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """min_p on probabilities, per row of a batch ([b, 1] min_p) or on one row."""
    return probs < min_p * probs.amax(-1, keepdim=True)


def top_k_top_p_mask(sorted_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """On one row's logits sorted in descending order: True where a token is pruned.

    top_k keeps the k best; top_p keeps the smallest prefix whose probability reaches p
    (the token that crosses p is kept, so at least one token always survives).
    """
    vocab = sorted_logits.shape[-1]
    # A top_k beyond the vocabulary keeps everything (and must not overflow the comparison).
    pruned = torch.arange(vocab, device=sorted_logits.device) >= min(top_k or vocab, vocab)
    probs = sorted_logits.masked_fill(pruned, NEG_INF).softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly above each token
    return pruned | (before >= top_p)


# -- the draw: every sampled row of a step at once ---------------------------------------------
# top_k and top_p both come down to a number of tokens kept per row, k, in the order of a stable
# descending sort; the kept set is then every token whose logit is at least the k-th largest,
# less any token tied with it past k (ties go to the lower id), applied in one pass per step.
# top_k rows (with or without top_p) take k from a batched topk of their k largest logits (top_p
# is resolved on those candidates: past k nothing is kept). top_p rows without top_k find their
# boundary without sorting the vocabulary: each row's tokens are bucketed by the leading bits of
# their probability (monotone in the logit), a histogram of probability mass per bucket says
# which bucket the nucleus ends in, and only that bucket's tokens (a few hundred at most on a
# flat distribution) are sorted. The cost is a few passes over [rows, vocab], the same whether
# the nucleus holds 3 tokens (a trained model) or 45,000 (a random-weight one, nearly uniform).
# Every op works within a row, so a row's kept set is the same alone or batched (rule 4).
BUCKET_BITS = 6  # mantissa bits of a probability that name its bucket, beside the exponent
BUCKETS = 128 << BUCKET_BITS  # every float32 in [0, 1] (exponent at most 127)
DRAW_BLOCK = 256  # the draw's cumulative sum is taken per block of this many token ids


@dataclass(frozen=True, slots=True)
class DrawParams:
    """The sampled rows' parameters as tensors, built once per step."""

    inv_temperature: torch.Tensor  # [b, 1] float32
    min_p: torch.Tensor  # [b, 1] float32; 0: off
    top_k: torch.Tensor  # [b] int64; the vocabulary size: off
    top_p: torch.Tensor  # [b] float64; 1: off
    # The same decisions on the host, from the requests' own numbers: branching on the tensors
    # above would wait for the device each time.
    by_k: tuple[int, ...] = ()  # rows truncated by top_k (with or without top_p)
    by_p: tuple[int, ...] = ()  # rows truncated by top_p alone
    k_max: int = 0  # the largest top_k among by_k rows
    min_p_on: bool = False

    @property
    def truncating(self) -> bool:
        return bool(self.by_k or self.by_p)

    def only_top_p(self, rows: torch.Tensor) -> DrawParams:
        """These rows, each truncated by top_p alone (rows of by_p)."""
        return DrawParams(
            self.inv_temperature[rows], self.min_p[rows], self.top_k[rows], self.top_p[rows],
            by_p=tuple(range(rows.numel())), min_p_on=self.min_p_on,
        )  # fmt: skip

    @classmethod
    def of(cls, rows: list[SamplingRow], vocab: int, device: torch.device) -> DrawParams:
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        # Python's min first: a top_k of 10**30 must not overflow int64.
        top_k = [min(r.params.top_k or vocab, vocab) for r in rows]
        by_k = tuple(i for i, k in enumerate(top_k) if k < vocab)
        by_p = tuple(i for i, r in enumerate(rows) if r.params.top_p < 1.0 and top_k[i] >= vocab)
        return cls(
            # A multiplication, not a division: ATen divides a [1, V] row by a [1, 1] tensor
            # with a reciprocal but a [B, V] batch exactly, so a row alone would round otherwise.
            tensor([[1.0 / r.params.temperature] for r in rows], torch.float32),
            tensor([[r.params.min_p] for r in rows], torch.float32),
            tensor(top_k, torch.long),
            tensor([r.params.top_p for r in rows], torch.float64),
            by_k=by_k,
            by_p=by_p,
            k_max=max((top_k[i] for i in by_k), default=0),
            min_p_on=any(r.params.min_p > 0 for r in rows),
        )


Redraw = Callable[[list[int]], torch.Tensor]  # rows -> a second uniform each ([n] float64)


def draw_batch(
    logits: torch.Tensor, params: DrawParams, u: torch.Tensor, redraw: Redraw | None = None
) -> torch.Tensor:
    """One token per row of processed `logits` [b, V]; row i draws with its uniform u[i].

    With `redraw`, rows truncated by top_p alone draw first from their whole distribution and
    keep the token when it lies in the nucleus; the others (about 1 - top_p of them) draw
    again, exactly, from the nucleus, with a second uniform from `redraw`. Accepting a draw
    from the whole distribution when it falls in the nucleus is a draw from the nucleus, so
    the mixture is the nucleus distribution, and most rows skip finding its boundary (the
    bucket pass below): 32 rows of a 49k vocabulary at top_p 0.95 sampled in 5.1-5.9 ms
    against 10.7-16.4 (temperature alone: 1.6; interleaved A/B on a 2-core Xeon).

    Every operation works within a row (softmax, cumsum, compare, topk, scatter_add, a stable
    sort of one bucket), so a row's token depends only on its own logits and uniforms, never
    on the rows beside it (rule 4).
    """
    if redraw is None or not params.by_p:
        return _inverse_cdf(truncated_weights(logits, params), u)
    first = replace(params, by_p=())  # top_k rows truncate now; top_p-only rows do not
    weights = truncated_weights(logits, first)
    tokens = _inverse_cdf(weights, u)
    by_p = torch.tensor(params.by_p, dtype=torch.long, device=logits.device)
    sure = _surely_in_nucleus(_rows_of(weights, by_p), tokens[by_p], params.top_p[by_p])
    unsure = [i for i, ok in zip(params.by_p, to_host(sure), strict=True) if not ok]
    if not unsure:
        return tokens
    # Settled exactly: their nuclei, as truncated_weights finds them (the bucket pass).
    rows = torch.tensor(unsure, dtype=torch.long, device=logits.device)
    nucleus = truncated_weights(logits[rows], params.only_top_p(rows))
    inside = to_host(nucleus.gather(1, tokens[rows][:, None])[:, 0] > 0)
    out = [j for j, ok in enumerate(inside) if not ok]
    if out:
        pick = torch.tensor(out, dtype=torch.long, device=logits.device)
        again = [unsure[j] for j in out]
        tokens[rows[pick]] = _inverse_cdf(nucleus[pick], redraw(again).to(logits.device))
    return tokens


def _surely_in_nucleus(
    weights: torch.Tensor, tokens: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """[rows] bool: True where the row's token is certainly in its top_p nucleus (False: not
    certain either way). In the stable descending order of the logits (truncated_weights), a
    token is kept when the mass strictly before it is below top_p of the total and it has
    weight. Every token before it has a weight at least its own (the softmax keeps the order,
    rounding at most makes neighbours equal), so the mass of the tokens weighing at least as
    much, less its own, bounds that mass from above; a margin of 1e-4 of the total covers the
    float32 sums' rounding (far less). From the weights alone, the logits need not outlive the
    softmax: one [b, V] buffer and one pass less (32 rows of a 49k vocabulary at top_p 0.95
    sampled in 0.79-0.91x the time of the logits-based check, `bench/sampling.py
    --baseline-ref`, 2-core AMX Xeon VM)."""
    wt = weights.gather(1, tokens[:, None])
    # weights >= wt as 1.0/0.0, then a dot product per row: torch.where over [32, 49152]
    # took 5.5 ms here against 1.2 (2-core AMX Xeon), most of a top_p step's sampling.
    at_least = torch.ge(weights, wt, out=torch.empty_like(weights))
    upper = (torch.linalg.vecdot(weights, at_least) - wt[:, 0]).double()
    total = weights.sum(-1).double()
    return (upper < (top_p - 1e-4) * total) & (wt[:, 0] > 0)


def truncated_weights(logits: torch.Tensor, params: DrawParams) -> torch.Tensor:
    """[b, V] probabilities after temperature, 0 where min_p, top_k or top_p prune a token.

    Not renormalised (the draw scales by each row's total). The kept set is the one a stable
    full sort in descending order defines: among equal logits the lower token id comes first.
    """
    x, weights = _tempered(logits, params)
    if params.truncating:
        _truncate(x, weights, params)
    return weights


def _tempered(logits: torch.Tensor, params: DrawParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits / temperature, their probabilities with min_p applied). Without truncation the
    logits are not needed after the softmax: it overwrites them (one [b, V] buffer instead of
    two; a step's large allocations are what cost most here), and both returned are that
    buffer."""
    x = logits * params.inv_temperature
    weights = x.softmax(-1) if params.truncating else torch.softmax(x, -1, out=x)
    if params.min_p_on:
        weights.masked_fill_(min_p_drop(weights, params.min_p), 0.0)
    return x, weights


def _truncate(x: torch.Tensor, weights: torch.Tensor, params: DrawParams) -> None:
    """top_k and top_p in place on `weights`: each row keeps the first k tokens of the stable
    descending order of `x`, k from its top_k and top_p (the token that crosses p is kept)."""
    kth = x.new_full((x.shape[0], 1), NEG_INF)  # keep x >= kth; -inf: the whole row
    past: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row, id): tied with kth, past k
    for which, find in ((params.by_k, _kth_by_topk), (params.by_p, _kth_by_buckets)):
        if which:
            rows = torch.tensor(which, dtype=torch.long, device=x.device)
            value, (r, ids) = find(x, weights, rows, params)
            kth[rows] = value
            past.append((rows[r], ids))
    # x >= kth as 1.0/0.0 then a product: a quarter of masked_fill's time here (its kernel is
    # not vectorized); kth -inf keeps a row whole.
    weights.mul_(torch.ge(x, kth, out=torch.empty_like(x)))
    for r, ids in past:
        weights[r, ids] = 0.0


def _rows_of(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return t if rows.numel() == t.shape[0] else t[rows]  # every row: no copy


def _kth_by_topk(
    x: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, params: DrawParams
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """top_k rows: the k-th largest logit of each (k from top_k, then top_p on the top k's mass)
    and the tokens tied with it past k, (row among `rows`, id)."""
    k, top_p = params.top_k[rows], params.top_p[rows]
    # One candidate past the largest k: a tie at the k-th that runs past k shows in the list.
    values, ids = _rows_of(x, rows).topk(min(params.k_max + 1, x.shape[-1]), dim=-1)
    # Equal logits have equal weights, so these are the stable order's weights position by
    # position even where topk orders ties otherwise; past k a token is not kept.
    w = weights[rows[:, None], ids]
    w.masked_fill_(torch.arange(ids.shape[-1], device=x.device) >= k[:, None], 0.0)
    w = w.double()
    cum = w.cumsum(-1)
    limit = top_p * cum[:, -1]
    crossed = ((cum - w) < limit[:, None]) & (w > 0)  # mass strictly before each < p
    k = torch.where(top_p < 1.0, crossed.sum(-1), k)
    kth = values.gather(1, (k - 1)[:, None])
    # Tokens equal to the k-th past k: none if none is among the candidates past k (the ties
    # of the k-th come next to it in topk's order); else found in the row itself.
    ties_past = (values == kth) & (torch.arange(ids.shape[-1], device=x.device) >= k[:, None])
    if not to_host(ties_past.any()):
        return kth, _no_tokens(x.device)
    return kth, _ties_past_k(_rows_of(x, rows), kth, k)


def _ties_past_k(
    xs: torch.Tensor, kth: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) of the tokens equal to each row's k-th logit that come after the k-th in the
    stable order: the ties beyond the room left by the larger logits, highest ids first out."""
    ties = xs == kth
    room = k[:, None] - (xs > kth).sum(-1, keepdim=True)
    return (ties & (ties.cumsum(-1) > room)).nonzero(as_tuple=True)


def _no_tokens(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    empty = torch.empty(0, dtype=torch.long, device=device)
    return empty, empty


def _kth_by_buckets(
    x: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, params: DrawParams
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """top_p rows without top_k: the logit of the token that crosses p (the last one kept) and
    the tokens tied with it that are not kept, (row among `rows`, id)."""
    xs, ws = _rows_of(x, rows), _rows_of(weights, rows)
    n = xs.shape[0]
    first = torch.arange(n, device=x.device, dtype=torch.int32)[:, None] * BUCKETS
    bucket = _weight_buckets(ws).add_(first)  # row j's numbered from j * BUCKETS
    mass = torch.bincount(bucket.view(-1), weights=ws.double().view(-1), minlength=n * BUCKETS)
    cum = mass.view(n, BUCKETS).flip(-1).cumsum(-1)  # mass of the buckets up to each, top first
    limit = params.top_p[rows] * cum[:, -1]
    last = (cum[:, :-1] < limit[:, None]).sum(-1)  # the bucket the nucleus ends in, from the top
    above = torch.where(last > 0, cum.gather(1, (last - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inside = bucket == (BUCKETS - 1 - last[:, None]).int() + first
    vals, wts, ids = _sorted_bucket(xs, ws, inside)
    before = above[:, None] + (wts.cumsum(-1) - wts)  # mass strictly before each token
    k = ((before < limit[:, None]) & (wts > 0)).sum(-1, keepdim=True)  # >= 1: its top token
    kth = vals.gather(1, k - 1)
    pos = torch.arange(vals.shape[-1], device=x.device)
    r, c = ((vals == kth) & (pos >= k)).nonzero(as_tuple=True)  # every tie is in the bucket
    return kth, (r, ids[r, c])


def _weight_buckets(ws: torch.Tensor) -> torch.Tensor:
    """[rows, V] int32 bucket of each token's probability: its float32 exponent and top
    BUCKET_BITS mantissa bits, which order non-negative floats as their values do. So a higher
    logit never lands in a lower bucket (its probability is not lower), each bucket holds a
    contiguous run of the descending order, ties always together; a bucket spans about
    1/2**BUCKET_BITS of a factor 2 in probability, and all that round to 0 share bucket 0."""
    return torch.bitwise_right_shift(ws.view(torch.int32), 23 - BUCKET_BITS)


def _sorted_bucket(
    xs: torch.Tensor, ws: torch.Tensor, inside: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The boundary bucket's tokens per row, stable-sorted by logit (nonzero lists them by id):
    (logits, float64 weights, ids), each [rows, most tokens in one row's bucket], padded with
    -inf logits and 0 weights."""
    r, c = inside.nonzero(as_tuple=True)  # row-major, ids ascending within a row
    counts = torch.bincount(r, minlength=xs.shape[0])
    pos = torch.arange(r.numel(), device=r.device) - (counts.cumsum(0) - counts)[r]
    shape = (xs.shape[0], to_host(counts.max()))
    vals = xs.new_full(shape, NEG_INF).index_put_((r, pos), xs[r, c])
    ids = torch.zeros(shape, dtype=torch.long, device=xs.device).index_put_((r, pos), c)
    wts = torch.zeros(shape, dtype=torch.float64, device=xs.device)
    wts.index_put_((r, pos), ws[r, c].double())
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    return vals, wts.gather(1, order), ids.gather(1, order)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative weight (in id order) exceeds u times the row's
    total, never a token of weight 0.

    In two levels, batched: the blocks of DRAW_BLOCK ids, by their summed weight, then the ids
    of the one block the draw lands in (one pass over [b, V] instead of a float64 cumsum per
    row). Each block is summed on its own, so a row's sums are the same alone or batched.
    """
    b, vocab = weights.shape
    dev = weights.device
    whole = vocab // DRAW_BLOCK * DRAW_BLOCK
    sums = weights[:, :whole].view(b, -1, DRAW_BLOCK).sum(-1)
    if whole < vocab:
        sums = torch.cat([sums, weights[:, whole:].sum(-1, keepdim=True)], dim=-1)
    cum = sums.double().cumsum(-1)
    total = cum[:, -1:].contiguous()
    target = u[:, None] * total
    # The block the target falls in; at most the last block with weight (u * total can round
    # up to the total).
    block = torch.minimum(
        torch.searchsorted(cum, target, right=True), torch.searchsorted(cum, total)
    )
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp(min=0)), 0.0)
    ids = block * DRAW_BLOCK + torch.arange(DRAW_BLOCK, device=dev)
    w = weights.gather(1, ids.clamp(max=vocab - 1)).double()
    w.masked_fill_(ids >= vocab, 0.0)
    at = torch.searchsorted(w.cumsum(-1), target - before, right=True)
    # Rounding between the block's sum and its cumsum can leave the target past the block's
    # last id: then its last id of positive weight.
    last = DRAW_BLOCK - 1 - (w > 0).flip(-1).int().argmax(-1, keepdim=True)
    return ids.gather(1, torch.minimum(at, last))[:, 0]


# -- which rows draw, their uniforms and their failures ----------------------------------------
NOT_FINITE = "no token can be drawn: every logit is -inf or one is NaN"


def _undrawn(n: int, device: torch.device) -> torch.Tensor:
    """n tokens not drawn yet: -1 each, where a row that fails keeps it."""
    return torch.full((n,), -1, dtype=torch.long, device=device)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _uniforms(rows: list[SamplingRow], which: list[int], errors: RowErrors) -> dict[int, float]:
    """Each drawing row's uniform from its own generator, first: one draw per row and step."""
    u: dict[int, float] = {}
    for i in which:
        try:
            u[i] = float(torch.rand(1, generator=rows[i].generator))
        except Exception as e:  # noqa: BLE001 - a generator that cannot draw fails its row
            errors[i] = e
    return u


@dataclass(frozen=True, slots=True)
class _Drawn:
    """The drawing rows' results, still on the device."""

    which: list[int]  # row indices of the step
    tokens: torch.Tensor  # [len(which)] long
    # [len(which)] bool, False where the row could not draw: read back with the tokens on an
    # accelerator; None on a CPU, where such rows were reported (errors) before drawing
    finite: torch.Tensor | None


def _draw(processed: torch.Tensor, rows: list[SamplingRow], errors: RowErrors) -> _Drawn | None:
    """Tokens of the rows that sample (not greedy, not failed), on the device."""
    which = [i for i, r in enumerate(rows) if i not in errors and not r.greedy]
    u = _uniforms(rows, which, errors)
    which = [i for i in which if i not in errors]
    if not which:
        return None
    dev = processed.device
    x = processed if len(which) == len(rows) else processed[_index(which, dev)]
    native_first = _native_first(x)
    if native_first:  # sample.c finds rows with no finite top logit itself (status -1)
        finite = None
    else:
        x, which, finite = _finite(x, which, errors)
        if not which:
            return None
    uniforms = torch.tensor([u[i] for i in which], dtype=torch.float64, device=dev)
    tokens, rest = _native_draws(x, rows, which, uniforms)
    if rest and native_first:
        rest = _drop_not_finite(x, which, rest, errors)
    if rest:  # in torch: rows sample.c does not take, and top_p rows it could not settle
        sub = x if len(rest) == len(which) else x[_index(rest, dev)]
        mine = [which[j] for j in rest]
        tokens[_index(rest, dev)] = _torch_draws(sub, rows, mine, u, uniforms[rest], errors)
    return _Drawn(which, tokens, finite)


def _native_first(x: torch.Tensor) -> bool:
    """Whether sample.c draws these logits: the step's rows then skip a pass over the whole
    [rows, vocab] for their top logits (0.23 ms of a 32-row step), which it takes anyway."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and native.library() is not None


def _drop_not_finite(
    x: torch.Tensor, which: list[int], rest: list[int], errors: RowErrors
) -> list[int]:
    """Of the rows left to torch (positions in `which`), those with no finite top logit fail
    alone (NOT_FINITE), as _finite fails them on an accelerator; the others are returned."""
    top = x[_index(rest, x.device)].amax(-1)
    keep = []
    for j, ok in zip(rest, torch.isfinite(top).tolist(), strict=True):
        if ok:
            keep.append(j)
        else:
            errors[which[j]] = ValueError(NOT_FINITE)
    return keep


def _native_draws(
    x: torch.Tensor, rows: list[SamplingRow], which: list[int], uniforms: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """(tokens, the rows still to draw): sample.c's draws where it runs (CPU float32 logits;
    rows with neither top_k nor min_p), a top_p draw outside its nucleus drawn again inside it
    there with the row's second uniform; -1 and left to torch elsewhere (and for rows with no
    finite logit, which torch reports). A row takes the same path alone or batched: it depends
    only on its own parameters, logits and uniforms. `which`: the rows' indices in the step."""
    vocab = x.shape[-1]
    takes = [
        j for j, i in enumerate(which)
        if not (rows[i].params.top_k and rows[i].params.top_k < vocab)
        and rows[i].params.min_p <= 0.0
    ]  # fmt: skip
    everyone = list(range(len(which)))
    if not takes or x.device.type != "cpu" or x.dtype != torch.float32 or not native.library():
        return _undrawn(len(which), x.device), everyone
    # Every row, the common step: no indexing by a list (each such index or assignment cost
    # ~20 us, a third of a one-row draw).
    whole = len(takes) == len(which)
    sub = x if whole else x[_index(takes, x.device)]
    sub = sub.contiguous()
    t = torch.tensor([1.0 / rows[which[j]].params.temperature for j in takes])
    p = torch.tensor([rows[which[j]].params.top_p for j in takes], dtype=torch.float64)
    try:
        drawn = native.draw_rows(sub, t, uniforms if whole else uniforms[takes], p)
        outside = [k for k, s in enumerate(drawn.status) if s == native.OUTSIDE]
        if outside:
            u2 = _Seconds(rows, x.device).of([which[takes[k]] for k in outside])
            second = u2(list(range(len(outside))))
            again = native.redraw_rows(sub[outside], t[outside], second, p[outside])
            drawn.tokens[outside] = again
    except (MemoryError, ValueError):  # no memory for a row's weights: torch draws them all
        return _undrawn(len(which), x.device), everyone
    if whole:
        tokens = drawn.tokens
    else:
        tokens = _undrawn(len(which), x.device)
        tokens[takes] = drawn.tokens
    settled = {j for j, s, tok in zip(takes, drawn.status, drawn.tokens.tolist(), strict=True)
               if s != native.CANNOT and tok >= 0}  # fmt: skip
    return tokens, [j for j in everyone if j not in settled]


def _torch_draws(
    x: torch.Tensor, rows: list[SamplingRow], which: list[int], u: dict[int, float],
    uniforms: torch.Tensor, errors: RowErrors,
) -> torch.Tensor:  # fmt: skip
    """draw_batch over these rows (step rows `which`), or row by row where the batch raised."""
    again = _Seconds(rows, x.device)
    try:
        params = DrawParams.of([rows[i] for i in which], x.shape[-1], x.device)
        return draw_batch(x, params, uniforms, again.of(which))
    except Exception:  # noqa: BLE001 - redone row by row below, to find the row at fault
        return _draw_alone(x, rows, which, u, errors, again)


def _finite(
    x: torch.Tensor, which: list[int], errors: RowErrors
) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """A row without a finite top logit (all masked, or NaN) cannot draw and fails alone.

    On a CPU the flags are read at once (no device to wait for) and such rows leave the batch.
    On an accelerator they come back with the step's results; until then such a row draws from
    zeros, so that no batched op indexes out of its row (on CUDA an out-of-range index is a
    device assert that ends every request)."""
    finite = torch.isfinite(x.amax(-1))
    if x.device.type != "cpu":
        return torch.where(finite[:, None], x, 0.0), which, finite
    flags = finite.tolist()
    if all(flags):
        return x, which, None
    for i, ok in zip(which, flags, strict=True):
        if not ok:
            errors[i] = ValueError(NOT_FINITE)
    keep = [j for j, ok in enumerate(flags) if ok]
    return x[keep], [which[j] for j in keep], None


@dataclass(slots=True)
class _Seconds:
    """Second uniforms, for rows whose first draw fell outside their nucleus: each drawn from
    the row's own generator when first asked for, and remembered, so that a row redone alone
    after a failed batch draws the same numbers as it would have batched."""

    rows: list[SamplingRow]
    device: torch.device
    drawn: dict[int, float] = field(default_factory=dict)

    def of(self, which: list[int]) -> Redraw:
        """A Redraw for a draw over these rows of the step (its row j is step row which[j])."""

        def redraw(js: list[int]) -> torch.Tensor:
            for i in (which[j] for j in js):
                if i not in self.drawn:
                    self.drawn[i] = float(torch.rand(1, generator=self.rows[i].generator))
            values = [self.drawn[which[j]] for j in js]
            return torch.tensor(values, dtype=torch.float64, device=self.device)

        return redraw


def _draw_alone(
    x: torch.Tensor, rows: list[SamplingRow], which: list[int], u: dict[int, float],
    errors: RowErrors, again: _Seconds,
) -> torch.Tensor:  # fmt: skip
    """Each row by itself, with the uniforms it already drew: the same tokens as batched."""
    dev = x.device
    out = _undrawn(len(which), dev)
    for j, i in enumerate(which):
        try:
            params = DrawParams.of([rows[i]], x.shape[-1], dev)
            uniform = torch.tensor([u[i]], dtype=torch.float64, device=dev)
            out[j : j + 1] = draw_batch(x[j : j + 1], params, uniform, again.of([i]))
        except Exception as e:  # noqa: BLE001 - this row's request fails, not the batch
            errors[i] = e
    return out


# -- logprobs -------------------------------------------------------------------------------
def token_logprob(raw_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """From the model's own distribution (vLLM's default): before bias, penalties, masks.
    With its rank (a prompt token's, for vLLM's prompt_logprobs): 1 + the ids more likely."""
    logprobs = raw_row.float().log_softmax(-1)
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = logprobs.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    value = logprobs[token]
    return TokenLogprob(token, float(value), top, int((logprobs > value).sum()) + 1)


@dataclass(slots=True)
class _Results:
    """A step's results on the device as one float64 vector, and how to read it back: copied
    to the host in one go (on an accelerator, one sync instead of a few per row)."""

    parts: list[torch.Tensor] = field(default_factory=list)

    def add(self, t: torch.Tensor) -> int:
        """Queue a 1-D tensor; returns its length (its values come back in this order)."""
        self.parts.append(t.reshape(-1))
        return self.parts[-1].numel()

    def fetch(self) -> list[float]:
        if len(self.parts) == 1:  # the tokens alone (a CPU step without logprobs): no copy
            return to_host(self.parts[0])
        return to_host(torch.cat([p.double() for p in self.parts])) if self.parts else []


def _queue_logprobs(
    logits: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor, errors: RowErrors,
    out: _Results,
) -> list[tuple[int, int]]:  # fmt: skip
    """log_softmax of every row that asked, in one op; each row's top k from its own row (a
    k shared by the batch could pick other ids among equal logprobs). Returns (row, k) in the
    order queued: per row its token's logprob, then k values and k ids."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None and i not in errors]
    if not want:
        return []
    idx = _index(want, logits.device)
    table = logits[idx].float().log_softmax(-1)
    # clamp: a row that failed after this (no finite logit) holds -1, never an index here
    out.add(table.gather(1, tokens[idx].clamp(min=0)[:, None]))
    queued = []
    for j, i in enumerate(want):
        k = rows[i].params.logprobs
        try:
            if k:
                values, ids = table[j].topk(k)
                out.add(values)
                out.add(ids)
            queued.append((i, k))
        except Exception as e:  # noqa: BLE001 - this row's request fails, not the batch
            errors[i] = e
    return queued


def _read_logprobs(
    host: list[float], at: int, n_rows: int, queued: list[tuple[int, int]], tokens: list[int]
) -> list[TokenLogprob | None]:
    """The logprobs queued by _queue_logprobs, read back from the host copy from `at`."""
    out: list[TokenLogprob | None] = [None] * n_rows
    chosen, at = host[at : at + len(queued)], at + len(queued)
    for (i, k), value in zip(queued, chosen, strict=True):
        values, ids = host[at : at + k], host[at + k : at + 2 * k]
        at += 2 * k
        top = tuple((int(t), v) for t, v in zip(ids, values, strict=True))
        out[i] = TokenLogprob(tokens[i], value, top)
    return out


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
    """One token per row. `logits` is [len(rows), vocab] float32 and is not modified.

    A row that raises (in its masks, its draw or its logprobs) is reported in `errors` with
    token -1; every other row still draws from its own generator exactly once, so a failing
    neighbour changes no other row's tokens (rule 4).
    """
    if not rows:
        return SampleOutput([], [])
    processed, errors = process(logits, rows)
    dev = logits.device
    greedy = [i for i, r in enumerate(rows) if r.greedy]  # no draw
    drawn = _draw(processed, rows, errors)
    if drawn is not None and len(drawn.which) == len(rows):
        tokens = drawn.tokens  # every row drew: nothing to merge
    else:
        tokens = _undrawn(len(rows), dev)
        if greedy:
            idx = _index(greedy, dev)
            top = processed if len(greedy) == len(rows) else processed[idx]
            tokens.index_copy_(0, idx, top.argmax(-1))
        if drawn is not None:
            tokens.index_copy_(0, _index(drawn.which, dev), drawn.tokens)
    results = _Results()
    n_tokens = results.add(tokens)
    has_flags = drawn is not None and drawn.finite is not None
    n_finite = results.add(drawn.finite) if has_flags else 0
    queued = _queue_logprobs(logits, rows, tokens, errors, results)
    host = results.fetch()
    picked = [int(t) for t in host[:n_tokens]]
    if has_flags:
        for i, ok in zip(drawn.which, host[n_tokens : n_tokens + n_finite], strict=True):
            if not ok and i not in errors:
                errors[i] = ValueError(NOT_FINITE)
    logprobs = _read_logprobs(host, n_tokens + n_finite, len(rows), queued, picked)
    return SampleOutput(
        [-1 if i in errors else t for i, t in enumerate(picked)],
        [None if i in errors else lp for i, lp in enumerate(logprobs)],
        errors,
    )
