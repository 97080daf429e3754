"""genserve on Ray Serve: N engine replicas, one control replica, the OpenAI edge as ingress.

    Ray's HTTP proxy -> edge (ingress) --handle--> engine replica x N   (generation, tokenize)
                                       \\-handle--> control replica x 1 (files, jobs, /v1/models)

- Every replica runs the whole genserve app (create_app) in-process, lifespan included: its own
  engine, its own middleware (API keys, limits, request ids). The edge only buffers a request,
  picks a deployment, and streams the reply back; it never imports torch.
- A request whose `model` is a fine-tuned id (`ft:...`) goes out with that id as Serve's
  multiplexed model id: Serve routes it to a replica that already holds the adapter, and a
  replica that does not loads it on demand (`@serve.multiplexed`, LRU-bounded per replica).
- The control replica owns the store (SQLite + files under --data-dir) and runs the
  fine-tuning manager, so exactly one process writes the database; with a control resource
  (RayOptions.control_resource, a custom resource only the chosen node has) it always lands on
  that node, so the store never moves. Each training run is a Ray task (genserve.ray.training)
  on whichever node has the CPUs; its inputs and results travel through Ray's object store.
- No filesystem is shared: engine replicas get a private scratch data dir (under their node's
  TMPDIR) and fetch an adapter's files from the control replica into it. Rate limits,
  /metrics and token usage are kept once for the deployment through the control replica
  (genserve.ray.shared), and so are stored Responses, stored chat completions and
  conversations (genserve.ray.records). A background response runs on the engine replica that
  started it and writes its state and events to that store as it goes; another replica reads
  them there, and records a cancel there for the running one to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genserve.api.errors import APIError, bad_request
from genserve.api.middleware import is_upload
from genserve.config import ServerConfig
from genserve.ray.bridge import (
    HTTPRequest,
    ResponseStart,
    call_app,
    lifespan,
    read_body,
    reply_error,
)
from genserve.ray.records import (
    RemoteCompletions,
    RemoteConversations,
    RemoteResponses,
    StoreCall,
    Stores,
    answer,
)
from genserve.ray.shared import (
    Admission,
    ControlLimits,
    ForwardedLedger,
    MetricsBoard,
    admit_here,
    merge_metrics,
    record_usage_here,
    report_metrics_forever,
    send_usage_forever,
    spend_here,
)
from genserve.ray.transfer import Folder, pack, unpack
from genserve.runtime.batches import BatchCall, BatchReply
from genserve.runtime.errors import DomainError

if TYPE_CHECKING:
    from genserve.api.auth import KeyRecord
    from genserve.runtime.models import AdapterSpec
    from genserve.storage.usage import UsageRow

log = logging.getLogger(__name__)

APP_NAME = "genserve"
ENGINE, CONTROL, EDGE = "engine", "control", "edge"
REPLICA_HEADER = b"x-genserve-replica"
READY_TIMEOUT_S = 900.0  # a replica that has not loaded its model by then is replaced
LAST_USAGE_SEND_S = 0.5  # an engine replica's last send of token usage, at shutdown
ADAPTER_RECHECK_S = 5.0  # how stale an engine replica's view of a deleted adapter may be
# The usage API reads the shared store, where every engine replica's counts end up; batches
# are kept there too (their lines run on the engine replicas: EngineBatches).
CONTROL_PREFIXES = (
    "/v1/batches", "/v1/files", "/v1/uploads", "/v1/fine_tuning", "/v1/models",
    "/v1/organization/usage",
)  # fmt: skip
UPLOAD_SLACK = 2**20  # multipart framing around an upload's bytes


@dataclass(frozen=True, slots=True)
class RayOptions:
    """How genserve is laid out on Ray; the model and API settings stay in ServerConfig."""

    replicas: int = 1  # engine replicas (one engine each)
    address: str | None = None  # an existing cluster ("auto", "host:6379"); None: start one here
    replica_cpus: float | None = None  # CPUs per engine replica; None: 1, or a share of a local Ray
    # GPUs per engine replica and per training task when the model runs on CUDA (fractional:
    # replicas share a GPU); none are asked for on a CPU.
    replica_gpus: float = 1.0
    training_gpus: float = 1.0
    max_adapters_per_replica: int = 8  # fine-tuned adapters a replica keeps (LRU beyond)
    # Custom resources (`ray start --resources '{"name": 1}'`) that place the control replica
    # (its node keeps SQLite and the files) and the training tasks; None: anywhere.
    control_resource: str | None = None
    training_resource: str | None = None
    replicas_per_node: int | None = None  # engine replicas one node may hold (None: any)
    edge_replicas: int = 1
    control_cpus: float = 0.0  # the control replica mostly waits; training is a Ray task apart
    local_cpus: int | None = None  # a local Ray's CPUs (default: this machine's)
    object_store_mb: int = 200  # a local Ray's object store; requests pass through it
    log_level: str = "info"  # genserve's own loggers inside the replicas (to their stderr)

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.edge_replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.replica_cpus is not None and self.replica_cpus < 0:
            raise ValueError("replica_cpus must be >= 0")
        if self.replica_gpus <= 0 or self.training_gpus < 0:
            raise ValueError("replica_gpus must be > 0 and training_gpus >= 0")
        if self.replica_gpus > 1 and self.replica_gpus != int(self.replica_gpus):
            raise ValueError("replica_gpus above 1 must be a whole number (Ray's rule)")
        if self.max_adapters_per_replica < 1:
            raise ValueError("max_adapters_per_replica must be >= 1")
        if self.replicas_per_node is not None and self.replicas_per_node < 1:
            raise ValueError("replicas_per_node must be >= 1")
        if self.object_store_mb < 80:
            raise ValueError("object_store_mb must be >= 80 (Ray's minimum is 75 MB)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log level {self.log_level!r}")

    def cpus_per_replica(self) -> float:
        if self.replica_cpus is not None:
            return self.replica_cpus
        if self.address is not None:
            return 1.0
        return min(1.0, (self.local_cpus or os.cpu_count() or 1) / self.replicas)


@dataclass(frozen=True, slots=True)
class Resources:
    """What one replica or task asks Ray for. Ray hides the GPUs an actor did not ask for
    (CUDA_VISIBLE_DEVICES), so a model on CUDA must ask for its share or it sees none."""

    num_cpus: float
    num_gpus: float = 0.0
    custom: dict[str, float] = dataclasses.field(default_factory=dict)  # placement resources

    def options(self) -> dict[str, Any]:
        asked: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        return {**asked, "resources": self.custom} if self.custom else asked


# How much of a placement resource one replica or task asks for: a sliver, so that the node
# that has it (say with 1) takes any number of them.
PLACEMENT_SHARE = 0.001


def placement(resource: str | None) -> dict[str, float]:
    return {resource: PLACEMENT_SHARE} if resource else {}


@dataclass(frozen=True, slots=True)
class Layout:
    engine: Resources
    control: Resources
    training: Resources


def on_cuda(device: str, cluster_gpus: float) -> bool:
    """Whether replicas run their models on CUDA: --device cuda, or auto on a cluster that has
    GPUs (the driver's own GPUs say nothing about the nodes replicas land on)."""
    return device == "cuda" or (device == "auto" and cluster_gpus > 0)


def layout(config: ServerConfig, options: RayOptions, cluster_gpus: float) -> Layout:
    """Resources of each role. On CUDA, engine replicas and training tasks ask for GPUs; the
    control replica never does: its engine only backs the model list and the fine-tuning
    manager, so its model loads on the CPU (control_config) and leaves the GPUs to serving."""
    gpu = on_cuda(config.model.device, cluster_gpus)
    training_gpus = options.training_gpus if gpu else 0.0
    return Layout(
        engine=Resources(options.cpus_per_replica(), options.replica_gpus if gpu else 0.0),
        control=Resources(options.control_cpus, custom=placement(options.control_resource)),
        training=Resources(
            training_cpus(config), training_gpus, placement(options.training_resource)
        ),
    )


# --- per-role configs ------------------------------------------------------------------------


def _replace(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace with only the fields this version of the config has."""
    names = {f.name for f in dataclasses.fields(obj)}
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if k in names})


def absolute_paths(config: ServerConfig) -> ServerConfig:
    """Paths as the driver meant them: a replica's working directory is Ray's, not ours."""
    model, storage, security = config.model, config.storage, config.security
    ref = os.path.abspath(model.ref) if os.path.exists(model.ref) else model.ref
    loras = tuple((name, os.path.abspath(path)) for name, path in model.lora_modules)
    key_file = security.api_key_file and os.path.abspath(security.api_key_file)
    dirs = {k: os.path.abspath(getattr(storage, k)) for k in ("data_dir", "models_dir")
            if hasattr(storage, k)}  # fmt: skip
    return _replace(
        config,
        model=_replace(model, ref=ref, lora_modules=loras),
        storage=_replace(storage, **dirs),
        security=_replace(security, api_key_file=key_file),
    )


def hashed_keys(config: ServerConfig) -> ServerConfig:
    """GENSERVE_API_KEYS / GENSERVE_ADMIN_KEYS as their SHA-256 digests: a deployment's init
    arguments are stored by Ray and shown by its state API and dashboard, so plaintext keys
    must not be among them (the replicas only ever compare hashes)."""
    return _replace(config, security=config.security.hashed())


def engine_config(config: ServerConfig, scratch: str) -> ServerConfig:
    """An engine replica: no store of its own beyond a private scratch dir, no training. Its
    engine runs on a thread of the replica: the replica is a process of its own already, with
    HTTP parsed in the edge's, and a child process outside Ray's accounting made a local
    Ray's shutdown 5 s slower."""
    storage = _replace(config.storage, data_dir=scratch)
    training = _replace(config.training, enabled=False)
    engine = _replace(config.engine, own_process=False)
    return _replace(config, storage=storage, training=training, engine=engine)


def control_config(config: ServerConfig) -> ServerConfig:
    """The control replica: the shared store and the trainer; its engine only backs the
    fine-tuning manager (base weights, chat template) and the model list, so one slot, on the
    CPU (it asks Ray for no GPU: see layout). Training keeps the operator's device choice."""
    engine = _replace(config.engine, max_batch_size=1, kv_cache_tokens=None, own_process=False)
    model = _replace(config.model, embedding_model=None, device="cpu")
    device = config.training.device or config.model.device
    training = _replace(config.training, device=device)
    return _replace(config, engine=engine, model=model, training=training)


# --- replicas --------------------------------------------------------------------------------


async def wait_ready(runtime: Any, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not runtime.ready:
        if runtime.load_error:
            raise RuntimeError(f"model failed to load: {runtime.load_error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"model not loaded after {timeout_s:.0f}s")
        await asyncio.sleep(0.05)


def log_to_stderr(level: str) -> None:
    """Ray configures its own loggers in a replica, not genserve's: send those to stderr,
    which Ray keeps in the worker's log file and shows on the driver's console."""
    logger = logging.getLogger("genserve")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def replica_name() -> str:
    from ray import serve

    ctx = serve.get_replica_context()
    return f"{ctx.deployment}#{ctx.replica_id.unique_id}"


class AppReplica:
    """One genserve app inside a Serve replica, its lifespan entered before traffic comes:
    Serve marks the replica RUNNING only once __init__ returns, i.e. once the model is loaded."""

    async def _start(
        self,
        config: ServerConfig,
        log_level: str,
        launcher: Any = None,  # noqa: ANN401
        batch_handler: Any = None,  # noqa: ANN401 - runs a batch's lines elsewhere
    ) -> None:
        from genserve.api.app import create_app

        log_to_stderr(log_level)
        self.app = create_app(config)
        self.runtime = self.app.state.runtime
        self.runtime.training_launcher = launcher
        if batch_handler is not None:  # before the lifespan: it starts the batch runner
            self.runtime.batch_handler = batch_handler
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        await wait_ready(self.runtime)
        self.name = replica_name()
        self._headers = ((REPLICA_HEADER, self.name.encode()),)
        log.info("replica %s ready", self.name)

    async def handle_http(self, req: HTTPRequest):  # noqa: ANN201 - an async generator
        async for item in call_app(self.app, req, self._headers):
            yield item

    def check_health(self) -> None:
        """Serve calls this periodically; raising gets the replica replaced."""
        if self.runtime.load_error:
            raise RuntimeError(f"model failed to load: {self.runtime.load_error}")

    async def __del__(self) -> None:
        if hasattr(self, "_lifespan"):
            await self._lifespan.aclose()


class UnknownAdapter(LookupError):
    """No served fine-tuned model has this id (never trained, failed, or deleted)."""


class ServedAdapter:
    """What the multiplexed loader returns. Serve calls __del__ (in a worker thread) when it
    evicts the adapter from this replica; the adapter is then unloaded from the engine."""

    def __init__(self, runtime: Any, model_id: str, folder: Path) -> None:  # noqa: ANN401
        self.runtime = runtime
        self.model_id = model_id
        self.folder = folder  # the replica's copy of its files
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.released = False

    def __del__(self) -> None:
        if self.released or threading.get_ident() == self.loop_thread:
            return  # already unloaded, or garbage collected as the replica goes away
        self.released = True
        with contextlib.suppress(Exception):
            unload = self.runtime.unregister_adapter(self.model_id)
            asyncio.run_coroutine_threadsafe(unload, self.loop).result(timeout=30)
            log.info("evicted adapter %s", self.model_id)
        shutil.rmtree(self.folder, ignore_errors=True)


SCRATCH_PREFIX = "genserve-replica-"


def scratch_dir() -> tuple[str, int]:
    """A new engine replica's scratch dir (its data dir and the adapters it fetched), and the
    descriptor of the lock it holds on it while it lives. The dirs whose lock no process
    holds are removed first: a replica killed (a node's OOM killer, `ray.kill`, a crash)
    could not remove its own, and each left its adapters' weights in the node's TMPDIR.

    A lock, not a pid: the kernel drops it with its process, whatever pid namespace shares
    the TMPDIR. The dir gets its name only once locked (a rename), so no sweep meets it
    unlocked."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{SCRATCH_PREFIX}*"):
        if _abandoned(old / ".lock"):
            log.info("removing %s, left by a replica that is gone", old)
            shutil.rmtree(old, ignore_errors=True)
    new = Path(tempfile.mkdtemp(prefix=f".{SCRATCH_PREFIX}"))
    fd = os.open(new / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    final = new.with_name(new.name[1:])
    new.rename(final)
    return str(final), fd


def _abandoned(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:  # no lock file (another kind of dir), or another user's
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its replica lives
        return False
    finally:
        os.close(fd)  # (a lock taken here goes with it)
    return True


class EngineReplica(AppReplica):
    async def __init__(self, config: ServerConfig, control: Any, options: RayOptions) -> None:
        from ray import serve

        # Under the node's TMPDIR: this replica's own disk, whatever node it lands on.
        self._scratch, self._scratch_lock = scratch_dir()
        await self._start(engine_config(config, self._scratch), options.log_level)
        self.control = control
        self._checked: dict[str, float] = {}
        self.app.state.edge.limits = ControlLimits(control)
        # Stored where every replica finds them: the control replica's store.
        self.runtime.responses = RemoteResponses(control)
        self.runtime.completions = RemoteCompletions(control)
        self.runtime.conversations = RemoteConversations(control)
        render = self.app.state.metrics.render
        self._reporter = asyncio.create_task(report_metrics_forever(control, self.name, render))
        self._usage: ForwardedLedger | None = None
        if self.runtime.usage is not None:  # its requests count on the control replica
            self._usage = ForwardedLedger(self.runtime.usage.db)
            self.runtime.usage = self._usage
            self._sender = asyncio.create_task(send_usage_forever(control, self._usage))

        async def load(model_id: str) -> ServedAdapter:
            return await self._load_adapter(model_id)

        held = options.max_adapters_per_replica
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=held)(load)

    async def batch_call(self, call: BatchCall) -> BatchReply:
        """One line of a batch the control replica runs (EngineBatches): answered here as its
        online call would be, its tokens counted for its project like a line on one node."""
        from ray import serve

        from genserve.api.batches import handle

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._ensure_adapter(model_id)
        return await handle(self.runtime, call)

    async def handle_http(self, req: HTTPRequest):  # noqa: ANN201 - an async generator
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._ensure_adapter(model_id)
        async for item in call_app(self.app, req, self._headers):
            yield item

    async def _load_adapter(self, model_id: str) -> ServedAdapter:
        """The adapter's files, fetched from the control replica into this replica's scratch
        dir (no node reads another's disk), then loaded into the engine."""
        folder = Path(self._scratch) / "adapters" / hashlib.sha256(model_id.encode()).hexdigest()
        if model_id not in self.runtime.adapters:
            shipped: ShippedAdapter | None = await self.control.adapter_files.remote(model_id)
            if shipped is None:
                raise UnknownAdapter(model_id)
            await asyncio.to_thread(unpack, shipped.files, folder)
            await self.runtime.register_adapter(dataclasses.replace(shipped.spec, path=folder))
            log.info("%s loaded adapter %s", self.name, model_id)
        self._checked[model_id] = time.monotonic()
        return ServedAdapter(self.runtime, model_id, folder)

    async def _ensure_adapter(self, model_id: str) -> None:
        """Load the adapter unless held; then the app answers (404 if it is not served)."""
        try:
            await self.load_adapter(model_id)
        except UnknownAdapter:
            return
        except Exception:  # noqa: BLE001 - the app answers for the model it cannot find
            log.exception("%s could not load adapter %s", self.name, model_id)
            return
        if time.monotonic() - self._checked.get(model_id, 0.0) < ADAPTER_RECHECK_S:
            return
        self._checked[model_id] = time.monotonic()
        try:
            spec = await self.control.resolve_adapter.remote(model_id)
        except Exception:  # noqa: BLE001 - the control replica restarting: keep serving it
            log.warning("%s could not re-check adapter %s", self.name, model_id)
            return
        if spec is None:  # deleted meanwhile
            with contextlib.suppress(DomainError):
                held = await self.runtime.unregister_adapter(model_id)
                shutil.rmtree(held.path, ignore_errors=True)

    async def __del__(self) -> None:
        if hasattr(self, "_reporter"):
            self._reporter.cancel()
        if hasattr(self, "_sender"):
            self._sender.cancel()
        await AppReplica.__del__(self)
        await self._send_last_usage()
        shutil.rmtree(self._scratch, ignore_errors=True)
        os.close(self._scratch_lock)

    async def _send_last_usage(self) -> None:
        """What the requests drained at shutdown counted (the control replica may be going
        too: then those counts are lost, as a crash loses an unflushed minute on one node)."""
        usage: ForwardedLedger | None = getattr(self, "_usage", None)
        if usage is None:
            return
        try:
            # Bounded: a handle's call to a control replica already stopped waits for a new
            # one that never comes, and would hold this replica's shutdown.
            await asyncio.wait_for(usage.send(self.control), LAST_USAGE_SEND_S)
        except Exception as e:  # noqa: BLE001 - a timeout too
            log.warning("%s could not send its last token usage: %r", self.name, e)


class ControlReplica(AppReplica):
    async def __init__(
        self, config: ServerConfig, options: RayOptions, training: Resources
    ) -> None:
        from genserve.ray.training import launch_ray_task

        # Each fine-tuning run is a Ray task, placed wherever the cluster has the CPUs (and the
        # GPU share, on CUDA; and the training resource, if the operator named one).
        launcher = functools.partial(
            launch_ray_task, gpus=training.num_gpus, resources=training.custom
        )
        await self._start(control_config(config), options.log_level, launcher, EngineBatches())
        self.board = MetricsBoard()

    def resolve_adapter(self, model_id: str) -> Any:
        """The AdapterSpec this deployment serves under model_id, or None."""
        return self.runtime.adapters.get(model_id)

    async def adapter_files(self, model_id: str) -> ShippedAdapter | None:
        """An adapter as an engine replica on any node receives it: its spec and its files."""
        spec = self.runtime.adapters.get(model_id)
        if spec is None:
            return None
        return ShippedAdapter(spec, await asyncio.to_thread(pack, Path(spec.path)))

    def admit(self, record: KeyRecord) -> Admission:
        """Count one request of a rate-limited key, for whichever replica received it."""
        return admit_here(self.app.state.edge.keys, record)

    def spend(self, record: KeyRecord, tokens: int) -> None:
        spend_here(self.app.state.edge.keys, record, tokens)

    def report_metrics(self, replica: str, text: str) -> None:
        self.board.report(replica, text)

    async def store_call(self, call: StoreCall) -> Any:  # noqa: ANN401 - per operation
        """An engine replica's operation on stored responses, chat completions or
        conversations, in the one shared store (on a thread: each is a SQLite transaction, and
        this replica's loop serves every other)."""
        if self.runtime.database is None:
            raise RuntimeError(
                f"the control replica's store did not open: {self.runtime.storage_error}"
            )
        return await asyncio.to_thread(answer, Stores.over(self.runtime.database), call)

    def record_usage(self, rows: list[UsageRow]) -> None:
        """An engine replica's token usage, for the usage API (answered here)."""
        record_usage_here(self.runtime.usage, rows)

    def metrics_texts(self) -> dict[str, str]:
        """Every live replica's metrics, this one's included."""
        return {**self.board.texts(), self.name: self.app.state.metrics.render().decode()}


class EngineBatches:
    """The control replica's batch handler: it keeps the batches (their files are in its
    store) and sends each line to an engine replica, through Serve's router and, for a
    fine-tuned model, its multiplexing, as the edge sends a request."""

    def __init__(self) -> None:
        self._engine: Any = None

    def engine(self) -> Any:  # noqa: ANN401 - a Serve deployment handle
        # Looked up on first use: the engine deployment is built after this one (it takes
        # this replica's handle), and a batch resumed at start-up waits for it here.
        if self._engine is None:
            from ray import serve

            self._engine = serve.get_deployment_handle(ENGINE, APP_NAME)
        return self._engine

    async def __call__(self, call: BatchCall) -> BatchReply:
        from ray.exceptions import RayError, RayTaskError
        from ray.serve.exceptions import RayServeException

        model = call.body.get("model")
        adapter = model if isinstance(model, str) and model.startswith("ft:") else ""
        try:
            handle = self.engine().options(multiplexed_model_id=adapter)
            return await handle.batch_call.remote(call)
        except (RayError, RayServeException) as e:
            # A replica that died or is not up yet: the line runs again later, as a line that
            # met a full engine does; a bug in the replica's code fails it (RayTaskError).
            if isinstance(e, RayTaskError):
                log.exception("batch line failed on an engine replica")
                body = {"error": {"message": "the server had an error", "type": "server_error",
                                  "param": None, "code": None}}  # fmt: skip
                return BatchReply(500, body)
            log.warning("batch line will be retried: %s", e)
            return BatchReply(503, {}, retry=True)


@dataclass(frozen=True, slots=True)
class ShippedAdapter:
    spec: AdapterSpec  # its path is the control replica's: the receiver sets its own
    files: Folder


# --- the edge (ingress) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_request_bytes: int
    max_upload_bytes: int


def edge_limits(config: ServerConfig) -> EdgeLimits:
    upload = config.storage.max_file_bytes + UPLOAD_SLACK
    return EdgeLimits(config.security.max_request_bytes, upload)


def unsupported_on_ray(req: HTTPRequest) -> APIError | None:
    """What a deployment cannot serve coherently, refused up front with a 400:
    - base models are fixed per deployment: loading one at run time on one replica would leave
      the others without it (listing, reading and deleting fine-tuned models work), and so
      are adapters loaded from a path (vLLM's routes; fine-tuned ones are served).
    Stored responses (background ones too), stored chat completions and conversations are
    served: they are kept in the control replica's store (genserve/ray/records.py); so are
    batches, whose lines the engine replicas run (EngineBatches)."""
    if req.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        return _refused("adapters are served at run time only on one node; use --lora-modules")
    if not req.path.startswith("/v1/models") or req.method in ("GET", "HEAD"):
        return None
    model = req.path.removeprefix("/v1/models").lstrip("/")
    if req.method == "DELETE" and model.startswith("ft:"):
        return None
    return _refused(
        "registering, changing or unloading base models at run time is not supported under "
        "Ray Serve; redeploy with --model instead",
        "model",
    )


def _refused(message: str, param: str | None = None) -> APIError:
    return bad_request(message, param, "unsupported_on_ray")


class Edge:
    """The ingress deployment; Serve asks it for its ASGI app once the replica starts."""

    def __init__(self, engine: Any, control: Any, limits: EdgeLimits) -> None:
        self.edge = EdgeApp(engine, control, limits)

    def __serve_build_asgi_app__(self) -> EdgeApp:
        return self.edge


class EdgeApp:
    """The ASGI app of the ingress: buffers the request, picks engine or control, streams
    the reply."""

    def __init__(self, engine: Any, control: Any, limits: EdgeLimits) -> None:
        self.engine = engine
        self.control = control
        self.limits = limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return None
        upload = is_upload(scope)
        limit = self.limits.max_upload_bytes if upload else self.limits.max_request_bytes
        body = await read_body(receive, limit)
        if body is None:
            message = f"The request body exceeds {limit} bytes."
            return await reply_error(send, APIError(400, message, None, "request_too_large"))
        req = to_request(scope, body)
        err = unsupported_on_ray(req)
        if err is not None:
            return await reply_error(send, err)
        if req.path == "/metrics" and req.method == "GET":
            return await self.merged_metrics(req, send)
        return await self.forward(req, send)

    def route(self, req: HTTPRequest) -> Any:
        if req.path.startswith(CONTROL_PREFIXES):
            return self.control.options(stream=True)
        model = req.json_model()
        adapter = model if model and model.startswith("ft:") else ""
        return self.engine.options(stream=True, multiplexed_model_id=adapter)

    async def forward(self, req: HTTPRequest, send: Any) -> None:
        from ray.exceptions import RayError, RayTaskError
        from ray.serve.exceptions import RayServeException

        stream = self.route(req).handle_http.remote(req)
        started = finished = False
        try:
            async for item in stream:
                if isinstance(item, ResponseStart):
                    headers = [(k, v) for k, v in item.headers if k.lower() != b"x-request-id"]
                    message = {"type": "http.response.start", "status": item.status}
                    await send({**message, "headers": headers})
                    started = True
                else:
                    await send({"type": "http.response.body", "body": item, "more_body": True})
            finished = True
        except (RayError, RayServeException) as e:
            if started:
                raise  # mid-stream: the client sees a cut response, as from a crashed server
            retry = not isinstance(e, RayTaskError)  # a replica died or is unreachable
            log.warning("%s %s failed (%s): %s", req.method, req.path, type(e).__name__, e)
            return await reply_error(send, replica_error(retry))
        finally:
            if not finished:  # the client went away: the replica aborts its request
                with contextlib.suppress(Exception):
                    stream.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def merged_metrics(self, req: HTTPRequest, send: Any) -> None:
        """/metrics of the whole deployment: an engine replica answers the request (its keys,
        its errors), and a 200's body is replaced by every replica's metrics, merged."""
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        try:
            start, body = await buffered(self.engine.options(stream=True).handle_http.remote(req))
            if start.status == 200:
                body = merge_metrics(await self.control.metrics_texts.remote())
        except (RayError, RayServeException) as e:
            log.warning("/metrics failed (%s): %s", type(e).__name__, e)
            return await reply_error(send, replica_error(retry=True))
        headers = [(k, v) for k, v in start.headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def buffered(stream: Any) -> tuple[ResponseStart, bytes]:  # noqa: ANN401 - Serve's stream
    start, chunks = None, []
    async for item in stream:
        if isinstance(item, ResponseStart):
            start = item
        else:
            chunks.append(item)
    assert start is not None  # call_app always answers
    return start, b"".join(chunks)


def replica_error(retry: bool) -> APIError:
    if retry:
        message = "The replica serving this request went away; retry."
        return APIError(503, message, headers={"Retry-After": "1"})
    return APIError(500, "The server had an error while processing your request.")


def to_request(scope: dict, body: bytes) -> HTTPRequest:
    client = scope.get("client")
    return HTTPRequest(
        method=scope["method"],
        path=scope["path"],
        query_string=scope.get("query_string", b""),
        headers=tuple((bytes(k), bytes(v)) for k, v in scope.get("headers", ())),
        body=body,
        client=tuple(client) if client else None,
        scheme=scope.get("scheme", "http"),
        http_version=scope.get("http_version", "1.1"),
    )


# --- building and running --------------------------------------------------------------------


def build_app(config: ServerConfig, options: RayOptions, cluster_gpus: float = 0.0) -> Any:
    """The Serve application: edge -> (engine x N, control x 1)."""
    from ray import serve

    config = hashed_keys(absolute_paths(config))
    roles = layout(config, options, cluster_gpus)
    drain = config.security.drain_timeout_s
    common = {"graceful_shutdown_timeout_s": max(drain, 1.0), "health_check_period_s": 5.0}
    control = serve.deployment(
        ControlReplica, name=CONTROL, num_replicas=1, max_ongoing_requests=256,
        ray_actor_options=roles.control.options(), **common,
    ).bind(config, options, roles.training)  # fmt: skip
    # Serve's own queueing stays out of the way: genserve's queue answers 429 when full.
    ongoing = config.engine.max_batch_size + max(config.engine.max_waiting, 1)
    if options.replicas_per_node is not None:
        common = {**common, "max_replicas_per_node": options.replicas_per_node}
    engine = serve.deployment(
        EngineReplica, name=ENGINE, num_replicas=options.replicas, max_ongoing_requests=ongoing,
        ray_actor_options=roles.engine.options(), **common,
    ).bind(config, control, options)  # fmt: skip
    edge = serve.deployment(
        serve.ingress()(Edge), name=EDGE, num_replicas=options.edge_replicas,
        max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0},
    )  # fmt: skip
    return edge.bind(engine, control, edge_limits(config))


def connect(options: RayOptions, training_cpus: int = 0) -> bool:
    """Join the cluster at options.address, or start a small local Ray. True if started here.

    A local Ray gets `training_cpus` on top of the machine's: the engine replicas share the
    machine's CPUs, and a fine-tuning task must still find its own to be scheduled."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if options.address is not None:
        ray.init(address=options.address, namespace=APP_NAME)
        return False
    # A local Ray is the one node: it has whatever placement resources the options name.
    names = (options.control_resource, options.training_resource)
    with _termination_blocked():
        ray.init(
            num_cpus=(options.local_cpus or os.cpu_count() or 1) + training_cpus,
            resources={name: 1.0 for name in names if name},
            include_dashboard=False,
            object_store_memory=options.object_store_mb * 2**20,
            namespace=APP_NAME,
        )
    return True


@contextlib.contextmanager
def _termination_blocked() -> Iterator[None]:
    """SIGTERM blocked while a local Ray starts: its processes (GCS, raylet, and the replicas'
    workers they spawn) inherit the mask, so a SIGTERM sent to the whole process group (a
    terminal, a container's init) reaches only this driver, which then takes the app down in
    order. Without it the GCS died first and the driver waited 60 s for it (issue 20). Ray
    already blocks SIGINT in its children the same way; ray.shutdown() still ends them (it
    kills what does not terminate)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def training_cpus(config: ServerConfig) -> int:
    return config.training.threads if config.training.enabled else 0


def deploy(config: ServerConfig, options: RayOptions) -> str:
    """Connect (or start Ray), deploy, and wait until every replica has loaded its model."""
    import ray
    from ray import serve

    connect(options, training_cpus(config))
    serve.start(http_options={"host": config.host, "port": config.port})
    gpus = ray.cluster_resources().get("GPU", 0.0)
    serve.run(build_app(config, options, gpus), name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def serve_on_ray(config: ServerConfig, options: RayOptions) -> None:
    """`genserve serve --ray`: deploy, then hold until SIGINT/SIGTERM and take it down."""
    import ray
    from ray import serve

    started_here = connect(options, training_cpus(config))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = deploy(config, options)
    log.info("serving on Ray: %s (%d engine replicas)", url, options.replicas)
    stop.wait()
    began = time.monotonic()
    log.info("stopping: deleting the Serve application (in-flight requests finish first)")
    serve.delete(APP_NAME)
    log.info("application deleted in %.1fs", time.monotonic() - began)
    if started_here:
        # No serve.shutdown(): the app is gone, and ending this Ray ends Serve's controller and
        # proxies with it (several seconds less of a 30 s grace period).
        ray.shutdown()
        log.info("local Ray shut down in %.1fs", time.monotonic() - began)
