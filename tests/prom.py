"""A /metrics answer read as Prometheus reads it (prometheus_client's own parser), by sample."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """Every sample: (its name, its labels) -> its value. Parsing fails on a malformed text."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a series not (yet) there, as a counter that never moved."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def grown(before: Samples, after: Samples) -> dict[tuple[str, frozenset], float]:
    """What changed between two scrapes, by sample (counters and histograms only grow)."""
    keys = before.keys() | after.keys()
    changed = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in changed.items() if v and not k[0].endswith("_created")}
