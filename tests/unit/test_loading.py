import time
from pathlib import Path

import pytest
import torch

from genserve.model.hardware import detect
from genserve.model.loading import (
    FALLBACK_CHAT_TEMPLATE,
    ModelLoadError,
    check_weights,
    load_model,
    resolve_model_ref,
)
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "plain", chat_template=None)


def test_local_folder_loads_with_fallback_template(no_template_model: Path) -> None:
    loaded = load_model(str(no_template_model), dtype="auto", device="cpu")
    assert loaded.name == "plain"
    assert loaded.chat_template == FALLBACK_CHAT_TEMPLATE
    # auto on a CPU: fp32, or bf16 only where the CPU has bf16 units (and measured faster)
    bf16_units = detect(torch.device("cpu")).bf16
    assert loaded.dtype == torch.float32 or (bf16_units and loaded.dtype == torch.bfloat16)
    assert loaded.eos_token_ids == (loaded.tokenizer.eos_token_id,)
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        chat_template=loaded.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_dtype_is_honoured(no_template_model: Path) -> None:
    loaded = load_model(str(no_template_model), dtype="bfloat16", device="cpu")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_offline_hub_id_fails_at_once_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(ModelLoadError, match="pass the local folder"):
        resolve_model_ref("someorg/some-model-that-is-not-cached")
    assert time.monotonic() - t < 10


def test_unknown_ref_is_explained() -> None:
    with pytest.raises(ModelLoadError, match="not a bundled model"):
        resolve_model_ref("not a model")


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_ref(str(tmp_path))


def test_pickle_only_checkpoint_is_refused_unless_opted_in(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        check_weights(tmp_path, allow_pickle=False)
    assert check_weights(tmp_path, allow_pickle=True) is False


def test_cuda_without_gpu_is_a_clear_error(no_template_model: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model(str(no_template_model), device="cuda")
