"""Issue 20, item 3: a fine-tuning job trains where the server would serve (a GPU when one is
there, bf16 autocast where it has bf16), and says so in its events."""

from __future__ import annotations

import pytest
import torch

from genserve.model.loading import ModelLoadError
from genserve.training.manager import _started_text
from genserve.training.messages import Started, WorkerSpec
from genserve.training.trainer import Placement, placement


def test_on_a_cpu_machine_a_job_trains_on_the_cpu_in_fp32(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("auto", "cpu"):
        place = placement(device)
        assert place.device.type == "cpu" and place.precision == "float32"
    with pytest.raises(ModelLoadError):
        placement("cuda")  # asked for, absent: the job fails saying so


@pytest.mark.parametrize(("bf16", "precision"), [(True, "bfloat16 autocast"), (False, "float32")])
def test_with_a_gpu_auto_trains_on_it(monkeypatch, bf16: bool, precision: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    place = placement("auto")
    assert place.device.type == "cuda" and place.precision == precision
    assert placement("cpu").device.type == "cpu"  # --device cpu keeps training there too


def test_the_started_event_names_device_and_precision() -> None:
    text = _started_text(Started(10, 30, 0, 0, 0, 0, "cuda:0", "bfloat16 autocast"))
    assert "on cuda:0 (bfloat16 autocast)" in text
    assert "on cpu (float32)" in _started_text(Started(10, 30, 0, 0, 0))


def test_the_spec_carries_the_servers_device_choice() -> None:
    fields = dict(job_id="j", base_path="/m", chat_template="", train_file="/t", n_epochs=1,
                  batch_size=1, learning_rate=1e-3, seed=0, max_len=8, out_dir="/o")  # fmt: skip
    assert WorkerSpec(**fields).device == "auto"
    assert WorkerSpec(**fields, device="cpu").device == "cpu"


def test_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights() -> None:
    """The autocast path itself, on the CPU (which has bf16 autocast too)."""
    layer = torch.nn.Linear(8, 8)
    with Placement(torch.device("cpu"), torch.bfloat16).compute():
        y = layer(torch.randn(2, 8))
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
