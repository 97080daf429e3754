"""`genserve serve | ...` — the command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from genserve.config import (
    DEFAULT_MODEL,
    ConnectionConfig,
    EngineConfig,
    ModelConfig,
    QuotaConfig,
    SecurityConfig,
    ServerConfig,
    StorageConfig,
    TrainingConfig,
)
from genserve.models_cli import models_app
from genserve.training.cli import finetune_app

app = typer.Typer(help="Serve and fine-tune generative models behind an OpenAI-compatible API.")
E = "GENSERVE_"
# Every `serve` option can also come from GENSERVE_<OPTION> (--max-file-bytes:
# GENSERVE_MAX_FILE_BYTES), as containers set them: click derives the name of each option that
# declares none, so an option added later is bound too.
SERVE_ENV = {"auto_envvar_prefix": "GENSERVE"}
CONN = ConnectionConfig()  # the connection options' defaults, declared once in config.py
QUOTAS = QuotaConfig()  # the quota options' defaults, declared once in config.py


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


@app.command(context_settings=SERVE_ENV)
def serve(
    model: Annotated[
        str, typer.Option(envvar=E + "MODEL", help="Bundled name, local HF folder, or hub id.")
    ] = DEFAULT_MODEL,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model id in the API (default: from the ref).")
    ] = None,
    host: Annotated[str, typer.Option(envvar=E + "HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar=E + "PORT")] = 8000,
    dtype: Annotated[
        str,
        typer.Option(help="float32|auto (bf16 where measured faster here)|bfloat16|float16"),
    ] = "float32",
    quantization: Annotated[
        str, typer.Option(help="none|int8 (weight-only int8, per output channel).")
    ] = "none",
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
    deterministic: Annotated[
        bool,
        typer.Option(
            help="Batch-invariant numerics for every request, not only seeded ones (~20% slower)."
        ),
    ] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run code shipped with a model.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Load .bin/.pt pickle weights.")] = False,
    lora_modules: Annotated[
        list[str] | None,
        typer.Option(help="Serve a LoRA adapter folder as NAME=PATH (repeatable)."),
    ] = None,
    models_dir: Annotated[
        str, typer.Option(envvar=E + "MODELS_DIR", help="POST /v1/models loads folders from here.")
    ] = "var/genserve/models",
    embedding_model: Annotated[
        str, typer.Option(help="Embeddings model served at start ('none': no embeddings).")
    ] = "all-MiniLM-L6-v2",
    memory_budget_gb: Annotated[
        float | None, typer.Option(help="Memory for all loaded models (default: 80% of RAM).")
    ] = None,
    data_dir: Annotated[
        str, typer.Option(envvar=E + "DATA_DIR", help="Uploads, jobs, adapters (SQLite + files).")
    ] = "var/genserve",
    max_file_bytes: Annotated[int, typer.Option(help="Largest upload to /v1/files.")] = 512 * 2**20,
    training_threads: Annotated[
        int, typer.Option(help="CPU threads a fine-tuning worker may use.")
    ] = 1,
    api_key_file: Annotated[
        str | None,
        typer.Option(envvar=E + "API_KEY_FILE", help="Key file from `genserve keys` (hashes)."),
    ] = None,
    allow_unauthenticated: Annotated[
        bool, typer.Option(help="Serve beyond 127.0.0.1 with no API key (not advised).")
    ] = False,
    max_request_bytes: Annotated[int, typer.Option(help="Largest JSON request body.")] = 4 * 2**20,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Ceiling on prompt tokens.")] = None,
    max_tokens_limit: Annotated[int | None, typer.Option(help="Ceiling on max_tokens.")] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM, seconds running requests may take.")
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(help="Open connections; beyond, idle/half-sent ones are closed, or 503.")
    ] = CONN.max_connections,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a request may take to send its headers.")
    ] = CONN.header_timeout_s,
    keep_alive_timeout: Annotated[
        float, typer.Option(help="Seconds an idle keep-alive connection stays open.")
    ] = CONN.keep_alive_s,
    max_header_bytes: Annotated[
        int, typer.Option(help="Largest request line + headers (larger: 431).")
    ] = CONN.max_header_bytes,
    max_files_per_project: Annotated[
        int,
        typer.Option(envvar=E + "MAX_FILES_PER_PROJECT", help="Quota: files one project holds."),
    ] = QUOTAS.max_files,
    max_file_bytes_per_project: Annotated[
        int,
        typer.Option(
            envvar=E + "MAX_FILE_BYTES_PER_PROJECT", help="Quota: bytes of one project's files."
        ),
    ] = QUOTAS.max_file_bytes,
    max_jobs_per_project: Annotated[
        int,
        typer.Option(
            envvar=E + "MAX_JOBS_PER_PROJECT",
            help="Quota: one project's fine-tuning jobs validating, queued or running.",
        ),
    ] = QUOTAS.max_active_jobs,
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
    ray: Annotated[bool, typer.Option(help="Deploy on Ray Serve (needs the ray extra).")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: engine replicas.")] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", "--address", help="With --ray: cluster (default: local)."),
    ] = None,
) -> None:
    """Serve a model with the OpenAI-compatible API.

    Keys: GENSERVE_API_KEYS (members) and GENSERVE_ADMIN_KEYS (admins), comma-separated, each
    its own project; or --api-key-file (`genserve keys create --project NAME --role ROLE`).
    """
    from genserve.api.middleware import EscapeControls
    from genserve.server import serve as run_server

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:  # a client's text cannot forge a log line
        handler.addFilter(EscapeControls())
    options = dict(locals())
    try:
        config = build_config(options)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if not config.security.auth_enabled:
        warn_unauthenticated(config)
    if ray:
        from genserve.ray.cli import serve_with_ray

        serve_with_ray(config, replicas, ray_address, log_level)
        return
    run_server(config, log_level.lower())


def warn_unauthenticated(config: ServerConfig) -> None:
    log = logging.getLogger("genserve")
    if config.security.allow_unauthenticated:
        log.warning(
            "!!! NO API KEY: anyone who can reach %s:%d can use this server and its "
            "fine-tuning API (--allow-unauthenticated) !!!", config.host, config.port,
        )  # fmt: skip
    else:
        log.info("no API key set: serving on loopback only")


def build_config(o: dict) -> ServerConfig:
    """CLI options (and GENSERVE_API_KEYS, GENSERVE_ADMIN_KEYS) -> the validated server config."""
    env_keys, admin_keys = env_list(E + "API_KEYS"), env_list(E + "ADMIN_KEYS")
    return ServerConfig(
        host=o["host"],
        port=o["port"],
        model=ModelConfig(
            o["model"], o["served_model_name"], o["dtype"], o["device"], o["trust_remote_code"],
            o["allow_pickle"], parse_lora_modules(o["lora_modules"] or []),
            embedding_model=None if o["embedding_model"] == "none" else o["embedding_model"],
            memory_budget_gb=o["memory_budget_gb"], quantization=o["quantization"],
        ),
        engine=EngineConfig(
            max_batch_size=o["max_batch_size"], max_model_len=o["max_model_len"],
            kv_cache_tokens=o["kv_cache_tokens"],
            max_num_batched_tokens=o["max_num_batched_tokens"], max_waiting=o["max_waiting"],
            fast_path=o["fast_path"], batch_invariant=o["deterministic"],
        ),
        storage=StorageConfig(o["data_dir"], o["models_dir"], o["max_file_bytes"]),
        training=TrainingConfig(threads=o["training_threads"]),
        security=SecurityConfig(
            api_keys=env_keys, admin_keys=admin_keys, api_key_file=o["api_key_file"],
            allow_unauthenticated=o["allow_unauthenticated"],
            max_request_bytes=o["max_request_bytes"], max_prompt_tokens=o["max_prompt_tokens"],
            max_tokens_limit=o["max_tokens_limit"], drain_timeout_s=o["drain_timeout"],
        ),
        connections=ConnectionConfig(
            max_connections=o["max_connections"], header_timeout_s=o["header_timeout"],
            keep_alive_s=o["keep_alive_timeout"], max_header_bytes=o["max_header_bytes"],
        ),
        quotas=QuotaConfig(
            max_files=o["max_files_per_project"],
            max_file_bytes=o["max_file_bytes_per_project"],
            max_active_jobs=o["max_jobs_per_project"],
        ),
    )  # fmt: skip


def env_list(name: str) -> tuple[str, ...]:
    """A comma-separated environment variable, blanks dropped."""
    return tuple(k.strip() for k in os.environ.get(name, "").split(",") if k.strip())


@app.command()
def doctor(
    model: Annotated[str, typer.Option(help="Whose weight shapes to measure.")] = DEFAULT_MODEL,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16")] = "auto",
    quantization: Annotated[str, typer.Option(help="none|int8")] = "none",
    data_dir: Annotated[str, typer.Option(envvar=E + "DATA_DIR")] = "var/genserve",
    max_batch_size: Annotated[int, typer.Option(help="As `serve`'s.")] = 32,
    max_num_batched_tokens: Annotated[int, typer.Option(help="As `serve`'s.")] = 512,
    remeasure: Annotated[bool, typer.Option(help="Measure again; do not read the cache.")] = False,
) -> None:
    """CPU/GPU features, read bandwidth, and the precision and kernels chosen here."""
    from genserve.doctor import run_doctor

    run_doctor(model, dtype, quantization, data_dir, max_batch_size, max_num_batched_tokens,
               remeasure)  # fmt: skip


keys_app = typer.Typer(
    help="Manage API keys in a key file (only hashes are stored). Each key belongs to a "
    "project (its files, jobs and fine-tuned models are visible to that project's keys only) "
    "and has a role: `admin` keys may also register, change and unload base models."
)
app.add_typer(keys_app, name="keys")
app.add_typer(finetune_app, name="finetune")
app.add_typer(models_app, name="models")
KeyFileOpt = Annotated[
    str, typer.Option("--key-file", envvar=E + "API_KEY_FILE", help="The key file.")
]


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    key_file: KeyFileOpt = "var/genserve/keys.json",
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    project: Annotated[
        str, typer.Option(help="The project (tenant) whose files, jobs and models it sees.")
    ] = "default",
    role: Annotated[
        str, typer.Option(help="member, or admin: may also manage base models.")
    ] = "member",
) -> None:
    """Create a key; it is printed once and only its hash is kept."""
    from genserve.api.auth import KeyFile

    try:
        key, record = KeyFile(Path(key_file)).create(name, rpm, tpm, project, role)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(f"id: {record.id}\nkey: {key}\nproject: {record.project}\nrole: {record.role}")
    typer.echo("(store it now: it is not shown again)")


@keys_app.command("list")
def keys_list(key_file: KeyFileOpt = "var/genserve/keys.json") -> None:
    """Keys by id, name, project, role, limits and state (never the key itself)."""
    from genserve.api.auth import KeyFile

    for r in KeyFile(Path(key_file)).load():
        state = "revoked" if r.revoked else "active"
        typer.echo(
            f"{r.id}  {r.name:20s}  project={r.project}  role={r.role}  "
            f"rpm={r.rpm}  tpm={r.tpm}  {state}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: str, key_file: KeyFileOpt = "var/genserve/keys.json") -> None:
    """Revoke a key by id; a running server stops accepting it at once."""
    from genserve.api.auth import KeyFile

    try:
        KeyFile(Path(key_file)).revoke(key_id)
    except KeyError:
        raise typer.BadParameter(f"no key with id {key_id!r}") from None
    typer.echo(f"revoked {key_id}")


if __name__ == "__main__":
    app()
