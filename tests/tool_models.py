"""Tools as `openai.pydantic_function_tool` writes them: parameters whose Enum fields and nested
models are `$defs` reached by `$ref`, and two tools whose `$defs` share a name (`Color`) but
not its values, so a call checked against the other tool's `Color` would fail."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import openai
from pydantic import BaseModel, Field


class Color(StrEnum):
    RED = "red"
    GREEN = "green"


class Size(BaseModel):
    width: int = Field(ge=1, le=9)
    unit: Literal["cm", "in"]


class Paint(BaseModel):  # an Enum field and a nested model: `$defs` {Color, Size}
    color: Color
    size: Size


# Another class named Color: pydantic names its $defs entry "Color" too.
OtherColor = StrEnum("Color", {"CYAN": "cyan", "MAGENTA": "magenta"})


class Tint(BaseModel):
    color: OtherColor  # type: ignore[valid-type]
    strength: int = Field(ge=0, le=5)


PAINT = openai.pydantic_function_tool(Paint)
TINT = openai.pydantic_function_tool(Tint)
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (PAINT, TINT)}


def responses_tool(tool: dict) -> dict:
    """The same tool in the Responses API's flat shape."""
    return {"type": "function", **tool["function"]}
