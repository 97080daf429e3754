from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.server import LiveServer, start_server
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--max-batch-size", "8")
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def model_id() -> str:
    return "tiny-llama"
