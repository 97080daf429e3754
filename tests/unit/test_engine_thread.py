"""The model never crosses threads: the engine thread builds the worker and steps it."""

import threading
from dataclasses import replace

import pytest

from genserve.config import EngineConfig, ModelConfig, ServerConfig
from genserve.engine.thread import EngineThread
from genserve.engine.types import Request, SamplingParams


def test_jobs_run_in_order_on_one_thread_that_is_not_the_caller() -> None:
    thread = EngineThread()
    try:
        idents = [thread.call(threading.get_ident) for _ in range(3)]
        assert len(set(idents)) == 1
        assert idents[0] != threading.get_ident()
        order: list[int] = []
        futures = [thread.submit(lambda k=k: order.append(k)) for k in range(5)]
        for f in futures:
            f.result(timeout=5)
        assert order == [0, 1, 2, 3, 4]
    finally:
        thread.close(timeout=5)


def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    thread = EngineThread()
    try:
        with pytest.raises(ZeroDivisionError):
            thread.call(lambda: 1 / 0)
        assert thread.call(lambda: 42) == 42
    finally:
        thread.close(timeout=5)


def test_close_ends_the_thread() -> None:
    thread = EngineThread(name="genserve-test-engine")
    thread.close(timeout=5)
    assert "genserve-test-engine" not in {t.name for t in threading.enumerate()}


def test_served_model_builds_its_worker_on_the_thread_that_steps_it(
    tiny_model_dir, monkeypatch
) -> None:
    """The wiring in build_served_model: a runner built on one thread and stepped on another
    ran 25% slower on CPU (see genserve.engine.thread)."""
    import genserve.runtime.build as server_mod
    from genserve.model.worker import ModelWorker

    seen: dict[str, int] = {}

    class RecordingWorker(ModelWorker):
        def __init__(self, *args, **kwargs) -> None:
            seen["built"] = threading.get_ident()
            super().__init__(*args, **kwargs)

        def execute(self, step):  # noqa: ANN001, ANN201
            seen["stepped"] = threading.get_ident()
            return super().execute(step)

    monkeypatch.setattr(server_mod, "ModelWorker", RecordingWorker)
    cfg = replace(
        ServerConfig(),
        model=replace(ModelConfig(), ref=str(tiny_model_dir), embedding_model=None),
        engine=EngineConfig(max_batch_size=2, max_model_len=64),
    )
    served = server_mod.build_served_model(cfg)
    core = served.engine.core
    done = threading.Event()
    core.publish = lambda deltas: done.set() if any(d.finished for d in deltas) else None
    core.start()
    try:
        core.submit(Request("r", [5, 6, 7], SamplingParams(max_tokens=2)))
        assert done.wait(timeout=30)
    finally:
        core.stop()
    assert seen["built"] == seen["stepped"] != threading.get_ident()
