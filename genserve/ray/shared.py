"""What the replicas of a Ray deployment share through the control replica, since each runs its
own copy of the app: one rate-limit window per key, the metrics of every replica, and the
token usage the usage API reports.

- Rate limits: an engine replica verifies the key itself, then asks the control replica (one
  replica, pinned) to count the request in the key's window (`ControlLimits.admit`), so a key
  gets its limit across the deployment, not once per replica. Keys without limits never ask.
- Metrics: each replica reports its Prometheus text to the control replica every
  METRICS_REPORT_S; the edge answers /metrics with all of them merged, each sample labelled
  with its replica. A replica gone quiet for METRICS_STALE_S is dropped from the merge.
- Usage: an engine replica counts its requests' tokens in memory as one node does
  (`ForwardedLedger`), and every USAGE_SEND_S sends the counts to the control replica, whose
  ledger writes them to the shared store; the usage API is answered there. A failed send keeps
  its counts for the next one, as a failed flush does.

No Ray import here: the control replica's handle is passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from genserve.api.auth import Caller, KeyRecord, KeyStore, Principal
from genserve.api.errors import APIError
from genserve.storage.usage import UsageLedger, UsageRow, as_rows

log = logging.getLogger(__name__)

METRICS_REPORT_S = 1.0  # how stale the edge's /metrics may be
METRICS_STALE_S = 30.0  # a replica not heard from for this long is gone
USAGE_SEND_S = 1.0  # how far the usage API may lag an engine replica's requests
REPLICA_LABEL = "replica"


# --- rate limits -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """The control replica's answer: the rate-limit headers, and why it refused, if it did."""

    headers: dict[str, str]
    refused: str | None = None  # the 429's message; its Retry-After is in headers


def admit_here(keys: KeyStore, record: KeyRecord) -> Admission:
    """On the control replica: count one request in the key's window."""
    caller = Caller(Principal(record.id, record.project, record.role), record)
    try:
        return Admission(keys.admit(caller))
    except APIError as e:
        return Admission(dict(e.headers), e.message)


def spend_here(keys: KeyStore, record: KeyRecord, tokens: int) -> None:
    caller = Caller(Principal(record.id, record.project, record.role), record)
    keys.spend(caller, tokens)


class ControlLimits:
    """An engine replica's genserve.api.middleware.SharedLimits: the windows live on control."""

    def __init__(self, control: Any) -> None:  # noqa: ANN401 - a Serve deployment handle
        self.control = control
        self._spent: set[asyncio.Future] = set()

    async def admit(self, caller: Caller) -> dict[str, str]:
        record = caller.record
        if record is None or (record.rpm is None and record.tpm is None):
            return {}
        answer: Admission = await self.control.admit.remote(record)
        if answer.refused is not None:
            raise APIError(429, answer.refused, code="rate_limit_exceeded", headers=answer.headers)
        return answer.headers

    def spend(self, caller: Caller, tokens: int) -> None:
        record = caller.record
        if record is None or record.tpm is None:
            return
        # Not awaited: the reply is on its way already. Kept until done so it is not dropped.
        sent = asyncio.ensure_future(self._spend(record, tokens))
        self._spent.add(sent)
        sent.add_done_callback(self._spent.discard)

    async def _spend(self, record: KeyRecord, tokens: int) -> None:
        try:
            await self.control.spend.remote(record, tokens)
        except Exception:  # noqa: BLE001 - a lost count must not fail a finished request
            log.warning("could not count %d tokens for key %s", tokens, record.id)


# --- metrics ---------------------------------------------------------------------------------


class MetricsBoard:
    """On the control replica: the latest Prometheus text of each replica."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self._texts[replica] = (time.monotonic(), text)

    def texts(self) -> dict[str, str]:
        now = time.monotonic()
        gone = [r for r, (at, _) in self._texts.items() if now - at > METRICS_STALE_S]
        for replica in gone:
            del self._texts[replica]
        return {r: text for r, (_, text) in self._texts.items()}


async def report_metrics_forever(control: Any, replica: str, render: Any) -> None:  # noqa: ANN401
    """An engine replica's background task: its metrics to the control replica, periodically."""
    while True:
        with contextlib.suppress(Exception):  # control restarting: the next report catches up
            await control.report_metrics.remote(replica, render().decode())
        await asyncio.sleep(METRICS_REPORT_S)


class _Families:
    """A prometheus_client collector over already-built metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_metrics(texts: dict[str, str]) -> bytes:
    """One exposition from several replicas': each sample gains a `replica` label, samples of
    the same family are listed under one HELP/TYPE (Prometheus' rule)."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples += [
                s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples
            ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


# --- usage -----------------------------------------------------------------------------------


class ForwardedLedger(UsageLedger):
    """An engine replica's usage ledger: requests add to it as on one node; its counts go to
    the control replica (`send`), never to the replica's scratch store."""

    def flush(self) -> int:
        """Nothing to write here: the periodic flush and the one at shutdown leave the counts
        in memory for `send` (the replica's own store is scratch, read by no usage report)."""
        return 0

    async def send(self, control: Any) -> int:  # noqa: ANN401 - a Serve deployment handle
        """Hand the counts gathered since the last send to the control replica; how many rows.
        A send that fails (or is cancelled) keeps them for the next one."""
        rows = as_rows(self.take())
        if not rows:
            return 0
        try:
            await control.record_usage.remote(rows)
        except BaseException:
            self.merge(rows)
            raise
        return len(rows)


def record_usage_here(ledger: UsageLedger | None, rows: list[UsageRow]) -> None:
    """On the control replica: an engine replica's counts join this ledger's, written at its
    next flush (every FLUSH_S, and before any usage report is read)."""
    if ledger is None:  # the sender keeps its counts and tries again
        raise RuntimeError("the control replica has no usage store (its storage failed)")
    ledger.merge(rows)


async def send_usage_forever(control: Any, ledger: ForwardedLedger) -> None:  # noqa: ANN401
    """An engine replica's background task: its usage to the control replica, periodically."""
    while True:
        await asyncio.sleep(USAGE_SEND_S)
        try:
            await ledger.send(control)
        except Exception as e:  # noqa: BLE001 - control restarting: kept for the next send
            log.warning("could not send token usage to the control replica: %s", e)
