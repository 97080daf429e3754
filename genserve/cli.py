"""`genserve serve | ...` — the command line."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from genserve.config import DEFAULT_MODEL, EngineConfig, ModelConfig, ServerConfig

app = typer.Typer(help="Serve and fine-tune generative models behind an OpenAI-compatible API.")
E = "GENSERVE_"  # every option can also come from GENSERVE_<OPTION>


@app.callback()
def main() -> None:
    """genserve command line."""


def parse_lora_modules(items: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--lora-modules wants NAME=PATH, got {item!r}")
        pairs.append((name, path))
    return tuple(pairs)


@app.command()
def serve(
    model: Annotated[
        str, typer.Option(envvar=E + "MODEL", help="Bundled name, local HF folder, or hub id.")
    ] = DEFAULT_MODEL,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model id in the API (default: from the ref).")
    ] = None,
    host: Annotated[str, typer.Option(envvar=E + "HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar=E + "PORT")] = 8000,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 32,
    max_model_len: Annotated[
        int | None, typer.Option(help="Context per sequence (default: model's, max 2048).")
    ] = None,
    kv_cache_tokens: Annotated[
        int | None, typer.Option(help="KV-cache budget in tokens (default: batch x len).")
    ] = None,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget per step.")] = 512,
    max_waiting: Annotated[int, typer.Option(help="Queue bound; beyond it, 429.")] = 256,
    fast_path: Annotated[bool, typer.Option(help="Use the Llama-family runner.")] = True,
    batch_invariant: Annotated[
        bool, typer.Option(help="Seeded outputs identical alone or under load.")
    ] = True,
    trust_remote_code: Annotated[bool, typer.Option(help="Run code shipped with a model.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Load .bin/.pt pickle weights.")] = False,
    lora_modules: Annotated[
        list[str] | None,
        typer.Option(help="Serve a LoRA adapter folder as NAME=PATH (repeatable)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
) -> None:
    """Serve a model with the OpenAI-compatible API."""
    import uvicorn

    from genserve.api.app import create_app

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = ServerConfig(
            host=host,
            port=port,
            model=ModelConfig(
                model,
                served_model_name,
                dtype,
                device,
                trust_remote_code,
                allow_pickle,
                parse_lora_modules(lora_modules or []),
            ),
            engine=EngineConfig(
                max_batch_size=max_batch_size,
                max_model_len=max_model_len,
                kv_cache_tokens=kv_cache_tokens,
                max_num_batched_tokens=max_num_batched_tokens,
                max_waiting=max_waiting,
                fast_path=fast_path,
                batch_invariant=batch_invariant,
            ),
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level.lower())


if __name__ == "__main__":
    app()
