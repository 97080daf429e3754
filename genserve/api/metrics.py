"""Prometheus metrics with vLLM's names (prefixed `genserve:`), in a registry per app.

Engine gauges and the stores' counts are read at scrape time; per-request metrics come from
the engine client (RequestObserver), once per delta and mostly once per request; HTTP metrics
from the outermost middleware (genserve.api.http_metrics).
"""

from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from genserve.engine.types import FailureKind, FinishReason, Request, TokenDelta
from genserve.storage import batches, jobs

PREFIX = "genserve:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Token counts per request, 1-2-5 steps as vLLM's; fixed, since one histogram serves every
# model whatever its context length.
COUNT_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))
N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's, for request_params_n
HTTP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# vLLM's finished_reason values. The engine's `stop` is also what OpenAI's answer calls
# `tool_calls` (a call ends the text), and no request ends in `content_filter` here.
STOP, LENGTH, ABORT, ERROR = "stop", "length", "abort", "error"
REASONS = (STOP, LENGTH, ABORT, ERROR)


class EngineGauges(Collector):
    """Read at scrape time from the engines, so the numbers are never stale."""

    def __init__(self, runtime) -> None:  # noqa: ANN001 - genserve.runtime.runtime.Runtime
        self.runtime = runtime

    def collect(self):  # noqa: ANN201 - prometheus' interface
        running = GaugeMetricFamily(
            PREFIX + "num_requests_running", "Requests in the running batch", labels=["model_name"]
        )
        waiting = GaugeMetricFamily(
            PREFIX + "num_requests_waiting",
            "Requests waiting for KV-cache blocks",
            labels=["model_name"],
        )
        usage = GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc",
            "Fraction of KV-cache blocks held by running requests (0-1)",
            labels=["model_name"],
        )
        queries = CounterMetricFamily(
            PREFIX + "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            labels=["model_name"],
        )
        hits = CounterMetricFamily(
            PREFIX + "prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            labels=["model_name"],
        )
        preempted = CounterMetricFamily(
            PREFIX + "num_preemptions",
            "Requests preempted (KV blocks freed, recomputed later)",
            labels=["model_name"],
        )
        for model_id, served in self.runtime.models.items():
            s = served.engine.stats()
            running.add_metric([model_id], s.num_running)
            waiting.add_metric([model_id], s.num_waiting)
            usage.add_metric([model_id], s.kv_cache_usage)
            queries.add_metric([model_id], s.prefix_cache_queries)
            hits.add_metric([model_id], s.prefix_cache_hits)
            preempted.add_metric([model_id], s.num_preempted)
        yield from (running, waiting, usage, queries, hits, preempted)


class StoreGauges(Collector):
    """Fine-tuning jobs and batches by status, counted in SQLite at scrape time (one grouped
    count per table: a scrape reads no row whole). Every status is listed, zeros included, so
    that a status emptied drops to 0 rather than vanishing. Nothing while storage is down."""

    def __init__(self, runtime) -> None:  # noqa: ANN001 - genserve.runtime.runtime.Runtime
        self.runtime = runtime

    def collect(self):  # noqa: ANN201 - prometheus' interface
        manager, runner = self.runtime.fine_tuning, self.runtime.batches
        if manager is not None:
            counts = manager.jobs.count_by_status()
            yield _by_status("fine_tuning_jobs", "Fine-tuning jobs", jobs.STATUSES, counts)
        if runner is not None:
            counts = runner.store.count_by_status()
            yield _by_status("batches", "Batches", batches.STATUSES, counts)


def _by_status(
    name: str, what: str, statuses: tuple[str, ...], counts: dict[str, int]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, f"{what} by status", labels=["status"])
    for status in dict.fromkeys((*statuses, *counts)):  # a status unknown here still shows
        family.add_metric([status], counts.get(status, 0))
    return family


class Metrics:
    """Per-request observations from the engine client, counters from the API."""

    def __init__(self, runtime) -> None:  # noqa: ANN001
        self.registry = CollectorRegistry()
        self.registry.register(EngineGauges(runtime))
        self.registry.register(StoreGauges(runtime))
        label = ["model_name"]
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token")
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Time between tokens", TOKEN_BUCKETS
        )
        self.e2e = self._histogram("e2e_request_latency_seconds", "Arrival to last token")
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed", label, registry=self.registry
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated", label, registry=self.registry
        )
        self.success = Counter(
            PREFIX + "request_success", "Requests finished, by finish reason",
            ["model_name", "finished_reason"], registry=self.registry,
        )  # fmt: skip
        self._request_histograms()
        # Every metric labelled by model: an unloaded model's series leave them all (forget).
        self.by_model = (
            self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens,
            self.request_prompt, self.request_generation, self.params_n, self.params_max_tokens,
            self.queue_time, self.prefill_time, self.decode_time, self.inference_time,
        )  # fmt: skip
        self._http()
        self._last: dict[str, float] = {}

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> Histogram:
        return Histogram(
            PREFIX + name, doc, ["model_name"], registry=self.registry, buckets=buckets
        )

    def _request_histograms(self) -> None:
        """One observation per request that ended (the phases: per request that ended with
        stop or length, as the engine measured them), and per prompt of an admitted call."""
        h = self._histogram
        self.request_prompt = h("request_prompt_tokens", "Prompt tokens per request", COUNT_BUCKETS)
        self.request_generation = h(
            "request_generation_tokens", "Tokens generated per request", COUNT_BUCKETS
        )
        self.params_n = h("request_params_n", "The n request parameter", N_BUCKETS)
        self.params_max_tokens = h(
            "request_params_max_tokens", "The max_tokens request parameter", COUNT_BUCKETS
        )
        self.queue_time = h("request_queue_time_seconds", "Time in the engine's queue")
        self.prefill_time = h("request_prefill_time_seconds", "First scheduled to first token")
        self.decode_time = h("request_decode_time_seconds", "First token to last token")
        self.inference_time = h("request_inference_time_seconds", "First scheduled to last token")

    def _http(self) -> None:
        """prometheus-fastapi-instrumentator's names and labels, which vLLM exposes (status: the
        code itself, not its class)."""
        self.http_requests = Counter(
            "http_requests_total", "Requests by method, status and handler (route template)",
            ["method", "status", "handler"], registry=self.registry,
        )  # fmt: skip
        self.http_duration = Histogram(
            "http_request_duration_seconds", "Latency by handler, to the response's end",
            ["method", "handler"], registry=self.registry, buckets=HTTP_BUCKETS,
        )  # fmt: skip

    def http_answered(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, str(status), handler).inc()
        self.http_duration.labels(method, handler).observe(seconds)

    def observer(self, model_id: str) -> RequestObserver:
        return RequestObserver(self, model_id)

    def admitted(self, model_id: str, n: int, prompts: int) -> None:
        """A call was admitted: its n, once per prompt (vLLM observes n per request, and a
        completions call with several prompts is several requests there)."""
        child = self.params_n.labels(model_id)
        for _ in range(prompts):
            child.observe(n)

    def forget(self, model_id: str) -> None:
        """An unloaded model's series leave /metrics (its gauges already do: they are read
        from the served models). Adapters have none of their own: their requests count under
        their base model's name. Its in-flight requests end on the children its observer
        holds, which are no longer collected."""
        for metric in self.by_model:
            with contextlib.suppress(KeyError):  # none yet: it served no request
                metric.remove(model_id)
        for reason in REASONS:
            with contextlib.suppress(KeyError):
                self.success.remove(model_id, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def finished_reason(delta: TokenDelta) -> str:
    """vLLM's label for how a request ended: `error` when the engine failed it (a 500: an
    ABORT without a reason is a request the engine dropped), `abort` when it ended early for
    any other reason (the model unloaded, the server draining, input the engine refused)."""
    if delta.finish_reason is not FinishReason.ABORT:
        return str(delta.finish_reason)  # stop or length: the engine's names are vLLM's
    failed = delta.error is None or delta.error.kind is FailureKind.INTERNAL
    return ERROR if failed else ABORT


class RequestObserver:
    """What AsyncEngine calls for each delta of each request of one model. The labelled
    children are looked up once: `labels()` per token was 14% of the API process's CPU at 32
    streams, and on a 2-core machine that CPU comes out of the engine's steps. What is
    observed once per request is done on its last delta."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self.m = metrics
        self.ttft = metrics.ttft.labels(model_id)
        self.itl = metrics.itl.labels(model_id)
        self.e2e = metrics.e2e.labels(model_id)
        self.prompt_tokens = metrics.prompt_tokens.labels(model_id)
        self.generation_tokens = metrics.generation_tokens.labels(model_id)
        # Every reason's series from the start (at 0), as vLLM lists them.
        self.success = {r: metrics.success.labels(model_id, r) for r in REASONS}
        self.request_prompt = metrics.request_prompt.labels(model_id)
        self.request_generation = metrics.request_generation.labels(model_id)
        self.max_tokens = metrics.params_max_tokens.labels(model_id)
        self.queue = metrics.queue_time.labels(model_id)
        self.prefill = metrics.prefill_time.labels(model_id)
        self.decode = metrics.decode_time.labels(model_id)
        self.inference = metrics.inference_time.labels(model_id)

    def on_delta(self, request: Request, delta: TokenDelta) -> None:
        now = time.monotonic()
        rid = request.request_id
        last = self.m._last.get(rid)
        if delta.token_ids:
            if last is None:
                self.ttft.observe(now - request.arrival_time)
            else:  # a delta may carry several tokens (--stream-interval): each its share
                gap = (now - last) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self.itl.observe(gap)
            self.m._last[rid] = now
        if delta.finished:
            self.m._last.pop(rid, None)
            self.e2e.observe(now - request.arrival_time)
            self.prompt_tokens.inc(delta.prompt_tokens)
            self.generation_tokens.inc(delta.completion_tokens)
            self._ended(request, delta)

    def _ended(self, request: Request, delta: TokenDelta) -> None:
        self.success[finished_reason(delta)].inc()
        self.request_prompt.observe(delta.prompt_tokens)
        self.request_generation.observe(delta.completion_tokens)
        if request.params.max_tokens is not None:  # settled before the engine saw it
            self.max_tokens.observe(request.params.max_tokens)
        times = delta.times
        if times is not None:
            self.queue.observe(times.queued_s)
            self.prefill.observe(times.prefill_s)
            self.decode.observe(times.decode_s)
            self.inference.observe(times.inference_s)

    def on_abandon(self, request: Request) -> None:
        """The client went away (or its call failed on another choice): vLLM's `abort`."""
        self.m._last.pop(request.request_id, None)
        self.success[ABORT].inc()
