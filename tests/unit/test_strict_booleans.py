"""Every boolean, integer, number and string of a request body is strict: OpenAI answers 400
for "true", "yes" or 1 where a boolean goes, where pydantic's lax mode took them (`stream:
"yes"` streamed); tests/unit/test_strict_numbers.py has the numbers and strings. Query
parameters are not bodies: they still parse "true" from a URL."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from typing import Annotated

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field, StrictBool, ValidationError
from pydantic.fields import FieldInfo
from pydantic.types import Strict

import genserve.api
from genserve.api.errors import APIError, install, validation_error
from genserve.api.responses import named_as_text_format
from genserve.api.schemas import ChatCompletionRequest, CompletionRequest, WireModel
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


SCALARS = (bool, int, float, str)


def lax_scalars(annotation: object, metadata: list, strict: bool, kinds: tuple = SCALARS) -> bool:
    """Whether a scalar of `kinds` in this annotation is taken laxly: its model is not strict
    and no Strict marker stands beside it, or a Strict(False) marker undoes the model's mode."""
    if annotation in kinds:
        markers = [m.strict for m in metadata if isinstance(m, Strict)]
        return not (markers[-1] if markers else strict)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return lax_scalars(args[0], [*metadata, *args[1:]], strict, kinds)
    return any(lax_scalars(a, [], strict, kinds) for a in args)


def lax_fields(model: type[BaseModel], kinds: tuple = SCALARS) -> list[str]:
    fields: dict[str, FieldInfo] = model.model_fields
    strict = bool(model.model_config.get("strict"))
    return [
        n for n, f in fields.items() if lax_scalars(f.annotation, list(f.metadata), strict, kinds)
    ]


def test_no_request_model_takes_a_boolean_laxly() -> None:
    models = request_models()
    assert len(models) > 20  # the walk found the wire's models
    lax = {m.__name__: lax_fields(m, (bool,)) for m in models if lax_fields(m, (bool,))}
    assert lax == {}


def test_no_request_model_takes_a_number_or_a_string_laxly() -> None:
    """A field added later as a plain `int` on a model that is not a WireModel fails here."""
    lax = {m.__name__: lax_fields(m) for m in request_models() if lax_fields(m)}
    assert lax == {}


def test_the_walk_sees_a_lax_field() -> None:
    class Lax(BaseModel):
        n: Annotated[int, Field(ge=1)] | None = None
        stop: str | list[str] | None = None
        flag: StrictBool = False

    class Undone(WireModel):
        n: Annotated[int, Strict(False)] = 1

    assert (lax_fields(Lax), lax_fields(Undone), lax_fields(WireModel)) == (
        ["n", "stop"],
        ["n"],
        [],
    )


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
