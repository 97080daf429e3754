"""The slow work one request asks for, kept off the event loop and within time limits.

One caller must not hurt the others (issue 13): tokenizing, chat-template rendering and
grammar compiling run on a worker thread (`asyncio.to_thread`), so /health and every stream
keep answering meanwhile. The defaults are listed in README.md's security section.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, TypeVar

from genserve.runtime.errors import InvalidRequest

T = TypeVar("T")

GRAMMAR_BUDGET_S = 5.0  # response_format compile (llguidance's own limits bound it further)
TEMPLATE_RENDER_S = 2.0  # rendering one request's messages with the chat template
TEMPLATE_CHECK_S = 1.0  # a template set through the API must render CHECK_TURNS within this
CHECK_TURNS = 64  # turns of the conversation a new template is tried on
CHECK_TURN_CHARS = 400  # characters per turn
_JINJA_FILENAME = "<template>"  # what jinja names the code it compiles from a string


class TemplateTimeout(Exception):
    """A chat template ran past its time limit."""


def with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """fn() on this thread; TemplateTimeout once `seconds` pass inside jinja template code.

    A thread cannot be killed, so the template's own code checks the clock: a line tracer is
    set on jinja's compiled frames only, which also stops loops that print nothing and call
    nothing. Rendering runs in transformers' ImmutableSandboxedEnvironment (no attribute
    escapes, range() capped); this adds the time limit the sandbox lacks.
    """
    deadline = time.monotonic() + seconds

    def in_template(frame: FrameType, event: str, arg: Any) -> Any:  # noqa: ANN401
        if time.monotonic() > deadline:
            raise TemplateTimeout(f"the chat template ran longer than {seconds:g}s")
        return in_template

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:  # noqa: ANN401
        return in_template if frame.f_code.co_filename == _JINJA_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return fn()
    finally:
        sys.settrace(previous)


def check_chat_template(tokenizer: Any, template: str) -> None:  # noqa: ANN401
    """Before a template set through the API is stored: it must render one message, and a
    long conversation within TEMPLATE_CHECK_S (one slow template stalled every chat request).
    InvalidRequest naming `chat_template` otherwise. Runs on the calling thread, for at most
    the budget."""
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], chat_template=template, tokenize=False
        )
    except Exception as e:  # noqa: BLE001 - a template that cannot render is refused
        raise InvalidRequest(f"chat_template does not render: {e}", "chat_template") from e
    turns = [
        {"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "x" * CHECK_TURN_CHARS}
        for i in range(CHECK_TURNS - 1)
    ]
    render = lambda: tokenizer.apply_chat_template(  # noqa: E731
        turns, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    try:
        with_deadline(render, TEMPLATE_CHECK_S)
    except TemplateTimeout as e:
        msg = (
            f"chat_template is too slow: a {CHECK_TURNS - 1}-turn conversation did not render "
            f"within {TEMPLATE_CHECK_S:g}s"
        )
        raise InvalidRequest(msg, "chat_template") from e
    except Exception:  # noqa: BLE001, S110 - role rules may refuse this conversation; time is checked
        pass


async def off_loop(fn: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
    """fn(*args) on a worker thread: tokenizing a 3.9 MB prompt blocked the loop for ~3 s."""
    return await asyncio.to_thread(fn, *args)


BACKGROUND_NICENESS = 10  # where SCHED_IDLE is refused: CFS weight 110 against the engine's 1024


class BackgroundPool:
    """Worker threads, below the engine's CPU priority, for costly work one caller asks for
    (compiling a response_format grammar). On 2 cores a 4 s compile on a normal thread took a
    core from the engine's OpenMP threads, and every stream's steps slowed with it (`bench/
    load.py --hostile`). Niced 10 it still got ~10% of a contended core, and an OpenMP step
    waits at each barrier for whichever of its threads is off the core: the 12-deep anyOf
    still cost the streams 2.2x their TTFT. So the threads run under SCHED_IDLE (Linux): they
    get a core only when nothing else wants it, and a waking engine thread takes it back at
    once. llguidance drops the GIL while it compiles, so the engine does not wait on them."""

    def __init__(self, workers: int = 2, niceness: int = BACKGROUND_NICENESS) -> None:
        self._pool = ThreadPoolExecutor(
            workers, "genserve-bg", initializer=lower_priority, initargs=(niceness,)
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def lower_priority(niceness: int = BACKGROUND_NICENESS, idle: bool = True) -> None:
    """This thread at a lower CPU priority. Linux gives each thread its own policy and nice
    value (set on the thread id), which the threads it starts inherit: the idle policy where
    allowed (and asked for), else the nice value; elsewhere the calls fail or apply to the
    process, and the thread just runs at normal priority."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, niceness)
    if idle:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def longest_token_bytes(tokenizer: Any) -> int:  # noqa: ANN401
    """UTF-8 bytes of the longest entry of the vocabulary, added tokens included; 0 if the
    tokenizer has no vocabulary to read. Token strings spell byte-level BPE's bytes one
    character each, and SentencePiece's `▁` or byte-fallback `<0x..>` with more bytes than
    they stand for: over-counting only makes the bound below looser, never wrong."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - no vocabulary: no pre-check
        return 0
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=0)


def check_prompt_bytes(text: str, max_token_bytes: int, context: int, param: str) -> None:
    """A text of B bytes has at least B / max_token_bytes tokens: when that alone exceeds the
    context, refuse before tokenizing (a 3.9 MB prompt took 7.7 s of a core and ~700 MB of
    RSS in the tokenizer only to be refused for its length)."""
    if max_token_bytes <= 0:
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_token_bytes * context:
        at_least = -(-size // max_token_bytes)
        msg = (
            f"This model's maximum context length is {context} tokens. However, your prompt "
            f"is {size} bytes, which is at least {at_least} tokens. Please reduce the prompt."
        )
        raise InvalidRequest(msg, param, "context_length_exceeded")
