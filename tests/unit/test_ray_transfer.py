"""Issue 20, item 5, without a cluster: what crosses nodes by Ray instead of a shared disk.
Folders packed and unpacked whole, a training run's inputs rewritten for the task's scratch
dir and its results back under the control's job folder, one rate-limit window for every
replica, and the replicas' metrics merged into one exposition."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from genserve.api.auth import KeyRecord, KeyStore
from genserve.ray.shared import admit_here, merge_metrics
from genserve.ray.training import TrainingInputs, incoming, materialize, outgoing, read_inputs
from genserve.ray.transfer import Folder, pack, unpack
from genserve.training.messages import Checkpointed, Finished, WorkerSpec, dump, load


def test_a_folder_arrives_whole_and_replaces_what_was_there(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0\1")
    root = tmp_path / "root"
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "stale").write_text("old")
    unpack(pack(src, "adapter"), root)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "adapter/a.json", "adapter/sub/w.bin",
    ]  # fmt: skip
    assert (root / "adapter" / "sub" / "w.bin").read_bytes() == b"\0\1"


@pytest.mark.parametrize("bad", [("../x", "f"), ("/abs", "f"), ("ok", "../../f")])
def test_a_folder_cannot_name_a_path_outside_the_receivers_root(tmp_path, bad) -> None:  # noqa: ANN001
    path, name = bad
    with pytest.raises(ValueError):
        unpack(Folder(path, {name: b"x"}), tmp_path / "root")
    assert not (tmp_path / "x").exists() and not (tmp_path / "f").exists()


def spec_in(job_dir: Path, **changes: object) -> WorkerSpec:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir.parent / "train.jsonl").write_text('{"messages": []}\n')
    fields = dict(
        job_id="ftjob-1", base_path="/models/base", chat_template="", n_epochs=1, batch_size=1,
        learning_rate=1e-4, seed=0, max_len=64, train_file=str(job_dir.parent / "train.jsonl"),
        out_dir=str(job_dir),
    )  # fmt: skip
    return WorkerSpec(**{**fields, **changes})


def test_a_run_reads_only_its_scratch_dir_and_its_results_come_back(tmp_path: Path) -> None:
    control = tmp_path / "control" / "jobs" / "ftjob-1"
    ckpt = control / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 2}')
    spec = spec_in(control, resume_dir=str(ckpt))
    (control / "spec.json").write_text(spec.model_dump_json())
    inputs = read_inputs(control / "spec.json")
    assert isinstance(inputs, TrainingInputs) and inputs.train == b'{"messages": []}\n'

    spec_path, job_dir = materialize(inputs, tmp_path / "node")
    there = WorkerSpec.model_validate_json(spec_path.read_text())
    for path in (there.train_file, there.out_dir, there.resume_dir):
        assert Path(path).is_relative_to(tmp_path / "node"), path
    assert (Path(there.resume_dir) / "state.json").read_text() == '{"step": 2}'

    adapter = job_dir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    line = (dump(Finished(12, str(adapter))) + "\n").encode()
    folder, relative = outgoing(line, job_dir)
    assert load(relative) == Finished(12, "adapter")
    unpack(folder, control)
    assert load(incoming(relative, control)) == Finished(12, str(control / "adapter"))
    assert (control / "adapter" / "adapter_config.json").read_text() == "{}"
    step = (dump(Checkpointed(3, 1, str(job_dir / "checkpoints" / "step-3"))) + "\n").encode()
    (job_dir / "checkpoints" / "step-3").mkdir(parents=True)
    assert load(outgoing(step, job_dir)[1]).path == "checkpoints/step-3"
    assert outgoing(b"a stray line\n", job_dir) == [b"a stray line\n"]


def test_every_replica_counts_against_one_window_on_control(tmp_path: Path) -> None:
    keys = KeyStore((), None)
    record = KeyRecord("k1", "limited", "0" * 64, 0, rpm=2)
    answers = [admit_here(keys, record) for _ in range(3)]
    assert [a.refused is None for a in answers] == [True, True, False]
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
    assert "Retry-After" in answers[2].headers and "2 requests" in answers[2].refused


def exposition(prompt_tokens: int) -> str:
    registry = CollectorRegistry()
    counter = Counter("genserve:prompt_tokens", "Prompt tokens", ["model_name"], registry=registry)
    counter.labels("m").inc(prompt_tokens)
    return generate_latest(registry).decode()


def test_metrics_of_replicas_merge_into_one_exposition_labelled_by_replica() -> None:
    merged = merge_metrics({"engine#a": exposition(3), "engine#b": exposition(4)}).decode()
    assert merged.count("# TYPE genserve:prompt_tokens_total ") == 1  # one family, both replicas
    (family,) = [f for f in text_string_to_metric_families(merged) if f.type == "counter"]
    values = {s.labels["replica"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert values == {"engine#a": 3.0, "engine#b": 4.0}
