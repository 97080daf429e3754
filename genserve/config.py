"""Server settings: frozen dataclasses, validated once, the one reader of GENSERVE_* env."""

from __future__ import annotations

import hashlib
import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")
DEVICES = ("auto", "cpu", "cuda")
TOOL_CALL_FORMATS = ("auto", "hermes", "llama3_json", "mistral")
# How a reasoning model's thinking is told from its answer (genserve/runtime/reasoning.py);
# deepseek_r1 and qwen3 are vLLM's names for the same <think> tags.
REASONING_PARSERS = ("auto", "none", "think", "deepseek_r1", "qwen3")
DEFAULT_MODEL = "genserve-starter"
# GENSERVE_API_KEYS, GENSERVE_ADMIN_KEYS, GENSERVE_API_KEY_FILE, and any GENSERVE_ secret.
SECRET_ENV = re.compile(r"GENSERVE_\w*(KEYS?|KEY_FILE|SECRETS?|TOKEN|PASSWORD)", re.IGNORECASE)


def is_secret_env(name: str) -> bool:
    """A variable naming a key, secret, token or password: no child process gets it."""
    return SECRET_ENV.fullmatch(name) is not None


def hash_key(key: str) -> str:
    """How the server keeps and compares an API key: its SHA-256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


def drop_secret_env(environ: MutableMapping[str, str]) -> None:
    """The secret variables out of `environ` (os.environ, once the config has read them).
    Every process the server starts inherits its environment, whoever starts it: the engine
    and the grammar helper (multiprocessing takes no environment of its own), the training
    worker, the compilers its kernels build with. None of them answers the API, and each
    one's environment is readable in /proc/<pid>/environ. (The server's own there keeps what
    it started with: no process can change that.)"""
    for name in [k for k in environ if is_secret_env(k)]:
        del environ[name]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine batches and how much KV cache it may hold."""

    max_batch_size: int = 32
    max_model_len: int | None = None  # None: the model's context, capped at 2048
    kv_cache_tokens: int | None = None  # None: max_batch_size * max_model_len (CPU), see below
    # On a GPU without --kv-cache-tokens, the KV pool takes what is left of this fraction of
    # the device's memory once the weights are loaded (vLLM's gpu_memory_utilization).
    gpu_memory_fraction: float = 0.9
    # Full KV blocks stay cached after their request and are reused by any later prompt that
    # starts with the same tokens (same adapter); --no-prefix-caching turns it off.
    prefix_caching: bool = True
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    # A streamed answer's tokens are sent on every this many (the first and the last at once);
    # 1: each token its own chunk, as OpenAI and vLLM send them. An answer that is not
    # streamed is sent whole when it finishes, whatever this says.
    stream_interval: int = 1
    max_waiting: int = 256  # bounded queue: beyond this, 429
    fast_path: bool = True  # our Llama-family runner when the architecture allows it
    # --deterministic: no row's numbers depend on its batch. Off, only seeded requests' rows
    # are batch-invariant (their seeds must reproduce under load): for every request it costs
    # more than 15% of throughput at 32 streams on 2 threads.
    batch_invariant: bool = False
    # The model and its engine loop in a child process (genserve.engine.process): requests
    # and token deltas cross a pipe, and nothing the API does holds the engine's GIL.
    own_process: bool = True
    # A lone free decode (one stream) as one graph compiled at start-up (model/compiled.py):
    # faster steps (1.27x at one stream, bf16, 2-core Xeon) for a slower start (+~45 s) and
    # more memory (the weights again, and inductor's prepacked copy).
    compile_decode: bool = False
    # genserve's own C kernels (model/native.py: gemv, attend.c, decode.c), each used where it
    # measured faster at start-up; off: torch's kernels only (an operator's way out, should a
    # C compiler build them wrong on some machine).
    native_kernels: bool = True
    # Free decode steps run on every core, or on one fewer where that measures faster as they
    # run (another process taking a core stalls every thread of a step: model/threads.py).
    adaptive_threads: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError("max_model_len must be >= 16")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 16:
            raise ValueError("kv_cache_tokens must be >= 16")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        if self.max_num_batched_tokens < 16:
            raise ValueError("max_num_batched_tokens must be >= 16")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model to serve and how to place it."""

    ref: str = DEFAULT_MODEL
    served_name: str | None = None
    # float32 by default: bf16 kernels are not always batch-invariant (see
    # tests/unit/test_hardware.py), so `auto` (bf16 where measured faster) is opt-in for now.
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False  # refused unless the operator opts in
    allow_pickle: bool = False  # .bin/.pt checkpoints are refused unless opted in
    lora_modules: tuple[tuple[str, str], ...] = ()  # (model id, adapter folder) served at start
    embedding_model: str | None = "all-MiniLM-L6-v2"  # served at start when installed
    memory_budget_gb: float | None = None  # None: 80% of the machine's memory
    # int8: weight-only int8 (per output channel) on the Llama-family fast path
    quantization: str = "none"
    # The syntax tool calls are written in (genserve/runtime/tools.py); auto: from the template
    tool_call_format: str = "auto"
    # auto: split <think>...</think> off chat answers where the chat template knows the tag
    reasoning_parser: str = "auto"

    def __post_init__(self) -> None:
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"reasoning_parser must be one of {REASONING_PARSERS}, "
                f"got {self.reasoning_parser!r}"
            )
        if self.tool_call_format not in TOOL_CALL_FORMATS:
            raise ValueError(
                f"tool_call_format must be one of {TOOL_CALL_FORMATS}, "
                f"got {self.tool_call_format!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if not self.ref:
            raise ValueError("model ref must not be empty")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Where uploads, jobs and adapters live. SQLite holds metadata; bytes are plain files."""

    data_dir: str = "var/genserve"
    models_dir: str = "var/genserve/models"  # POST /v1/models loads folders from here only
    max_file_bytes: int = 512 * 2**20  # larger uploads are refused with 400, param "file"

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("data_dir must not be empty")
        if self.max_file_bytes < 1:
            raise ValueError("max_file_bytes must be >= 1")


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """Fine-tuning runs in worker processes beside the serving engine, one job at a time."""

    threads: int = 1  # torch threads of the training worker: its share of the CPU
    enabled: bool = True
    device: str | None = None  # where jobs train; None: the model's --device (auto, cpu, cuda)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError("training threads must be >= 1")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"training device must be one of {DEVICES}, got {self.device!r}")


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Who may call the API, and the limits every request meets."""

    api_keys: tuple[str, ...] = ()  # from GENSERVE_API_KEYS; hashed on load, never stored
    admin_keys: tuple[str, ...] = ()  # from GENSERVE_ADMIN_KEYS: these may manage base models
    api_key_file: str | None = None  # managed by `genserve keys`; holds hashes only
    # The same keys as SHA-256 hex digests: how they travel to Ray replicas, whose init
    # arguments Ray stores and shows (genserve.ray.deploy.hashed_keys)
    api_key_hashes: tuple[str, ...] = ()
    admin_key_hashes: tuple[str, ...] = ()
    allow_unauthenticated: bool = False  # needed to bind beyond loopback without keys
    exempt_paths: tuple[str, ...] = ("/health", "/metrics", "/", "/static")
    max_request_bytes: int = 4 * 2**20  # JSON bodies; uploads have their own limit
    max_prompt_tokens: int | None = None  # None: only the model's context bounds it
    max_tokens_limit: int | None = None  # a ceiling on max_tokens per request
    drain_timeout_s: float = 30.0  # SIGTERM: how long running requests may take to finish

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")
        for name in ("max_prompt_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        for digest in self.api_key_hashes + self.admin_key_hashes:
            if len(digest) != 64 or digest.strip("0123456789abcdef"):
                raise ValueError("a key hash must be a SHA-256 hex digest")

    def hashed(self) -> SecurityConfig:
        """The same keys, the plaintext ones as their digests: for a process that only
        compares them (a Ray replica) or never sees a request (the engine process)."""
        return replace(
            self, api_keys=(), admin_keys=(),
            api_key_hashes=self.api_key_hashes + tuple(map(hash_key, self.api_keys)),
            admin_key_hashes=self.admin_key_hashes + tuple(map(hash_key, self.admin_keys)),
        )  # fmt: skip

    @property
    def auth_enabled(self) -> bool:
        hashed = self.api_key_hashes or self.admin_key_hashes
        return bool(self.api_keys or self.admin_keys or self.api_key_file or hashed)


GIB = 2**30


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """What one project may hold at once; beyond it, 429 `quota_exceeded`. Unlike rate
    limits these do not free themselves with time: delete files, or wait for jobs to end."""

    max_files: int = 1000  # stored files, the jobs' result files included
    max_file_bytes: int = 10 * GIB  # their bytes together
    max_active_jobs: int = 8  # unfinished fine-tuning jobs, paused ones too
    retry_after_s: int = 60  # Retry-After on a quota's 429

    def __post_init__(self) -> None:
        for name in ("max_files", "max_file_bytes", "max_active_jobs", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"quota {name} must be >= 1")


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """What one TCP connection may hold before it sends a request (genserve.api.connections).

    uvicorn times out idle keep-alive connections but not a request whose headers never end
    (slowloris), and its `limit_concurrency` counts such half-sent connections against complete
    requests; these limits close them instead.
    """

    max_connections: int = 512  # beyond: the oldest idle or half-sent one is closed; else 503
    header_timeout_s: float = 10.0  # from connect / a request's first byte to its last header
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this (uvicorn's)
    max_header_bytes: int = 64 * 1024  # request line + headers; larger: 431 and close

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.header_timeout_s <= 0 or self.keep_alive_s <= 0:
            raise ValueError("header_timeout_s and keep_alive_s must be > 0")
        if self.max_header_bytes < 1024:
            raise ValueError("max_header_bytes must be >= 1024")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    retry_after_s: int = 1  # Retry-After sent with 429 when the queue is full
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    connections: ConnectionConfig = field(default_factory=ConnectionConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        loopback = self.host in ("127.0.0.1", "localhost", "::1")
        sec = self.security
        if not loopback and not sec.auth_enabled and not sec.allow_unauthenticated:
            raise ValueError(
                f"refusing to serve on {self.host} without API keys: set GENSERVE_API_KEYS, "
                "GENSERVE_ADMIN_KEYS or --api-key-file, or pass --allow-unauthenticated"
            )
