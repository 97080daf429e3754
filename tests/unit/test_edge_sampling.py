"""The edge builds the one sampling record once: bounds checked there, naming the field."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from genserve.api.app import create_app
from genserve.api.errors import APIError
from genserve.api.sampling import PER_ROUTE, SETTLED, SHARED, grammar_spec, sampling_params
from genserve.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    SamplingDefaults,
    SamplingFields,
)
from genserve.config import ModelConfig, ServerConfig, StorageConfig
from genserve.engine.types import GrammarSpec, SamplingParams


def never_loads(_: ServerConfig):  # noqa: ANN202
    raise RuntimeError("no model in this test")


@pytest.fixture
def http(tmp_path: Path):  # noqa: ANN201
    config = ServerConfig(
        model=ModelConfig(embedding_model=None), storage=StorageConfig(data_dir=str(tmp_path))
    )
    with TestClient(create_app(config, loader=never_loads)) as client:
        yield client


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"n": 99}, "n"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
    ],
)
def test_a_bad_sampling_value_is_refused_at_the_edge_naming_its_param(
    http: TestClient, extra: dict, param: str
) -> None:
    # The model never loaded: the answer comes from the edge's schema, before the runtime.
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_bad_serving_default_is_refused_naming_its_param(http: TestClient) -> None:
    r = http.put("/v1/models/m", json={"defaults": {"temperature": 9}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "defaults.temperature"


def test_each_sampling_field_is_declared_once_in_the_record_and_once_on_the_wire() -> None:
    record = {f.name for f in fields(SamplingParams)}
    assert record == set(SHARED) | set(PER_ROUTE) | set(SETTLED)
    # The serving defaults are the requests' own declarations, not a copy of them.
    for name in SamplingDefaults.model_fields:
        assert SamplingFields.model_fields[name] is not None
        assert name in SamplingDefaults.__annotations__
        assert name not in SamplingFields.__annotations__


def test_the_body_becomes_the_record_once() -> None:
    body = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stop="END",
        top_k=-1,
        logit_bias={"1": 1.0, "01": 2.0, "7": -1.0},
        seed=5,
        stop_token_ids=[3],
    )
    params = sampling_params(body, None)
    assert params == SamplingParams(
        top_k=0, stop=("END",), seed=5, stop_token_ids=(3,), logit_bias=((1, 3.0), (7, -1.0))
    )
    # What the body leaves out keeps the record's default.
    plain = sampling_params(CompletionRequest(model="m", prompt="x"), 16)
    assert plain == SamplingParams(max_tokens=16)


def test_response_format_becomes_a_grammar_at_the_edge() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    spec = grammar_spec(ResponseFormat.model_validate(rf))
    assert spec == GrammarSpec.json_schema(schema)
    assert spec.schema_json.index('"b"') < spec.schema_json.index('"a"')  # order kept
    assert grammar_spec(ResponseFormat(type="json_object")) == GrammarSpec.json_object()
    assert grammar_spec(ResponseFormat(type="text")) is None
    assert grammar_spec(None) is None
    with pytest.raises(APIError) as e:
        grammar_spec(ResponseFormat.model_validate({"type": "json_schema", "json_schema": {}}))
    assert e.value.status == 400 and e.value.param == "response_format"
    assert "schema" in e.value.message
    with pytest.raises(ValidationError):
        ResponseFormat.model_validate({"type": "grammar"})
