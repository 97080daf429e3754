"""The usage ledger (storage/usage.py): requests add up per minute, project, key, model and
batch; a flush that fails keeps its counts for the next one, added to what came meanwhile;
reads flush first and filter."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.storage.db import Database
from genserve.storage.usage import UsageLedger, Used

T = 1_800_000_000  # a minute's start


def ledger(tmp_path: Path) -> UsageLedger:
    return UsageLedger(Database(tmp_path / "u.db"))


def test_requests_add_up_per_minute_and_key(tmp_path: Path) -> None:
    u = ledger(tmp_path)
    u.add(Used("completions", "m", 10, 5, 4), "p", "k1", at=T + 1)
    u.add(Used("completions", "m", 20, 1), "p", "k1", at=T + 59)
    u.add(Used("completions", "m", 7, 7), "p", "k1", at=T + 60)  # the next minute
    u.add(Used("completions", "m", 3, 3), "p", "k2", at=T + 2)
    u.add(Used("completions", "m", 1, 1), "p", None, batch=True, at=T + 3)
    u.add(Used("embeddings", "e", 9), "p", "k1", at=T + 4)
    rows = u.rows("completions", T, T + 120)
    got = {
        (r.key.minute, r.key.key_id, r.key.batch): (
            r.counts.input_tokens, r.counts.output_tokens, r.counts.cached_tokens,
            r.counts.requests,
        )
        for r in rows
    }  # fmt: skip
    assert got == {
        (T, "k1", False): (30, 6, 4, 2),
        (T + 60, "k1", False): (7, 7, 0, 1),
        (T, "k2", False): (3, 3, 0, 1),
        (T, None, True): (1, 1, 0, 1),
    }
    assert [r.counts.input_tokens for r in u.rows("embeddings", T, T + 120)] == [9]
    assert len(u.rows("completions", T, T + 120, key_ids=["k2"])) == 1
    assert len(u.rows("completions", T, T + 120, batch=True)) == 1
    assert u.rows("completions", T, T + 120, models=["other"]) == []
    assert len(u.rows("completions", T + 60, T + 120)) == 1


def test_a_failed_flush_keeps_its_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    u = ledger(tmp_path)
    u.add(Used("completions", "m", 10, 1), "p", "k", at=T)
    real = u.db.transaction

    def broken():  # noqa: ANN202
        raise OSError("disk full")

    monkeypatch.setattr(u.db, "transaction", broken)
    with pytest.raises(OSError):
        u.flush()
    u.add(Used("completions", "m", 5, 2), "p", "k", at=T)  # while the disk was full
    monkeypatch.setattr(u.db, "transaction", real)
    assert u.flush() == 1
    (row,) = u.rows("completions", T, T + 60)
    assert (row.counts.input_tokens, row.counts.output_tokens, row.counts.requests) == (15, 3, 2)
    u.add(Used("completions", "m", 1, 1), "p", "k", at=T)  # a later flush adds to the row
    (row,) = u.rows("completions", T, T + 60)
    assert row.counts.requests == 3
