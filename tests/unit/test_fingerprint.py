"""Issue 20 item 2: system_fingerprint names the GPU (seeds reproduce per fingerprint)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from genserve.runtime.build import attention_choices, fingerprint


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


def test_the_fingerprint_names_the_attention_kernels_a_runner_measured(tmp_path) -> None:
    """The prompt attention kernel is measured at each start (SDPA, amx.c's or dp.c's),
    and a prompt row's bits differ between them: another choice, another fingerprint. The
    decode lanes' kernel serves free rows only and is not named."""
    loaded = SimpleNamespace(path=tmp_path, dtype=torch.bfloat16, name="m",
                             device=torch.device("cpu"))  # fmt: skip

    def runner(prompt: str) -> SimpleNamespace:
        return SimpleNamespace(attention="sdpa", prompt_attention=prompt, lane_attention="native")

    dp, sdpa = attention_choices(runner("dp")), attention_choices(runner("sdpa"))
    assert dp == ("attention-sdpa", "prompt_attention-dp")
    assert fingerprint(loaded, "LlamaRunner", False, None, dp) != fingerprint(
        loaded, "LlamaRunner", False, None, sdpa
    )
    assert attention_choices(SimpleNamespace()) == ()  # runners without these choices
