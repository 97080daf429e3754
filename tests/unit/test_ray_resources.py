"""Issue 20, item 4: on CUDA, engine replicas and training tasks ask Ray for GPUs (Ray hides
the GPUs an actor did not ask for, so without them every replica failed to load); on a CPU
they ask for none. Checked on the deployments and task options genserve builds, no cluster."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from genserve.config import ServerConfig
from genserve.ray import training
from genserve.ray.deploy import RayOptions, build_app, control_config, layout
from genserve.training.messages import WorkerSpec

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic use


def on(device: str) -> ServerConfig:
    base = ServerConfig()
    return dataclasses.replace(base, model=dataclasses.replace(base.model, device=device))


def actor_options(app) -> dict[str, dict]:  # noqa: ANN001 - a Serve Application
    """Each deployment's ray_actor_options, by name (Serve keeps the bound graph on the app)."""
    found: dict[str, dict] = {}

    def visit(node) -> None:  # noqa: ANN001
        bound = getattr(node, "_bound_deployment", None)
        if bound is None:
            return
        found[bound.name] = bound.ray_actor_options
        for arg in bound.init_args:
            visit(arg)

    visit(app)
    return found


@pytest.mark.parametrize(("device", "cluster_gpus"), [("cpu", 4.0), ("auto", 0.0)])
def test_on_cpus_nothing_asks_for_a_gpu(device: str, cluster_gpus: float) -> None:
    opts = actor_options(build_app(on(device), RayOptions(replicas=2), cluster_gpus))
    assert {name: o.get("num_gpus", 0) for name, o in opts.items()} == {
        "edge": 0,
        "engine": 0,
        "control": 0,
    }
    assert layout(on(device), RayOptions(), cluster_gpus).training.num_gpus == 0


@pytest.mark.parametrize(("device", "cluster_gpus"), [("cuda", 0.0), ("auto", 2.0)])
def test_on_cuda_engine_replicas_and_training_ask_for_gpus(device, cluster_gpus) -> None:
    opts = actor_options(build_app(on(device), RayOptions(replicas=2), cluster_gpus))
    assert opts["engine"]["num_gpus"] == 1.0
    # The control replica's model backs the model list only: on the CPU, no GPU taken from
    # serving (a single-GPU machine could not place it beside a whole-GPU replica otherwise).
    assert opts["control"]["num_gpus"] == 0.0
    assert control_config(on(device)).model.device == "cpu"
    assert control_config(on(device)).training.device == device  # training keeps the choice
    assert layout(on(device), RayOptions(), cluster_gpus).training.num_gpus == 1.0


def test_replicas_can_share_a_gpu() -> None:
    opts = actor_options(build_app(on("cuda"), RayOptions(replicas=2, replica_gpus=0.5), 1.0))
    assert opts["engine"] == {"num_cpus": RayOptions(replicas=2).cpus_per_replica(),
                              "num_gpus": 0.5}  # fmt: skip
    with pytest.raises(ValueError):
        RayOptions(replica_gpus=1.5)  # Ray takes fractions below 1, whole numbers above


def test_a_training_task_asks_for_its_gpu_share(monkeypatch, tmp_path: Path) -> None:
    asked: dict = {}

    class Gen:
        def completed(self):  # noqa: ANN202
            return SimpleNamespace(task_id=lambda: SimpleNamespace(hex=lambda: "t1"))

        def __aiter__(self):  # noqa: ANN204
            return self

        async def __anext__(self):  # noqa: ANN204
            raise StopAsyncIteration

    def options(**kw):  # noqa: ANN202
        asked.update(kw)
        return SimpleNamespace(remote=lambda *a: Gen())

    monkeypatch.setattr(training, "_remote_train_job", lambda: SimpleNamespace(options=options))

    spec = worker_spec(tmp_path)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())

    async def launch() -> None:
        proc = await training.launch_ray_task(tmp_path / "spec.json", 2, gpus=0.5)
        await proc.wait()

    asyncio.run(launch())
    assert asked["num_cpus"] == 2 and asked["num_gpus"] == 0.5


def worker_spec(job_dir: Path) -> WorkerSpec:
    (job_dir / "train.jsonl").write_text("{}\n")
    return WorkerSpec(
        job_id="ftjob-1", base_path="/models/base", chat_template="", n_epochs=1, batch_size=1,
        learning_rate=1e-4, seed=0, max_len=64, train_file=str(job_dir / "train.jsonl"),
        out_dir=str(job_dir),
    )  # fmt: skip


def test_placement_resources_pin_control_and_training() -> None:
    options = RayOptions(
        replicas=2, control_resource="genserve_control", training_resource="trainers",
        replicas_per_node=1,
    )  # fmt: skip
    opts = actor_options(build_app(on("cpu"), options))
    assert set(opts["control"]["resources"]) == {"genserve_control"}
    assert "resources" not in opts["engine"] and "resources" not in opts["edge"]
    assert set(layout(on("cpu"), options, 0.0).training.custom) == {"trainers"}
