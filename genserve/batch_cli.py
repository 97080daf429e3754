"""`genserve batch create|list|show|cancel`: the Batch API from a terminal.

Plain HTTP against any server with OpenAI's /v1/files and /v1/batches (this one, or OpenAI);
the base URL and key default to OPENAI_BASE_URL and OPENAI_API_KEY, as the openai client's do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from genserve.training.cli import (
    DEFAULT_URL,
    APIFailure,
    ApiKey,
    BaseUrl,
    Client,
    console,
    fail,
    parse_metadata,
)

batch_app = typer.Typer(help="Run files of requests with the Batch API, through the HTTP API.")
TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")


def upload(client: Client, path: Path) -> str:
    with path.open("rb") as f:
        files = {"file": (path.name, f, "application/jsonl")}
        record = client.call("POST", "/files", data={"purpose": "batch"}, files=files)
    console.print(f"uploaded {path} as {record['id']} ({record['bytes']} bytes)")
    return record["id"]


@batch_app.command("create")
def create(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Requests, JSONL.")],
    endpoint: Annotated[str, typer.Option(help=f"One of {', '.join(ENDPOINTS)}.")] = ENDPOINTS[0],
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress until the batch ends.")] = True,
    output: Annotated[
        Path | None, typer.Option(help="Write the output lines here (errors to *.errors.jsonl).")
    ] = None,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Upload the file, create the batch and follow it to the end."""
    client = Client(base_url, api_key)
    try:
        body: dict[str, Any] = {
            "input_file_id": upload(client, file),
            "endpoint": endpoint,
            "completion_window": "24h",
        }
        if (meta := parse_metadata(metadata or [])) is not None:
            body["metadata"] = meta
        batch = client.call("POST", "/batches", json=body)
        console.print(f"created {batch['id']} ({batch['status']})")
        if follow:
            batch = follow_batch(client, batch["id"])
            if output is not None:
                download(client, batch, output)
    except APIFailure as e:
        raise fail(e) from None
    if batch["status"] in ("failed", "expired", "cancelled"):
        raise typer.Exit(1)


def follow_batch(client: Client, batch_id: str, poll_s: float = 1.0) -> dict:
    """A progress bar of finished requests (completed and failed) until the batch ends."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("{task.fields[failed]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("validating", total=None, failed="")
        while True:
            batch = client.call("GET", f"/batches/{batch_id}")
            counts = batch["request_counts"]
            failed = f"{counts['failed']} failed" if counts["failed"] else ""
            done = counts["completed"] + counts["failed"]
            total = counts["total"] or None
            bar.update(
                task, description=batch["status"], total=total, completed=done, failed=failed
            )
            if batch["status"] in TERMINAL:
                break
            time.sleep(poll_s)
    _summary(batch)
    return batch


def _summary(batch: dict) -> None:
    counts = batch["request_counts"]
    status = batch["status"]
    colour = {"completed": "green", "failed": "red"}.get(status, "yellow")
    console.print(
        f"[{colour}]{status}[/{colour}]: {counts['completed']} completed, {counts['failed']} "
        f"failed of {counts['total']}"
    )
    for err in (batch.get("errors") or {}).get("data", []):
        where = f"line {err['line']}: " if err.get("line") else ""
        console.print(f"  [red]{err['code']}[/red] {where}{err['message']}")
    for kind in ("output_file_id", "error_file_id"):
        if batch.get(kind):
            console.print(f"{kind}: {batch[kind]}")


def download(client: Client, batch: dict, path: Path) -> None:
    for kind, target in (
        ("output_file_id", path),
        ("error_file_id", path.with_suffix(".errors.jsonl")),
    ):
        if batch.get(kind):
            r = client.http.get(f"/files/{batch[kind]}/content")
            if not r.is_success:
                raise APIFailure(f"{r.status_code}: could not download {batch[kind]}")
            target.write_bytes(r.content)
            console.print(f"wrote {target}")


@batch_app.command("list")
def list_batches(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Batches, newest first."""
    try:
        page = Client(base_url, api_key).call("GET", "/batches", params={"limit": limit})
    except APIFailure as e:
        raise fail(e) from None
    table = Table()
    table.add_column("id", no_wrap=True, min_width=30)
    for name in ("endpoint", "status", "done", "created"):
        table.add_column(name, overflow="fold")
    for b in page["data"]:
        c = b["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"]))
        done = f"{c['completed']}+{c['failed']} failed / {c['total']}"
        table.add_row(b["id"], b["endpoint"], b["status"], done, created)
    console.print(table)


@batch_app.command("show")
def show(batch_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """A batch as JSON."""
    try:
        batch = Client(base_url, api_key).call("GET", f"/batches/{batch_id}")
    except APIFailure as e:
        raise fail(e) from None
    console.print_json(json.dumps(batch))


@batch_app.command("cancel")
def cancel(batch_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Cancel a batch: nothing new starts; what finished is kept in its output file."""
    try:
        batch = Client(base_url, api_key).call("POST", f"/batches/{batch_id}/cancel")
    except APIFailure as e:
        raise fail(e) from None
    console.print(f"{batch['id']}: {batch['status']}")
