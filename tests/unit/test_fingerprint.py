"""Issue 20 item 2: system_fingerprint names the GPU (seeds reproduce per fingerprint)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from genserve.runtime.build import fingerprint


def test_the_fingerprint_names_the_gpu(monkeypatch, tmp_path) -> None:
    """Issue 20 item 2: seeds reproduce per system_fingerprint, and kernels differ per GPU."""

    def on(device: str, name: str = "") -> str:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
        loaded = SimpleNamespace(path=tmp_path, dtype=torch.bfloat16, name="m",
                                 device=torch.device(device))  # fmt: skip
        return fingerprint(loaded, "LlamaRunner", True)

    assert on("cuda", "NVIDIA H200") != on("cuda", "NVIDIA L4")
    assert on("cuda", "NVIDIA H200") == on("cuda", "NVIDIA H200")
    assert on("cpu", "NVIDIA H200") == on("cpu", "NVIDIA L4")  # no GPU: its name is not asked
