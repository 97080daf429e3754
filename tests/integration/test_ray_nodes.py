"""Issue 20: genserve on a two-node Ray cluster that shares no filesystem between its nodes.

Both nodes run on this machine (ray.cluster_utils.Cluster), but each has its own scratch dir
(TMPDIR) and its own custom resource: `genserve_control` on the head, where the control
replica (SQLite and the files, under --data-dir) is pinned, and `genserve_training` on the
second node, where fine-tuning tasks go. One engine replica runs on each node. Every Python
process of the second node records the paths it touches under the control's data dir
(ray_audit/sitecustomize.py), and there must be none: the training files, checkpoints and the
adapter all travel through Ray's object store. Through `genserve serve --ray`, as an operator
runs it:
- a fine-tuning job runs as a task on the second node, and its adapter is served by the
  engine replicas of both nodes, each from a copy in its own node's scratch dir;
- a key limited to N requests a minute gets N in total across the replicas, then 429;
- /metrics counts the requests each replica served.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from genserve.api.auth import KeyFile
from tests import ray_cli
from tests.ray_cli import start_ray_cli
from tests.server import LiveServer, free_port, wait_until

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
cluster_utils = pytest.importorskip("ray.cluster_utils")

MODEL = "tiny-llama"
REPLICA = "x-genserve-replica"
RPM = 4  # the limited key's requests per minute
AUDIT = Path(__file__).parent / "ray_audit"
MB = 2**20
pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray's own pydantic use
]


@dataclass(frozen=True)
class Deployment:
    url: str
    data: Path  # the control replica's --data-dir, on the head node
    head_scratch: Path  # TMPDIR of each node's Ray processes
    node_scratch: Path
    audit: Path  # what the second node's processes touched under the watched folders
    key: str  # unlimited
    limited_key: str  # RPM requests a minute
    served: Counter = field(default_factory=Counter)  # completions answered, per replica


def node_env(scratch: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"TMPDIR": str(scratch), **(extra or {})}


def start_cluster(dirs: dict[str, Path]) -> object:
    """Two nodes: the head (1 CPU: an engine replica; genserve_control) and a second node
    (2 CPUs: an engine replica and the training task; genserve_training), each with its own
    TMPDIR. The second node's processes load ray_audit/sitecustomize.py."""
    watch = os.pathsep.join(str(dirs[k]) + os.sep for k in ("data", "node_scratch"))
    audited = {
        "PYTHONPATH": os.pathsep.join([str(AUDIT), os.environ.get("PYTHONPATH", "")]),
        "GENSERVE_AUDIT_DIR": str(dirs["audit"]),
        "GENSERVE_AUDIT_WATCH": watch,
    }
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1, "resources": {"genserve_control": 1}, "object_store_memory": 100 * MB,
            "include_dashboard": False, "env_vars": node_env(dirs["head_scratch"]),
        },
    )  # fmt: skip
    cluster.add_node(
        num_cpus=2, resources={"genserve_training": 1}, object_store_memory=100 * MB,
        env_vars=node_env(dirs["node_scratch"], audited),
    )  # fmt: skip
    return cluster


def start_cli(model: Path, tmp: Path, data: Path, keys: Path, address: str) -> LiveServer:
    port = free_port()
    # Both nodes are on this machine: one HTTP proxy (the head's) binds the port. The driver's
    # serve.start then finds Serve running and keeps these options.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    args = [
        "--model", str(model), "--replicas", "2", "--ray-address", address,
        "--replicas-per-node", "1",
        "--ray-control-resource", "genserve_control",
        "--ray-training-resource", "genserve_training",
        "--max-batch-size", "2", "--max-waiting", "1", "--embedding-model", "none",
        "--data-dir", str(data), "--api-key-file", str(keys),
    ]  # fmt: skip
    return start_ray_cli(port, args, tmp, timeout=240, every=0.5)


@pytest.fixture(scope="module", name="d")
def deployment(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    tmp = tmp_path_factory.mktemp("raynodes").resolve()
    dirs = {k: tmp / k for k in ("data", "head_scratch", "node_scratch", "audit")}
    for d in dirs.values():
        d.mkdir()
    keys = tmp / "keys.json"  # the operator's key file, outside the data dir
    key, _ = KeyFile(keys).create("unlimited", None, None)
    limited, _ = KeyFile(keys).create("limited", RPM, None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = start_cluster(dirs)
    server = None
    try:
        ray.init(address=cluster.address, namespace="genserve-tests", log_to_driver=False)
        server = start_cli(tiny_model_dir, tmp, dirs["data"], keys, cluster.address)
        yield Deployment(
            server.url, dirs["data"], dirs["head_scratch"], dirs["node_scratch"], dirs["audit"],
            key, limited,
        )  # fmt: skip
    finally:
        if server is not None:
            assert server.stop() == 0, server.log()[-3000:]
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def client(d: Deployment, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key=key, max_retries=0)


def fine_tune(api: openai.OpenAI) -> tuple[str, str]:
    hyper = {"n_epochs": 1, "batch_size": 2}
    return ray_cli.fine_tune(api, MODEL, "nodes", 4, hyper, timeout=180, every=0.5)


def complete(d: Deployment, api: openai.OpenAI, model: str, prompt: str) -> str:
    raw = api.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=24)
    raw.parse()
    d.served[raw.headers[REPLICA]] += 1
    return raw.headers[REPLICA]


def touched(d: Deployment) -> list[tuple[str, str]]:
    """(event, path) of everything the second node's processes touched under the watch."""
    lines = [ln for f in d.audit.glob("*.log") for ln in f.read_text().splitlines()]
    return [tuple(ln.split("\t", 1)) for ln in lines]  # type: ignore[misc]


def test_fine_tune_on_the_other_node_served_by_both_with_no_shared_disk(d: Deployment) -> None:
    api = client(d, d.key)
    # One engine replica per node, each in its own node's scratch dir.
    assert len(list(d.head_scratch.glob("genserve-replica-*"))) == 1
    assert len(list(d.node_scratch.glob("genserve-replica-*"))) == 1

    ft, job_id = fine_tune(api)
    events = [e.message for e in api.fine_tuning.jobs.list_events(job_id, limit=100)]
    assert any(m.startswith("Training as Ray task ") for m in events), events
    # The run read its training file from the second node's scratch dir, and the adapter it
    # wrote came back to the control replica's job folder.
    paths = [path for _, path in touched(d)]
    assert any("/genserve-train-" in p and p.endswith("train.jsonl") for p in paths), paths
    assert (d.data / "jobs" / job_id / "adapter" / "adapter_config.json").is_file()
    assert any((d.data / "jobs" / job_id / "checkpoints").iterdir())

    # Concurrent requests overflow the replica that holds the adapter (2 running, 1 waiting):
    # the other one then fetches it too.
    def burst() -> set[str]:
        with ThreadPoolExecutor(8) as pool:
            return set(pool.map(lambda i: complete(d, api, ft, f"{i} + {i}?"), range(8)))

    served_by: set[str] = set()
    wait_until(lambda: len(served_by.__ior__(burst())) == 2, timeout=120, every=0.1)
    under_data = [(e, p) for e, p in touched(d) if p.startswith(str(d.data) + os.sep)]
    assert under_data == [], under_data  # nothing on the second node read the control's disk
    for scratch in (d.head_scratch, d.node_scratch):  # each replica reads its own copy
        copies = list(scratch.glob("genserve-replica-*/adapters/*/adapter_config.json"))
        assert len(copies) == 1, (scratch, copies)


def test_rate_limit_counts_once_across_replicas(d: Deployment) -> None:
    api = client(d, d.limited_key)
    statuses: list[tuple[int, str, str | None]] = []

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"count {i}", "max_tokens": 2}
        headers = {"authorization": f"Bearer {d.limited_key}"}
        r = httpx.post(d.url + "/v1/completions", json=body, headers=headers, timeout=60)
        statuses.append((r.status_code, r.headers[REPLICA], r.headers.get("retry-after")))
        if r.status_code == 200:
            d.served[r.headers[REPLICA]] += 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(3 * RPM)))
    codes = sorted(s for s, _, _ in statuses)
    assert codes == [200] * RPM + [429] * (2 * RPM), statuses
    assert len({replica for _, replica, _ in statuses}) == 2, statuses  # both replicas asked
    assert all(after for s, _, after in statuses if s == 429)
    with pytest.raises(openai.RateLimitError):
        api.completions.create(model=MODEL, prompt="one more", max_tokens=2)


def served_counts(url: str) -> dict[str, float]:
    """Requests finished per engine replica, from the deployment's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "genserve:e2e_request_latency_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_count") and s.labels["replica"].startswith("engine#"):
                replica = s.labels["replica"]
                counts[replica] = counts.get(replica, 0.0) + s.value
    return counts


def test_metrics_count_requests_served_by_both_replicas(d: Deployment) -> None:
    api = client(d, d.key)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: complete(d, api, MODEL, f"m{i}"), range(12)))
    assert len(d.served) == 2, d.served
    # Every completion of this module, by the replica that answered it. Each replica reports
    # its metrics to the control replica every second: wait for the last report.
    expected = {replica: float(n) for replica, n in d.served.items()}
    seen: list[dict[str, float]] = []
    try:
        wait_until(lambda: seen.append(served_counts(d.url)) or seen[-1] == expected, 30, 0.5)
    except AssertionError:
        raise AssertionError(f"/metrics counts {seen[-1]}, the clients saw {expected}") from None
