"""Every error leaves in OpenAI's shape: {"error": {message, type, param, code}}.

The runtime raises domain errors (genserve.runtime.errors); this module alone says which HTTP
status each one is.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.runtime.errors import (
    ClientGone,
    Conflict,
    DomainError,
    InsufficientMemory,
    Internal,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unavailable,
)
from genserve.runtime.json_text import field_name
from genserve.storage.space import is_disk_full

log = logging.getLogger(__name__)

# Status -> the `type` OpenAI uses for it; the official client maps the status to its
# exception class (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, ...).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.error_type = error_type  # None: the type OpenAI uses for `status`

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code, self.error_type)


def error_body(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    error_type: str | None = None,
) -> dict:
    fallback = "server_error" if status >= 500 else "invalid_request_error"
    kind = error_type or ERROR_TYPES.get(status, fallback)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


# Domain error -> HTTP status; the first class a raised error is an instance of wins.
DOMAIN_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (InvalidRequest, 400),
    (PermissionDenied, 403),
    (NotFound, 404),
    (Conflict, 409),
    (Overloaded, 429),
    (ClientGone, 499),  # nginx's "client closed request": nobody reads it, logs do
    (Internal, 500),
    (Unavailable, 503),
    (InsufficientMemory, 507),
)


def http_error(exc: DomainError) -> APIError:
    """The HTTP error a domain error answers as (500 for one this table does not know)."""
    status = next((code for kind, code in DOMAIN_STATUS if isinstance(exc, kind)), 500)
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return APIError(status, exc.message, exc.param, exc.code, headers)


def _validation_param(loc: tuple) -> str | None:
    # loc is ("body", "messages", 0, "content"): OpenAI names the field as "messages.[0].content".
    # Only the first part says where the field was sent: a body field may be named `query`.
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    kept = [p for i, p in enumerate(loc) if not _union_tag(p, loc[i - 1] if i else None)]
    return field_name(kept)


SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "any"})


def _union_tag(part: object, before: object) -> bool:
    """Whether a loc part is pydantic's name for the member of a union the error came from
    ("str", "list[str]", "constrained-str", "dict[any,any]", a model's class name such as
    "Document"): not a field the caller sent, so not part of OpenAI's `param` ("text_1", not
    "text_1.constrained-str"). Field names are snake_case; a metadata key is the caller's own
    word, whatever its spelling, and stays."""
    if not isinstance(part, str) or before == "metadata":
        return False
    return part in SCALAR_TAGS or "[" in part or "-" in part or part[:1].isupper()


def validation_error(errors: Sequence[Any]) -> APIError:
    """pydantic's errors -> the 400 that names the first one's field (the Batch API validates
    its lines' bodies with the same schemas, so their errors read as online ones do)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its loc is the offset: ("body", 1) read "[1]"
        why = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"the body is not valid JSON: {why or first.get('msg')}")
    first, one_of = _reported(list(errors) or [first])
    param = _validation_param(tuple(first.get("loc", ())))
    if one_of or first.get("type") in EXPECTED_TYPES:
        expected = _one_of(one_of) if one_of else EXPECTED_TYPES[first["type"]]
        where = f"'{param}'" if param else "the request body"
        got = json_type(first.get("input"))
        return bad_request(
            f"Invalid type for {where}: expected {expected}, but got {got} instead.", param
        )
    # pydantic prefixes a validator's own words with "Value error, ": they read as written.
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    return bad_request(message, param=param)


# pydantic's type errors -> the JSON type the field takes, in OpenAI's words ("Invalid type for
# 'n': expected an integer, but got a string instead.").
EXPECTED_TYPES = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def json_type(value: object) -> str:
    """The JSON type of a value the caller sent, as OpenAI's type errors name it."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a decimal number"),
             (str, "a string"), (list | tuple, "an array"), (dict, "an object"))  # fmt: skip
    return next((name for kind, name in kinds if isinstance(value, kind)), "an object")


def _one_of(kinds: list[str]) -> str:
    return kinds[0] if len(kinds) == 1 else f"one of {', '.join(kinds[:-1])} or {kinds[-1]}"


def _reported(errors: list[Any]) -> tuple[Any, list[str]]:
    """The error a 400 reports, and the types a union field takes when the value's own type
    matched none of them. pydantic lists one error per member of a union; the one reported is
    the member that got furthest (for `prompt: [1, "a"]`, list[int] at [1], not str at the
    top), so that `param` and the message point at the item that is wrong."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    at = next((i for i, p in enumerate(loc) if _union_tag(p, loc[i - 1] if i else None)), None)
    if at is None:
        return first, []
    same = [e for e in errors if _member(tuple(e["loc"]), at) and tuple(e["loc"][:at]) == loc[:at]]
    if all(len(e["loc"]) == at + 1 and e["type"] in EXPECTED_TYPES for e in same):
        return first, list(dict.fromkeys(EXPECTED_TYPES[e["type"]] for e in same))
    members: dict[object, list[Any]] = {}
    for e in same:
        members.setdefault(e["loc"][at], []).append(e)
    return min(members.values(), key=_member_rank)[0], []


def _member(loc: tuple, at: int) -> bool:
    """Whether an error's loc names a member of a union at `at` (the union's own errors)."""
    return len(loc) > at and _union_tag(loc[at], loc[at - 1] if at else None)


def _member_rank(errors: list[Any]) -> tuple:
    """Fewer type errors first (a value of the right type but out of bounds beats a wrong
    type), then fewer errors, then the deepest and furthest item reached."""
    reached = [p for p in errors[0]["loc"] if isinstance(p, int)]
    wrong_types = sum(e["type"] in EXPECTED_TYPES for e in errors)
    return (wrong_types, len(errors), -len(reached), [-p for p in reached])


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc.errors()))


async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = "Unknown route: see /docs for the routes this server offers."
    return error_response(APIError(exc.status_code, message, headers=exc.headers))


async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _on_domain_error(_: Request, exc: DomainError) -> JSONResponse:
    return error_response(http_error(exc))


def insufficient_storage() -> APIError:
    return APIError(
        507, "The server's disk is full; retry once an operator has freed space.",
        code="insufficient_storage", headers={"Retry-After": "60"},
    )  # fmt: skip


async def _on_storage(request: Request, exc: Exception) -> JSONResponse:
    """A full disk under an upload or a job write is a 507, any other OS or SQLite error a
    500. Handled here rather than in ServerErrorMiddleware, which re-raises after replying."""
    if is_disk_full(exc):
        log.warning("%s: the disk is full: %s", request.method, exc)
        return error_response(insufficient_storage())
    return await _on_unexpected(request, exc)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(APIError(500, "The server had an error processing your request."))


class ErrorDetail(BaseModel):
    model_config = ConfigDict(strict=True)  # as every model under api/ (test_strict_booleans)

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(strict=True)

    error: ErrorDetail


ERROR_STATUSES = {
    "400": "Invalid request (the message and `param` say what)",
    "401": "Missing, wrong or revoked API key",
    "403": "The key's role may not do this (an admin key is needed)",
    "404": "No such model, file, job or route (or it belongs to another project)",
    "429": "Rate limit, quota or queue full; see Retry-After",
    "500": "Server error",
    "503": "Loading or shutting down; see Retry-After",
}


def document_errors(schema: dict) -> dict:
    """Our OpenAPI document as the server behaves: validation errors are 400s in OpenAI's
    error shape (FastAPI would document 422s), and every operation lists its error statuses."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorDetail"] = ErrorDetail.model_json_schema()
    components["ErrorResponse"] = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in schema.get("paths", {}).items():
        if path == "/health":  # its own shape: {"status": ...}, documented on the route
            continue
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status, text in ERROR_STATUSES.items():
                responses.setdefault(
                    status, {"description": text, "content": {"application/json": {"schema": ref}}}
                )
    return schema


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(DomainError, _on_domain_error)
    app.add_exception_handler(OSError, _on_storage)
    app.add_exception_handler(sqlite3.Error, _on_storage)
    app.add_exception_handler(Exception, _on_unexpected)
