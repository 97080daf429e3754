"""Usage under Ray without a cluster (genserve/ray/shared.py): an engine replica's ledger sends
its counts to the control replica's, which writes them to the shared store; a failed send keeps
them for the next one; the replica's scratch store gets none."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from genserve.ray.shared import ForwardedLedger, record_usage_here, send_usage_forever
from genserve.storage.db import Database
from genserve.storage.usage import UsageLedger, UsageRow, Used

T = 1_800_000_000  # a minute's start


class FakeControl:
    """The control replica's handle: record_usage.remote(rows) into its own ledger."""

    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger
        self.record_usage = self
        self.fail = False
        self.calls = 0

    async def remote(self, rows: list[UsageRow]) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError("control replica restarting")
        record_usage_here(self.ledger, rows)


def ledgers(tmp_path: Path) -> tuple[ForwardedLedger, ForwardedLedger, FakeControl]:
    control = FakeControl(UsageLedger(Database(tmp_path / "control.db")))
    a = ForwardedLedger(Database(tmp_path / "a.db"))
    b = ForwardedLedger(Database(tmp_path / "b.db"))
    return a, b, control


def totals(ledger: UsageLedger) -> dict[str | None, tuple[int, int, int]]:
    rows = ledger.rows("completions", T, T + 60)
    return {
        r.key.key_id: (r.counts.input_tokens, r.counts.output_tokens, r.counts.requests)
        for r in rows
    }


async def test_two_replicas_counts_end_up_in_one_report(tmp_path: Path) -> None:
    a, b, control = ledgers(tmp_path)
    a.add(Used("completions", "m", 10, 2), "p", "k1", at=T)
    b.add(Used("completions", "m", 5, 1), "p", "k1", at=T + 5)
    b.add(Used("completions", "m", 1, 1), "p", "k2", at=T + 6)
    assert await a.send(control) == 1 and await b.send(control) == 2
    assert await a.send(control) == 0 and control.calls == 2  # nothing new: nothing sent
    assert totals(control.ledger) == {"k1": (15, 3, 2), "k2": (1, 1, 1)}


async def test_an_engine_replica_writes_nothing_to_its_scratch_store(tmp_path: Path) -> None:
    a, _, control = ledgers(tmp_path)
    a.add(Used("completions", "m", 10, 2), "p", "k1", at=T)
    assert a.flush() == 0  # lifecycle's flushes leave the counts for the send
    assert a.db.query("SELECT * FROM usage") == []
    await a.send(control)
    assert totals(control.ledger) == {"k1": (10, 2, 1)}


async def test_a_failed_send_keeps_its_counts_for_the_next(tmp_path: Path) -> None:
    a, _, control = ledgers(tmp_path)
    a.add(Used("completions", "m", 10, 2), "p", "k1", at=T)
    control.fail = True
    with pytest.raises(ConnectionError):
        await a.send(control)
    a.add(Used("completions", "m", 1, 1), "p", "k1", at=T + 1)  # came meanwhile
    control.fail = False
    assert await a.send(control) == 1
    assert totals(control.ledger) == {"k1": (11, 3, 2)}


async def test_a_cancelled_send_keeps_its_counts(tmp_path: Path) -> None:
    a, _, control = ledgers(tmp_path)
    a.add(Used("completions", "m", 4, 4), "p", "k1", at=T)
    sending = asyncio.create_task(a.send(control))
    await asyncio.sleep(0)  # inside the remote call
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await a.send(control)  # the replica's last send at shutdown
    assert totals(control.ledger) == {"k1": (4, 4, 1)}


async def test_the_periodic_sender_survives_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("genserve.ray.shared.USAGE_SEND_S", 0.01)
    a, _, control = ledgers(tmp_path)
    control.fail = True
    a.add(Used("completions", "m", 3, 3), "p", "k1", at=T)
    sender = asyncio.create_task(send_usage_forever(control, a))
    try:
        for _ in range(200):  # bounded: a few sends fail first
            if control.calls >= 2:
                break
            await asyncio.sleep(0.01)
        control.fail = False
        for _ in range(200):
            if totals(control.ledger):
                break
            await asyncio.sleep(0.01)
    finally:
        sender.cancel()
    assert totals(control.ledger) == {"k1": (3, 3, 1)}


def test_a_control_replica_without_storage_refuses_so_the_sender_keeps_them() -> None:
    with pytest.raises(RuntimeError):
        record_usage_here(None, [])
