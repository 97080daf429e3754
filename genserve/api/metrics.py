"""Prometheus metrics with vLLM's names (prefixed `genserve:`), in a registry per app."""

from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from genserve.engine.types import Request, TokenDelta

PREFIX = "genserve:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


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


class Metrics:
    """Per-request observations from the engine client, counters from the API."""

    def __init__(self, runtime) -> None:  # noqa: ANN001
        self.registry = CollectorRegistry()
        self.registry.register(EngineGauges(runtime))
        label = ["model_name"]
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token", label,
            registry=self.registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between tokens", label,
            registry=self.registry, buckets=TOKEN_BUCKETS,
        )  # fmt: skip
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to last token", label,
            registry=self.registry, buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed", label, registry=self.registry
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated", label, registry=self.registry
        )
        # Every metric labelled by model: an unloaded model's series leave them all (forget).
        self.by_model = (self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens)
        self._last: dict[str, float] = {}

    def observer(self, model_id: str) -> RequestObserver:
        return RequestObserver(self, model_id)

    def forget(self, model_id: str) -> None:
        """An unloaded model's series leave /metrics (its gauges already do: they are read
        from the served models). Adapters have none of their own: their requests count under
        their base model's name. Its in-flight requests end on the children its observer
        holds, which are no longer collected."""
        for metric in self.by_model:
            with contextlib.suppress(KeyError):  # none yet: it served no request
                metric.remove(model_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestObserver:
    """What AsyncEngine calls for each delta of each request of one model. The labelled
    children are looked up once: `labels()` per token was 14% of the API process's CPU at 32
    streams, and on a 2-core machine that CPU comes out of the engine's steps."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self.m = metrics
        self.ttft = metrics.ttft.labels(model_id)
        self.itl = metrics.itl.labels(model_id)
        self.e2e = metrics.e2e.labels(model_id)
        self.prompt_tokens = metrics.prompt_tokens.labels(model_id)
        self.generation_tokens = metrics.generation_tokens.labels(model_id)

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

    def on_abandon(self, request: Request) -> None:
        self.m._last.pop(request.request_id, None)
