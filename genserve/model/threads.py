"""How many threads a free decode step runs on, chosen while serving.

Why: a decode step's kernels meet at a barrier after every linear (some 150 a step), so a
core that another process takes for a moment stops every thread of the step until it is given
back. On a 2-core machine with two niced test runs beside it, one int8 stream on both cores
fell to 10-25 tok/s while the same server on one thread kept 100-116: the scheduler's slices
are milliseconds, the barriers tens of microseconds apart. On an idle machine both cores are
faster. Which is faster depends on what else runs at the moment, so it is measured as it
runs: each row bucket keeps a moving average of its step time per thread count, runs the
fastest, and every EXPLORE steps runs one step on another count to keep that one's figure
current. A wrong choice corrects itself within a few steps, since the chosen count is timed
on every step. Free rows only (LlamaRunner._native): their kernels sum each row on one thread
in one order whatever the count, and no seed promises their bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

EXPLORE = 64  # steps between two steps on another thread count
CHOSEN_WEIGHT = 0.1  # a chosen count's moving average: steps come often, each noisy
PROBE_WEIGHT = 0.5  # another count's: its few steps must move its figure quickly
MARGIN = 0.95  # another count is chosen once its time is below this share of the chosen's


def counts(most: int) -> tuple[int, ...]:
    """The thread counts worth comparing: all of them, or one left to whatever else runs."""
    return (most, most - 1) if most > 1 else (most,)


@dataclass(slots=True)
class Bucket:
    """One row bucket's figures: seconds a step, moving average, per thread count."""

    seconds: dict[int, float] = field(default_factory=dict)
    chosen: int = 0
    steps: int = 0
    probe: int = 0  # which other count the next exploring step runs


class ThreadGovernor:
    """Thread counts for free decode steps, per row bucket (see the module's docstring)."""

    def __init__(self, most: int | None = None) -> None:
        self.counts = counts(most if most is not None else torch.get_num_threads())
        self.buckets: dict[int, Bucket] = {}

    def pick(self, key: int) -> int:
        b = self.buckets.setdefault(key, Bucket(chosen=self.counts[0]))
        b.steps += 1
        unmeasured = [n for n in self.counts if n not in b.seconds]
        if unmeasured:
            return unmeasured[0]
        if b.steps % EXPLORE:
            return b.chosen
        others = [n for n in self.counts if n != b.chosen]
        b.probe = (b.probe + 1) % len(others) if others else 0
        return others[b.probe] if others else b.chosen

    def record(self, key: int, threads: int, seconds: float) -> None:
        b = self.buckets[key]
        last = b.seconds.get(threads)
        weight = CHOSEN_WEIGHT if threads == b.chosen else PROBE_WEIGHT
        b.seconds[threads] = seconds if last is None else last + weight * (seconds - last)
        best = min(b.seconds, key=b.seconds.__getitem__)
        if best != b.chosen and b.seconds[best] < MARGIN * b.seconds.get(b.chosen, float("inf")):
            b.chosen = best

    def chosen(self) -> dict[int, int]:
        """Each bucket's thread count now (for the log and /metrics)."""
        return {k: b.chosen for k, b in self.buckets.items()}


@contextlib.contextmanager
def running_on(threads: int) -> Iterator[None]:
    """torch's threads (and so every kernel of genserve's library, which asks torch) set to
    `threads` for the block. 0.3 us a switch: OpenMP keeps its pool."""
    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
