"""`BatchedHFRunner`: any decoder-only transformers model, batched, on genserve's own KV slots.

The model code stays transformers' (embeddings, norms, q/k norms, rotary or learned positions,
MoE routing, final soft-capping); only attention is ours. transformers lets a model's attention
modules call a registered function by name (`AttentionInterface`), so the runner registers one,
switches the model to it, and passes each step's metadata (which rows belong to which slot, at
which positions) through the forward's kwargs, which transformers hands to that function. The
function writes the step's keys and values into static per-slot caches, as `LlamaRunner` does,
and attends each sequence over its own cached prefix (vLLM's Transformers backend works the
same way, over its paged cache).

A step's tokens from all sequences are flattened into one forward of batch 1 x T with
per-token position_ids, so every projection runs once over the whole step. With a custom
attention name, transformers builds no attention mask at all (its mask functions are keyed by
the built-in names), so masks (causal, sliding window) are made here, per sequence.

Around that: the model's plain Linear layers run on genserve's prepacked `Linear` (as
LlamaRunner's do), LoRA adapters are applied per row by forward hooks (lora_hooks.py), and a
model is only put on this runner after a load-time check that the runner reproduces the
model's own forward (`self_check`); otherwise dispatch.make_runner gives it to HFRunner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genserve.engine.types import ChunkInput, SamplingParams, StepInput
from genserve.model.kernels import onednn_ok
from genserve.model.lora_hooks import HookLora
from genserve.model.memory import huge_pages
from genserve.model.runner import Linear

ATTENTION_NAME = "genserve_slots"
STEP_KWARG = "genserve_step"  # the forward kwarg that carries a StepAttention
ATTENTION_LAYERS = ("full_attention", "sliding_attention")
CHECK_TOKENS = 12  # the load-time check's sequence: a prompt in three chunks, then a decode


def unsupported_reason(model: Any) -> str | None:
    """Why this model cannot run on BatchedHFRunner, or None when it can: first what its
    config says, then a check of the runner's numbers against the model's own forward."""
    return _static_reason(model) or self_check(model)


def _static_reason(model: Any) -> str | None:
    cfg = model.config
    if not getattr(type(model), "_supports_attention_backend", False):
        origin = type(model).__module__
        where = "remote code" if not origin.startswith("transformers.") else "its modeling code"
        return f"{where} ({origin}) does not route attention through transformers' interface"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder models are not served batched"
    if getattr(cfg, "alibi", False):
        return "ALiBi biases are folded into the attention mask, which this runner does not build"
    other = set(getattr(cfg, "layer_types", None) or ()) - set(ATTENTION_LAYERS)
    if other:  # conv, linear attention, mamba, chunked: state or masks not kept here
        return f"layers of type {', '.join(sorted(other))} are not served batched"
    return None


def self_check(model: Any) -> str | None:
    """Runs one short sequence as the engine would (a prompt in three chunks, then a decode)
    through the runner and through the model's own forward, and says why they differ. A
    model may route attention through the interface and still keep state of its own that
    this runner does not carry (recurrent or convolution layers, KV shared between layers,
    attention sinks): this finds out at load, in milliseconds, instead of serving wrong
    numbers. Every row after the first chunk is compared: a row just past a chunk boundary
    is where missing state shows most."""
    ids = [i % model.config.vocab_size for i in range(1, CHECK_TOKENS + 1)]
    own = model.config._attn_implementation
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
        want = logits[CHECK_TOKENS // 3 :]
        try:
            got = _runner_logits(BatchedHFRunner(model, 1, CHECK_TOKENS, pack=False), ids)
        except Exception as e:  # noqa: BLE001 - any failure means: not on this runner
            model.set_attn_implementation(own)
            return f"the batched attention failed on it ({type(e).__name__}: {e})"
    tol = 1e-4 if model.dtype == torch.float32 else 5e-2
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    if diff > tol * max(scale, 1.0):
        model.set_attn_implementation(own)
        return f"the batched runner's logits differ from the model's own by {diff:.3g}"
    return None


def _runner_logits(runner: BatchedHFRunner, ids: list[int]) -> torch.Tensor:
    """Logits of every row after the first of three prompt chunks, and of a decode."""
    params = SamplingParams(prompt_logprobs=0)  # every row's logits back
    third, last = CHECK_TOKENS // 3, CHECK_TOKENS - 1
    bounds = [(0, third), (third, 2 * third), (2 * third, last), (last, CHECK_TOKENS)]
    out = []
    for start, end in bounds:
        chunk = ChunkInput("check", 0, tuple(ids[start:end]), start, True, params, 0)
        out.append(runner.execute(StepInput((chunk,))))
    return torch.cat(out[1:])


@dataclass(frozen=True, slots=True)
class Span:
    """One sequence's rows in the flat batch: rows [row0, row0+n) at positions start..start+n-1."""

    row0: int
    n: int
    slot: int
    start: int


@dataclass(frozen=True, slots=True)
class Decodes:
    """Single-token decodes attended together in one padded product over slots 0..span-1 and
    positions 0..length-1, masked per slot (a slot not decoding sees position 0 only)."""

    rows: torch.Tensor  # [B] their rows in the flat batch
    slots: torch.Tensor  # [B]
    positions: torch.Tensor  # [span]: each slot's query position (0 for idle slots)
    span: int
    length: int


@dataclass(frozen=True, slots=True)
class StepAttention:
    """What the attention function needs for one forward, shared by every layer."""

    cache: SlotCache
    slots: torch.Tensor  # [T] each row's slot
    positions: torch.Tensor  # [T] each row's position
    spans: tuple[Span, ...]  # attended one call each
    decodes: Decodes | None
    # Built on first use by the first layer and reused by the others: keyed by kv-head count
    # (write indices) or by sliding window (decode masks), which may differ between layers.
    memo: dict = field(default_factory=dict)

    def write_index(self, kv_heads: int, max_len: int) -> torch.Tensor:
        """Row of each (token, head) in a layer's cache seen as [slots*heads*max_len, D]."""
        key = ("write", kv_heads)
        if key not in self.memo:
            heads = torch.arange(kv_heads, device=self.slots.device)
            index = (self.slots[:, None] * kv_heads + heads) * max_len + self.positions[:, None]
            self.memo[key] = index.reshape(-1)
        return self.memo[key]

    def decode_mask(self, window: int | None, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
        key = ("decode", window, kv_heads, dtype)
        if key not in self.memo:
            self.memo[key] = _decode_mask(self.decodes, window, kv_heads, dtype)
        return self.memo[key]


class SlotCache:
    """Per layer, keys and values as [slots, kv_heads, max_len, head_dim], allocated when the
    layer first runs (the runner runs one token at load): the head count and width are then
    read off the keys themselves, which covers models whose layers differ."""

    def __init__(self, num_slots: int, max_len: int, device: torch.device) -> None:
        self.num_slots, self.max_len, self.device = num_slots, max_len, device
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, step: StepAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value: [kv_heads, T, D] for the step's rows; returns the layer's caches."""
        kv_heads, _, dim = key.shape
        if layer not in self.keys:
            self.keys[layer] = self._allocate((self.num_slots, kv_heads, self.max_len, dim), key)
            self.values[layer] = self._allocate(self.keys[layer].shape, value)
        kc, vc = self.keys[layer], self.values[layer]
        index = step.write_index(kv_heads, self.max_len)
        kc.view(-1, dim).index_copy_(0, index, key.transpose(0, 1).reshape(-1, dim))
        vc.view(-1, dim).index_copy_(0, index, value.transpose(0, 1).reshape(-1, dim))
        return kc, vc

    def _allocate(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Zeroed (padded decode rows read masked positions never written), on 2 MiB pages
        where Linux gives them, as LlamaRunner's cache (decode reads are spread over it)."""
        empty = torch.empty(shape, dtype=like.dtype, device=self.device)
        return huge_pages(empty).zero_()


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention: query [1, H, T, D], key/value [1, KV, T, D] for the step's
    rows; returns [1, T, H, D] as transformers' own implementations do."""
    step: StepAttention | None = kwargs.get(STEP_KWARG)
    if step is None:
        raise RuntimeError("genserve's attention ran outside BatchedHFRunner.execute")
    if attention_mask is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("a model-built mask or position bias is not honoured here")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks are not supported")
    kc, vc = step.cache.write(module.layer_idx, key[0], value[0], step)
    q = query[0].transpose(0, 1)  # [T, H, D]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    window = sliding_window if sliding_window and sliding_window > 0 else None
    out = torch.empty_like(q)
    if step.decodes is not None:
        _attend_decodes(q, kc, vc, step, window, scale, softcap, out)
    for sp in step.spans:
        out[sp.row0 : sp.row0 + sp.n] = _attend_span(q, kc, vc, sp, window, scale, softcap)
    return out[None], None


def _attend_span(q, kc, vc, sp: Span, window, scale, softcap) -> torch.Tensor:  # noqa: ANN001
    """One sequence over exactly its own cached keys (from the window's first, if any)."""
    end = sp.start + sp.n
    lo = 0 if window is None else max(0, sp.start - window + 1)
    qs = q[sp.row0 : sp.row0 + sp.n].transpose(0, 1)[None]  # [1, H, n, D]
    ks, vs = kc[sp.slot : sp.slot + 1, :, lo:end], vc[sp.slot : sp.slot + 1, :, lo:end]
    mask = _span_mask(sp, lo, window, q.device)
    causal = mask is None and sp.n > 1  # prompt from position 0, no window cut
    if softcap is None:
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
    else:
        if causal:
            mask = torch.ones(sp.n, sp.n, dtype=torch.bool, device=q.device).tril()
        o = _eager_softcap(qs, ks, vs, mask, scale, softcap)
    return o[0].transpose(0, 1)


def _span_mask(sp: Span, lo: int, window: int | None, device) -> torch.Tensor | None:  # noqa: ANN001
    """Boolean [n, end-lo] (True: visible), or None where no key needs hiding: a decode
    sees every key from lo on, a prompt from 0 uncut by a window is plain causal."""
    end = sp.start + sp.n
    if sp.n == 1 or (sp.start == 0 and lo == 0 and (window is None or sp.n <= window)):
        return None
    pos = torch.arange(sp.start, end, device=device)[:, None]
    keys = torch.arange(lo, end, device=device)[None, :]
    visible = keys <= pos
    if window is not None:
        visible &= keys > pos - window
    return visible


def _eager_softcap(q, k, v, mask, scale, softcap) -> torch.Tensor:  # noqa: ANN001
    """Scores soft-capped as Gemma 2 does (cap * tanh(s / cap)); SDPA has no such option."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def _decode_mask(d: Decodes, window: int | None, kv_heads: int, dtype: torch.dtype):  # noqa: ANN202
    """Additive [span * kv_heads, 1, length]: 0 where a slot's query sees a key, -inf not."""
    keys = torch.arange(d.length, device=d.positions.device)[None, :]
    pos = d.positions[:, None]
    visible = keys <= pos
    if window is not None:
        visible &= keys > pos - window
    mask = torch.zeros(d.span, d.length, dtype=dtype, device=pos.device)
    mask.masked_fill_(~visible, float("-inf"))
    return mask.repeat_interleave(kv_heads, dim=0)[:, None, :]


def _attend_decodes(q, kc, vc, step: StepAttention, window, scale, softcap, out) -> None:  # noqa: ANN001
    """Decodes free to depend on their batch, in two batched products over slots 0..span-1
    with the query heads of one KV head side by side, so each cached key and value is read
    once per step rather than once per sequence call (decode steps are bound by that read)."""
    d = step.decodes
    kv, dim = kc.shape[1], kc.shape[3]
    heads = q.shape[1]
    group = heads // kv
    qd = q.new_zeros(d.span, heads, dim)
    qd.index_copy_(0, d.slots, q.index_select(0, d.rows))
    keys = kc[: d.span].reshape(d.span * kv, -1, dim)[:, : d.length]
    values = vc[: d.span].reshape(d.span * kv, -1, dim)[:, : d.length]
    scores = torch.bmm(qd.view(d.span * kv, group, dim), keys.transpose(1, 2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores += step.decode_mask(window, kv, scores.dtype)
    o = torch.bmm(torch.softmax(scores, dim=-1), values).view(d.span, heads, dim)
    out.index_copy_(0, d.rows, o.index_select(0, d.slots))


@dataclass(slots=True)
class ForwardMode:
    """Set by the runner for each forward, read by its PackedLinear layers."""

    invariant: bool = False  # some row must not depend on its batch: a lone row is padded


class PackedLinear(torch.nn.Module):
    """An nn.Linear whose product runs on genserve's `Linear` (on CPU in fp32, oneDNN with a
    prepacked weight: the projections are most of a decode step, and oneDNN ran them 1.9x
    faster than nn.Linear here, see pack_linears). The weight stays referenced (tied
    embeddings share it; adapters check shapes against it)."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int, mode: ForwardMode) -> None:
        super().__init__()
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        bias = None if linear.bias is None else linear.bias.detach()
        self.packed = Linear(linear.weight.detach(), bias, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1 and not self.mode.invariant:
            # A lone row (one stream decoding) ran faster through nn.Linear's own kernel:
            # 2.3 vs 3.2 ms a decode step, hidden 256 x 4 layers. On the invariant path it is
            # padded to two instead (Linear's pad_single), as every row there must take the
            # kernel whose rows do not depend on each other.
            return F.linear(x, self.weight, self.bias)
        y = self.packed(rows, self.mode.invariant)
        return y.view(*x.shape[:-1], self.out_features)


def pack_linears(model: torch.nn.Module, batch_hint: int, mode: ForwardMode) -> int:
    """Swap every plain nn.Linear the fast kernels take for a PackedLinear; returns how many.
    Subclasses are left alone: their forward may do more than x W^T + b."""
    swaps = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and onednn_ok(m.weight)
    ]
    with torch.no_grad():
        for name, m in swaps:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, PackedLinear(m, batch_hint, mode))
    return len(swaps)


def rows_independent(model: torch.nn.Module) -> bool:
    """Whether one forward over many sequences gives each row exactly its numbers alone, so
    that seeded rows may share a forward: every Linear runs on the prepacked kernel (whose
    rows do not depend on each other from two rows up, see runner.Linear), and no expert
    routing groups rows into products whose size depends on the batch. Attention is per
    sequence; norms, rotary and activations work row by row."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or "expert" in type(m).__name__.lower():
            return False
    return True


def register_attention() -> None:
    """Make the name known to transformers (idempotent). Done when a runner is built, never
    at import: importing genserve changes no library's settings."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, slot_attention)


class BatchedHFRunner:
    """execute(step) -> logits for the sampled rows, through transformers' own modules.

    Sequences that must not depend on their batch (seeded requests, or all under
    --deterministic) attend alone, and share the forward with the others where the model's
    rows are independent (see rows_independent); elsewhere (MoE, Linear layers without the
    prepacked kernel) each runs in a forward of its own, its numbers then being those of the
    same sequence alone by construction.
    """

    def __init__(
        self,
        model: Any,
        num_slots: int,
        max_len: int,
        batch_invariant: bool = True,
        pack: bool = True,  # prepack the Linear layers (off: a throwaway runner, self_check)
    ) -> None:
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation != ATTENTION_NAME:
            raise ValueError(f"{type(model).__name__} did not take the attention function")
        self.model = model.eval()
        self.mode = ForwardMode()
        if pack:
            pack_linears(model, num_slots, self.mode)
        self.rows_independent = rows_independent(model)
        self.num_slots, self.max_len = num_slots, max_len
        self.batch_invariant = batch_invariant
        self.device = model.device
        self.cache = SlotCache(num_slots, max_len, self.device)
        self.lora = HookLora(model)
        self._allocate_cache()

    def _allocate_cache(self) -> None:
        """One token through the model now, so every layer's cache is allocated and written
        through at load rather than in the middle of the first requests' steps. Slot 0's
        position 0 is overwritten by the first sequence placed there."""
        self.execute(StepInput((ChunkInput("allocate", 0, (0,), 0, False, SamplingParams(), 0),)))

    paged = False  # its own static slots; the engine's block tables are not read here
    compiled_decode = "off"  # --compile-decode is LlamaRunner's

    def release(self, slot: int) -> None:
        """Nothing to free: the next sequence in this slot overwrites what it reads."""

    def add_adapter(self, name: str, path: Path) -> None:
        self.lora.add(name, path)

    def remove_adapter(self, name: str) -> None:
        self.lora.remove(name)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        rows: list[torch.Tensor | None] = [None] * len(step.chunks)
        for group in self._groups(step.chunks):
            logits = self._forward([step.chunks[i] for i in group])
            parts = logits.split([step.chunks[i].num_logit_rows for i in group])
            for i, part in zip(group, parts, strict=True):
                rows[i] = part
        if not any(r is not None and len(r) for r in rows):
            return torch.empty(0)
        return torch.cat([r for r in rows if r is not None])

    def _groups(self, chunks: tuple[ChunkInput, ...]) -> list[list[int]]:
        """Chunk indices per forward: all together where rows are independent, else each
        batch-invariant chunk alone and the rest together."""
        if self.rows_independent:
            return [list(range(len(chunks)))]
        alone = [[i] for i, c in enumerate(chunks) if self._invariant(c)]
        shared = [i for i, c in enumerate(chunks) if not self._invariant(c)]
        return alone + ([shared] if shared else [])

    def _invariant(self, chunk: ChunkInput) -> bool:
        return self.batch_invariant or chunk.params.reproducible

    def _forward(self, chunks: list[ChunkInput]) -> torch.Tensor:
        tokens, positions, slots, keep = self._flatten(chunks)
        attn = self._plan(chunks, slots, positions)
        self.mode.invariant = any(self._invariant(c) for c in chunks)
        with self.lora.rows(chunks):
            out = self.model(
                input_ids=tokens[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=keep,
                **{STEP_KWARG: attn},
            )
        return out.logits[0].float()

    def _flatten(self, chunks: list[ChunkInput]) -> tuple[torch.Tensor, ...]:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        for c in chunks:
            tokens.extend(c.token_ids)
            positions.extend(range(c.start, c.start + len(c.token_ids)))
            slots.extend([c.slot] * len(c.token_ids))
            keep.extend(range(len(tokens) - c.num_logit_rows, len(tokens)))
        return tuple(
            torch.tensor(v, dtype=torch.long, device=self.device)
            for v in (tokens, positions, slots, keep)
        )

    def _plan(self, chunks: list[ChunkInput], slots, positions) -> StepAttention:  # noqa: ANN001
        spans, pooled, row = [], [], 0
        for c in chunks:
            sp = Span(row, len(c.token_ids), c.slot, c.start)
            # Decodes free to depend on their batch share one padded call (a padded call's
            # sums depend on the longest sequence present, so reproducible rows attend alone).
            free = sp.n == 1 and sp.start > 0 and not self._invariant(c)
            (pooled if free else spans).append(sp)
            row += sp.n
        decodes = None
        if len(pooled) > 1:
            decodes = self._decodes(pooled)
        else:  # with a single decode there is nothing to share, and its own call reads less
            spans += pooled
        return StepAttention(self.cache, slots, positions, tuple(spans), decodes)

    def _decodes(self, pooled: list[Span]) -> Decodes:
        dev = self.device
        slots = torch.tensor([sp.slot for sp in pooled], device=dev)
        span = max(sp.slot for sp in pooled) + 1
        positions = torch.zeros(span, dtype=torch.long, device=dev)  # idle slots: position 0
        positions[slots] = torch.tensor([sp.start for sp in pooled], device=dev)
        rows = torch.tensor([sp.row0 for sp in pooled], device=dev)
        length = max(sp.start for sp in pooled) + 1
        return Decodes(rows, slots, positions, span, length)
