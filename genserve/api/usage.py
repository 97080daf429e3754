"""OpenAI's usage API for an operator: GET /v1/organization/usage/completions and
/v1/organization/usage/embeddings, admin keys only. Tokens and requests per time bucket (1m,
1h or 1d, aligned in UTC), filtered by project, key, model and (completions) batch, grouped by
any of those; pages of buckets with OpenAI's `next_page` cursor. A project here is a key's
project, a key id `genserve keys list`'s id (`env-...` for a key from the environment, none
for a Batch API line), a model the id a request named (a fine-tuned model's own).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request

from genserve.api.auth import require_admin
from genserve.api.errors import bad_request
from genserve.api.models import runtime_of
from genserve.runtime.errors import Unavailable
from genserve.storage.usage import Counts, UsageLedger, UsageRow

router = APIRouter()

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# OpenAI's bounds on buckets a page: (default, most) per width
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
GROUPS = {
    "completions": ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier"),
    "embeddings": ("project_id", "user_id", "api_key_id", "model"),
}
PAGE = "page_"


@dataclass(frozen=True, slots=True)
class Query:
    kind: str
    start: int  # the first bucket's start
    end: int  # exclusive
    width: int
    limit: int
    projects: list[str]
    key_ids: list[str]
    models: list[str]
    batch: bool | None
    group_by: list[str]


def values(request: Request, name: str) -> list[str]:
    """A query array, as `name=a&name=b` or `name[]=a` (OpenAI's clients send either)."""
    params = request.query_params
    return params.getlist(name) + params.getlist(f"{name}[]")


def integer(request: Request, name: str, default: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise bad_request(f"`{name}` is required (unix seconds)", name)
        return default
    if not raw.isascii() or not raw.isdigit():
        raise bad_request(f"`{name}` must be a non-negative integer", name)
    return int(raw)


def parse(request: Request, kind: str) -> Query:
    width_name = request.query_params.get("bucket_width", "1d")
    if width_name not in WIDTHS:
        raise bad_request("`bucket_width` must be one of 1m, 1h, 1d", "bucket_width")
    width = WIDTHS[width_name]
    start = integer(request, "start_time")
    end = integer(request, "end_time", int(time.time()) + 1)
    if end <= start:
        raise bad_request("`end_time` must be after `start_time`", "end_time")
    default, most = LIMITS[width_name]
    limit = integer(request, "limit", default)
    if not 1 <= limit <= most:
        raise bad_request(f"`limit` must be in [1, {most}] for {width_name} buckets", "limit")
    group_by = values(request, "group_by")
    for g in group_by:
        if g not in GROUPS[kind]:
            raise bad_request(f"`group_by` takes {', '.join(GROUPS[kind])}; not {g!r}", "group_by")
    batch = request.query_params.get("batch")
    if batch not in (None, "true", "false") or (batch is not None and kind != "completions"):
        raise bad_request("`batch` must be true or false (completions only)", "batch")
    first = start // width * width  # buckets are aligned to their width in UTC
    page = request.query_params.get("page")
    if page is not None:
        at = page.removeprefix(PAGE)
        if not page.startswith(PAGE) or not at.isdigit() or not first <= int(at) < end:
            raise bad_request("`page` is not a cursor this query gave", "page")
        first = int(at)
    return Query(
        kind, first, end, width, limit, values(request, "project_ids"),
        values(request, "api_key_ids"), values(request, "models"),
        None if batch is None else batch == "true", group_by,
    )  # fmt: skip


def ledger(request: Request) -> UsageLedger:
    usage = runtime_of(request).usage
    if usage is None:
        reason = runtime_of(request).storage_error or "storage is not configured"
        raise Unavailable(f"usage is unavailable: {reason}")
    return usage


def page_end(q: Query) -> int:
    """Where this page's buckets end: `limit` of them, or the one holding end_time."""
    last = -(-q.end // q.width) * q.width
    return min(last, q.start + q.limit * q.width)


def report(q: Query, rows: list[UsageRow]) -> dict:
    """OpenAI's page of buckets: each bucket of the page, empty ones too."""
    stop = page_end(q)
    buckets = []
    for at in range(q.start, stop, q.width):
        inside = [r for r in rows if at <= r.key.minute < at + q.width]
        buckets.append({"object": "bucket", "start_time": at, "end_time": at + q.width,
                        "results": results(q, inside)})  # fmt: skip
    more = stop < q.end  # a bucket starts before end_time past this page
    return {"object": "page", "data": buckets, "has_more": more,
            "next_page": f"{PAGE}{stop}" if more else None}  # fmt: skip


def results(q: Query, rows: list[UsageRow]) -> list[dict]:
    groups: dict[tuple, Counts] = {}
    for r in rows:
        g = groups.setdefault(tuple(GROUP_OF[name](r) for name in q.group_by), Counts())
        g.input_tokens += r.counts.input_tokens
        g.output_tokens += r.counts.output_tokens
        g.cached_tokens += r.counts.cached_tokens
        g.requests += r.counts.requests
    return [result(q, dict(zip(q.group_by, k, strict=True)), c) for k, c in groups.items()]


GROUP_OF: dict[str, Callable[[UsageRow], object]] = {
    "project_id": lambda r: r.key.project,
    "user_id": lambda r: None,  # genserve has keys, not users
    "api_key_id": lambda r: r.key.key_id,
    "model": lambda r: r.key.model,
    "batch": lambda r: r.key.batch,
    "service_tier": lambda r: "default",
}


def result(q: Query, group: dict[str, object], c: Counts) -> dict:
    ids = {"project_id": None, "user_id": None, "api_key_id": None, "model": None}
    if q.kind == "embeddings":
        out = {"object": "organization.usage.embeddings.result", "input_tokens": c.input_tokens,
               "num_model_requests": c.requests, **ids}  # fmt: skip
        return {**out, **group}
    out = {
        "object": "organization.usage.completions.result",
        "input_tokens": c.input_tokens,
        "output_tokens": c.output_tokens,
        "input_cached_tokens": c.cached_tokens,
        "input_uncached_tokens": c.input_tokens - c.cached_tokens,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": c.requests,
        **ids,
        "batch": None,
        "service_tier": None,
    }
    return {**out, **group}


def usage_route(kind: str) -> Callable:
    async def route(request: Request) -> dict:
        require_admin(request, f"read the organization's {kind} usage")
        q, store = parse(request, kind), ledger(request)
        rows = await asyncio.to_thread(  # it writes what is counted in memory first
            store.rows, kind, q.start, page_end(q), q.projects, q.key_ids, q.models, q.batch
        )
        return report(q, rows)

    route.__name__ = f"usage_{kind}"
    return route


router.add_api_route("/v1/organization/usage/completions", usage_route("completions"))
router.add_api_route("/v1/organization/usage/embeddings", usage_route("embeddings"))
