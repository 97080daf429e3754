"""`genserve completions export`: stored chat completions as a fine-tuning file.

Requests sent with `store: true` (and `metadata` to label them) keep the answers a model gave;
this writes them as OpenAI's chat fine-tuning lines, `{"messages": [...the request's messages,
the answer]}`, ready for `genserve finetune create --file` (distillation: the answers of a
larger model teach a smaller one). Plain HTTP against the stored-completions routes, so it reads
from any server that has them; the base URL and key default to OPENAI_BASE_URL and
OPENAI_API_KEY.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from genserve.training.cli import (
    DEFAULT_URL,
    APIFailure,
    ApiKey,
    BaseUrl,
    Client,
    fail,
    parse_metadata,
)

completions_app = typer.Typer(help="Stored chat completions (store: true), through the HTTP API.")
PAGE = 100
# What a training line's message keeps of a stored one (its id and content_parts are the store's).
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
COMPLETE = ("stop", "tool_calls")  # an answer cut by max_tokens teaches a cut answer


def stored(client: Client, model: str | None, metadata: dict[str, str]) -> Iterator[dict]:
    """Every stored completion that matches, oldest first, page by page."""
    params: dict[str, Any] = {"limit": PAGE, **{f"metadata[{k}]": v for k, v in metadata.items()}}
    if model is not None:
        params["model"] = model
    while True:
        page = client.call("GET", "/chat/completions", params=params)
        yield from page["data"]
        if not page["has_more"]:
            return
        params["after"] = page["last_id"]


def request_messages(client: Client, completion_id: str) -> list[dict]:
    out: list[dict] = []
    params: dict[str, Any] = {"limit": PAGE}
    while True:
        page = client.call("GET", f"/chat/completions/{completion_id}/messages", params=params)
        out += page["data"]
        if not page["has_more"]:
            return out
        params["after"] = page["last_id"]


def training_line(messages: list[dict], answer: dict) -> dict:
    """OpenAI's chat fine-tuning example: the conversation, then the answer's message."""
    turns = [{k: m[k] for k in MESSAGE_FIELDS if m.get(k) is not None} for m in messages]
    reply = {k: answer[k] for k in ("role", "content", "tool_calls") if answer.get(k) is not None}
    return {"messages": [*turns, reply]}


def export_to(
    out: TextIO, client: Client, model: str | None, metadata: dict[str, str], cut: bool
) -> tuple[int, int]:
    """(lines written, answers skipped as cut short)."""
    written = skipped = 0
    for completion in stored(client, model, metadata):
        answer = completion["choices"][0]
        if not cut and answer["finish_reason"] not in COMPLETE:
            skipped += 1
            continue
        line = training_line(request_messages(client, completion["id"]), answer["message"])
        out.write(json.dumps(line) + "\n")
        written += 1
    return written, skipped


@completions_app.command("export")
def export(
    output: Annotated[Path | None, typer.Option(help="JSONL file to write (else stdout).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's answers.")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE to match, repeatable.")
    ] = None,
    include_cut: Annotated[bool, typer.Option(help="Keep answers cut by max_tokens too.")] = False,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Write stored chat completions (the first choice of each) as a fine-tuning file."""
    client, match = Client(base_url, api_key), parse_metadata(metadata or []) or {}
    try:
        with output.open("w") if output is not None else contextlib.nullcontext(sys.stdout) as out:
            written, skipped = export_to(out, client, model, match, include_cut)
    except APIFailure as e:
        raise fail(e) from None
    note = f", {skipped} cut by max_tokens left out" if skipped else ""
    typer.echo(f"{written} examples{note}", err=True)  # stderr: stdout may be the file
