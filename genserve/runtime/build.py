"""Model building: a ServerConfig -> a loaded model behind an engine (not started yet), and the
fingerprint that names what determines its outputs. Runs off the event loop."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genserve import __version__
from genserve.config import ServerConfig
from genserve.engine.batcher import MicroBatcher
from genserve.engine.client import AsyncEngine
from genserve.engine.core import EngineCore
from genserve.engine.kv_blocks import DEFAULT_BLOCK_SIZE as BLOCK
from genserve.engine.kv_blocks import KVCacheManager, PagedShape
from genserve.engine.process import EngineProcess
from genserve.engine.thread import EngineThread, passing_thread
from genserve.model import native
from genserve.model.grammar import GrammarCompiler, GrammarUnavailable
from genserve.model.hardware import KernelPolicy, detect, model_specs, policy_for
from genserve.model.loading import (
    LoadedModel,
    ModelLoadError,
    chat_template_of,
    load_model,
    load_tokenizer,
    resolve_model_ref,
)
from genserve.model.memory import device_memory
from genserve.model.runner import (
    Runner,
    fast_path_supported,
    kv_bytes_per_token,
    kv_row_elements,
)
from genserve.model.sizing import cache_shape, pool_tokens
from genserve.model.worker import ModelWorker
from genserve.runtime.engine_main import spawn_engine
from genserve.runtime.grammar_check import (
    GrammarChecks,
    HelperChecks,
    LocalChecks,
    compiler_for,
    serialized_tokenizer,
)
from genserve.runtime.limits import longest_token_bytes
from genserve.runtime.models import EmbeddingModel, ServedModel
from genserve.runtime.tokens import TokenText

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the API side needs of a built engine; crosses the pipe from the engine process."""

    name: str
    path: Path
    eos_token_ids: tuple[int, ...]
    num_slots: int
    max_len: int
    vocab_size: int  # width of the logits
    config_vocab_size: int  # the model config's, which the grammar compiler is built for
    fingerprint: str


@dataclass(slots=True)
class EngineParts:
    """A built (not started) engine and what it was built from."""

    core: EngineCore
    info: EngineInfo
    tokenizer: Any
    chat_template: str
    grammars: GrammarCompiler | GrammarUnavailable


def build_served_model(cfg: ServerConfig, child: EngineProcess | None = None) -> ServedModel:
    """Load the model and build (but do not start) its engine. Runs off the event loop.

    With `engine.own_process` (the default) the model lives in a child process
    (genserve.engine.process) and this process keeps only its tokenizer; otherwise the engine
    runs on a thread of this process. `child`: that process, already spawned for `cfg`."""
    if cfg.engine.own_process:
        return _served_by_child(cfg, child or spawn_engine(cfg, build_engine))
    parts = build_engine(cfg)
    checks = LocalChecks(parts.grammars)  # the worker reuses what these compile
    return served_model(cfg, parts.core, parts.info, parts.tokenizer, parts.chat_template, checks)


def _served_by_child(cfg: ServerConfig, child: EngineProcess) -> ServedModel:
    trust = cfg.model.trust_remote_code
    try:
        # While the child imports torch and loads the weights (a server starts ~2 s sooner);
        # where both fail, the child's error is the one raised (it checks the weights first).
        tokenizer, tokenizer_error = _tokenizer_of(cfg.model.ref, trust)
        info = child.wait_ready()
        if tokenizer_error is not None:
            raise tokenizer_error
    except BaseException:
        child.stop()
        raise
    checks = HelperChecks(
        serialized_tokenizer(tokenizer), info.config_vocab_size, info.eos_token_ids
    )
    checks.start()  # loads in the background; /health says when it is ready
    return served_model(cfg, child, info, tokenizer, chat_template_of(tokenizer), checks)


def _tokenizer_of(ref: str, trust: bool) -> tuple[Any, Exception | None]:
    try:
        return load_tokenizer(resolve_model_ref(ref), trust), None
    except Exception as e:  # noqa: BLE001 - raised after the engine's own outcome
        return None, e


def served_model(
    cfg: ServerConfig,
    core: EngineCore | EngineProcess,
    info: EngineInfo,
    tokenizer: Any,  # noqa: ANN401
    chat_template: str,
    grammars: GrammarChecks,
) -> ServedModel:
    capacity = info.num_slots + cfg.engine.max_waiting
    return ServedModel(
        id=info.name,
        created=int(time.time()),
        engine=AsyncEngine(core, max_len=info.max_len, capacity=capacity),
        path=info.path,
        tokenizer=tokenizer,
        chat_template=chat_template,
        max_len=info.max_len,
        fingerprint=info.fingerprint,
        vocab_size=info.vocab_size,
        token_text=TokenText(tokenizer),
        grammars=grammars,
        max_token_bytes=longest_token_bytes(tokenizer),
    )


@dataclass(frozen=True, slots=True)
class _RustDecoder:
    """The fast tokenizer's own decode, without transformers' wrapper around it (argument
    conversions, then a clean-up pass this tokenizer does not ask for): the detokenizer
    decodes twice a token, and at 32 streams the wrapper was 0.4 ms of a 21 ms step."""

    backend: Any

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def token_decoder(tokenizer: Any) -> Any:  # noqa: ANN401 - a transformers tokenizer
    """What the engine decodes tokens with: the Rust tokenizer where transformers' decode adds
    nothing to it (a fast tokenizer with no clean-up of spaces), else the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer
    return _RustDecoder(backend)


def build_engine(cfg: ServerConfig) -> EngineParts:
    """The model loaded, its worker and engine built, on the thread that will step it (see
    genserve.engine.thread for why). Runs in whichever process will run the engine."""
    mc = cfg.model
    native.set_enabled(cfg.engine.native_kernels)
    thread = EngineThread()
    try:
        loaded = thread.call(
            lambda: load_model(
                mc.ref,
                mc.dtype,
                mc.device,
                mc.trust_remote_code,
                mc.allow_pickle,
                mc.served_name,
                Path(cfg.storage.data_dir) / "cache",
            )
        )
        slots, max_len, paged = cache_plan(cfg, loaded)
        vocab = loaded.model.config.vocab_size
        grammars = grammar_compiler(loaded.tokenizer, vocab, loaded.eos_token_ids, loaded.name)
        worker = thread.call(
            lambda: ModelWorker(
                loaded, slots, max_len, cfg.engine.fast_path, cfg.engine.batch_invariant,
                grammars, kernel_policy(loaded, cfg, paged.max_seqs, max_len), paged,
                compile_decode=cfg.engine.compile_decode,
                adaptive_threads=cfg.engine.adaptive_threads,
            )
        )  # fmt: skip
    except BaseException:
        thread.close()
        raise
    runner = worker.runner
    kv = kv_manager(runner, paged, cfg.engine.prefix_caching, max_len)
    _log_cache(loaded, runner, kv, max_len)
    core = EngineCore(
        worker,
        token_decoder(loaded.tokenizer),
        num_slots=runner.num_slots,
        token_budget=cfg.engine.max_num_batched_tokens,
        publish=lambda _: None,  # replaced by AsyncEngine.start (or the engine process)
        batch_invariant=cfg.engine.batch_invariant,
        thread=thread,
        kv=kv,
    )
    info = EngineInfo(
        name=loaded.name,
        path=loaded.path,
        eos_token_ids=loaded.eos_token_ids,
        num_slots=runner.num_slots,
        max_len=max_len,
        vocab_size=worker.vocab_size,
        config_vocab_size=vocab,
        fingerprint=fingerprint(
            loaded,
            type(runner).__name__,
            cfg.engine.batch_invariant,
            getattr(runner, "policy", None),
            attention_choices(runner),
        ),  # fmt: skip
    )
    return EngineParts(core, info, loaded.tokenizer, loaded.chat_template, grammars)


def cache_plan(cfg: ServerConfig, loaded: LoadedModel) -> tuple[int, int, PagedShape]:
    """Slots, longest sequence and KV pool shape; a model that does not fit the configured
    cache is a load error (the operator's to fix), not a crash."""
    try:
        slots, max_len = cache_shape(cfg.engine, loaded.max_context)
        # Rounded up: a pool of at least max_len tokens always holds one sequence of max_len.
        tokens = kv_pool_tokens(cfg, loaded, max_len)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    return slots, max_len, PagedShape(cfg.engine.max_batch_size, -(-tokens // BLOCK))


def kv_pool_tokens(cfg: ServerConfig, loaded: LoadedModel, max_len: int) -> int:
    """The KV pool's tokens (model.sizing.pool_tokens); on a GPU, from its free memory now
    that the weights are on it, keeping room for the runner's stacked copies (made before it
    frees the originals) and for a full step's activations and logits."""
    model = loaded.model
    device = device_memory(model.device)
    if device is None:
        return pool_tokens(cfg.engine, max_len)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    width = (
        4 * c.hidden_size + 2 * getattr(c, "intermediate_size", 4 * c.hidden_size) + c.vocab_size
    )
    activations = cfg.engine.max_num_batched_tokens * width * 4  # fp32 at worst
    per_token = kv_bytes_per_token(c, model.dtype)
    return pool_tokens(
        cfg.engine, max_len, device, per_token, weights + activations, kv_row_elements(c)
    )


def kv_manager(runner: Runner, paged: PagedShape, caching: bool, max_len: int) -> KVCacheManager:
    """The engine's view of the runner's KV cache: the paged runner's block pool, prefix
    caching as configured; for a runner with static slots, blocks enough for every slot to
    hold max_len (so admission still counts blocks, and never preempts), nothing shared."""
    if runner.paged:  # one lane per slot: see engine/kv_blocks.py
        return KVCacheManager(paged.num_blocks, paged.block_size, caching, lanes=runner.num_slots)
    per_slot = -(-max_len // paged.block_size)
    return KVCacheManager(runner.num_slots * per_slot, paged.block_size, caching=False)


def grammar_compiler(
    tokenizer: Any,  # noqa: ANN401
    vocab: int,
    eos_ids: tuple[int, ...],
    name: str,
) -> GrammarCompiler | GrammarUnavailable:
    """The model's grammar compiler; when llguidance cannot read its tokenizer (a WordLevel one
    without a ByteLevel or SentencePiece decoder), the model still serves plain generation and
    response_format answers 400 with the reason (DESIGN rule 11)."""
    compiler = compiler_for(tokenizer, vocab, eos_ids)
    if isinstance(compiler, GrammarUnavailable):
        log.warning("%s: response_format is off: the grammar library failed: %s", name,
                    compiler.reason)  # fmt: skip
    return compiler


def kernel_policy(
    loaded: LoadedModel, cfg: ServerConfig, slots: int, max_len: int
) -> KernelPolicy | None:
    """The measured (or cached) kernel choice for the fast path; None off it. Runs on the
    engine thread: kernels are timed with the threads that will run them."""
    config, mc = loaded.model.config, cfg.model
    if not (cfg.engine.fast_path and fast_path_supported(config, max_len)):
        if mc.quantization != "none":
            log.warning("%s: --quantization %s needs the Llama-family fast path; serving "
                        "unquantized", loaded.name, mc.quantization)  # fmt: skip
        return None
    chunk = cfg.engine.max_num_batched_tokens
    specs = model_specs(config, chunk, slots)
    policy = policy_for(
        specs, loaded.dtype, mc.quantization, loaded.device, chunk, slots,
        Path(cfg.storage.data_dir) / "cache",
    )  # fmt: skip
    log.info("kernels %s: %s, %.2fs; %s", detect(loaded.device).line(), policy.summary(),
             policy.seconds, policy.against_linear())  # fmt: skip
    return policy


def fingerprint(
    loaded: LoadedModel, runner: str, deterministic: bool, policy: KernelPolicy | None = None,
    attention: Sequence[str] = (),
) -> str:  # fmt: skip
    """Names the configuration that determines outputs, as OpenAI's system_fingerprint does:
    with measured kernels, which kernel runs which rows (a faster one on another machine
    sums in another order) and whether the weights are quantized; `attention`: the runner's
    attention kernels, also chosen by measurement at each start (attention_choices)."""
    import torch

    weights = sorted((p.name, p.stat().st_size) for p in loaded.path.glob("*.safetensors"))
    parts = [__version__, torch.__version__, runner, str(loaded.dtype), loaded.device.type]
    if loaded.device.type == "cuda":  # another GPU model picks other kernels (issue 20)
        parts.append(torch.cuda.get_device_name(loaded.device))
    parts.append("deterministic" if deterministic else "plain")
    if policy is not None:
        parts.append(f"kernels-{policy.tag()}")
    parts.extend(attention)
    digest = hashlib.sha256(repr((parts, weights, loaded.name)).encode()).hexdigest()
    return f"fp_{digest[:10]}"


def attention_choices(runner: object) -> tuple[str, ...]:
    """The attention kernels a runner chose at its start that seeded rows run through
    (LlamaRunner: flex or per-sequence, and SDPA or genserve's kernels for prompt chunks,
    measured): a prompt row's bits differ between them, so seeded outputs are promised per
    choice, and the choice is named. Decode lanes (attend.c or SDPA) serve free rows only."""
    chosen = ((n, getattr(runner, n, None)) for n in ("attention", "prompt_attention"))
    return tuple(f"{n}-{v}" for n, v in chosen if isinstance(v, str))


def _log_cache(loaded: LoadedModel, runner: Runner, kv: KVCacheManager, max_len: int) -> None:
    tokens = kv.pool.num_blocks * kv.block_size
    gib = kv_bytes_per_token(loaded.model.config, loaded.dtype) * tokens / 2**30
    log.info(
        "serving %s from %s on %s (%s, %s): KV cache of %d blocks x %d tokens = %.2f GiB, "
        "up to %d sequences of %d tokens, prefix caching %s",
        loaded.name, loaded.path, loaded.device, loaded.dtype, type(runner).__name__,
        kv.pool.num_blocks, kv.block_size, gib, runner.num_slots, max_len,
        "on" if kv.caching else "off",
    )  # fmt: skip


def build_embedding_model(ref: str, model_id: str, device: str = "auto") -> EmbeddingModel:
    from genserve.model.embedder import Embedder

    # Loaded and run on passing threads: an OpenMP pool left on a thread that outlives its
    # work slows every decode step of the generation engines (genserve.engine.thread).
    embedder = passing_thread(lambda: Embedder(ref, device))
    return EmbeddingModel(
        id=model_id,
        created=int(time.time()),
        batcher=MicroBatcher(lambda batch: passing_thread(lambda: embedder.embed(batch))),
        tokenize=embedder.tokenize,
        dimensions=embedder.dimensions,
        max_len=embedder.max_len,
        vocab_size=int(embedder.model.config.vocab_size),
    )
