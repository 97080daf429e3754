"""Unloading a model frees its id at once and its budget once stopped (a lifecycle sweep:
a reload of the same id during the stop lost its budget entry, and 13 models were served
where 12 filled the budget)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from genserve.config import ServerConfig
from genserve.runtime.errors import InsufficientMemory
from genserve.runtime.registry import ModelRegistry
from genserve.runtime.runtime import Runtime


class SlowStop:
    """A served model whose stop waits until the test lets it end."""

    def __init__(self) -> None:
        self.stopping, self.release = threading.Event(), threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        assert self.release.wait(timeout=30)


def test_a_reload_during_the_stop_keeps_its_budget_and_the_old_counts_until_stopped() -> None:
    async def body() -> None:
        rt = Runtime(ServerConfig())
        registry = ModelRegistry(rt, ServerConfig(), None)
        registry.budget = 250
        old = SlowStop()
        rt.models["m"] = old  # type: ignore[assignment]
        registry.used["m"] = 100
        unloading = asyncio.create_task(registry.unload("m"))
        assert await asyncio.to_thread(old.stopping.wait, 30)
        assert "m" not in rt.models  # the id is free while it stops
        registry.check_budget("m", 100)  # a reload fits beside the old one (200 of 250)...
        registry.used["m"] = 100  # ...and registers, as register() does
        with pytest.raises(InsufficientMemory):  # the old one still counts: 300 > 250
            registry.check_budget("n", 100)
        old.release.set()
        await unloading
        assert registry.used == {"m": 100}  # the reload's entry, and only it

    asyncio.run(body())
