"""execute(step) -> logits for the tokens that sample.

Runners share one interface:
- `LlamaRunner`, the fast path for Llama-family models (Llama, Mistral without sliding window,
  Qwen2, SmolLM). Its KV cache is a pool of fixed-size blocks (engine/kv_blocks.py allocates
  them; a sequence's block table says where each of its positions lives), written in place: a
  step's tokens from all sequences are flattened into one [T, hidden] matrix for the
  projections (where the FLOPs are). Attention reads a sequence whose blocks are one
  contiguous run as a view of the cache (decodes in their slots' lanes: all in one batched
  call, side by side), and gathers the blocks of the others.
- `HFRunner`, for causal LMs that cannot use transformers' attention interface (remote code):
  transformers' own forward, one sequence at a time, each slot with its own DynamicCache.
Every other decoder-only model runs on `BatchedHFRunner` (genserve/model/hf_batched.py).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from genserve.engine.kv_blocks import DEFAULT_BLOCK_SIZE, lane_blocks
from genserve.engine.thread import COMPILE_THREAD
from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model import flex, hardware, kernels, native
from genserve.model.compiled import WARM_UP_ROWS, build_lone_decode, compile_lone_decode
from genserve.model.hardware import KernelPolicy, ShapePlan
from genserve.model.llama_math import Rotation, rms_norm, rope, stack_layer
from genserve.model.lora import AdapterError, BaseShape, FusedStack, LoraSet, load_adapter
from genserve.model.memory import huge_pages, return_freed_memory
from genserve.model.threads import OtherLoad, ThreadGovernor, running_on

log = logging.getLogger(__name__)

FAST_PATH_TYPES = ("llama", "mistral", "qwen2")


class Runner(Protocol):
    num_slots: int
    max_len: int
    paged: bool  # its KV cache is addressed through the engine's block tables
    compiled_decode: str  # --compile-decode: "off", "compiling", "ready" or "failed"

    def execute(self, step: StepInput) -> torch.Tensor: ...

    def release(self, slot: int) -> None: ...

    def add_adapter(self, name: str, path: Path) -> None: ...

    def remove_adapter(self, name: str) -> None: ...


# A decode.c path for a step of free decodes: the rows and their embeddings in, the final
# norm's output out (LlamaRunner._through_stack, _through_glue).
NativePath = Callable[[native.DecodeStep, torch.Tensor], torch.Tensor]


def kv_row_elements(config: Any) -> int:
    """One token's keys (or values) in one layer: kv_heads x head_dim."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv_heads * head_dim


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_row_elements(config) * elem


def fast_path_supported(config: Any, max_len: int) -> bool:
    if config.model_type not in FAST_PATH_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_len:
        return False
    return getattr(config, "hidden_act", "silu") == "silu"


def bucket(rows: int) -> int:
    """Index into hardware.BUCKETS: 1 row, 2-8, 9-64, more (a prefill chunk)."""
    return 0 if rows <= 1 else 1 if rows <= 8 else 2 if rows <= 64 else 3


class Linear:
    """y = x W^T + b, through the kernel measured fastest on this machine for the call's row
    count (a hardware.ShapePlan), or one fixed kernel for rows that must not depend on their
    batch. Without a plan: oneDNN's prepacked fp32 kernel on CPU (its default before kernels
    were measured), plain F.linear elsewhere. `quantize`: weight-only int8 (every kernel then
    computes with the same int8 weights)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        batch_hint: int,
        plan: ShapePlan | None = None,
        quantize: bool = False,
        glu: bool = False,
    ) -> None:
        plan = plan or _default_plan(weight)
        quant = kernels.quantize_int8(weight) if quantize else None
        kinds = set(plan.choices) | {plan.invariant}
        vnni = "vnni" in plan.choices[:2]  # measured faster for a few rows: decode.c's too
        if not vnni and (quant is not None or "linear" in kinds) and native.supports(weight):
            # It reads a tensor this layer holds anyway (the int8 one, or the weight F.linear
            # reads): decode.c's linear (runner._native_stack), at no memory cost.
            kinds.add("gemv")
        dense = weight
        if quant is not None and kinds - set(kernels.QUANTIZED):
            dense = quant.dequantize(weight.dtype)
        built = {k: kernels.build(k, dense, bias, quant, batch_hint, glu) for k in sorted(kinds)}
        self.by_bucket = tuple(built[k] for k in plan.choices)
        self.invariant = built[plan.invariant]
        # what decode.c reads for a batch, where the policy runs amx.c's or dp.c's packed weight
        self.tiles = _tiles_from(plan, built.get("amx")) or _tiles_from(plan, built.get("dp"))
        # and below those rows: dp.c's packed weight where the policy runs it for a lone row
        # (beside amx from two rows up: the AMX Xeon), else gemv's, where the policy built it
        gemv = built.get("vnni") if vnni else built.get("gemv")
        self.few = built["dp"] if plan.choices[0] == "dp" else gemv
        self.pad_single = plan.pad_single
        self.plan = plan

    def __call__(self, x: torch.Tensor, invariant: bool = False) -> torch.Tensor:
        if not invariant:
            return self.by_bucket[bucket(x.shape[0])](x)
        if self.plan.fixed_rows:  # no kernel here keeps a row's bits whatever its batch
            return hardware.in_fixed_rows(self.invariant, x, self.plan.fixed_rows)
        if x.shape[0] == 1 and self.pad_single:
            # This kernel sums a single row in another order than two or more (checked at
            # start-up, as is that from two rows up a row's result does not depend on the
            # others): a lone row is padded to two, so it samples the same alone or batched.
            return self.invariant(x.repeat(2, 1))[:1]
        return self.invariant(x)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a [gate; up] weight (`glu`), a free call's SiLU(gate) * up straight from amx.c's
        tiles where x's row bucket runs them; None elsewhere (the caller multiplies, then
        applies SiLU: the same bits)."""
        kernel = self.by_bucket[bucket(x.shape[0])]
        return kernel.silu_mul(x) if isinstance(kernel, native.Amx) and kernel.glu else None

    def logits(self, x: torch.Tensor, invariant: bool = False) -> torch.Tensor:
        """A model's logits in float32. genserve's own kernels write their float32 sums as they
        are: no rounding to the model's dtype and no copy to float32 after it (32 rows of a
        49k vocabulary: the cast was 0.3 ms of a 21 ms step); other kernels' are cast."""
        kernel = self.invariant if invariant else self.by_bucket[bucket(x.shape[0])]
        wrapped = invariant and (self.plan.fixed_rows or (x.shape[0] == 1 and self.pad_single))
        if isinstance(kernel, native.Amx | native.Dp | native.Gemv) and not wrapped:
            return kernel(x, float_out=True)
        return self(x, invariant).float()


# Prompt chunks of at least this many rows may take a prompt kernel (one block of 16 rows:
# amx.c's tiles or dp.c's dot products), where the runner measured it faster than SDPA;
# shorter spans (a decode attending alone) keep SDPA.
PROMPT_TILE_ROWS = 16
PROMPT_KERNELS = {"amx": native.amx_attend_causal, "dp": native.dp_attend_causal}
BUCKET_FIRST_ROW = (1, 2, 9)  # the fewest rows of each decode bucket (see `bucket`)


def _tiles_from(plan: ShapePlan, packed: Any) -> tuple[native.Amx | native.Dp, int] | None:  # noqa: ANN401
    """amx.c's or dp.c's kernel and the fewest rows from which the policy runs it for every
    decode bucket up to 9-64 (decode.c's stack then does too), or None."""
    if not isinstance(packed, native.Amx | native.Dp):
        return None
    kind = "amx" if isinstance(packed, native.Amx) else "dp"
    decode = plan.choices[:3]
    for b in range(3):
        if all(c == kind for c in decode[b:]):
            return packed, BUCKET_FIRST_ROW[b]
    return None


def _lin_lora(fused: FusedStack | None) -> native.LinLora | None:
    """One projection's fused LoRA as decode.c reads it (B transposed: a row's sum runs
    along the outputs)."""
    if fused is None:
        return None
    owner = fused.owner.to("cpu", torch.int32).contiguous()
    a, bt = fused.a_raw.float().contiguous(), fused.b_raw.float().t().contiguous()
    return native.LinLora(a, bt, owner, fused.out.start)


def _lora_plan(weight: torch.Tensor) -> ShapePlan:
    """An adapter's rank-r product: a lone free row through plain F.linear (1.7 + 5.8 us for a
    rank-8 A and B of the bench model against 11 + 17 through oneDNN's prepacked kernel, Zen
    5); the rest, and every invariant call, as the default plan has them."""
    plan = _default_plan(weight)
    return replace(plan, choices=("linear", *plan.choices[1:]))


def _default_plan(weight: torch.Tensor) -> ShapePlan:
    fp32_onednn = kernels.onednn_ok(weight) and weight.dtype == torch.float32
    kind = "onednn" if fp32_onednn else "linear"
    return ShapePlan(*weight.shape, choices=(kind,) * 4, invariant=kind, pad_single=fp32_onednn)


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # q, k and v projections stacked: one matmul instead of three
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # gate and up projections stacked
    down: Linear


def _stack_layer(layer: Any, make: Any) -> LayerWeights:
    """`make(weight, bias, glu=False)` builds one Linear (the runner's kernels for that
    shape; `glu` for the stacked [gate; up])."""
    w = stack_layer(layer)
    return LayerWeights(
        input_norm=w.input_norm,
        qkv=make(w.qkv, w.qkv_bias),
        o=make(w.o, w.o_bias),
        post_norm=w.post_norm,
        gate_up=make(w.gate_up, None, glu=True),
        down=make(w.down, w.down_bias),
    )


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One sequence's rows in the flat batch: rows [row0, row0+n) at positions start..start+n-1."""

    row0: int
    n: int
    table: tuple[int, ...]  # the sequence's KV blocks
    start: int
    mask: torch.Tensor | None  # causal mask over the cached prefix, for later prompt chunks
    index: torch.Tensor | None = None  # the blocks holding positions 0..start+n-1, to gather
    run: int | None = None  # or the cache position of 0 when those blocks are one run


@dataclass(frozen=True, slots=True)
class LaneBatch:
    """Single-token decodes free to depend on their batch whose blocks are each the start of
    their slot's lane (engine/kv_blocks.py): lanes first..first+span-1 read side by side as
    views of the cache, with no copy. Lanes in the range without a decode are computed
    (position 0 only, so no row is all -inf) and dropped."""

    rows: torch.Tensor  # [B] rows of the flat batch that decode
    lanes: torch.Tensor  # [B] each one's lane, minus `first`
    first: int
    span: int
    length: int  # positions attended: 0..length-1
    mask: torch.Tensor  # [span, 1, 1, length] additive: 0 where visible, -inf not
    lane_ids: torch.Tensor  # [B] int32: `lanes`, for attend.c (which reads no mask)
    lengths: torch.Tensor  # [B] int32: positions each one attends


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """Single-token decodes that may depend on their batch (unseeded requests, without
    --deterministic), attended in one batched call; built once a step. Each sequence's blocks
    are gathered into [kv_heads, B, length], padded to the longest (padding reads block 0 and
    is masked out)."""

    rows: torch.Tensor  # [B] rows of the flat batch that decode
    index: torch.Tensor  # [B * blocks] each decode's blocks, padded to the longest's count
    batch: int  # B
    length: int  # positions attended: 0..length-1 (whole blocks)
    mask: torch.Tensor  # [B, 1, 1, length] additive: 0 where visible, -inf not


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    """Per-step attention metadata, built once and shared by every layer."""

    write_index: torch.Tensor  # [T * kv_heads] row of each token's key/value in a flat cache
    spans: tuple[ChunkSpan, ...]  # chunks attended one call each
    decode: DecodeBatch | None  # single-token decodes attended together (see DecodeBatch)
    lanes: LaneBatch | None  # the same, for decodes read in place from their lanes
    lora_rows: dict[str, list[tuple[int, int]]]  # adapter -> its row ranges in the flat batch
    lora_owner: torch.Tensor | None  # [T] each row's adapter index (-1: none), fused path
    # Some row must not depend on its batch (--deterministic, or a seeded request): a lone
    # row is padded to two in the linears, adapters run one pass each (not fused).
    invariant: bool = False
    flex_mask: flex.FlexMask | None = None  # the step's mask when every row attends in one call


class FlexFailed(RuntimeError):
    """FlexAttention raised inside a step (its cause says why): the runner falls back."""


class LlamaRunner:
    def __init__(
        self,
        model: Any,
        num_slots: int,
        max_len: int,
        batch_invariant: bool = True,
        policy: KernelPolicy | None = None,  # None: the fixed fp32 oneDNN kernels
        num_blocks: int | None = None,  # None: as many as num_slots sequences of max_len
        block_size: int = DEFAULT_BLOCK_SIZE,
        compile_decode: bool = False,  # a lone free decode as one compiled graph (compiled.py)
        attention: str = "auto",  # "flex" (model/flex.py), "sdpa", or "auto": by device
        adaptive_threads: bool = True,  # free decode steps' threads chosen as they run
    ) -> None:
        cfg = model.config
        self.batch_invariant = batch_invariant
        self.policy = policy
        self.num_slots, self.max_len = num_slots, max_len
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.device, self.dtype = model.device, model.dtype
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.rotary = inner.rotary_emb  # transformers' own RoPE, so every rope_scaling works
        with torch.no_grad():
            self.lm_head = self._linear(model.lm_head.weight, None)
            self.layers = [_stack_layer(layer, self._linear) for layer in inner.layers]
        self.lora = LoraSet(make_linear=self._pack, device=self.device, dtype=self._lora_dtype())
        self.base_shape = _base_shape(cfg, self.num_heads, self.num_kv_heads, self.head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks or num_slots * -(-max_len // block_size)
        self.lane_blocks = lane_blocks(self.num_blocks, num_slots)  # as the engine allocates
        self.lane_len = self.lane_blocks * block_size
        # Per layer [kv_heads, positions, head_dim]: a gather of a sequence's positions along
        # dim 1 gives [kv_heads, length, head_dim] as attention reads it, contiguous. A tensor
        # per layer, not one for all: a compiled step (model/compiled.py) writes each in place,
        # where writing through views of one tensor made it copy the whole cache per layer.
        # Rows past the allocator's blocks (cache_len): --compile-decode's warm-up writes and
        # reads there while requests run (whole blocks, so a layer still views as blocks).
        self.cache_len = self.num_blocks * block_size
        self.cache_rows = self.cache_len + -(-WARM_UP_ROWS // block_size) * block_size
        self.k_cache = [self._cache_layer() for _ in self.layers]
        self.v_cache = [self._cache_layer() for _ in self.layers]
        self.attention = _attention_kind(attention, self.device)
        self._flex = flex.attention_fn(self.device) if self.attention == "flex" else None
        self._flex_masks = (
            flex.StepMasks(block_size, self.cache_rows, self.device) if self._flex else None
        )
        if self.attention == "flex":
            self._try_flex()
        self._buffers: dict[str, torch.Tensor] = {}  # gather scratch (see _gather)
        self.lane_attention = "sdpa"  # or "native" (attend.c), where it measures faster
        self.lane_attention = self._choose_lane_attention()
        self.prompt_attention = "sdpa"  # or a PROMPT_KERNELS kind, where it measures faster
        self.prompt_attention = self._choose_prompt_attention()
        self.lone: Any = None  # the compiled lone decode, once compiled (see _compile_lone)
        self.compiled_decode = "off"  # "compiling", "ready" or "failed" with --compile-decode
        self.compiling: threading.Thread | None = None
        # decode.c's paths for steps of free decodes, per row bucket (0: one row, 1: 2-8,
        # 2: 9-64), where one measured faster than eager here (_choose_native_decode): every
        # layer in one C call (native_stack), or torch's linears with C between them (glue)
        self.native_shape = native.DecodeShape(
            cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
            cfg.intermediate_size, self.eps, self.dtype,
        )  # fmt: skip
        self.native_decode: dict[int, NativePath] = {}
        self.threads: ThreadGovernor | None = None  # set once the paths are chosen
        self.native_stack = self._native_stack()
        self._stack_lora: tuple[int, native.StackLora] | None = None  # (LoraSet.version, ...)
        self.native_glue = self._native_glue()
        self.native_decode = self._choose_native_decode()
        # The threads those steps run on, chosen as they run (model/threads.py).
        if adaptive_threads and self.native_decode:
            self.threads = ThreadGovernor(load=OtherLoad())
        if compile_decode:
            self._compile_lone(model)

    paged = True

    def _choose_lane_attention(self) -> str:
        """SDPA or attend.c for the lanes' decodes, whichever is faster here on a batch of
        lanes read in place (up to 8 lanes of up to 256 positions, this model's heads, the
        best of 5 rounds each, interleaved): no machine's numbers are assumed. On the 2-core
        AMX Xeon attend.c measured 1.48-1.67 ms a layer against SDPA's 2.78-2.84 (32 lanes
        of 528 positions, bf16), and a 32-stream step at context 512 ran 1.4x faster."""
        if self.device.type != "cpu" or self.attention != "sdpa" or native.library() is None:
            return "sdpa"
        span = min(8, self.num_slots)
        length = min(256, self.lane_len)
        if span < 2 or length < 1:
            return "sdpa"
        spans = {j: ChunkSpan(j, 1, self._table_of_lane(j), length - 1, None) for j in range(span)}
        batch = self._lane_batch(spans)
        q = torch.randn(span, self.num_heads, self.head_dim).to(self.dtype)
        out = torch.empty_like(q)

        def attend(kind: str) -> None:
            self.lane_attention = kind
            self._attend_lanes(0, q, batch, out)

        best = _best_times({k: lambda k=k: attend(k) for k in ("sdpa", "native")}, rounds=5)
        kind = min(best, key=best.__getitem__)
        log.info(
            "decode attention over lanes (%d x %d positions): sdpa %.0f us, native %.0f us: %s",
            span, length, best["sdpa"] * 1e6, best["native"] * 1e6, kind,
        )  # fmt: skip
        return kind

    def _choose_prompt_attention(self) -> str:
        """SDPA or one of genserve's prompt kernels for prompt chunks (spans of
        PROMPT_TILE_ROWS rows or more): amx.c's tiles or dp.c's AVX512-BF16 dot products,
        where they run here, whichever is fastest on one prompt chunk of up to 512 rows (this
        model's heads, layer 0's cache, the best of 3 rounds each, interleaved). A 512-token
        prompt's attention took 0.58 ms a layer on amx against SDPA's 0.9 (2-core AMX Xeon),
        0.71 ms on dp.c against SDPA's 4.2 (2-core AMD EPYC, Zen 5)."""
        kinds = [k for k, ready in self._prompt_kernels().items() if ready]
        n = min(512, self.cache_len)
        if not kinds or n < PROMPT_TILE_ROWS:
            return "sdpa"
        span = ChunkSpan(0, n, (), 0, None, run=0)
        plan = AttentionPlan(torch.empty(0, dtype=torch.long), (span,), None, None, {}, None)
        q = torch.randn(n, self.num_heads, self.head_dim).to(self.dtype)

        def attend(kind: str) -> None:
            self.prompt_attention = kind
            self._attention(0, q, plan)

        best = _best_times({k: lambda k=k: attend(k) for k in ("sdpa", *kinds)}, rounds=3)
        kind = min(best, key=best.__getitem__)
        times = ", ".join(f"{k} {t * 1e6:.0f} us" for k, t in best.items())
        log.info("prompt attention (%d rows): %s: %s", n, times, kind)
        return kind

    def _prompt_kernels(self) -> dict[str, bool]:
        """genserve's prompt attention kernels and whether each runs for this model here."""
        cpu_bf16 = (
            self.device.type == "cpu" and self.attention == "sdpa" and self.dtype == torch.bfloat16
        )
        d = self.head_dim
        return {
            "amx": cpu_bf16 and d % 32 == 0 and d <= native.AMX_ATTEND_MAX_DIM
            and native.amx_ready(),
            "dp": cpu_bf16 and d in native.DP_ATTEND_DIMS and native.dp_ready(),
        }  # fmt: skip

    def _native_offered(self) -> bool:
        """decode.c runs on the CPU's per-sequence attention path, with a measured policy (a
        runner without one keeps torch's fixed kernels), where the library built; not under
        --deterministic, where no row is free to take it."""
        cpu = self.device.type == "cpu" and self.attention == "sdpa"
        usable = self.policy is not None and not self.batch_invariant
        return cpu and usable and native.library() is not None

    def _native_glue(self) -> native.DecodeGlue | None:
        if not self._native_offered():
            return None
        try:
            return native.DecodeGlue(self.native_shape, self.cache_rows)
        except ValueError as e:
            log.info("native decode not offered: %s", e)
            return None

    def _native_stack(self) -> native.DecodeStack | None:
        """decode.c's stack where every decoder linear has a kernel for a few rows (gemv's
        weight, or dp.c's where the policy runs dp for one row) or amx.c's or dp.c's packed
        weight from one row up (the policy runs it for every row count): a step through it
        runs the small ops between the linears in C, its linears on that few-row kernel, or on
        the packed weight from the rows where the policy runs it."""
        if not self._native_offered():
            return None
        layers = []
        for w, k, v in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            lins = (w.qkv, w.o, w.gate_up, w.down)
            fns = [lin.few for lin in lins]
            tiles = tuple(lin.tiles for lin in lins)
            pairs = zip(fns, tiles, strict=True)
            if not all(fn is not None or (t is not None and t[1] <= 1) for fn, t in pairs):
                return None  # a linear with no kernel decode.c runs for a lone row
            layers.append(native.DecodeLayer(w.input_norm, w.post_norm, *fns, k, v, tiles))
        try:
            return native.DecodeStack(layers, self.native_shape)
        except ValueError as e:
            log.info("native decode not offered: %s", e)
            return None

    def _choose_native_decode(self) -> dict[int, NativePath]:
        """Per row bucket (one row; 2-8, timed at four; 9-64, at up to 32), the path that ran
        a step of decodes fastest here, eager included (128 positions each, on lanes that hold
        no request yet; the best of 3 rounds, interleaved): no machine's numbers are assumed."""
        paths: dict[str, NativePath] = {}
        if self.native_stack is not None:
            paths["stack"] = self._through_stack
        if self.native_glue is not None:
            paths["glue"] = self._through_glue
        kept: dict[int, NativePath] = {}
        length = min(128, self.lane_len)
        batches = self.native_stack is not None and all(
            lin.tiles is not None and lin.tiles[1] <= BUCKET_FIRST_ROW[2]
            for w in self.layers for lin in (w.qkv, w.o, w.gate_up, w.down)
        )  # fmt: skip
        for b, rows in ((0, 1), (1, min(4, self.num_slots)), (2, min(32, self.num_slots))):
            # 9-64 rows: the stack only where its linears run amx or dp there (gemv's are slow)
            offered = {k: v for k, v in paths.items() if b < 2 or k == "glue" or batches}
            if not offered or bucket(rows) != b or length < 2:
                continue
            tried: dict[str, NativePath | None] = {"eager": None, **offered}
            step = StepInput(tuple(
                ChunkInput(f"warm-{j}", j, (0,), length - 1, True, SamplingParams(), 0)
                for j in range(rows)
            ))  # fmt: skip

            def run(path: NativePath | None, b: int = b, step: StepInput = step) -> None:
                self.native_decode = {b: path} if path is not None else {}
                self.execute(step)

            best = _best_times({k: lambda p=p: run(p) for k, p in tried.items()}, rounds=3)
            fastest = min(best, key=best.__getitem__)
            if fastest != "eager":
                kept[b] = tried[fastest]
            log.info(
                "decode step of %d rows: %s: %s", rows,
                ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in best.items()), fastest,
            )  # fmt: skip
        self.native_decode = {}
        return kept

    def _table_of_lane(self, lane: int) -> tuple[int, ...]:
        first = lane * self.lane_blocks
        return tuple(range(first, first + self.lane_blocks))

    def _cache_layer(self) -> torch.Tensor:
        shape = (self.num_kv_heads, self.cache_rows, self.head_dim)
        # Written through once here (zero_ touches every page): a lazily mapped cache would
        # take its page faults in the middle of the first requests' steps instead.
        return huge_pages(torch.empty(shape, dtype=self.dtype, device=self.device)).zero_()

    def release(self, slot: int) -> None:
        """Nothing to free: a block's next owner overwrites what it reads."""

    def free_source_weights(self, model: Any) -> None:
        """Drop `model`'s decoder layers and head once this runner holds its own stacked (and,
        on CPU, prepacked) copies: kept beside them they cost +55% to +100% of the weights.
        The model keeps its config, embedding (read here) and rotary module; it can no longer
        run a forward of its own (nothing does: fine-tuning reads the weights from disk)."""
        model.model.layers = torch.nn.ModuleList()
        model.lm_head = torch.nn.Identity()  # tied: the embedding stays alive through self.embed
        if self.device.type == "cpu":
            return_freed_memory()

    def _compile_lone(self, model: Any) -> None:
        """Measure each weight's form now (seconds; before any request, so the timings are
        this machine's alone), then compile on a thread of its own: the server serves eager
        meanwhile (a minute or more), and steps take the graph once `lone` is set."""
        if self.device.type != "cpu":
            log.warning("--compile-decode ignored: it is built for the CPU")
            return
        try:
            module = build_lone_decode(model, self.k_cache, self.v_cache, self.eps, self.policy)
        except Exception:  # noqa: BLE001 - e.g. no C++ compiler here: serve eager, say why
            log.exception("--compile-decode failed; every step runs eager")
            self.compiled_decode = "failed"
            return
        self.compiled_decode = "compiling"
        # A thread that ends with the compile: its OpenMP pool (the warm-up runs the graph)
        # goes with it (engine/thread.py says why a second live pool slows every step).
        self.compiling = threading.Thread(
            target=self._compile, args=(module,), name=COMPILE_THREAD, daemon=True
        )
        self.compiling.start()

    def _compile(self, module: Any) -> None:
        try:
            self.lone = compile_lone_decode(module, self.rotary, self.cache_len)
            self.compiled_decode = "ready"
        except Exception:  # noqa: BLE001 - serve eager, say why
            log.exception("--compile-decode failed; every step runs eager")
            self.compiled_decode = "failed"

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        try:
            return self._execute(step)
        except FlexFailed as e:
            # A shape the load-time try did not meet (flex recompiles as the step's rows
            # change). Running the step again is safe: it rewrites the same cache rows.
            self._drop_flex(e.__cause__ or e)
            return self._execute(step)

    def _execute(self, step: StepInput) -> torch.Tensor:
        if (logits := self._native(step)) is not None:
            return logits
        if (lone := self._lone(step)) is not None:
            return lone
        if self.threads is None or any(self._invariant(c) for c in step.chunks):
            return self._eager(step)  # a seeded row's bits may not depend on the thread count
        with running_on(self.threads.untimed()):  # a core fewer while another holds one
            return self._eager(step)

    def _eager(self, step: StepInput) -> torch.Tensor:
        """A step through torch's layers (the glued stages for free prompt rows)."""
        self._copy_blocks(step)
        tokens, positions, sample_rows = self._flatten(step)
        plan = self._plan(step, positions)
        x = self.embed[tokens]
        # forward, not __call__: a --compile-decode compile on its own thread may be tracing
        # with torch.fx, which patches nn.Module.__call__ for the whole process meanwhile (a
        # step calling through it failed with "module is not installed as a submodule").
        cos, sin = self.rotary.forward(x[None], positions[None])
        if self.native_glue is not None and not plan.invariant and plan.flex_mask is None:
            h = self._glued_prompt(x, cos[0].float(), sin[0].float(), plan)
            return self.lm_head.logits(h[sample_rows], plan.invariant)
        rot = Rotation.of(cos[0], sin[0])
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, rot, plan)
        x = self._norm(x[sample_rows], self.final_norm)
        return self.lm_head.logits(x, plan.invariant)

    def _native(self, step: StepInput) -> torch.Tensor | None:
        """The logits through decode.c when every chunk is a free single-token decode whose
        blocks are one run, in a row bucket where it measured faster, else None. Free rows
        only: its norms sum in another order than torch's, so a row's bits differ from the
        eager path's, and a seeded row's must not depend on which path its batch took."""
        key = bucket(len(step.chunks))
        path = self.native_decode.get(key)
        if path is None:
            return None
        write, starts, lengths = [], [], []
        for c in step.chunks:
            if (found := self._free_decode_run(c, adapter_ok=True)) is None:
                return None
            table, run = found
            write.extend(self._rows_of(table, c.start, c.start + 1))
            starts.append(run)
            lengths.append(c.start + 1)
        # each row's adapter (LoraSet.order's index, -1 for none): its LoRA is added in C too
        order = self.lora.order
        owners = [-1 if c.adapter is None else order.index(c.adapter) for c in step.chunks]
        rows = (starts, lengths, owners if max(owners) >= 0 else None)
        self._copy_blocks(step)
        x = self.embed[torch.tensor([c.token_ids[0] for c in step.chunks])]
        cos, sin = self.rotary.forward(x[None], torch.tensor([[n - 1 for n in lengths]]))
        if self.threads is None:
            return self._native_logits(path, x, cos, sin, write, *rows)
        count = self.threads.pick(key)
        with running_on(count):
            began = time.perf_counter()
            logits = self._native_logits(path, x, cos, sin, write, *rows)
            self.threads.record(key, count, time.perf_counter() - began)
        return logits

    def _native_logits(self, path, x, cos, sin, write, starts, lengths, owners) -> torch.Tensor:  # noqa: ANN001
        """Built inside the step's thread count: decode.c's Step takes it when made."""
        rows = native.DecodeStep(
            self.native_shape, self.cache_rows, cos[0].float(), sin[0].float(), write, starts,
            lengths, owners,
        )  # fmt: skip
        return self.lm_head.logits(path(rows, x))

    def _through_stack(self, rows: native.DecodeStep, x: torch.Tensor) -> torch.Tensor:
        """Every layer in one C call (gemv's linears, amx's for a batch; the rows' adapters'
        LoRA too), then the final norm, also decode.c's (torch's rms_norm: 0.09 ms a step at
        one row under cProfile, 1.5% of an int8 step)."""
        lora = self._lora_for_stack() if rows.owners is not None else None
        self.native_stack(rows, x, lora)  # the glue exists wherever the stack does
        h = torch.empty_like(x)
        self.native_glue.norm(rows, x, self.final_norm, h)
        return h

    def _lora_for_stack(self) -> native.StackLora:
        """decode.c's layers with the loaded adapters' LoRA, made again when the set changed.
        An adapter's row took the eager path before (gemv's linears one call each): a rank-8
        adapter streamed at 0.38-0.47x of its base (Zen 5)."""
        if self._stack_lora is None or self._stack_lora[0] != self.lora.version:
            stacks = ("qkv", "o", "gate_up", "down")
            layers = range(len(self.layers))
            lora = [[_lin_lora(self.lora.fused(i, s)) for s in stacks] for i in layers]
            self._stack_lora = (self.lora.version, self.native_stack.with_lora(lora))
        return self._stack_lora[1]

    def _through_glue(self, rows: native.DecodeStep, x: torch.Tensor) -> torch.Tensor:
        """torch's linears (the policy's kernels for this many rows) with decode.c's stages
        between them, attention included: one C call each instead of a dozen small ops.
        Returns the final norm."""
        g, n = self.native_glue, x.shape[0]
        q = x.new_empty(n, self.num_heads * self.head_dim)
        att = torch.empty_like(q)

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            g.attend(rows, self.k_cache[i], self.v_cache[i], qkv, q, att)
            return att

        owner = None if rows.owners is None else rows.owners.to(self.device, torch.long)

        def project(i: int, stack: str, lin: Linear, h: torch.Tensor) -> torch.Tensor:
            y = lin(h)
            if owner is not None:
                self.lora.apply_fused(i, stack, h, y, owner)
            return y

        return self._glued_layers(x, rows, attend, project, fuse=owner is None)

    def _glued_prompt(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        """Any free step (prompt chunks, decodes beside them, adapters' rows) with decode.c's
        row-wise stages (norms, residuals, rotary and the cache writes, SiLU) around torch's
        linears and attention: a 512-token bf16 prompt took 150 ms through torch's small ops
        and 133 ms this way (2-core AMX Xeon). Free rows only, as _native: the norms sum in
        another order than torch's. Returns every row's final norm."""
        g, n, q_size = self.native_glue, x.shape[0], self.num_heads * self.head_dim
        rows = g.rows(n, cos, sin, plan.write_index[:: self.num_kv_heads])

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            g.rotate_write(rows, self.k_cache[i], self.v_cache[i], qkv)
            q = qkv[:, :q_size].view(n, self.num_heads, self.head_dim)
            return self._attention(i, q, plan).reshape(n, q_size)

        def project(i: int, stack: str, lin: Linear, h: torch.Tensor) -> torch.Tensor:
            return self._project(i, stack, lin, h, plan)

        fuse = plan.lora_owner is None and not plan.lora_rows  # no adapter adds to gate/up
        return self._glued_layers(x, rows, attend, project, fuse)

    def _glued_layers(
        self, x: torch.Tensor, rows: native.DecodeStep | native.GlueRows,
        attend: Callable[[int, torch.Tensor], torch.Tensor],
        project: Callable[[int, str, Linear, torch.Tensor], torch.Tensor],
        fuse: bool,
    ) -> torch.Tensor:  # fmt: skip
        """Every layer: `project` each linear, `attend` from a layer's qkv, and decode.c's
        row-wise stages between them. `fuse`: SiLU(gate) * up may come straight from the
        gate/up kernel (Linear.silu_mul; nothing is added to the projection). Returns every
        row's final norm."""
        g = self.native_glue
        h, act = torch.empty_like(x), x.new_empty(x.shape[0], self.native_shape.inter)
        norms = [w.input_norm for w in self.layers] + [self.final_norm]  # each layer's first
        g.norm(rows, x, norms[0], h)
        for i, w in enumerate(self.layers):
            att = attend(i, project(i, "qkv", w.qkv, h))
            g.residual_norm(rows, x, project(i, "o", w.o, att), w.post_norm, h)
            fused = w.gate_up.silu_mul(h) if fuse else None
            if fused is not None:
                act = fused
            else:
                g.silu_mul(rows, project(i, "gate_up", w.gate_up, h), act)
            # x += down(act), then the next layer's input norm (after the last: the final norm)
            g.residual_norm(rows, x, project(i, "down", w.down, act), norms[i + 1], h)
        return h

    def _lone(self, step: StepInput) -> torch.Tensor | None:
        """The compiled step's logits when this step is one free decode whose blocks are one
        run (the common one-stream step), else None."""
        if self.lone is None or len(step.chunks) != 1 or step.copies:
            return None
        c = step.chunks[0]
        if (found := self._free_decode_run(c)) is None:
            return None
        table, run = found
        token = torch.tensor(c.token_ids, device=self.device)
        cos, sin = self.rotary.forward(self.embed[token][None], torch.tensor([[c.start]]))
        write = torch.tensor(self._rows_of(table, c.start, c.start + 1))
        return self.lone(token, write, cos[0], sin[0], run + c.start + 1, c.start + 1)

    def _free_decode_run(
        self, c: ChunkInput, adapter_ok: bool = False
    ) -> tuple[tuple[int, ...], int] | None:
        """(block table, cache row of position 0) when the chunk is one free decode (of no
        adapter unless `adapter_ok`: decode.c's paths add LoRA, the compiled step does not; one
        logits row) whose blocks are one run, as the compiled and decode.c paths read them;
        else None."""
        if len(c.token_ids) != 1 or not c.start or self._invariant(c):
            return None
        if c.adapter is not None and not adapter_ok:
            return None
        table = self._table(c)
        run = self._run(table, c.start + 1)
        if run is None or c.num_logit_rows != 1:
            return None
        return table, run

    def _copy_blocks(self, step: StepInput) -> None:
        """Reused partial blocks (engine/types.py BlockCopy): every layer's rows at once."""
        bs = self.block_size
        for c in step.copies:
            src, dst = (
                slice(c.src * bs, c.src * bs + c.rows),
                slice(c.dst * bs, c.dst * bs + c.rows),
            )
            for cache in (*self.k_cache, *self.v_cache):
                cache[:, dst] = cache[:, src]

    def _flatten(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        for c in step.chunks:
            tokens.extend(c.token_ids)
            positions.extend(range(c.start, c.start + len(c.token_ids)))
            sample_rows.extend(range(len(tokens) - c.num_logit_rows, len(tokens)))
        dev = self.device
        return (
            torch.tensor(tokens, device=dev),
            torch.tensor(positions, device=dev),
            torch.tensor(sample_rows, device=dev, dtype=torch.long),
        )

    def _plan(self, step: StepInput, positions: torch.Tensor) -> AttentionPlan:
        tables = [self._table(c) for c in step.chunks]
        writes, lora, rows = self._writes_and_adapters(step, tables)
        if self.attention == "flex":
            return self._flex_plan(step, tables, writes, lora, rows)
        spans = []
        row = 0
        for c, table in zip(step.chunks, tables, strict=True):
            n = len(c.token_ids)
            mask = None
            if c.start and n > 1:  # a later prompt chunk sees the whole cached prefix
                mask = torch.ones(n, c.start + n, dtype=torch.bool, device=self.device)
                mask = mask.tril(c.start)
            spans.append(ChunkSpan(row, n, table, c.start, mask))
            row += n
        # Decodes that may share one padded call; a reproducible one attends alone.
        pooled = [
            sp for sp, c in zip(spans, step.chunks, strict=True)
            if sp.n == 1 and sp.start > 0 and not self._invariant(c)
        ]  # fmt: skip
        laned, gathered = self._split_by_lane(pooled)
        if len(laned) == 1 and self.lane_attention != "native":
            # Alone, it reads its lane as a span (one SDPA call over the view per layer, not two
            # bmm per KV head): one stream decoded 11% faster (server A/B, fp32, 2-core EPYC:
            # 22.6, 23.3, 23.8 against 22.1, 20.3, 20.2 tok/s). Where attend.c reads the lanes
            # (measured faster at start-up) a lone one goes there too: a stream the eager path
            # serves (an adapter's) spent a fifth of its step in SDPA. Free rows only: a
            # seeded row never pools, so its result does not depend on this.
            laned = {}
        lanes, decode = self._lane_batch(laned), self._decode_batch(gathered)
        batched = {sp.row0 for sp in gathered} | {sp.row0 for sp in laned.values()}
        spans = [self._reader(sp) for sp in spans if sp.row0 not in batched]
        invariant = any(self._invariant(c) for c in step.chunks)
        return AttentionPlan(
            write_index=self._write_index(torch.tensor(writes, device=self.device)),
            spans=tuple(spans),
            decode=decode,
            lanes=lanes,
            lora_rows=lora,
            lora_owner=self._owners(lora, rows) if lora and not invariant else None,
            invariant=invariant,
        )

    def _writes_and_adapters(
        self, step: StepInput, tables: list[tuple[int, ...]]
    ) -> tuple[list[int], dict[str, list[tuple[int, int]]], int]:
        """Each new token's cache row, each adapter's row ranges, and the step's row count."""
        writes: list[int] = []
        lora: dict[str, list[tuple[int, int]]] = {}
        row = 0
        for c, table in zip(step.chunks, tables, strict=True):
            n = len(c.token_ids)
            writes.extend(self._rows_of(table, c.start, c.start + n))
            if c.adapter is not None:
                _extend_range(lora.setdefault(c.adapter, []), row, row + n)
            row += n
        return writes, lora, row

    def _flex_plan(
        self, step: StepInput, tables: list[tuple[int, ...]], writes: list[int],
        lora: dict[str, list[tuple[int, int]]], rows: int,
    ) -> AttentionPlan:  # fmt: skip
        """Every row in one call per layer (model/flex.py): the step's mask, nothing per
        sequence."""
        spans = [
            flex.FlexSpan(table, c.start, len(c.token_ids))
            for c, table in zip(step.chunks, tables, strict=True)
        ]
        invariant = any(self._invariant(c) for c in step.chunks)
        return AttentionPlan(
            write_index=self._write_index(torch.tensor(writes, device=self.device)),
            spans=(), decode=None, lanes=None, lora_rows=lora,
            lora_owner=self._owners(lora, rows) if lora and not invariant else None,
            invariant=invariant,
            flex_mask=self._flex_masks.build(spans),
        )  # fmt: skip

    def _try_flex(self) -> None:
        """flex where its kernels build and run here for a prompt tile and a decode (compiled
        now, not at the first request); else the per-sequence path, with the reason logged.
        On an H200 the Triton template's default tiles once asked for more shared memory than
        the chip has (flex.GPU_KERNEL_OPTIONS); a server must not answer 500s over that."""
        assert self._flex is not None and self._flex_masks is not None
        rows = min(flex.Q_TILE, self.cache_len)
        table = tuple(range(-(-rows // self.block_size)))
        try:
            for n in (rows, 1):
                mask = self._flex_masks.build([flex.FlexSpan(table, 0, n)])
                q = torch.zeros(n, self.num_heads, self.head_dim, device=self.device,
                                dtype=self.dtype)  # fmt: skip
                flex.attend(self._flex, q, self.k_cache[0], self.v_cache[0], mask)
        except Exception as e:  # noqa: BLE001 - inductor and Triton raise many kinds
            self._drop_flex(e)

    def _drop_flex(self, why: BaseException) -> None:
        """The per-sequence path from now on, with the reason logged."""
        first = (str(why).splitlines() or [type(why).__name__])[0][:300]
        log.warning("FlexAttention failed on %s (%s): attending per sequence instead",
                    self.device, first)  # fmt: skip
        self._flex = self._flex_masks = None
        self.attention = "sdpa"

    def _invariant(self, chunk: ChunkInput) -> bool:
        return self.batch_invariant or chunk.params.reproducible

    def _table(self, c: ChunkInput) -> tuple[int, ...]:
        """The chunk's block table; without one (a runner driven without the engine's
        allocator: tests, load-time checks), its slot's lane."""
        if c.blocks:
            return c.blocks
        return self._table_of_lane(c.slot)

    def _run(self, table: tuple[int, ...], end: int) -> int | None:
        """Cache position of position 0 when the blocks of positions 0..end-1 are one
        contiguous run (then attention reads them as a view), else None."""
        used = -(-end // self.block_size)
        first = table[0]
        if table[used - 1] - first != used - 1 or table[:used] != tuple(range(first, first + used)):
            return None
        return first * self.block_size

    def _split_by_lane(
        self, decodes: list[ChunkSpan]
    ) -> tuple[dict[int, ChunkSpan], list[ChunkSpan]]:
        """Decodes whose blocks are one run from the start of a lane, by lane, and the
        others (a lane holds one sequence's blocks; a second would be gathered)."""
        laned: dict[int, ChunkSpan] = {}
        gathered = []
        for sp in decodes:
            run = self._run(sp.table, sp.start + 1) if self.lane_len else None
            lane = None if run is None or run % self.lane_len else run // self.lane_len
            if lane is None or lane in laned or sp.start + 1 > self.lane_len:
                gathered.append(sp)
            else:
                laned[lane] = sp
        return laned, gathered

    def _reader(self, sp: ChunkSpan) -> ChunkSpan:
        """How a span attended alone reads its keys: a view where its blocks are one run."""
        run = self._run(sp.table, sp.start + sp.n)
        return replace(sp, run=run) if run is not None else replace(sp, index=self._read_index(sp))

    def _rows_of(self, table: tuple[int, ...], start: int, end: int) -> list[int]:
        """Cache rows (block * block_size + offset) of positions start..end-1."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _read_index(self, sp: ChunkSpan) -> torch.Tensor:
        used = -(-(sp.start + sp.n) // self.block_size)
        return torch.tensor(sp.table[:used], device=self.device)

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor, into: str) -> torch.Tensor:
        """A layer's keys (or values) of these blocks, in order: [kv_heads, blocks*bs, D].
        Whole blocks are copied (one contiguous run each), not one row per position, into a
        scratch buffer kept across layers and steps (`into` names it): a fresh one per call
        took fresh pages each time, and the gather ran 3.3x slower (0.56 vs 0.17 ms for 32
        decodes of 224 tokens, SmolLM2-135M shape, on the 2-core EPYC)."""
        kv, dim, row = self.num_kv_heads, self.head_dim, self.block_size * self.head_dim
        by_block = cache.view(kv, -1, row)
        out = self._scratch(into, kv * blocks.numel() * row).view(kv, blocks.numel(), row)
        torch.index_select(by_block, 1, blocks, out=out)
        return out.view(kv, -1, dim)

    def _scratch(self, name: str, numel: int) -> torch.Tensor:
        """A buffer of at least `numel` elements, reused until a larger one is needed. Safe
        because each gathered tensor is read before the next gather into the same name."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel]

    def _write_index(self, rows: torch.Tensor) -> torch.Tensor:
        """Row of (token, head) in a layer's cache seen as [heads*positions, D]: one
        index_copy_ per layer writes every new key, where advanced indexing cost 4x."""
        heads = torch.arange(self.num_kv_heads, device=self.device)
        return (heads[None, :] * self.cache_rows + rows[:, None]).reshape(-1)

    def _decode_batch(self, decodes: list[ChunkSpan]) -> DecodeBatch | None:
        if not decodes:
            return None
        dev, bs = self.device, self.block_size
        width = -(-(max(sp.start for sp in decodes) + 1) // bs)
        length = width * bs
        tables = torch.zeros(len(decodes), width, dtype=torch.long)  # padding: block 0
        for j, sp in enumerate(decodes):
            used = sp.table[: -(-(sp.start + 1) // bs)]
            tables[j, : len(used)] = torch.tensor(used)
        index = tables.reshape(-1).to(dev)
        pos = torch.arange(length)
        limit = torch.tensor([sp.start for sp in decodes])
        visible = (pos[None, :] <= limit[:, None]).to(dev)
        mask = torch.zeros(len(decodes), length, dtype=self.dtype, device=dev)
        mask.masked_fill_(~visible, float("-inf"))
        rows = torch.tensor([sp.row0 for sp in decodes], device=dev)
        return DecodeBatch(rows, index, len(decodes), length, mask[:, None, None])

    def _lane_batch(self, decodes: dict[int, ChunkSpan]) -> LaneBatch | None:
        if not decodes:
            return None
        dev = self.device
        first = min(decodes)
        span = max(decodes) - first + 1
        length = max(sp.start for sp in decodes.values()) + 1
        limit = torch.zeros(span, dtype=torch.long)  # lanes without a decode see position 0
        lanes = torch.tensor([lane - first for lane in decodes])
        limit[lanes] = torch.tensor([sp.start for sp in decodes.values()])
        visible = torch.arange(length)[None, :] <= limit[:, None]
        mask = torch.zeros(span, length, dtype=self.dtype)
        mask.masked_fill_(~visible, float("-inf"))
        rows = torch.tensor([sp.row0 for sp in decodes.values()])
        mask = mask[:, None, None].to(dev)
        lengths = torch.tensor([sp.start + 1 for sp in decodes.values()], dtype=torch.int32)
        return LaneBatch(
            rows.to(dev), lanes.to(dev), first, span, length, mask, lanes.to(torch.int32), lengths
        )

    def _owners(self, lora: dict[str, list[tuple[int, int]]], rows: int) -> torch.Tensor:
        owner = torch.full((rows,), -1, dtype=torch.long)
        for name, ranges in lora.items():
            for start, end in ranges:
                owner[start:end] = self.lora.order.index(name)
        return owner.to(self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps)

    def _layer(self, i: int, w: LayerWeights, x: torch.Tensor, rot: Rotation, plan) -> torch.Tensor:
        h = self._norm(x, w.input_norm)
        qkv = self._project(i, "qkv", w.qkv, h, plan)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        q_size = heads * dim
        # q and k rotate as one [T, heads + kv_heads, D] view: half the small ops of two calls
        qk = rope(qkv[:, : q_size + kv_heads * dim].view(-1, heads + kv_heads, dim), rot)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, q_size + kv_heads * dim :].view(-1, kv_heads, dim)
        flat = (-1, self.head_dim)  # a layer's cache as [kv_heads * positions, head_dim]
        self.k_cache[i].view(flat).index_copy_(0, plan.write_index, k.reshape(flat))
        self.v_cache[i].view(flat).index_copy_(0, plan.write_index, v.reshape(flat))
        attn = self._attention(i, q, plan)
        x = x + self._project(i, "o", w.o, attn.reshape(-1, q_size), plan)
        h = self._norm(x, w.post_norm)
        gate, up = self._project(i, "gate_up", w.gate_up, h, plan).chunk(2, dim=-1)
        act = F.silu(gate).mul_(up)  # in place: one pass less over [T, intermediate]
        return x.add_(self._project(i, "down", w.down, act, plan))

    def _project(self, i: int, stack: str, lin: Linear, h: torch.Tensor, plan) -> torch.Tensor:
        y = lin(h, plan.invariant)
        if plan.lora_owner is not None:
            self.lora.apply_fused(i, stack, h, y, plan.lora_owner)
        elif plan.lora_rows:
            self.lora.apply(i, stack, h, y, plan.lora_rows, plan.invariant)
        return y

    def add_adapter(self, name: str, path: Path) -> None:
        adapter = load_adapter(name, path, self.base_shape, self._pack)
        self.lora.add(adapter)

    def remove_adapter(self, name: str) -> None:
        self.lora.remove(name)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None, glu: bool = False) -> Linear:
        """A base weight through the policy's kernels (and int8 when it quantizes)."""
        p = self.policy
        plan = p.plan(*weight.shape) if p is not None else None
        quantize = p is not None and p.quantization == "int8"
        return Linear(weight, bias, self.num_slots, plan, quantize, glu)

    def _lora_dtype(self) -> torch.dtype | None:
        """float32 for adapters on a CPU (see LoraSet.dtype); the model's dtype elsewhere."""
        return torch.float32 if torch.device(self.device).type == "cpu" else None

    def _pack(self, weight: torch.Tensor) -> Linear:
        """An adapter's weight: never quantized (a LoRA's few parameters are cheap to read).
        Where the base weights needed fixed-row calls to stay batch-invariant (cuBLAS), the
        adapter's invariant calls take them too: the same library picks by row count."""
        w = weight.to(device=self.device, dtype=self._lora_dtype() or self.dtype).contiguous()
        plans = self.policy.plans if self.policy is not None else ()
        fixed = max((p.fixed_rows for p in plans), default=0)
        plan = replace(_default_plan(w), fixed_rows=fixed) if fixed else _lora_plan(w)
        return Linear(w, None, self.num_slots, plan)

    def _attention(self, i: int, q: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Each sequence attends over exactly its own cached length, gathered from its blocks.

        One call per sequence costs about what one padded, masked call costs at decode sizes
        (measured with static slots), and it makes a row's result independent of its batch:
        a padded call's kernel blocks its reduction by the longest sequence present. Only
        decodes free to depend on their batch run as one padded call (plan.decode).
        """
        if plan.flex_mask is not None:
            try:
                return flex.attend(self._flex, q, self.k_cache[i], self.v_cache[i], plan.flex_mask)
            except torch.OutOfMemoryError:
                raise  # the device's memory, not flex's kernels: nothing to fall back from
            except Exception as e:  # inductor and Triton raise many kinds
                raise FlexFailed() from e
        out = torch.empty_like(q)
        if plan.decode is not None:
            self._attend_decodes(i, q, plan.decode, out)
        if plan.lanes is not None:
            self._attend_lanes(i, q, plan.lanes, out)
        kc, vc = self.k_cache[i], self.v_cache[i]
        prompt_kernel = PROMPT_KERNELS.get(self.prompt_attention)
        for sp in plan.spans:
            end = sp.start + sp.n
            if sp.run is not None:  # one run of blocks: a view, as SDPA reads any strides
                keys, values = kc[:, sp.run : sp.run + end], vc[:, sp.run : sp.run + end]
            else:
                keys = self._gather(kc, sp.index, "k")[:, :end]
                values = self._gather(vc, sp.index, "v")[:, :end]
            if prompt_kernel is not None and sp.n >= PROMPT_TILE_ROWS:
                # a row sees positions 0 .. its own, as sp.mask says (it is built so)
                rows = q[sp.row0 : sp.row0 + sp.n]
                out[sp.row0 : sp.row0 + sp.n] = prompt_kernel(rows, keys, values, sp.start)
                continue
            o = F.scaled_dot_product_attention(
                q[sp.row0 : sp.row0 + sp.n].transpose(0, 1)[None],
                keys[None],
                values[None],
                attn_mask=sp.mask,
                is_causal=sp.start == 0 and sp.n > 1,
                enable_gqa=True,
            )
            out[sp.row0 : sp.row0 + sp.n] = o[0].transpose(0, 1)
        return out

    def _attend_decodes(self, i: int, q: torch.Tensor, d: DecodeBatch, out: torch.Tensor) -> None:
        """Decodes free to depend on their batch, in one SDPA call over the decodes' gathered
        keys (positions 0..length-1, masked per sequence)."""
        kv, dim, b = self.num_kv_heads, self.head_dim, d.batch
        # [kv, B * L, D] gathered, seen as [B, kv, L, D]: a view, no more copies.
        keys = self._gather(self.k_cache[i], d.index, "k").view(kv, b, d.length, dim)
        values = self._gather(self.v_cache[i], d.index, "v").view(kv, b, d.length, dim)
        qd = q.index_select(0, d.rows)
        o = _grouped_attention(qd, keys.transpose(0, 1), values.transpose(0, 1), d.mask)
        out.index_copy_(0, d.rows, o)

    def _attend_lanes(self, i: int, q: torch.Tensor, d: LaneBatch, out: torch.Tensor) -> None:
        """As _attend_decodes, reading lanes first..first+span-1 of the cache in place: the
        lanes are [kv, span, lane_len, D] rows at fixed strides, a view SDPA reads as it is (a
        gather of them cost ~15% of a 32-stream step). Or through attend.c, where it measured
        faster here (_choose_lane_attention), which reads each lane to its own length."""
        kv, dim, span, lane = self.num_kv_heads, self.head_dim, d.span, self.lane_len
        if self.lane_attention == "native":
            qd = q.index_select(0, d.rows)
            row0 = d.first * lane
            o = native.attend_lanes(
                qd, self.k_cache[i], self.v_cache[i], d.lane_ids, d.lengths, row0, lane
            )
            out.index_copy_(0, d.rows, o)
            return
        qd = q.new_zeros(span, self.num_heads, dim)
        qd.index_copy_(0, d.lanes, q.index_select(0, d.rows))
        lo, hi = d.first * lane, (d.first + span) * lane
        keys = self.k_cache[i][:, lo:hi].view(kv, span, lane, dim)[:, :, : d.length]
        values = self.v_cache[i][:, lo:hi].view(kv, span, lane, dim)[:, :, : d.length]
        o = _grouped_attention(qd, keys.transpose(0, 1), values.transpose(0, 1), d.mask)
        out.index_copy_(0, d.rows, o.index_select(0, d.lanes))


def _best_times(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Each run's best time over `rounds` rounds, the runs interleaved, each timed call after
    an untimed one (warm: pages, code): start-up choices between kernels or paths."""
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                run()
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _attention_kind(asked: str, device: torch.device) -> str:
    """FlexAttention on accelerators (one call per layer; the CPU path's many small calls
    would each be a kernel launch there), the per-sequence SDPA path on the CPU, where it is
    measured fast. "flex" can be asked for anywhere (the CPU runs its reference: tests)."""
    if asked not in ("auto", "flex", "sdpa"):
        raise ValueError(f"attention {asked!r}: auto, flex or sdpa")
    if asked == "auto":
        return "flex" if device.type != "cpu" and flex.available() else "sdpa"
    return asked


def _grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One decode token per sequence: q [B, heads, D] against keys/values [B, kv, L, D] (any
    strides) under an additive mask [B, 1, 1, L]. The query heads that share a KV head are
    that head's rows, so each cached key and value is read once, not once per query head,
    and one SDPA call serves every sequence and head: against two bmm per KV head (whose
    strided operands were copied first) it ran 1.45x faster in fp32 and 1.74x in bf16 (32
    lanes of 200 positions, SmolLM2-135M heads, 2-core Xeon with AMX)."""
    b, heads, dim = q.shape
    kv = keys.shape[1]
    o = F.scaled_dot_product_attention(q.view(b, kv, heads // kv, dim), keys, values, mask)
    return o.reshape(b, heads, dim)


def _extend_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], end)
    else:
        ranges.append((start, end))


def _base_shape(cfg: Any, heads: int, kv_heads: int, head_dim: int) -> BaseShape:
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = heads * head_dim, kv_heads * head_dim
    return BaseShape(
        num_layers=cfg.num_hidden_layers,
        in_features={
            "q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": q,
            "gate_proj": hidden, "up_proj": hidden, "down_proj": inter,
        },
        slices={
            "q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv),
            "o_proj": slice(0, hidden), "gate_proj": slice(0, inter),
            "up_proj": slice(inter, 2 * inter), "down_proj": slice(0, hidden),
        },
    )  # fmt: skip


class HFRunner:
    """Any causal LM, through transformers' forward, one sequence at a time."""

    paged = False  # one DynamicCache per slot

    def __init__(self, model: Any, num_slots: int, max_len: int) -> None:
        self.model = model
        self.num_slots, self.max_len = num_slots, max_len
        self.caches: dict[int, Any] = {}
        # transformers 5 renamed `past_key_values` to `cache`; remote-code models may not have.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)

    def add_adapter(self, name: str, path: Path) -> None:
        raise AdapterError(
            f"LoRA adapters are served on the Llama-family fast path only; "
            f"{self.model.config.model_type} runs on the generic runner"
        )

    def remove_adapter(self, name: str) -> None:
        """Nothing was ever added."""

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        from transformers import DynamicCache

        rows = []
        for c in step.chunks:
            if c.start == 0:
                self.caches[c.slot] = DynamicCache(config=self.model.config)
            ids = torch.tensor([c.token_ids], device=self.model.device)
            kwargs = {self.cache_kw: self.caches[c.slot]}
            out = self.model(input_ids=ids, use_cache=True, **kwargs)
            if c.num_logit_rows:
                rows.append(out.logits[0, -c.num_logit_rows :].float())
        return torch.cat(rows) if rows else torch.empty(0)
