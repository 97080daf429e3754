"""Logging for every genserve process: one format, and no line a client's text can forge."""

from __future__ import annotations

import logging
import re

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def printable(text: str) -> str:
    """`text` with control characters escaped, so that a client's path cannot start a forged
    line in the log (`GET /v1/x%0a... INFO genserve.access: DELETE ...`)."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class EscapeControls(logging.Filter):
    """On a handler: every message it writes has its control characters escaped (a traceback,
    formatted after, keeps its lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if CONTROL.search(message):
            record.msg, record.args = printable(message), None
        return True


def configure(level: int | str) -> None:
    """The root logger to stderr in genserve's format, each handler escaping control chars."""
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapeControls())
