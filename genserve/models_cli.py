"""`genserve models list|load|show|set|rm`: models as REST resources, from a terminal."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from genserve.training.cli import DEFAULT_URL, APIFailure, ApiKey, BaseUrl, Client

models_app = typer.Typer(help="Load, show, reconfigure and unload models on a running server.")
console = Console()


def _run(fn):  # noqa: ANN001, ANN202 - wraps a command body: API errors become exit 1
    try:
        return fn()
    except APIFailure as e:
        console.print(f"[red]error[/red] {e}")
        raise typer.Exit(1) from None


@models_app.command("list")
def list_models(base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Every model: id, kind, status, parent."""
    data = _run(lambda: Client(base_url, api_key).call("GET", "/models"))["data"]
    table = Table("id", "kind", "status", "parent")
    for m in data:
        table.add_row(m["id"], m.get("kind", "adapter" if m.get("parent") else ""),
                      m.get("status", "ready"), m.get("parent") or "")  # fmt: skip
    console.print(table)


@models_app.command("show")
def show(model_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """One model, as JSON."""
    card = _run(lambda: Client(base_url, api_key).call("GET", f"/models/{model_id}"))
    console.print_json(json.dumps(card))


@models_app.command("load")
def load(
    ref: Annotated[str, typer.Argument(help="Folder in the models dir, bundled name or hub id.")],
    model_id: Annotated[str | None, typer.Option("--id", help="Its id in the API.")] = None,
    base: Annotated[
        str | None, typer.Option(help="A LoRA adapter's base model (default: from its config).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until it is ready or failed.")] = True,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Register and load a model, or a LoRA adapter folder on a served model (POST /v1/models)."""
    client = Client(base_url, api_key)
    body = {
        "model": ref,
        **({"id": model_id} if model_id else {}),
        **({"base": base} if base else {}),
    }
    card = _run(lambda: client.call("POST", "/models", json=body))
    path = f"/models/{card['id']}"
    while wait and card.get("status") == "loading":
        time.sleep(1)
        card = _run(lambda: client.call("GET", path))
    console.print(f"{card['id']}: {card.get('status')} {card.get('error') or ''}")
    if card.get("status") == "failed":
        raise typer.Exit(1)


@models_app.command("set")
def set_settings(
    model_id: str,
    default: Annotated[
        list[str] | None,
        typer.Option(
            help="A sampling default, NAME=JSON (repeatable); the others stay. NAME=null "
            "removes one."
        ),
    ] = None,
    alias: Annotated[list[str] | None, typer.Option(help="An alias (repeatable).")] = None,
    max_context: Annotated[int | None, typer.Option(help="Tokens per request.")] = None,
    chat_template: Annotated[str | None, typer.Option(help="A Jinja chat template.")] = None,
    base_url: BaseUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Change some serving settings (PATCH /v1/models/{id}); the rest stay."""
    body: dict = {}
    if default:
        body["defaults"] = {k: json.loads(v) for k, _, v in (d.partition("=") for d in default)}
    if alias:
        body["aliases"] = alias
    if max_context is not None:
        body["max_context"] = max_context
    if chat_template is not None:
        body["chat_template"] = chat_template
    card = _run(lambda: Client(base_url, api_key).call("PATCH", f"/models/{model_id}", json=body))
    console.print_json(json.dumps(card.get("settings", card)))


@models_app.command("rm")
def remove(model_id: str, base_url: BaseUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Unload a model, or delete a fine-tuned one."""
    _run(lambda: Client(base_url, api_key).call("DELETE", f"/models/{model_id}"))
    console.print(f"removed {model_id}")
