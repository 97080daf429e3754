"""genserve on Ray Serve: a local Ray (3 CPUs, small object store) started here, 2 engine
replicas behind the edge. Requests spread over both (the x-genserve-replica header), the
official client works unchanged, the usage API reports both replicas' requests in one report,
stored responses, stored chat completions and conversations are found by every replica, a
batch runs its lines on the engine replicas, a fine-tuned model trained through the API (as a
Ray task) is served by the engine replicas through Serve's multiplexing, and a replica killed
under load is replaced while the client's retries succeed."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import pytest

from genserve.ray.deploy import SCRATCH_PREFIX, _abandoned
from tests import ray_cli
from tests.ray_cli import start_ray_cli
from tests.server import LiveServer, free_port, wait_until

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

MODEL = "tiny-llama"
T = TypeVar("T")
REPLICA = "x-genserve-replica"
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray's own pydantic use
]


@pytest.fixture(scope="module")
def ray_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray started here; `genserve serve --ray` joins it as a separate driver."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=3,  # one CPU per engine replica, one for the training task
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        namespace="genserve-tests",
        log_to_driver=False,
    )
    server = None
    try:
        server = start_cli(tiny_model_dir, tmp_path_factory.mktemp("ray"))
        yield server.url
    finally:
        if server is not None:
            assert server.stop() == 0, server.log()[-3000:]  # SIGTERM: the app is deleted
        serve.shutdown()
        ray.shutdown()


def start_cli(model: Path, tmp: Path) -> LiveServer:
    """`genserve serve --ray --replicas 2 --ray-address <this Ray>`, as an operator runs it."""
    args = [
        "--model", str(model), "--replicas", "2", "--deterministic",
        "--ray-address", ray.get_runtime_context().gcs_address,
        "--max-batch-size", "8", "--embedding-model", "none", "--data-dir", str(tmp / "data"),
    ]  # fmt: skip
    return start_ray_cli(free_port(), args, tmp, timeout=180, every=0.25)


def client_for(url: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=retries)


def replica_of(api: openai.OpenAI, model: str = MODEL, prompt: str = "def f(x):") -> str:
    raw = api.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=8)
    raw.parse()
    return raw.headers[REPLICA]


def concurrently(fn: Callable[[int], str], count: int, threads: int = 8) -> list[str]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, range(count)))


def engine_states() -> dict:
    app = serve.status().applications["genserve"]
    return app.deployments["engine"].replica_states


def test_health_through_the_proxy_and_requests_spread(ray_url: str) -> None:
    health = httpx.get(ray_url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers[REPLICA].startswith("engine#")
    api = client_for(ray_url)
    seen = concurrently(lambda i: replica_of(api, prompt=f"item {i}:"), 24)
    assert len(set(seen)) == 2, seen  # both engine replicas answered
    assert all(s.startswith("engine#") for s in seen)


def test_official_client_unchanged(ray_url: str) -> None:
    api = client_for(ray_url)
    assert MODEL in [m.id for m in api.models.list()]
    stream = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert usage is not None and ends in (["length"], ["stop"]), (ends, usage)
    # Unseeded at temperature 1, a random model may sample EOS before max_tokens: exactly
    # max_tokens (and some text) is owed only when the length ended it.
    if ends == ["length"]:
        assert usage.completion_tokens == 12
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        assert usage.completion_tokens <= 12

    # Same seed, same text, whichever replica sampled it: the replicas are interchangeable.
    def seeded(i: int) -> tuple[str, str]:
        raw = api.completions.with_raw_response.create(
            model=MODEL, prompt="import os\n", max_tokens=16, temperature=1.0, seed=7
        )
        return raw.parse().choices[0].text, raw.headers[REPLICA]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(seeded, range(16)))
    assert len({text for text, _ in results}) == 1
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="no-such-model", prompt="x", max_tokens=1)


def usage_totals(url: str) -> tuple[int, int, int]:
    """(requests, input tokens, output tokens) of the last hour's completions, as the usage API
    reports them (no keys here: the local caller is the admin)."""
    params = {"start_time": int(time.time()) - 3600, "bucket_width": "1d"}
    got = httpx.get(url + "/v1/organization/usage/completions", params=params, timeout=30)
    assert got.status_code == 200, got.text
    assert got.headers[REPLICA].startswith("control#")  # the one store that has them all
    rows = [r for b in got.json()["data"] for r in b["results"]]
    return tuple(sum(r[k] for r in rows) for k in ("num_model_requests", "input_tokens",
                                                    "output_tokens"))  # fmt: skip


def test_usage_of_both_replicas_in_one_report(ray_url: str) -> None:
    api = client_for(ray_url)
    last: list[tuple] = []

    def settled() -> tuple | None:  # what earlier tests counted has all been sent
        last.append(usage_totals(ray_url))
        return last[-1] if len(last) > 1 and last[-1] == last[-2] else None

    before = wait_until(settled, timeout=30, every=1.5)  # 1.5 s > USAGE_SEND_S

    def one(i: int) -> tuple[str, int, int]:
        raw = api.completions.with_raw_response.create(
            model=MODEL, prompt=f"usage {i}:", max_tokens=4
        )
        usage = raw.parse().usage
        return raw.headers[REPLICA], usage.prompt_tokens, usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    assert len({r for r, _, _ in answers}) == 2, answers  # both replicas counted some
    want = (
        before[0] + len(answers),
        before[1] + sum(i for _, i, _ in answers),
        before[2] + sum(o for _, _, o in answers),
    )
    # Each engine replica sends its counts every USAGE_SEND_S: the report has them soon.
    wait_until(lambda: usage_totals(ray_url) == want, timeout=30, every=0.25)


def test_stored_responses_are_found_by_every_replica(ray_url: str) -> None:
    """Each replica's own store is scratch: stored responses live in the control replica's,
    so whichever replica answers a GET, a chain or a DELETE finds them."""
    api = client_for(ray_url)

    def create(i: int) -> tuple[str, str]:
        raw = api.responses.with_raw_response.create(
            model=MODEL, input=f"note {i}", max_output_tokens=4, temperature=0
        )
        return raw.parse().id, raw.headers[REPLICA]

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(create, range(12)))
    assert len({r for _, r in created}) == 2, created  # both replicas stored some

    def read(i: int) -> tuple[str, str]:
        response_id = created[i % len(created)][0]
        raw = api.responses.with_raw_response.retrieve(response_id)
        assert raw.parse().id == response_id
        return response_id, raw.headers[REPLICA]

    with ThreadPoolExecutor(8) as pool:
        reads = list(pool.map(read, range(24)))
    stored_by = dict(created)
    assert any(stored_by[i] != r for i, r in reads), (
        reads
    )  # found by a replica that did not store it
    items = api.responses.input_items.list(created[0][0])
    assert [i.type for i in items.data] == ["message"]

    # A chain whose links land on either replica: each continues from the one before.
    first = api.responses.create(model=MODEL, input="a", max_output_tokens=4)

    def link(n: int, previous: str):  # noqa: ANN202 - the raw response
        return api.responses.with_raw_response.create(
            model=MODEL, input=f"and {n}", previous_response_id=previous, max_output_tokens=4
        )

    previous, hops = first.id, []
    while len(set(hops)) < 2 and len(hops) < 8:  # until both replicas took a link
        raw = elsewhere(ray_url, hops, partial(link, len(hops), previous))
        previous = raw.parse().id
        hops.append(raw.headers[REPLICA])
    assert len(set(hops)) == 2, hops
    tokens = api.responses.input_tokens.count(model=MODEL, input="x", previous_response_id=previous)
    alone = api.responses.input_tokens.count(model=MODEL, input="x")
    assert tokens.input_tokens > alone.input_tokens  # the whole chain comes before it

    for response_id, _ in created:
        assert api.responses.delete(response_id) is None
    with ThreadPoolExecutor(8) as pool:  # gone for every replica
        missing = list(pool.map(lambda i: gone(api, created[i % len(created)][0]), range(12)))
    assert all(missing)


def test_background_responses_are_followed_and_cancelled_through_every_replica(
    ray_url: str,
) -> None:
    """A background response runs on the replica that started it and writes its state and
    events to the control replica's store: the other replica streams them to the end, reads
    its result, and cancels or deletes one that runs (its runner sees the cancel)."""
    api = client_for(ray_url)

    def create(i: int) -> tuple[str, str]:
        raw = api.responses.with_raw_response.create(
            model=MODEL, input=f"bg {i}", background=True, max_output_tokens=48, temperature=0
        )
        made = raw.parse()
        assert made.status in ("queued", "in_progress")
        return made.id, raw.headers[REPLICA]

    with ThreadPoolExecutor(6) as pool:
        created = list(pool.map(create, range(6)))
    assert len({r for _, r in created}) == 2, created  # both replicas run some
    runner = dict(created)

    def streamed(i: int) -> tuple[str, str, list[dict]]:
        response_id = created[i % len(created)][0]
        raw = api.responses.with_raw_response.retrieve(response_id, stream=True)
        return response_id, raw.headers[REPLICA], [e.model_dump() for e in raw.parse()]

    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(streamed, range(12)))
    assert any(runner[i] != r for i, r, _ in streams), streams  # followed from the other one
    for response_id, _, events in streams:
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "response.created"
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
        final = api.responses.retrieve(response_id)  # from either replica: its stored end
        assert final.status == events[-1]["response"]["status"]
        assert final.output_text == "".join(
            e["delta"] for e in events if e["type"] == "response.output_text.delta"
        )

    crossed = []
    for attempt in range(10):  # until a cancel lands on the replica that does not run it
        raw = api.responses.with_raw_response.create(
            model=MODEL, input=f"long {attempt}", background=True, max_output_tokens=200,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        made, ran_on = raw.parse(), raw.headers[REPLICA]
        cancel = api.responses.with_raw_response.cancel(made.id)
        assert cancel.parse().status == "cancelled"
        if cancel.headers[REPLICA] != ran_on:
            crossed.append(made.id)
            break
    assert crossed, "every cancel landed on the replica that ran its response"
    for _ in range(4):  # cancelled for every replica; its stream has no completion
        assert api.responses.retrieve(crossed[0]).status == "cancelled"
        events = [e.type for e in api.responses.retrieve(crossed[0], stream=True)]
        assert "response.completed" not in events and "response.incomplete" not in events

    doomed = api.responses.create(
        model=MODEL, input="doomed", background=True, max_output_tokens=200,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert api.responses.delete(doomed.id) is None  # a running one: cancelled, then deleted
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda _: gone(api, doomed.id), range(4)))


def test_stored_chat_completions_are_found_by_every_replica(ray_url: str) -> None:
    """Stored chat completions live in the control replica's store: stored through either
    replica, each lists, reads, relabels and deletes them all."""
    api = client_for(ray_url)
    tag = f"t{time.monotonic_ns()}"  # this test's completions only, whatever else is stored

    def create(i: int) -> tuple[str, str]:
        raw = api.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"note {i}"}], max_tokens=4,
            store=True, metadata={"run": tag, "half": str(i % 2)},
        )  # fmt: skip
        return raw.parse().id, raw.headers[REPLICA]

    with ThreadPoolExecutor(8) as pool:
        created = dict(pool.map(create, range(12)))
    assert len(set(created.values())) == 2, created  # both replicas stored some

    def listed(i: int) -> tuple[set[str], str]:
        raw = api.chat.completions.with_raw_response.list(metadata={"run": tag}, limit=100)
        return {c.id for c in raw.parse().data}, raw.headers[REPLICA]

    lists = concurrently(listed, 12)
    assert {r for _, r in lists} == set(created.values())  # listed from either replica
    assert all(ids == set(created) for ids, _ in lists), lists
    halves = api.chat.completions.list(metadata={"run": tag, "half": "0"}, limit=100)
    assert len(halves.data) == 6

    def relabel(i: int) -> str:
        completion_id = list(created)[i]
        raw = api.chat.completions.with_raw_response.update(
            completion_id, metadata={"run": tag, "done": "yes"}
        )
        assert raw.parse().metadata == {"run": tag, "done": "yes"}
        got = api.chat.completions.retrieve(completion_id)
        assert got.metadata == {"run": tag, "done": "yes"} and got.id == completion_id
        messages = api.chat.completions.messages.list(completion_id)
        assert [m.content for m in messages.data] == [f"note {i}"]
        return raw.headers[REPLICA]

    assert len(set(concurrently(relabel, 12))) == 2  # relabelled through both replicas
    done = api.chat.completions.list(metadata={"done": "yes", "run": tag}, limit=100)
    assert {c.id for c in done.data} == set(created)

    for completion_id in created:
        assert api.chat.completions.delete(completion_id).deleted
    with ThreadPoolExecutor(8) as pool:  # gone for every replica
        missing = list(pool.map(lambda c: completion_gone(api, c), list(created) * 2))
    assert all(missing)
    assert api.chat.completions.list(metadata={"run": tag}).data == []


def test_a_conversation_is_shared_by_every_replica(ray_url: str) -> None:
    """A conversation's items live in the control replica's store: responses run in it on
    either replica each see the turns before them, and either replica lists them in order."""
    api = client_for(ray_url)
    ada = {"type": "message", "role": "user", "content": "My name is Ada."}
    conv = api.conversations.create(items=[ada], metadata={"topic": "names"})
    turns: list[list[str]] = []  # each response's output item ids

    def turn(n: int):  # noqa: ANN202 - the raw response
        return api.responses.with_raw_response.create(
            model=MODEL, input=f"turn {n}", conversation=conv.id, max_output_tokens=4
        )

    hops: list[str] = []
    while len(set(hops)) < 2 and len(hops) < 8:  # until both replicas ran a turn
        before = api.responses.input_tokens.count(model=MODEL, input="x", conversation=conv.id)
        raw = elsewhere(ray_url, hops, partial(turn, len(hops)))
        turns.append([item.id for item in raw.parse().output])
        hops.append(raw.headers[REPLICA])
        after = api.responses.input_tokens.count(model=MODEL, input="x", conversation=conv.id)
        assert after.input_tokens > before.input_tokens  # the turn joined it, for every replica
    assert len(set(hops)) == 2, hops

    def listed(_: int) -> tuple[list[str], list[str], str]:
        raw = api.conversations.items.with_raw_response.list(conv.id, order="asc", limit=100)
        items = raw.parse().data
        said = [i.content[0].text for i in items if i.type == "message" and i.role == "user"]
        return [i.id for i in items], said, raw.headers[REPLICA]

    lists = concurrently(listed, 12)
    assert {r for _, _, r in lists} == set(hops)  # listed from either replica
    ids, said, _ = lists[0]
    assert all(got[:2] == (ids, said) for got in lists), lists
    assert said == ["My name is Ada.", *(f"turn {i}" for i in range(len(turns)))]
    at = 1  # after Ada's item: each turn's input, then its output
    for output in turns:
        assert ids[at + 1 : at + 1 + len(output)] == output, (ids, turns)
        at += 1 + len(output)
    assert at == len(ids)
    assert api.conversations.retrieve(conv.id).metadata == {"topic": "names"}
    assert api.conversations.delete(conv.id).deleted
    for _ in range(4):  # gone for every replica
        with pytest.raises(openai.NotFoundError):
            api.conversations.items.list(conv.id)
        with pytest.raises(openai.NotFoundError):
            api.responses.create(model=MODEL, input="x", conversation=conv.id)


def elsewhere(url: str, hops: list[str], call: Callable[[], T]) -> T:
    """call(), sent where none of `hops` went while they all went to one replica: streams held
    open there until it has more of them than the other, so that Serve, which sends a request
    to the less busy of two replicas, sends this one to the other. Idle replicas may tie the
    same way every time, and alternating one filler was not enough (16 links on one replica)."""
    if len(set(hops)) != 1:
        return call()
    body = {"model": MODEL, "prompt": "filler", "max_tokens": 200, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with contextlib.ExitStack() as held, httpx.Client(base_url=url, timeout=60) as http:
        there = 0
        for _ in range(6):
            r = held.enter_context(http.stream("POST", "/v1/completions", json=body))
            there += 1 if r.headers[REPLICA] == hops[0] else -1
            if there > 0:
                break
        return call()


def completion_gone(api: openai.OpenAI, completion_id: str) -> bool:
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.retrieve(completion_id)
    return True


def gone(api: openai.OpenAI, response_id: str) -> bool:
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(response_id)
    return True


def fine_tune(api: openai.OpenAI) -> tuple[str, str]:
    return ray_cli.fine_tune(api, MODEL, "ray", 24, {"n_epochs": 1}, timeout=120, every=0.25)


def test_a_batch_runs_on_the_engine_replicas_from_the_control_replicas_store(
    ray_url: str,
) -> None:
    """The input file and the batch are the control replica's; each line runs on an engine
    replica (EngineBatches) and answers what the same request answers online."""
    import json

    api = client_for(ray_url)
    bodies = [
        {"model": MODEL, "prompt": f"batch line {i}:", "max_tokens": 4, "temperature": 0}
        for i in range(8)
    ]
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = api.files.create(file=("batch.jsonl", data), purpose="batch")
    batch = api.batches.create(
        input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = wait_until(
        lambda: (b := api.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
        timeout=120,
        every=0.5,
    )
    assert done.status == "completed", done
    assert done.request_counts.completed == 8 and done.request_counts.failed == 0
    out = [json.loads(x) for x in api.files.content(done.output_file_id).text.splitlines()]
    by_id = {o["custom_id"]: o["response"] for o in out}
    assert sorted(by_id) == sorted(line["custom_id"] for line in lines)
    for i, body in enumerate(bodies):
        answer = by_id[f"req-{i}"]
        assert answer["status_code"] == 200, answer
        online = api.completions.create(**body)  # --deterministic: greedy, the same text
        assert answer["body"]["choices"][0]["text"] == online.choices[0].text


def test_fine_tuned_model_served_by_engine_replicas_through_multiplexing(ray_url: str) -> None:
    api = client_for(ray_url)
    ft, job_id = fine_tune(api)  # trained as a Ray task, written to the shared data dir
    events = [e.message for e in api.fine_tuning.jobs.list_events(job_id, limit=100)]
    ran = [m for m in events if m.startswith("Training as Ray task ")]
    assert len(ran) == 1, events  # the control replica launched no local worker
    assert ft in [m.id for m in api.models.list()]
    holder = replica_of(api, model=ft)  # an engine replica loads the adapter on demand
    assert holder.startswith("engine#")
    time.sleep(1.5)  # the replica reports the adapters it holds; the router learns it
    assert {replica_of(api, model=ft, prompt=f"{i} +") for i in range(6)} == {holder}
    assert len(set(concurrently(lambda i: replica_of(api, prompt=f"b{i}"), 16))) == 2
    assert api.models.delete(ft).deleted

    def refused() -> bool:  # engine replicas re-check a held adapter every 5 s
        try:
            api.completions.create(model=ft, prompt="x", max_tokens=1)
        except openai.NotFoundError:
            return True
        return False

    wait_until(refused, timeout=60, every=0.5)


def test_replica_killed_under_load_is_replaced_and_retries_succeed(ray_url: str) -> None:
    statuses: list[tuple[int, str | None]] = []

    def record(response: httpx.Response) -> None:
        statuses.append((response.status_code, response.headers.get("retry-after")))

    http = httpx.Client(event_hooks={"response": [record]}, timeout=60)
    api = openai.OpenAI(base_url=ray_url + "/v1", api_key="unused", max_retries=8, http_client=http)
    victim = replica_of(api)
    actor = ray.get_actor(f"SERVE_REPLICA::genserve#{victim}", namespace="serve")

    def one(i: int) -> str:
        return replica_of(api, prompt=f"load {i}:")

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        wait(futures[:6])  # the burst is under way
        ray.kill(actor, no_restart=False)
        served = [f.result() for f in futures]  # raises if any request failed for good
    assert len(served) == 48
    # What the client saw on the way: answers, or 503s with Retry-After that it retried.
    assert {s for s, _ in statuses} <= {200, 503}, statuses
    assert all(after == "1" for s, after in statuses if s == 503)
    wait_until(lambda: engine_states() == {"RUNNING": 2}, timeout=120, every=0.25)

    def two_live_replicas() -> bool:
        seen = set(concurrently(lambda i: replica_of(api, prompt=f"after {i}:"), 8))
        return len(seen - {victim}) == 2

    wait_until(two_live_replicas, timeout=60, every=0.25)
    # The replacement removed what the killed replica could not: its scratch dir (its data dir
    # and fetched adapters), which a killed replica left in the node's TMPDIR.
    dirs = list(Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"))
    locked = [d for d in dirs if (d / ".lock").exists() and not _abandoned(d / ".lock")]
    assert len(locked) == 2, dirs  # the two live replicas'
    assert not [d for d in dirs if _abandoned(d / ".lock")], dirs
