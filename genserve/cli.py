"""`genserve serve | ...` — the command line."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from genserve.batch_cli import batch_app
from genserve.completions_cli import completions_app
from genserve.config import ServerConfig, drop_secret_env
from genserve.models_cli import models_app
from genserve.training.cli import finetune_app

app = typer.Typer(help="Serve and fine-tune generative models behind an OpenAI-compatible API.")
E = "GENSERVE_"
# Every `serve` option can also come from GENSERVE_<OPTION> (--max-file-bytes:
# GENSERVE_MAX_FILE_BYTES), as containers set them: click derives the name of each option that
# declares none, so an option added later is bound too.
SERVE_ENV = {"auto_envvar_prefix": "GENSERVE"}
DEFAULTS = ServerConfig()  # each option's default, declared once: in config.py


@app.callback()
def main() -> None:
    """genserve command line."""


@dataclass(frozen=True, slots=True)
class ConfigOption:
    """One `serve` option and the config field it sets: ServerConfig.<section>.<field>, or
    ServerConfig.<field> when section is None. Its type and default are the field's."""

    name: str  # --name-with-dashes on the command line
    section: str | None
    field: str
    help: str
    wire_type: Any = None  # the command line's type, where it differs from the field's

    @property
    def default(self) -> Any:  # noqa: ANN401 - a field's default
        holder = getattr(DEFAULTS, self.section) if self.section else DEFAULTS
        value = getattr(holder, self.field)
        return {(): None, None: "none"}.get(value, value) if self.wire_type else value

    @property
    def type(self) -> Any:  # noqa: ANN401 - a type
        if self.wire_type is not None:
            return self.wire_type
        cls = type(getattr(DEFAULTS, self.section)) if self.section else ServerConfig
        return get_type_hints(cls)[self.field]


def parse_lora_modules(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--lora-modules wants NAME=PATH, got {item!r}")
        pairs.append((name, path))
    return tuple(pairs)


def parse_embedding_model(name: str) -> str | None:
    return None if name == "none" else name


# The command line's shape -> the field's, for the options whose wire_type differs.
PARSE = {"lora_modules": parse_lora_modules, "embedding_model": parse_embedding_model}

SERVE_OPTIONS = (
    ConfigOption("model", "model", "ref", "Bundled name, local HF folder, or hub id."),
    ConfigOption("served_model_name", "model", "served_name",
                 "Model id in the API (default: from the ref)."),
    ConfigOption("host", None, "host", "Address to listen on."),
    ConfigOption("port", None, "port", "Port to listen on."),
    ConfigOption("dtype", "model", "dtype",
                 "float32|auto (bf16 where measured faster here)|bfloat16|float16"),
    ConfigOption("quantization", "model", "quantization",
                 "none|int8 (weight-only int8, per output channel)."),
    ConfigOption("device", "model", "device", "auto|cpu|cuda"),
    ConfigOption("tool_call_format", "model", "tool_call_format",
                 "auto (from the chat template)|hermes|llama3_json|mistral"),
    ConfigOption("reasoning_parser", "model", "reasoning_parser",
                 "auto (where the chat template knows </think>)|none|think "
                 "(deepseek_r1, qwen3: the same)"),
    ConfigOption("max_batch_size", "engine", "max_batch_size", "Sequences decoded together."),
    ConfigOption("max_model_len", "engine", "max_model_len",
                 "Context per sequence (default: model's, max 2048)."),
    ConfigOption("kv_cache_tokens", "engine", "kv_cache_tokens",
                 "KV-cache pool in tokens (default: batch x len; on a GPU, see the next)."),
    ConfigOption("gpu_memory_fraction", "engine", "gpu_memory_fraction",
                 "On CUDA: share of the GPU's memory for weights + KV pool (default 0.9)."),
    ConfigOption("prefix_caching", "engine", "prefix_caching",
                 "Reuse cached KV blocks of repeated prompt prefixes."),
    ConfigOption("max_num_batched_tokens", "engine", "max_num_batched_tokens",
                 "Token budget per step."),
    ConfigOption("stream_interval", "engine", "stream_interval",
                 "Streamed tokens sent every N (first and last at once); 1: each its own chunk."),
    ConfigOption("max_waiting", "engine", "max_waiting", "Queue bound; beyond it, 429."),
    ConfigOption("fast_path", "engine", "fast_path", "Use the Llama-family runner."),
    ConfigOption("deterministic", "engine", "batch_invariant",
                 "Batch-invariant numerics for every request, not only seeded ones (~20% slower)."),
    ConfigOption("engine_process", "engine", "own_process",
                 "Run the model in a process of its own (off: a thread of the API's)."),
    ConfigOption("compile_decode", "engine", "compile_decode",
                 "Compile the one-stream decode step at start-up (CPU, Llama family)."),
    ConfigOption("native_kernels", "engine", "native_kernels",
                 "Offer genserve's own C kernels where they measure faster (CPU)."),
    ConfigOption("adaptive_threads", "engine", "adaptive_threads",
                 "Run decode steps on one core fewer while that measures faster (CPU)."),
    ConfigOption("trust_remote_code", "model", "trust_remote_code",
                 "Run code shipped with a model."),
    ConfigOption("allow_pickle", "model", "allow_pickle", "Load .bin/.pt pickle weights."),
    ConfigOption("lora_modules", "model", "lora_modules",
                 "Serve a LoRA adapter folder as NAME=PATH (repeatable).", list[str] | None),
    ConfigOption("models_dir", "storage", "models_dir", "POST /v1/models loads folders from here."),
    ConfigOption("embedding_model", "model", "embedding_model",
                 "Embeddings model served at start ('none': no embeddings).", str),
    ConfigOption("memory_budget_gb", "model", "memory_budget_gb",
                 "Memory for all loaded models (default: 80% of RAM)."),
    ConfigOption("data_dir", "storage", "data_dir", "Uploads, jobs, adapters (SQLite + files)."),
    ConfigOption("max_file_bytes", "storage", "max_file_bytes", "Largest upload to /v1/files."),
    ConfigOption("training_threads", "training", "threads",
                 "CPU threads a fine-tuning worker may use."),
    ConfigOption("api_key_file", "security", "api_key_file",
                 "Key file from `genserve keys` (hashes)."),
    ConfigOption("allow_unauthenticated", "security", "allow_unauthenticated",
                 "Serve beyond 127.0.0.1 with no API key (not advised)."),
    ConfigOption("max_request_bytes", "security", "max_request_bytes",
                 "Largest JSON request body."),
    ConfigOption("max_prompt_tokens", "security", "max_prompt_tokens",
                 "Ceiling on prompt tokens."),
    ConfigOption("max_tokens_limit", "security", "max_tokens_limit", "Ceiling on max_tokens."),
    ConfigOption("drain_timeout", "security", "drain_timeout_s",
                 "On SIGTERM, seconds running requests may take."),
    ConfigOption("max_connections", "connections", "max_connections",
                 "Open connections; beyond, idle/half-sent ones are closed, or 503."),
    ConfigOption("header_timeout", "connections", "header_timeout_s",
                 "Seconds a request may take to send its headers."),
    ConfigOption("keep_alive_timeout", "connections", "keep_alive_s",
                 "Seconds an idle keep-alive connection stays open."),
    ConfigOption("max_header_bytes", "connections", "max_header_bytes",
                 "Largest request line + headers (larger: 431)."),
    ConfigOption("max_files_per_project", "quotas", "max_files", "Quota: files one project holds."),
    ConfigOption("max_file_bytes_per_project", "quotas", "max_file_bytes",
                 "Quota: bytes of one project's files."),
    ConfigOption("max_jobs_per_project", "quotas", "max_active_jobs",
                 "Quota: one project's unfinished fine-tuning jobs (paused ones too)."),
    ConfigOption("queue_retry_after", None, "retry_after_s",
                 "Retry-After seconds on the 429 of a full queue."),
)  # fmt: skip


def serve(
    log_level: Annotated[str, typer.Option(help="debug|info|warning|error")] = "info",
    ray: Annotated[bool, typer.Option(help="Deploy on Ray Serve (needs the ray extra).")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: engine replicas.")] = 1,
    replica_gpus: Annotated[
        float,
        typer.Option(
            help="With --ray on CUDA: GPUs per engine replica (0.5: two replicas share one)."
        ),
    ] = 1.0,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", "--address", help="With --ray: cluster (default: local)."),
    ] = None,
    ray_control_resource: Annotated[
        str | None,
        typer.Option(
            help="With --ray: a custom resource only one node has; the control replica (SQLite and "
            "the files) stays on that node."
        ),
    ] = None,
    ray_training_resource: Annotated[
        str | None,
        typer.Option(
            help="With --ray: a custom resource of the nodes that may run fine-tuning tasks."
        ),
    ] = None,
    replicas_per_node: Annotated[
        int | None, typer.Option(help="With --ray: at most this many engine replicas on one node.")
    ] = None,
    **options: Any,  # one per SERVE_OPTIONS entry: see command_signature
) -> None:
    """Serve a model with the OpenAI-compatible API.

    Keys: GENSERVE_API_KEYS (members) and GENSERVE_ADMIN_KEYS (admins), comma-separated, each
    its own project; or --api-key-file (`genserve keys create --project NAME --role ROLE`).
    """
    from genserve import logs
    from genserve.server import serve as run_server

    logs.configure(log_level.upper())  # a client's text cannot forge a log line
    try:
        config = build_config(options)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    drop_secret_env(os.environ)  # read into the config: no child process inherits them
    if not config.security.auth_enabled:
        warn_unauthenticated(config)
    if ray:
        from genserve.ray.cli import serve_with_ray

        serve_with_ray(
            config, replicas, ray_address, log_level, replica_gpus,
            control_resource=ray_control_resource, training_resource=ray_training_resource,
            replicas_per_node=replicas_per_node,
        )  # fmt: skip
        return
    run_server(config, log_level.lower())


def command_signature(fn: Any, names: tuple[str, ...]) -> inspect.Signature:  # noqa: ANN401
    """One option per SERVE_OPTIONS entry named, typed and defaulted by its config field, then
    `fn`'s own parameters: what typer reads to build the command (and --help). Every command
    taking an option of `serve` declares it here, so that its default cannot drift."""
    own = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    hints = get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in own]
    generated = [
        inspect.Parameter(
            o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=o.default,
            annotation=Annotated[o.type, typer.Option(help=o.help)],
        )
        for o in SERVE_OPTIONS
        if o.name in names
    ]  # fmt: skip
    return inspect.Signature([*generated, *own])


def generated_options(fn: Any, names: Iterable[str]) -> None:  # noqa: ANN401
    """`fn` (whose `**options` take them) seen by typer with those options of `serve`."""
    fn.__signature__ = command_signature(fn, tuple(names))
    fn.__annotations__ = {p.name: p.annotation for p in fn.__signature__.parameters.values()}


generated_options(serve, (o.name for o in SERVE_OPTIONS))
app.command(context_settings=SERVE_ENV)(serve)


def warn_unauthenticated(config: ServerConfig) -> None:
    log = logging.getLogger("genserve")
    if config.security.allow_unauthenticated:
        log.warning(
            "!!! NO API KEY: anyone who can reach %s:%d can use this server and its "
            "fine-tuning API (--allow-unauthenticated) !!!", config.host, config.port,
        )  # fmt: skip
    else:
        log.info("no API key set: serving on loopback only")


def build_config(options: dict[str, Any], keys: bool = True) -> ServerConfig:
    """Options of `serve` (and, with `keys`, GENSERVE_API_KEYS, GENSERVE_ADMIN_KEYS) -> the
    validated config: each option given sets the field SERVE_OPTIONS names; every field left
    keeps its default."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for o in SERVE_OPTIONS:
        if o.name in options:
            value = PARSE.get(o.name, lambda v: v)(options[o.name])
            (sections.setdefault(o.section, {}) if o.section else top)[o.field] = value
    if keys:
        security = sections.setdefault("security", {})
        security["api_keys"], security["admin_keys"] = (
            env_list(E + "API_KEYS"),
            env_list(E + "ADMIN_KEYS"),
        )
    nested = {name: replace(getattr(DEFAULTS, name), **fields) for name, fields in sections.items()}
    return replace(DEFAULTS, **top, **nested)


def env_list(name: str) -> tuple[str, ...]:
    """A comma-separated environment variable, blanks dropped."""
    return tuple(k.strip() for k in os.environ.get(name, "").split(",") if k.strip())


# doctor's options are serve's: the same defaults, so that plain `genserve doctor` shows what
# plain `genserve serve` decides (doctor's own `--dtype auto` once showed bf16 kernels that a
# default server, float32, never runs).
DOCTOR_OPTIONS = ("model", "dtype", "quantization", "device", "max_batch_size",
                  "max_num_batched_tokens", "native_kernels", "data_dir")  # fmt: skip


def doctor(
    remeasure: Annotated[bool, typer.Option(help="Measure again; do not read the cache.")] = False,
    **options: Any,  # one per DOCTOR_OPTIONS entry: see command_signature
) -> None:
    """CPU/GPU features, read bandwidth, and the precision and kernels `serve` with the same
    options chooses here."""
    from genserve.doctor import run_doctor

    try:
        config = build_config(options, keys=False)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    run_doctor(config, remeasure)


generated_options(doctor, DOCTOR_OPTIONS)
app.command(context_settings=SERVE_ENV)(doctor)


keys_app = typer.Typer(
    help="Manage API keys in a key file (only hashes are stored). Each key belongs to a "
    "project (its files, jobs and fine-tuned models are visible to that project's keys only) "
    "and has a role: `admin` keys may also register, change and unload base models."
)
app.add_typer(keys_app, name="keys")
app.add_typer(finetune_app, name="finetune")
app.add_typer(models_app, name="models")
app.add_typer(batch_app, name="batch")
app.add_typer(completions_app, name="completions")
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
