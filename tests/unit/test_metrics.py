"""Metrics without a model: the engine's phase times on a request's last delta, vLLM's
finished_reason for each way a request ends, the stores' gauges, and the HTTP counts of the
edge's own answers labelled by route template, never by raw path. The live-server side is
tests/integration/test_metrics.py."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import httpx
import pytest

from genserve.api.app import create_app, route_labels
from genserve.api.metrics import Metrics, finished_reason
from genserve.config import ServerConfig
from genserve.engine.client import AsyncEngine, EngineError
from genserve.engine.types import (
    FailureKind,
    FinishReason,
    Request,
    RequestFailure,
    SamplingParams,
    TokenDelta,
)
from tests.prom import parse, value
from tests.unit.test_engine_loop import ScriptedWorker, drain, req, run

M = {"model_name": "m"}


def runtime(jobs: dict[str, int] | None = None, batches: dict[str, int] | None = None):  # noqa: ANN201
    """What Metrics reads of a Runtime: no engine; stores counting what they are given."""

    def store(counts: dict[str, int]) -> SimpleNamespace:
        return SimpleNamespace(count_by_status=lambda: counts)

    manager = None if jobs is None else SimpleNamespace(jobs=store(jobs))
    runner = None if batches is None else SimpleNamespace(store=store(batches))
    return SimpleNamespace(models={}, fine_tuning=manager, batches=runner)


def test_only_the_last_delta_carries_the_phases() -> None:
    deltas = run(lambda eng: drain(eng.open([req("t-0", max_tokens=4)])), ScriptedWorker())
    assert [d.times is None for d in deltas] == [True, True, True, False]
    t = deltas[-1].times
    assert min(t.queued_s, t.prefill_s, t.decode_s) >= 0
    assert t.inference_s == t.prefill_s + t.decode_s


def stopping(rid: str) -> Request:
    """Ends with a stop on its first token (ScriptedWorker samples 7 every time)."""
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=5, stop_token_ids=(7,)))


def test_every_way_a_request_ends_counts_under_its_reason() -> None:
    metrics = Metrics(runtime())

    async def served(eng: AsyncEngine) -> None:
        eng.observer = metrics.observer("m")
        await drain(eng.open([stopping("s-0"), req("l-0", max_tokens=3), req("l-1")]))
        eng.open([req("gone", max_tokens=10_000)]).close()  # the client went away at once

    async def failed(eng: AsyncEngine) -> None:
        eng.observer = metrics.observer("m")
        with pytest.raises(EngineError):
            await drain(eng.open([req("f-0", max_tokens=5)]))

    run(served, ScriptedWorker())
    run(failed, ScriptedWorker(fail_at=1))
    got = parse(metrics.render().decode())
    success = "genserve:request_success_total"
    for reason, count in (("stop", 1), ("length", 2), ("abort", 1), ("error", 1)):
        assert value(got, success, finished_reason=reason, **M) == count, reason
    # Once per request that ended (the abandoned one never did): stop, 2 x length, error.
    assert value(got, "genserve:request_generation_tokens_count", **M) == 4
    assert value(got, "genserve:request_generation_tokens_sum", **M) == 1 + 3 + 3 + 0
    assert value(got, "genserve:request_prompt_tokens_sum", **M) == 4 * 3
    assert value(got, "genserve:request_params_max_tokens_sum", **M) == 5 + 3 + 3 + 5
    for phase in ("queue", "prefill", "decode", "inference"):  # the three that ran to an end
        assert value(got, f"genserve:request_{phase}_time_seconds_count", **M) == 3, phase


@pytest.mark.parametrize(
    ("reason", "kind", "label"),
    [
        (FinishReason.STOP, None, "stop"),
        (FinishReason.LENGTH, None, "length"),
        (FinishReason.ABORT, FailureKind.INTERNAL, "error"),
        (FinishReason.ABORT, None, "error"),  # dropped by the engine without a word
        (FinishReason.ABORT, FailureKind.UNAVAILABLE, "abort"),  # unloaded, stopped, drained
        (FinishReason.ABORT, FailureKind.INVALID, "abort"),
    ],
)
def test_finished_reason_is_vllms(reason: FinishReason, kind, label: str) -> None:  # noqa: ANN001
    error = None if kind is None else RequestFailure("why", kind)
    assert finished_reason(TokenDelta("r", (), "", reason, 1, 0, error=error)) == label


def test_n_is_observed_once_per_prompt_and_an_unloaded_model_leaves() -> None:
    metrics = Metrics(runtime())
    metrics.admitted("m", n=2, prompts=3)
    metrics.observer("m")
    got = parse(metrics.render().decode())
    assert value(got, "genserve:request_params_n_count", **M) == 3
    assert value(got, "genserve:request_params_n_sum", **M) == 6
    success = "genserve:request_success_total"
    assert (success, frozenset({"finished_reason": "stop", **M}.items())) in got  # listed at 0
    metrics.forget("m")
    assert 'model_name="m"' not in metrics.render().decode()


def test_jobs_and_batches_by_status_zeros_included() -> None:
    rt = runtime(jobs={"running": 1, "succeeded": 2}, batches={"completed": 3})
    got = parse(Metrics(rt).render().decode())
    assert value(got, "genserve:fine_tuning_jobs", status="running") == 1
    assert value(got, "genserve:fine_tuning_jobs", status="succeeded") == 2
    assert ("genserve:fine_tuning_jobs", frozenset({"status": "paused"}.items())) in got
    assert value(got, "genserve:batches", status="completed") == 3
    assert ("genserve:batches", frozenset({"status": "in_progress"}.items())) in got
    down = Metrics(runtime()).render().decode()  # no storage: no gauge claims zero jobs
    assert "genserve:fine_tuning_jobs" not in down and "genserve:batches" not in down


async def answer(app, requests: list[tuple[str, str]]) -> list[int]:  # noqa: ANN001
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [(await client.request(m, p)).status_code for m, p in requests]


def http_counts(app) -> dict[tuple[str, str, str], float]:  # noqa: ANN001
    got = parse(app.state.metrics.render().decode())
    return {
        (labels["method"], labels["handler"], labels["status"]): v
        for (name, key), v in got.items()
        if name == "http_requests_total" and (labels := dict(key))
    }


def test_a_draining_servers_503s_count_under_their_route() -> None:
    app = create_app(ServerConfig())  # no lifespan: nothing loads, the edge answers alone
    app.state.edge.draining = True
    codes = asyncio.run(answer(app, [("POST", "/v1/chat/completions"), ("GET", "/v1/files/f1")]))
    assert codes == [503, 503]
    assert http_counts(app) == {
        ("POST", "/v1/chat/completions", "503"): 1,
        ("GET", "/v1/files/{file_id}", "503"): 1,
    }


def test_paths_no_route_matches_are_one_series_not_one_per_path() -> None:
    """A trailing slash after an id (the router's 307), unknown paths, and a method a client
    made up: all under `none` or OTHER, however many distinct ones come."""
    app = create_app(ServerConfig())
    sent = [("GET", f"/v1/files/file-{i}/") for i in range(5)]
    sent += [("GET", f"/no/such/{i}") for i in range(5)] + [("BREW", "/v1/models")] * 2
    sent += [("GET", "/metrics"), ("GET", "/health")]  # scrapes and probes are not counted
    codes = asyncio.run(answer(app, sent))
    assert codes[:10] == [307] * 5 + [404] * 5
    assert http_counts(app) == {
        ("GET", "none", "307"): 5,
        ("GET", "none", "404"): 5,
        ("OTHER", "/v1/models", "405"): 2,
    }


def test_every_documented_route_is_labelled_with_its_own_template() -> None:
    """What the labels are read from stays true to what the app routes (a router added to the
    app but not to ROUTERS, or given a prefix, would fail here)."""
    app = create_app(ServerConfig())
    labels = route_labels(app)
    for path, ops in app.openapi()["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x1", path)
        for method in ops:
            scope = {"type": "http", "path": concrete, "method": method.upper(), "root_path": ""}
            assert labels(scope).replace(":path}", "}") == path, (method, path)


def test_replicas_expositions_still_merge_for_the_ray_edge() -> None:
    """Under Ray each replica's text is merged by genserve.ray.shared.merge_metrics: the new
    families (a counter of two labels, histograms, gauges by status) go through it intact."""
    from genserve.ray.shared import merge_metrics

    texts = {}
    for replica, status in (("engine#a", 200), ("engine#b", 429)):
        metrics = Metrics(runtime(jobs={"queued": 1}))
        metrics.http_answered("POST", "/v1/completions", status, 0.2)
        metrics.observer("m").success["length"].inc()
        texts[replica] = metrics.render().decode()
    got = parse(merge_metrics(texts).decode())
    http = "http_requests_total"
    assert value(got, http, method="POST", handler="/v1/completions", status="200",
                 replica="engine#a") == 1  # fmt: skip
    assert value(got, http, method="POST", handler="/v1/completions", status="429",
                 replica="engine#b") == 1  # fmt: skip
    success = "genserve:request_success_total"
    for replica in texts:
        assert value(got, success, finished_reason="length", replica=replica, **M) == 1
        assert value(got, "genserve:fine_tuning_jobs", status="queued", replica=replica) == 1
