"""The app answers while the model loads: /health 503, generation 503 in OpenAI's shape."""

import threading

from fastapi.testclient import TestClient

from genserve.api.app import create_app
from genserve.config import ServerConfig
from tests.conformance import assert_valid


def test_health_is_503_while_loading_and_when_load_failed() -> None:
    release = threading.Event()

    def slow_failing_loader(_: ServerConfig):
        release.wait(timeout=30)
        raise RuntimeError("disk on fire")

    with TestClient(create_app(ServerConfig(), loader=slow_failing_loader)) as http:
        r = http.get("/health")
        assert (r.status_code, r.json()["status"]) == (503, "loading")
        r = http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert_valid(r.json(), "ErrorResponse")
        # The model's card too: a 503 the official client retries, not a 404 it does not.
        r = http.get("/v1/models/m")
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert_valid(r.json(), "ErrorResponse")
        release.set()
        for _ in range(100):
            r = http.get("/health")
            if r.json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert (r.status_code, r.json()["status"]) == (503, "failed")
        assert "disk on fire" in r.json()["error"]
