"""Every boolean of a request body is strict: OpenAI answers 400 for "true", "yes" or 1, where
pydantic's lax mode took them (`stream: "yes"` streamed). Query parameters are not bodies:
they still parse "true" from a URL."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic.types import Strict

import genserve.api
from genserve.api.errors import APIError, install, validation_error
from genserve.api.responses import named_as_text_format
from genserve.api.schemas import ChatCompletionRequest, CompletionRequest
from genserve.api.structured import RESPONSE_FORMAT


def request_models() -> list[type[BaseModel]]:
    """The pydantic models declared under genserve/api (the wire's request bodies)."""
    found = {}
    for info in pkgutil.iter_modules(genserve.api.__path__):
        module = importlib.import_module(f"genserve.api.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseModel) and obj.__module__ == module.__name__:
                found[obj.__qualname__ + obj.__module__] = obj
    return list(found.values())


def lax_bools(annotation: object, metadata: list) -> bool:
    """Whether a bool in this annotation is taken laxly (no Strict marker beside it)."""
    if annotation is bool:
        return not any(isinstance(m, Strict) and m.strict for m in metadata)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return lax_bools(args[0], list(args[1:]))
    return any(lax_bools(a, []) for a in args)


def lax_fields(model: type[BaseModel]) -> list[str]:
    fields: dict[str, FieldInfo] = model.model_fields
    return [n for n, f in fields.items() if lax_bools(f.annotation, list(f.metadata))]


def test_no_request_model_takes_a_boolean_laxly() -> None:
    models = request_models()
    assert len(models) > 20  # the walk found the wire's models
    lax = {m.__name__: lax_fields(m) for m in models if lax_fields(m)}
    assert lax == {}


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "1"])
def test_a_string_or_a_number_for_stream_names_the_field(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], stream=value)
    err = validation_error(
        [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    )  # the route's loc
    assert (err.status, err.param) == (400, "stream")


def test_real_booleans_still_parse() -> None:
    body = CompletionRequest(model="m", prompt="x", echo=True, stream=False, ignore_eos=None)
    assert (body.echo, body.stream, body.ignore_eos) == (True, False, None)


def test_a_query_boolean_still_parses_from_a_url() -> None:
    """A list endpoint's flag comes from a URL, where "true" is the only spelling there is."""
    app = FastAPI()
    install(app)

    @app.get("/flag")
    def flag(stream: bool = Query(False)) -> dict:  # noqa: FBT001 - as the routes declare it
        return {"stream": stream}

    client = TestClient(app)
    assert client.get("/flag?stream=true").json() == {"stream": True}


@pytest.mark.parametrize(
    ("message", "param", "named", "text"),
    [
        ("response_format.json_schema.schema is required", RESPONSE_FORMAT,
         "text.format.schema", "text.format.schema is required"),
        ("response_format cannot be combined with `tools`", RESPONSE_FORMAT, "text.format",
         "text.format cannot be combined with `tools`"),
        ("`guided_regex` cannot be combined with `response_format`", "guided_regex",
         "guided_regex", "`guided_regex` cannot be combined with `text.format`"),
    ],
)  # fmt: skip
def test_responses_name_text_format_not_response_format(
    message: str, param: str, named: str, text: str
) -> None:
    e = named_as_text_format(APIError(400, message, param=param))
    assert (e.param, e.message) == (named, text)
