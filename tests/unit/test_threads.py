"""The thread governor (model/threads.py), fed step times as a machine would give them: all
cores fastest when nothing else runs, one core fewer while another process takes one, and
back again; trying the other count costs little while it loses by far. And a LlamaRunner's
free decode steps run through it, their logits the same on either count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import native
from genserve.model.threads import (
    EXPLORE,
    SLOWEST_EXPLORE,
    OtherLoad,
    ThreadGovernor,
    counts,
    running_on,
)

QUIET = {2: 4.0, 1: 5.5}  # ms a step: every core, one fewer
BUSY = {2: 16.0, 1: 6.5}  # another process on a core: the barriers wait for it


def run(g: ThreadGovernor, times: dict[int, float], steps: int, key: int = 0) -> list[int]:
    """`steps` steps at these times; the thread count each ran on."""
    ran = []
    for _ in range(steps):
        n = g.pick(key)
        g.record(key, n, times[n] / 1e3)
        ran.append(n)
    return ran


def test_counts() -> None:
    assert counts(1) == (1,)
    assert counts(2) == (2, 1)
    assert counts(16) == (16, 15)


def test_a_single_core_never_changes() -> None:
    g = ThreadGovernor(1)
    assert set(run(g, {1: 3.0}, 200)) == {1}


def test_quiet_keeps_every_core_and_tries_the_other_rarely() -> None:
    g = ThreadGovernor(2)
    ran = run(g, QUIET, 10 * EXPLORE)
    assert g.chosen() == {0: 2}
    assert ran.count(1) <= 10 + 1  # once to start, then one step in EXPLORE


def test_busy_moves_to_one_core_fewer_and_back() -> None:
    g = ThreadGovernor(2)
    run(g, QUIET, 5 * EXPLORE)
    ran = run(g, BUSY, 50)
    assert g.chosen() == {0: 1}
    assert ran[-30:].count(2) <= 2  # it left the stalled count within a few steps
    run(g, QUIET, 2 * SLOWEST_EXPLORE)
    assert g.chosen() == {0: 2}  # the other count is tried again, found faster, chosen


def test_trying_a_count_that_loses_by_far_backs_off() -> None:
    g = ThreadGovernor(2)
    run(g, BUSY, 100)
    ran = run(g, BUSY, 4 * SLOWEST_EXPLORE)
    # Stalled steps (2.5x) are tried ever less often: about once in SLOWEST_EXPLORE at last.
    assert ran.count(2) <= 4 + 6
    assert g.chosen() == {0: 1}


def test_buckets_are_apart() -> None:
    g = ThreadGovernor(2)
    run(g, BUSY, 60, key=0)
    run(g, QUIET, 60, key=2)
    assert g.chosen() == {0: 1, 2: 2}


def test_running_on_restores_the_count() -> None:
    before = torch.get_num_threads()
    with running_on(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), running_on(1):
        raise RuntimeError("a step that fails")
    assert torch.get_num_threads() == before


@pytest.mark.skipif(native.library() is None, reason="no C compiler: no native decode path")
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_runner_free_decodes_on_either_count_agree(quantization: str) -> None:
    """A free decode step goes through the governor, and both counts give its row the same
    logits (each row is summed by one thread in one order whatever the count): the governor
    changes speed, never tokens."""
    from genserve.model.runner import LlamaRunner
    from tests.unit.test_hardware import fixed_policy, tiny_llama

    model = tiny_llama()
    policy = fixed_policy(model, torch.float32, quantization, "gemv")
    runner = LlamaRunner(model, 2, 64, batch_invariant=False, policy=policy)
    assert runner.native_stack is not None
    runner.native_decode = dict.fromkeys((0, 1, 2), runner._through_stack)
    free = SamplingParams(temperature=0.8)

    class Fixed:
        def __init__(self, n: int) -> None:
            self.n, self.seen = n, []

        def pick(self, key: int) -> int:
            return self.n

        def record(self, key: int, threads: int, seconds: float) -> None:
            self.seen.append((key, threads))

    out = {}
    with torch.inference_mode():
        runner.execute(StepInput((ChunkInput("a", 0, tuple(range(3, 20)), 0, True, free, 0),)))
        for n in (2, 1):  # the same position again: it rewrites the same cache row
            runner.threads = Fixed(n)
            out[n] = runner.execute(StepInput((ChunkInput("a", 0, (7,), 17, True, free, 1),)))
            assert runner.threads.seen == [(0, n)]
    assert torch.equal(out[1], out[2])


def test_a_switch_is_logged_once_a_minute_at_most(caplog: pytest.LogCaptureFixture) -> None:
    g = ThreadGovernor(2)
    with caplog.at_level("INFO", logger="genserve.model.threads"):
        for _ in range(3):  # load comes and goes: three switches each way
            run(g, QUIET, 2 * SLOWEST_EXPLORE)
            run(g, BUSY, 60)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "now on 1 threads" in lines[0], lines


def test_other_steps_leave_a_core_while_another_process_holds_one_unless_seeded() -> None:
    """Prompt chunks are not timed against each other (too few): they run on a core fewer
    while other processes hold a core, as a core taken stalls them alike; a seeded row's step
    keeps every core, its bits promised whatever the load."""
    from genserve.model.runner import LlamaRunner
    from tests.unit.test_hardware import tiny_llama

    if torch.get_num_threads() < 2:
        pytest.skip("one core: nothing to choose")
    runner = LlamaRunner(tiny_llama(), 2, 64, batch_invariant=False)
    runner.threads = ThreadGovernor(torch.get_num_threads(), Load(1.0))
    runner.threads.cores = torch.get_num_threads()
    seen: list[int] = []
    eager = runner._eager

    def watched(step: StepInput) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return eager(step)

    runner._eager = watched
    prompt = tuple(range(3, 20))
    free, seeded = SamplingParams(), SamplingParams(seed=3)
    with torch.inference_mode():
        runner.execute(StepInput((ChunkInput("a", 0, prompt, 0, True, free, 0),)))
        runner.execute(StepInput((ChunkInput("b", 1, prompt, 0, True, seeded, 0),)))
        runner.threads.load = Load(0.1)  # the other process has gone: every core again
        runner.execute(StepInput((ChunkInput("c", 0, prompt, 0, True, free, 0),)))
    every = torch.get_num_threads()
    assert seen == [every - 1, every, every]


def test_a_try_waking_a_sleeping_thread_is_not_held_against_it() -> None:
    """The first step on more threads pays for waking the one that slept (3x here): it is not
    counted, so an idle machine goes back to every core."""
    g = ThreadGovernor(2)
    run(g, BUSY, 100)
    assert g.chosen() == {0: 1}
    before = 1
    for _ in range(2 * SLOWEST_EXPLORE):
        n = g.pick(0)
        g.record(0, n, QUIET[n] / 1e3 * (3 if n > before else 1))
        before = n
    assert g.chosen() == {0: 2}


class Load:
    """Other processes' cores, as a test sets them."""

    def __init__(self, busy: float | None) -> None:
        self.busy = busy

    def others(self) -> float | None:
        return self.busy


def test_more_threads_are_not_tried_while_other_work_holds_the_cores() -> None:
    """A try on every core while another process spins took 1.2 s on the Zen 5 VM: it waits
    until the machine has the cores free, then goes back at once."""
    load = Load(1.0)
    g = ThreadGovernor(2, load)
    g.cores = 2
    run(g, BUSY, 100)
    assert g.chosen() == {0: 1}
    assert run(g, BUSY, 4 * SLOWEST_EXPLORE).count(2) == 0  # never tried meanwhile
    load.busy = 0.2  # the API process and its client: half a core is not a held core
    ran = run(g, QUIET, 3 * EXPLORE)
    assert g.chosen() == {0: 2} and ran[-EXPLORE:].count(2) >= EXPLORE - 2
    load.busy = None  # unknown (not Linux): tried as without a load reading
    assert ThreadGovernor(2, load).pick(0) == 2


def test_other_load_reads_the_machine_less_this_process(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    clock, own = [100.0], [5.0]

    def cpu(busy_ticks: int, idle_ticks: int) -> None:  # user, nice, system, idle, iowait...
        stat.write_text(f"cpu  {busy_ticks} 0 0 {idle_ticks} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    cpu(1000, 5000)
    load = OtherLoad(stat, clock=lambda: clock[0], own=lambda: own[0])
    tick = load.tick
    clock[0] += 2.0  # two seconds: this process used 1.5 s of CPU, the machine 3.5 s
    own[0] += 1.5
    cpu(1000 + int(3.5 * tick), 5000 + int(0.5 * tick))
    assert load.others() == pytest.approx(1.0)  # another process held one core
    clock[0] += 0.1  # within the window: the last figure
    assert load.others() == pytest.approx(1.0)
    assert OtherLoad(tmp_path / "nothing").others() is None  # no /proc/stat: unknown
