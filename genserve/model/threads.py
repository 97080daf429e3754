"""How many threads a free decode step runs on, chosen while serving.

Why: a decode step's kernels meet at a barrier after every linear (some 150 a step), so a
core that another process takes for a moment stops every thread of the step until it is given
back. On the 2-core Zen 5 VM, beside one process spinning in another session, one int8 stream
on both cores fell to 1-5 tok/s, while on one core it kept 100-130 (bench/contention.py): the
scheduler's slices are milliseconds, the barriers tens of microseconds apart. On an idle
machine both cores are faster. Which is faster depends on what else runs at the moment, so
it is measured as it runs: each row bucket keeps a moving average of its step time per
thread count, runs the faster, and now and then runs a step on the other count to keep that
one's figure current. A wrong choice corrects itself within a few steps, since the chosen
count is timed on every step. Free rows only (LlamaRunner._native): their kernels sum each
row on one thread in one order whatever the count, and no seed promises their bits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXPLORE = 32  # steps before another thread count runs one step
SLOWEST_EXPLORE = 512  # ... after many that it lost by far (its steps cost a lot then)
FAR = 1.5  # lost by far: its step took this many times the chosen count's time
CHOSEN_WEIGHT = 0.1  # a chosen count's moving average: steps come often, each noisy
PROBE_WEIGHT = 1.0  # another count's: its latest try is its figure (an old one is stale)
MARGIN = 0.95  # another count is chosen once its time is below this share of the chosen's
LOG_EVERY_S = 60.0


def counts(most: int) -> tuple[int, ...]:
    """The thread counts compared: all of them, and one fewer (a core left to whatever else
    runs)."""
    return (most, most - 1) if most > 1 else (most,)


class OtherLoad:
    """How many cores other processes keep busy now: the machine's busy time (/proc/stat)
    less this process's own (os.times), over the last WINDOW_S. Linux only; None elsewhere.

    Why: on the 2-core Zen 5 VM, with one process spinning in another session, a step tried
    on both cores took 1.2 s (its barrier waited for the scheduler to give the spinner's core
    back), and a few such tries a minute cost more than the whole stream gained. So a try on
    more threads waits until the cores it needs are free of other work."""

    WINDOW_S = 0.25

    def __init__(
        self, stat: Path = Path("/proc/stat"), clock: Callable[[], float] = time.monotonic,
        own: Callable[[], float] = lambda: sum(os.times()[:2]),  # this process's CPU seconds
    ) -> None:  # fmt: skip
        self.stat, self.clock, self.own = stat, clock, own
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample()  # wall, machine busy, own (s)
        self._cores: float | None = None

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = self.stat.read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(f) for f in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle, iowait
        return self.clock(), (sum(ticks[:8]) - idle) / self.tick, self.own()

    def others(self) -> float | None:
        """Cores busy with other processes' work since the window before, or None."""
        last = self._last
        if last is not None and self.clock() - last[0] < self.WINDOW_S:
            return self._cores  # the last window's figure: /proc/stat is read once a window
        now = self._sample()
        if now is None:
            return None
        if last is not None:
            wall = now[0] - last[0]
            self._cores = max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall)
        self._last = now
        return self._cores


@dataclass(slots=True)
class Bucket:
    """One row bucket's figures: seconds a step, moving average, per thread count."""

    chosen: int
    seconds: dict[int, float] = field(default_factory=dict)
    interval: int = EXPLORE  # steps between two steps on the other count
    wait: int = EXPLORE  # steps left until the next
    warmed: bool = False  # the other count ran one step uncounted: the next is its try
    switches: int = 0  # changes of `chosen` since the last log line
    logged: float = float("-inf")  # time.monotonic() of that line


class ThreadGovernor:
    """Thread counts for free decode steps, per row bucket (see the module's docstring). While
    the other count keeps losing by far (a core taken by another process: a step on every
    core then took 2-8x one on a core fewer), it is tried ever less often, down to once in
    SLOWEST_EXPLORE steps, so trying it costs about 1% whatever the machine does."""

    def __init__(self, most: int | None = None, load: OtherLoad | None = None) -> None:
        self.counts = counts(most if most is not None else torch.get_num_threads())
        self.buckets: dict[int, Bucket] = {}
        self.load = load  # None: tries are never held back for other processes' work
        self.cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or self.counts[0])
        )

    def pick(self, key: int) -> int:
        b = self.buckets.setdefault(key, Bucket(chosen=self.counts[0]))
        for n in self.counts:
            if n not in b.seconds:
                return n
        b.wait -= 1
        if b.wait > 0:
            return b.chosen
        other = self._other(b)
        if other > b.chosen and not self._room_for(other):
            b.wait = EXPLORE  # other work holds the cores it needs: ask again later
            return b.chosen
        return other

    def untimed(self) -> int:
        """The count for steps not timed against each other (prompt chunks: too few, each
        its own size): one core fewer while other processes hold one, else every core. Not
        the decode steps' choice: one row is bound by the memory, where a core fewer costs
        little, a prompt by the multiplies, where it costs half."""
        return self.counts[0] if self._room_for(self.counts[0]) else self.counts[-1]

    def _room_for(self, threads: int) -> bool:
        """Whether other processes leave `threads` cores to this one (half a core of theirs
        is the API process and its client, or noise)."""
        busy = self.load.others() if self.load is not None else None
        return busy is None or busy <= self.cores - threads + 0.5

    def _warming(self, b: Bucket, threads: int) -> bool:
        """The first step of a try on the other count, not counted: a thread that slept while
        the count was lower wakes in it (and its caches are cold), which made every core look
        slower than it was on an idle machine."""
        if threads <= b.chosen or b.warmed:  # fewer threads wake none
            b.warmed = False
            return False
        b.warmed, b.wait = True, 1  # the next step tries it again, counted
        return True

    def record(self, key: int, threads: int, seconds: float) -> None:
        b = self.buckets[key]
        was = b.chosen
        last = b.seconds.get(threads)
        if last is not None and self._warming(b, threads):
            return
        if threads != b.chosen and last is not None:  # a step on the other count
            far = seconds > FAR * b.seconds[b.chosen]
            b.interval = min(2 * b.interval, SLOWEST_EXPLORE) if far else EXPLORE
            b.wait = b.interval
            log.debug("bucket %d: %d threads tried, %.2f ms against %d threads' %.2f ms; next "
                      "try in %d steps", key, threads, seconds * 1e3, b.chosen,
                      b.seconds[b.chosen] * 1e3, b.interval)  # fmt: skip
        weight = CHOSEN_WEIGHT if threads == b.chosen else PROBE_WEIGHT
        b.seconds[threads] = seconds if last is None else last + weight * (seconds - last)
        other = self._other(b)
        if other in b.seconds and b.seconds[other] < MARGIN * b.seconds[b.chosen]:
            b.chosen, b.interval, b.wait = other, EXPLORE, EXPLORE
        if b.chosen != was:
            self._changed(key, b)

    def _changed(self, key: int, b: Bucket) -> None:
        """One log line a bucket a minute at most: a machine whose load comes and goes would
        otherwise log every switch."""
        b.switches += 1
        now = time.monotonic()
        if now - b.logged < LOG_EVERY_S:
            return
        ms = ", ".join(f"{n} threads {s * 1e3:.2f} ms" for n, s in sorted(b.seconds.items()))
        log.info("decode steps of row bucket %d now on %d threads (%s; %d switches since the "
                 "last line)", key, b.chosen, ms, b.switches)  # fmt: skip
        b.logged, b.switches = now, 0

    def _other(self, b: Bucket) -> int:
        return next((n for n in self.counts if n != b.chosen), b.chosen)

    def chosen(self) -> dict[int, int]:
        """Each bucket's thread count now."""
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
