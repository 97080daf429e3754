"""The Ray edge without a cluster: HTTP over a (fake) handle, routing, errors, per-role configs."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from genserve.config import ServerConfig, StorageConfig
from genserve.ray.bridge import HTTPRequest, ResponseStart, call_app
from genserve.ray.deploy import (
    CONTROL_PREFIXES,
    EdgeApp,
    EdgeLimits,
    RayOptions,
    absolute_paths,
    control_config,
    engine_config,
    unsupported_on_ray,
)

ray_exceptions = pytest.importorskip("ray.exceptions")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use


def request(path: str = "/x", body: dict | None = None, method: str = "POST") -> HTTPRequest:
    raw = json.dumps(body).encode() if body is not None else b""
    headers = ((b"content-type", b"application/json"),) if body is not None else ()
    return HTTPRequest(method, path, b"", headers, raw)


def small_app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"got": await request.json()}

    @app.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def chunks():  # noqa: ANN202
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    return app


async def collect(gen, limit: int | None = None) -> list:  # noqa: ANN001
    items = []
    async for item in gen:
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    await gen.aclose()
    return items


async def test_call_app_relays_status_headers_and_body() -> None:
    app = small_app([])
    extra = ((b"x-genserve-replica", b"engine#a"),)
    items = await collect(call_app(app, request("/echo", {"model": "m"}), extra))
    start, *body = items
    assert isinstance(start, ResponseStart) and start.status == 200
    assert (b"x-genserve-replica", b"engine#a") in start.headers
    assert json.loads(b"".join(body)) == {"got": {"model": "m"}}


async def test_a_reader_that_stops_early_disconnects_the_stream() -> None:
    events: list[str] = []
    items = await collect(call_app(small_app(events), request("/stream", method="GET")), 4)
    assert isinstance(items[0], ResponseStart) and len(items) == 4
    assert events == ["stream closed"]  # the route saw the disconnect and finished


async def test_an_app_that_crashes_gives_500() -> None:
    items = await collect(call_app(small_app([]), request("/boom", method="GET")))
    assert items[0].status == 500


def test_json_model_is_read_only_from_json_posts() -> None:
    assert request("/v1/completions", {"model": "ft:a:b:c"}).json_model() == "ft:a:b:c"
    assert request("/v1/completions", {"model": 3}).json_model() is None
    assert HTTPRequest("POST", "/", b"", (), b"{bad").json_model() is None


def test_runtime_model_registration_is_refused_but_ft_deletion_is_not() -> None:
    assert unsupported_on_ray(request("/v1/models", {"id": "x", "model": "y"})).status == 400
    assert unsupported_on_ray(request("/v1/models/tiny", method="DELETE")) is not None
    assert unsupported_on_ray(request("/v1/models/ft:tiny:x:ftjob-1", method="DELETE")) is None
    assert unsupported_on_ray(request("/v1/models", method="GET")) is None
    assert unsupported_on_ray(request("/v1/chat/completions", {"model": "x"})) is None


def test_the_batch_api_goes_to_the_control_replica_under_ray() -> None:
    """Batches are kept where their input files are (the control replica's store), and their
    lines run on the engine replicas (deploy.EngineBatches)."""
    served = [
        request("/v1/batches", {"input_file_id": "file-1"}),
        request("/v1/batches/batch_1", method="GET"),
        request("/v1/batches/batch_1/cancel", {}),
    ]
    for req in served:
        assert unsupported_on_ray(req) is None, req
        assert req.path.startswith(CONTROL_PREFIXES), req
    # every engine replica sends its counts to the control replica, which answers the report
    assert unsupported_on_ray(request("/v1/organization/usage/completions", method="GET")) is None


def test_conversations_are_served_under_ray() -> None:
    """Kept in the control replica's store (genserve/ray/records.py): a response in one sees
    its items whichever engine replica runs it."""
    served = [
        request("/v1/conversations", {"items": []}),
        request("/v1/conversations/conv_1", method="GET"),
        request("/v1/conversations/conv_1", method="DELETE"),
        request("/v1/conversations/conv_1/items", {"items": []}),
        request("/v1/conversations/conv_1/items/msg_1", method="GET"),
        request("/v1/responses", {"model": "x", "input": "hi", "conversation": "conv_1"}),
        request("/v1/responses", {"model": "x", "input": "hi", "conversation": {"id": "c"}}),
        request("/v1/responses/input_tokens", {"model": "x", "conversation": "conv_1"}),
    ]
    for req in served:
        assert unsupported_on_ray(req) is None, req


def test_stored_and_background_responses_are_served_under_ray() -> None:
    """Stored responses live in the control replica's store (genserve/ray/records.py); a
    background one runs on the replica that started it and writes its state there, where the
    others read it and ask for its cancel."""
    served = [
        request("/v1/responses", {"model": "x", "input": "hi", "store": True}),
        request("/v1/responses", {"model": "x", "input": "hi", "background": False}),
        request("/v1/responses", {"model": "x", "input": "hi", "background": True}),
        request("/v1/responses", {"model": "x", "previous_response_id": "resp_1"}),
        request("/v1/responses/resp_1", method="GET"),
        request("/v1/responses/resp_1", method="DELETE"),
        request("/v1/responses/resp_1/input_items", method="GET"),
        request("/v1/responses/resp_1/cancel", {}),
    ]
    for req in served:
        assert unsupported_on_ray(req) is None, req


def test_stored_chat_completions_are_served_under_ray() -> None:
    """Kept in the control replica's store (genserve/ray/records.py): listed, read, labelled
    and deleted the same from every engine replica."""
    served = [
        request("/v1/chat/completions", {"model": "x"}),
        request("/v1/chat/completions", {"model": "x", "store": False}),
        request("/v1/chat/completions", {"model": "x", "store": True}),
        request("/v1/chat/completions", method="GET"),
        request("/v1/chat/completions/chatcmpl-1", method="GET"),
        request("/v1/chat/completions/chatcmpl-1", {"metadata": {}}),
        request("/v1/chat/completions/chatcmpl-1", method="DELETE"),
        request("/v1/chat/completions/chatcmpl-1/messages", method="GET"),
    ]
    for req in served:
        assert unsupported_on_ray(req) is None, req


class FakeStream:
    def __init__(self, items: list, error: Exception | None) -> None:
        self.items = items
        self.error = error
        self.cancelled = False

    def __aiter__(self):  # noqa: ANN204
        return self._run()

    async def _run(self):  # noqa: ANN202
        for item in self.items:
            yield item
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """Records .options(...) and answers handle_http.remote(req) with a FakeStream."""

    def __init__(self, items: list | None = None, error: Exception | None = None) -> None:
        self.items = [ResponseStart(200, ()), b"ok"] if items is None else items
        self.error = error
        self.options_seen: list[dict] = []
        self.streams: list[FakeStream] = []
        self.handle_http = self

    def options(self, **kwargs) -> FakeHandle:  # noqa: ANN003
        self.options_seen.append(kwargs)
        return self

    def remote(self, req: HTTPRequest) -> FakeStream:
        self.streams.append(FakeStream(self.items, self.error))
        return self.streams[-1]


async def drive(edge: EdgeApp, path: str, body: dict | None = None, method: str = "POST"):  # noqa: ANN201
    raw = json.dumps(body).encode() if body is not None else b""
    scope = {
        "type": "http", "method": method, "path": path, "query_string": b"",
        "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
    }  # fmt: skip
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await edge(scope, receive, send)
    return sent


def edge_with(engine: FakeHandle, control: FakeHandle | None = None) -> EdgeApp:
    return EdgeApp(engine, control or FakeHandle(), EdgeLimits(4096, 8192))


async def test_edge_routes_fine_tuned_models_by_multiplexed_id() -> None:
    engine, control = FakeHandle(), FakeHandle()
    edge = edge_with(engine, control)
    await drive(edge, "/v1/chat/completions", {"model": "ft:tiny:x:ftjob-1"})
    await drive(edge, "/v1/completions", {"model": "tiny"})
    await drive(edge, "/v1/fine_tuning/jobs", {"model": "tiny"})
    await drive(edge, "/v1/models", method="GET")
    await drive(edge, "/v1/organization/usage/embeddings", method="GET")
    ids = [o["multiplexed_model_id"] for o in engine.options_seen]
    assert ids == ["ft:tiny:x:ftjob-1", ""]
    # jobs, the model list and the usage report go to the control replica
    assert len(control.options_seen) == 3


async def test_edge_streams_the_reply_and_drops_the_replicas_request_id() -> None:
    start = ResponseStart(200, ((b"x-request-id", b"r1"), (b"content-type", b"text/plain")))
    sent = await drive(edge_with(FakeHandle([start, b"a", b"b"])), "/v1/completions", {})
    assert sent[0]["status"] == 200 and (b"x-request-id", b"r1") not in sent[0]["headers"]
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"ab"
    assert sent[-1]["more_body"] is False


async def test_a_dead_replica_gives_503_with_retry_after() -> None:
    engine = FakeHandle(items=[], error=ray_exceptions.ActorDiedError())
    sent = await drive(edge_with(engine), "/v1/completions", {"model": "tiny"})
    assert sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"]
    assert engine.streams[0].cancelled


async def test_a_replica_bug_gives_500_and_a_cut_stream_raises() -> None:
    bug = ray_exceptions.RayTaskError("handle_http", "tb", ValueError("x"))
    sent = await drive(edge_with(FakeHandle(items=[], error=bug)), "/v1/completions", {})
    assert sent[0]["status"] == 500
    died = FakeHandle(items=[ResponseStart(200, ()), b"a"], error=ray_exceptions.ActorDiedError())
    with pytest.raises(ray_exceptions.ActorDiedError):
        await drive(edge_with(died), "/v1/completions", {})


async def test_edge_refuses_a_body_over_the_limit() -> None:
    sent = await drive(edge_with(FakeHandle()), "/v1/completions", {"prompt": "x" * 5000})
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


def test_role_configs() -> None:
    config = ServerConfig(storage=StorageConfig("/shared/genserve"))
    engine = engine_config(config, "/tmp/scratch")
    assert engine.storage.data_dir == "/tmp/scratch" and not engine.training.enabled
    control = control_config(config)
    assert control.storage.data_dir == "/shared/genserve" and control.engine.max_batch_size == 1
    relative = absolute_paths(ServerConfig(storage=StorageConfig("var/x")))
    assert relative.storage.data_dir == os.path.abspath("var/x")  # replicas run elsewhere
    assert RayOptions(replicas=4, local_cpus=2).cpus_per_replica() == 0.5
    assert RayOptions(replicas=4, address="auto").cpus_per_replica() == 1.0
    with pytest.raises(ValueError):
        RayOptions(replicas=0)
