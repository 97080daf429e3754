"""`genserve finetune create|list|show|cancel|pause|resume`: the fine-tuning API from a terminal.

Plain HTTP (httpx) against any server with OpenAI's fine-tuning routes; the base URL and key
default to OPENAI_BASE_URL and OPENAI_API_KEY, as the openai client's do.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

finetune_app = typer.Typer(help="Fine-tune a served model with LoRA, through the HTTP API.")
console = Console()
TERMINAL = ("succeeded", "failed", "cancelled")

BaseUrl = Annotated[
    str, typer.Option(envvar="OPENAI_BASE_URL", help="The server, e.g. http://127.0.0.1:8000/v1.")
]
ApiKey = Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="API key, if it needs one.")]
DEFAULT_URL = "http://127.0.0.1:8000/v1"


class APIFailure(Exception):
    pass


@dataclass
class Client:
    base_url: str
    api_key: str
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        url = self.base_url.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"  # accept the bare server address too
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=120)

    def call(self, method: str, path: str, **kwargs: Any) -> dict:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise APIFailure(f"cannot reach {self.http.base_url}: {e}") from e
        if r.is_success:
            return r.json()
        try:
            err = r.json()["error"]
            where = f" (param: {err['param']})" if err.get("param") else ""
            raise APIFailure(f"{r.status_code}: {err['message']}{where}")
        except (ValueError, KeyError, TypeError):
            raise APIFailure(f"{r.status_code}: {r.text[:500]}") from None


def _client(base_url: str, api_key: str) -> Client:
    return Client(base_url, api_key)


def fail(e: APIFailure) -> typer.Exit:
    """An API failure, printed; the exit to raise (the CLIs share it)."""
    console.print(f"[red]error[/red] {e}")
    return typer.Exit(1)


def parse_metadata(items: list[str]) -> dict[str, str] | None:
    """`--metadata KEY=VALUE` options -> OpenAI's metadata (None when none was given)."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--metadata wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs or None


def _hyperparameters(
    epochs: int | None, batch_size: int | None, lr: float | None, beta: float | None = None
) -> dict:
    chosen = {"n_epochs": epochs, "batch_size": batch_size, "learning_rate_multiplier": lr}
    chosen["beta"] = beta
    return {k: v for k, v in chosen.items() if v is not None}


def upload(client: Client, path: Path) -> str:
    with path.open("rb") as f:
        files = {"file": (path.name, f, "application/jsonl")}
        record = client.call("POST", "/files", data={"purpose": "fine-tune"}, files=files)
    console.print(f"uploaded {path} as {record['id']} ({record['bytes']} bytes)")
    return record["id"]


@finetune_app.command("create")
def create(
    file: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Training JSONL.")],
    model: Annotated[str, typer.Option(help="The served base model to fine-tune.")],
    validation_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Validation JSONL.")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the new model's name.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: auto).")] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option()] = None,
    method: Annotated[
        Literal["supervised", "dpo"],
        typer.Option(help="dpo trains on preference pairs (input, preferred_output, ...)."),
    ] = "supervised",
    beta: Annotated[float | None, typer.Option(help="dpo only (default: auto, 0.1).")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same losses.")] = None,
    follow: Annotated[bool, typer.Option(help="Show progress until the job ends.")] = True,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Upload the data, create the job and follow it to the end."""
    client = _client(base_url, api_key)
    try:
        body: dict[str, Any] = {"model": model, "training_file": upload(client, file)}
        if validation_file is not None:
            body["validation_file"] = upload(client, validation_file)
        hyper = _hyperparameters(epochs, batch_size, learning_rate_multiplier, beta)
        body |= {"suffix": suffix, "seed": seed}
        if hyper or method != "supervised":
            body["method"] = {"type": method, method: {"hyperparameters": hyper}}
        job = client.call(
            "POST", "/fine_tuning/jobs", json={k: v for k, v in body.items() if v is not None}
        )
        console.print(f"created {job['id']} ({job['status']})")
        if follow:
            job = follow_job(client, job["id"])
    except APIFailure as e:
        raise fail(e) from None
    if job["status"] in ("failed", "cancelled"):
        raise typer.Exit(1)


def follow_job(client: Client, job_id: str, poll_s: float = 1.0) -> dict:
    """Print events as they come, with a progress bar of steps and the latest loss."""
    seen: set[str] = set()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("{task.fields[loss]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("training", total=None, loss="")
        while True:
            for event in _new_events(client, job_id, seen):
                _show(bar, task, event)
            job = client.call("GET", f"/fine_tuning/jobs/{job_id}")
            if job["status"] in (*TERMINAL, "paused"):  # a paused job waits for `resume`
                break
            time.sleep(poll_s)
        for event in _new_events(client, job_id, seen):
            _show(bar, task, event)
    _summary(job)
    return job


def _new_events(client: Client, job_id: str, seen: set[str]) -> list[dict]:
    page = client.call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    fresh = [e for e in reversed(page["data"]) if e["id"] not in seen]  # oldest first
    seen.update(e["id"] for e in fresh)
    return fresh


def _show(bar: Progress, task, event: dict) -> None:  # noqa: ANN001 - a rich TaskID
    data = event.get("data") or {}
    if event.get("type") == "metrics" and "step" in data:
        loss = f"loss {data['train_loss']:.4f}"
        if "valid_loss" in data:
            loss += f"  valid {data['valid_loss']:.4f}"
        bar.update(task, total=data.get("total_steps"), completed=data["step"], loss=loss)
        return
    style = {"warn": "yellow", "error": "red"}.get(event.get("level", "info"), "")
    bar.console.print(f"[{style}]{event['message']}[/{style}]" if style else event["message"])


def _summary(job: dict) -> None:
    if job["status"] == "succeeded":
        console.print(
            f"[green]succeeded[/green]: {job['fine_tuned_model']} "
            f"({job['trained_tokens']} trained tokens)"
        )
    elif job["status"] == "failed":
        err = job.get("error") or {}
        console.print(f"[red]failed[/red]: {err.get('message', 'no reason given')}")
    else:
        console.print(job["status"])


@finetune_app.command("list")
def list_jobs(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Fine-tuning jobs, newest first."""
    try:
        page = _client(base_url, api_key).call("GET", "/fine_tuning/jobs", params={"limit": limit})
    except APIFailure as e:
        raise fail(e) from None
    table = Table()
    table.add_column("id", no_wrap=True, min_width=30)  # ids are what the other commands take
    for name in ("model", "status", "fine-tuned model", "created"):
        table.add_column(name, overflow="fold")
    for job in page["data"]:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
        table.add_row(
            job["id"], job["model"], job["status"], job["fine_tuned_model"] or "", created
        )
    console.print(table)


@finetune_app.command("show")
def show(
    job_id: str,
    events: Annotated[int, typer.Option(help="How many recent events to print.")] = 10,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """A job as JSON, then its latest events."""
    client = _client(base_url, api_key)
    try:
        job = client.call("GET", f"/fine_tuning/jobs/{job_id}")
        page = client.call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": events})
    except APIFailure as e:
        raise fail(e) from None
    console.print_json(json.dumps(job))
    for event in reversed(page["data"]):
        console.print(
            f"{time.strftime('%H:%M:%S', time.localtime(event['created_at']))}  "
            f"{event['level']:5s}  {event['message']}"
        )


@finetune_app.command("cancel")
def cancel(job_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Cancel a job that has not finished."""
    _act(job_id, "cancel", base_url, api_key)


@finetune_app.command("pause")
def pause(job_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Pause a queued or running job: it saves its state and stops until resumed."""
    _act(job_id, "pause", base_url, api_key)


@finetune_app.command("resume")
def resume(job_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Queue a paused job again: it continues from where it paused."""
    _act(job_id, "resume", base_url, api_key)


def _act(job_id: str, action: str, base_url: str, api_key: str) -> None:
    try:
        job = _client(base_url, api_key).call("POST", f"/fine_tuning/jobs/{job_id}/{action}")
    except APIFailure as e:
        raise fail(e) from None
    console.print(f"{job['id']}: {job['status']}")
