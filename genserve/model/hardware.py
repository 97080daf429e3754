"""What this machine can do, and which precision and linear kernels run fastest on it.

Nothing here is assumed from another machine (DESIGN rule 10): the CPU's features decide
what is worth trying, and a start-up measurement of each candidate kernel on the model's own
weight shapes, at the row counts the engine runs (one decode, a few, a full batch, a prefill
chunk), decides what runs. The choice is cached per CPU, torch version, threads and shapes in
a small JSON file under the data dir, so a restart on the same machine does not re-measure.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genserve.model import kernels, native
from genserve.model.cpuinfo import read_cpuinfo

log = logging.getLogger(__name__)

FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")
BUCKETS = ("1", "2-8", "9-64", "chunk")  # row counts of one linear call in a step
BUCKET_ROWS = (1, 4, 32)  # rows timed for the first three buckets; the chunk bucket: chunk
# Extra kernel formats cost memory (a second copy of the weight): one is only kept for a
# bucket where it is measured at least this much faster than the batch-invariant kernel.
KEEP_GAIN = 0.9
# bf16 costs precision: `--dtype auto` takes it only where it is clearly faster.
BF16_GAIN = 0.85
CACHE_FILE = "kernels.json"
COLD_MAX_COPIES = 16  # copies of a weight timed alone (its model's size not known)
COLD_MAX_COPIES_STEP = 1024  # of a model's weight: enough to overflow the cache however small
# Bumped when how kernels are timed changes, so that choices timed the old way are timed again
# (2: whether a model's step fits the cache is measured, not read off the reported size).
TIMING_METHOD = 2
CACHE_SPEEDUP = 1.5  # a buffer read this much faster warm than past the cache sits in it
COLD_PROBE_MIB = 1024  # the largest buffer read to time a pass past the cache
BUSY_LOAD = 1.5  # load average per core above which a measurement is not cached


@dataclass(frozen=True, slots=True)
class Features:
    device: str  # "cpu" or "cuda"
    model: str  # CPU model name, or the GPU's
    flags: tuple[str, ...]  # those of FLAGS this CPU reports
    isa_cap: str  # ONEDNN_MAX_CPU_ISA when set (caps what oneDNN uses), else ""
    capability: str  # torch's CPU capability (AVX512, AVX2, ...) or CUDA's compute capability
    threads: int
    bf16: bool  # bf16 arithmetic in hardware that oneDNN (or CUDA) will use

    def line(self) -> str:
        cap = f" onednn-cap={self.isa_cap}" if self.isa_cap else ""
        return (
            f"{self.device}: {self.model} [{' '.join(self.flags) or 'no listed features'}] "
            f"torch {torch.__version__} {self.capability}{cap}, {self.threads} threads"
        )


def detect(device: torch.device | str = "cpu") -> Features:
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        major, minor = torch.cuda.get_device_capability(dev)
        bf16 = torch.cuda.is_bf16_supported()
        return Features("cuda", name, (), "", f"sm_{major}{minor}", 0, bf16)
    model, flags = read_cpuinfo()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()  # oneDNN's own variable
    has = tuple(f for f in FLAGS if f in flags)
    hw_bf16 = "amx_bf16" in has or "avx512_bf16" in has
    capability = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    return Features("cpu", model, has, cap, capability, threads, hw_bf16 and cap_allows_bf16(cap))


def cap_allows_bf16(cap: str) -> bool:
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (e.g. AVX512_CORE, AVX2) hides bf16 units."""
    return cap in ("", "ALL", "DEFAULT") or any(t in cap for t in ("BF16", "AMX", "AVX10"))


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of one pass summing a buffer far larger than the caches (the best of a few)."""
    buf = torch.ones(megabytes * 2**20 // 4)
    buf.sum()  # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


@dataclass(frozen=True, slots=True)
class ShapeSpec:
    """One weight shape of the fast path, and the most rows one call of it sees."""

    out_features: int
    in_features: int
    max_rows: int
    # Weights a decode step reads across the whole model (every layer and the LM head), which
    # decides whether a step finds this one in cache (measure it warm) or in memory (cold);
    # 0: not known (one shape timed alone).
    step_weights: int = 0


@dataclass(frozen=True, slots=True)
class ShapePlan:
    """The kernel for each row bucket of one weight shape, and the one kernel every
    batch-invariant row takes (seeded requests, --deterministic), whatever its batch."""

    out_features: int
    in_features: int
    choices: tuple[str, ...]  # per BUCKETS
    invariant: str
    pad_single: bool  # the invariant kernel sums a lone row differently: pad it to two rows
    times_us: dict[str, list[float]] = field(default_factory=dict)  # as measured, per bucket
    # > 0: no kernel kept a row's result whatever the other rows (cuBLAS picks its kernel by
    # row count): invariant calls run in calls of exactly this many rows, the last padded.
    fixed_rows: int = 0


@dataclass(frozen=True, slots=True)
class KernelPolicy:
    dtype: str  # compute precision: "float32", "bfloat16", "float16"
    quantization: str  # "none" | "int8"
    plans: tuple[ShapePlan, ...]
    source: str = "measured"  # or "cache"
    seconds: float = 0.0  # what measuring took

    def plan(self, out_features: int, in_features: int) -> ShapePlan | None:
        for p in self.plans:
            if (p.out_features, p.in_features) == (out_features, in_features):
                return p
        return None

    def summary(self) -> str:
        shapes = "; ".join(
            f"{p.out_features}x{p.in_features} {'/'.join(p.choices)} inv={p.invariant}"
            + ("(pad)" if p.pad_single else "")
            + (f"(rows of {p.fixed_rows})" if p.fixed_rows else "")
            for p in self.plans
        )
        return f"{self.dtype} quant={self.quantization} [{shapes}] ({self.source})"

    def against_linear(self) -> str:
        """The chosen kernels' times against plain F.linear's, as measured: the largest ratio
        over every shape and row bucket (at most 1.00x: never slower than linear), or why
        there is none."""
        ratios = [
            (p.times_us[c][b] / p.times_us["linear"][b], f"{p.out_features}x{p.in_features}")
            for p in self.plans
            if "linear" in p.times_us and all(c in p.times_us for c in p.choices)
            for b, c in enumerate(p.choices)
            if p.times_us["linear"][b] > 0
        ]
        if not ratios:
            return "against F.linear: not timed (cached before times were kept, or no linear)"
        worst, shape = max(ratios)
        fastest = min(r for r, _ in ratios)
        return (
            f"against F.linear: the chosen kernels take {fastest:.2f}-{worst:.2f}x its time "
            f"(worst {shape}) over {len(ratios)} shape-buckets"
        )

    def tag(self) -> str:
        """Names what decides the numbers (DESIGN rule 4 holds per system_fingerprint)."""
        what = [(self.dtype, self.quantization)]
        what += [
            (p.out_features, p.in_features, p.choices, p.invariant)
            + ((p.fixed_rows,) if p.fixed_rows else ())  # unchanged tags where it is 0
            for p in self.plans
        ]
        return hashlib.sha256(repr(what).encode()).hexdigest()[:8]

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict, source: str = "cache") -> KernelPolicy:
        plans = tuple(ShapePlan(**{**p, "choices": tuple(p["choices"])}) for p in d["plans"])
        return KernelPolicy(d["dtype"], d["quantization"], plans, source, d.get("seconds", 0.0))


def choose(
    times: dict[str, Sequence[float]],
    invariance: dict[str, tuple[bool, bool]],
    baseline: str = "linear",
    rows: Sequence[int] | None = None,
) -> tuple[tuple[str, ...], str, bool]:
    """(kernel per bucket, the batch-invariant kernel, pad_single) from measured times.

    invariance[kernel] = (a row's result does not depend on how many rows share the call
    from two rows up, a lone row sums as in a pair). The invariant kernel is the invariant
    candidate with the best time over all buckets, relative to each bucket's fastest. A
    bucket runs it too unless another kernel is clearly faster there (KEEP_GAIN: a second
    weight format costs memory), and never runs anything slower than the baseline.

    `rows` (the rows timed per bucket) prices a kernel that is not row-invariant as the
    invariant one run in fixed calls of rows[2] rows (the engine's batch: measure_shape), so
    that an invariant kernel far slower at some row count (row by row, on a prefill chunk)
    does not win by default."""
    n = len(next(iter(times.values())))
    fastest = [min(times, key=lambda c, b=b: times[c][b]) for b in range(n)]

    def score(c: str, ts: Sequence[float]) -> float:
        return sum(ts[b] / max(times[fastest[b]][b], 1e-9) for b in range(n))

    stable = [c for c in times if invariance.get(c, (False, False))[0]]
    inv_times = {c: times[c] for c in stable}
    if rows is not None:  # the others, each as it would run invariant: in calls of rows[2]
        for c in (c for c in times if c not in stable):
            inv_times[c] = [-(-r // rows[2]) * times[c][2] for r in rows]
    inv_times = inv_times or dict(times)
    inv = min(inv_times, key=lambda c: score(c, inv_times[c]))
    choices = []
    for b in range(n):
        cap = times[baseline][b] if baseline in times else float("inf")
        keep = times[inv][b] <= cap and times[inv][b] * KEEP_GAIN <= times[fastest[b]][b]
        choices.append(inv if keep else fastest[b])
    return tuple(choices), inv, not invariance.get(inv, (False, False))[1]


def bucket_rows(spec: ShapeSpec, chunk: int) -> list[int]:
    """Rows timed for each bucket, capped at what this shape ever sees."""
    return [max(1, min(r, spec.max_rows)) for r in (*BUCKET_ROWS, chunk)]


def candidates(
    spec: ShapeSpec, dtype: torch.dtype, quantization: str, device: torch.device, hint: int
) -> dict[str, list[kernels.Kernel]]:
    """Every kernel that builds here, on random weights of this shape (the values do not
    change a kernel's speed; random ones let the choice be cached by shape alone)."""
    copies = cold_copies(spec, dtype) if device.type == "cpu" else 1
    g = torch.Generator().manual_seed(spec.out_features * 7919 + spec.in_features)
    w = torch.randn(spec.out_features, spec.in_features, generator=g) * 0.02
    quant = kernels.quantize_int8(w) if quantization == "int8" else None
    w = (quant.dequantize(dtype) if quant else w.to(dtype)).to(device)
    if quant is not None:
        quant = kernels.QuantizedWeight(quant.q.to(device), quant.scales.to(device))
    built = {}
    for kind in kernels.available(dtype, device, quantization):
        try:
            # Every copy its own weights, the int8 ones too: shared, they were read from cache.
            fns = [kernels.build(kind, w.clone(), None, _copy(quant), hint) for _ in range(copies)]
            fns[0](torch.zeros(2, spec.in_features, dtype=dtype, device=device))
        except (RuntimeError, ValueError, NotImplementedError) as e:  # not on this build
            log.debug("kernel %s unavailable for %s: %s", kind, spec, e)
            continue
        built[kind] = fns
    return built


def _copy(quant: kernels.QuantizedWeight | None) -> kernels.QuantizedWeight | None:
    return None if quant is None else kernels.QuantizedWeight(quant.q.clone(), quant.scales)


def cold_copies(spec: ShapeSpec, dtype: torch.dtype) -> int:
    """Copies of a weight that, called in turn, overflow the last-level cache: in a real step
    each layer's weights come from memory, and one weight timed alone would sit in cache
    (a 3.5 MB bf16 matrix ran 2x faster hot than in a step here). Every copy of a small
    weight counts: capped at 16, a 960x576 one was timed from the cache (16 copies, 18 MB of a
    32 MB L3), where a bf16 kernel beat the int8 ones that read half the bytes in a step.
    One copy where the whole model's step fits in the cache, as measured: its steps run warm."""
    item = torch.empty((), dtype=dtype).element_size()
    llc, size = last_level_cache(), spec.out_features * spec.in_features * item
    if not spec.step_weights:
        return max(1, min(COLD_MAX_COPIES, -(-2 * llc // size)))
    step = spec.step_weights * item
    if cache_holds(step):
        return 1
    # as many bytes as a step reads (the cache did not hold them), at most twice the cache
    return max(1, min(COLD_MAX_COPIES_STEP, -(-min(2 * llc, step) // size)))


@functools.lru_cache(maxsize=8)
def cache_holds(nbytes: int) -> bool:
    """Whether `nbytes` read again and again come from the cache: no larger than the last-level
    cache Linux reports, and summed warm at least CACHE_SPEEDUP times as fast as a buffer past
    it. A VM may report its host's whole cache (480 MiB on the AMX Xeon) while its own share
    read a 270 MB model at memory speed, where timing its weights warm picked bf16 kernels
    over the int8 ones that a step, reading half the bytes from memory, runs faster."""
    llc = last_level_cache()
    if nbytes > llc:
        return False
    mib = max(1, nbytes >> 20)
    warm = read_bandwidth(mib, repeats=5)
    memory = read_bandwidth(min(COLD_PROBE_MIB, max(4 * mib, 2 * (llc >> 20))), repeats=3)
    fits = warm >= CACHE_SPEEDUP * memory
    log.info(
        "%d MiB of weights read warm at %.1f GB/s, past the cache at %.1f: %s", mib, warm,
        memory, "in cache" if fits else "from memory",
    )  # fmt: skip
    return fits


def last_level_cache(path: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Bytes of the largest CPU cache Linux reports (32 MiB where it reports none)."""
    sizes = []
    for f in path.glob("index*/size"):
        text = f.read_text().strip() if f.is_file() else ""
        unit = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        if text.rstrip("KM").isdigit():
            sizes.append(int(text.rstrip("KM")) * unit)
    return max(sizes, default=32 * 2**20)


def measure_shape(
    spec: ShapeSpec, dtype: torch.dtype, quantization: str, device: torch.device,
    chunk: int, hint: int,
) -> ShapePlan:  # fmt: skip
    fns = candidates(spec, dtype, quantization, device, hint)
    rows = bucket_rows(spec, chunk)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(max(rows), spec.in_features, generator=g).to(dtype=dtype, device=device)
    times = time_kernels(fns, [x[:r] for r in rows], device)
    sizes = sorted({m for m in (3, 8, 17, 64, max(rows)) if 2 < m <= max(rows)})
    invariance = {c: row_invariance(f[0], x, sizes) for c, f in fns.items()}
    choices, inv, pad = choose(times, invariance, rows=rows)
    rounded = {c: [round(t, 1) for t in ts] for c, ts in times.items()}
    fixed = 0 if invariance[inv][0] else fixed_rows_for(fns[inv][0], x, sizes, hint)
    if fixed:
        pad = False  # every invariant call has `fixed` rows, a lone one too
    return ShapePlan(spec.out_features, spec.in_features, choices, inv, pad, rounded, fixed)


def in_fixed_rows(fn: kernels.Kernel, x: torch.Tensor, rows: int) -> torch.Tensor:
    """fn over x in calls of exactly `rows` rows (the last padded with zeros): each row's
    result is then the one a call of `rows` rows gives it, whatever the batch."""
    n = x.shape[0]
    padded = -(-n // rows) * rows
    if padded != n:
        x = torch.cat([x, x.new_zeros(padded - n, x.shape[1])])
    return torch.cat([fn(part) for part in x.split(rows)])[:n]


def fixed_rows_for(fn: kernels.Kernel, x: torch.Tensor, sizes: Sequence[int], hint: int) -> int:
    """Rows per invariant call for a kernel whose rows depend on their batch: the engine's
    batch (a decode step is one call), checked here to make a row's result independent of
    the rest (0, with a warning, where even that does not hold)."""
    rows = max(2, hint)
    pair = in_fixed_rows(fn, x[:2], rows)
    if all(torch.equal(in_fixed_rows(fn, x[:m], rows)[:2], pair[:m]) for m in (1, *sizes)):
        return rows
    log.warning("no batch-invariant kernel for %s: seeded rows may differ under load", x.shape)
    return 0


def row_invariance(fn: kernels.Kernel, x: torch.Tensor, sizes: Sequence[int]) -> tuple[bool, bool]:
    """(the first two rows' results are the same bits in calls of every size, a lone row's
    result is the same bits as in a pair): checked here, since it is the kernel library's
    behaviour on this CPU, not a promise."""
    pair = fn(x[:2])
    rows_ok = all(torch.equal(fn(x[:m])[:2], pair) for m in sizes)
    return rows_ok, torch.equal(fn(x[:1])[0], pair[0])


def time_kernels(
    fns: dict[str, list[kernels.Kernel]],
    xs: list[torch.Tensor],
    device: torch.device,
    rounds: int = 5,
) -> dict[str, list[float]]:
    """Microseconds per call: the best of `rounds` short blocks, candidates interleaved block by
    block so that a neighbour's load falls on all of them alike (on a shared 2-core machine a
    block now and then loses a whole time slice; the best block is the kernel's own time)."""
    best = {c: [float("inf")] * len(xs) for c in fns}
    done: dict[int, int] = {}  # rows -> index of the bucket already timed with as many
    for b, x in enumerate(xs):
        if x.shape[0] in done:  # a shape capped to the same rows: the same measurement
            for c in fns:
                best[c][b] = best[c][done[x.shape[0]]]
            continue
        done[x.shape[0]] = b
        reps = {c: _reps(f, x, device) for c, f in fns.items()}
        turns = {c: itertools.cycle(f) for c, f in fns.items()}
        for r in range(rounds):
            lead = min(best[c][b] for c in fns)
            for c in fns:
                if r >= 2 and best[c][b] > 3 * lead:  # twice clearly out: not worth more time
                    continue
                best[c][b] = min(best[c][b], _block(turns[c], x, reps[c], device))
    return best


def _reps(fns: list[kernels.Kernel], x: torch.Tensor, device: torch.device) -> int:
    for fn in fns:
        fn(x)  # first call: oneDNN compiles its kernel for this shape; pages are touched
    one = min(_block(iter(fns), x, 1, device) for _ in range(2))
    return max(1, min(4 * len(fns), int(1000.0 / max(one, 1.0))))


def _block(
    fns: Iterator[kernels.Kernel], x: torch.Tensor, reps: int, device: torch.device
) -> float:
    """The fastest of `reps` calls, each timed alone and each taking the next weight copy (so
    it reads its weight from memory). Timed call by call, not as a block: on a shared 2-core
    machine one descheduled thread stalls a call for a whole time slice (8 ms here), which a
    block of calls would include and the fastest single call does not."""
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    best = float("inf")
    for _ in range(reps):
        fn = next(fns)
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def measure_policy(
    specs: Sequence[ShapeSpec], dtype: torch.dtype, quantization: str, device: torch.device,
    chunk: int, hint: int,
) -> KernelPolicy:  # fmt: skip
    t0 = time.perf_counter()
    with torch.inference_mode():
        plans = tuple(measure_shape(s, dtype, quantization, device, chunk, hint) for s in specs)
    name = str(dtype).removeprefix("torch.")
    return KernelPolicy(name, quantization, plans, "measured", round(time.perf_counter() - t0, 2))


def policy_for(
    specs: Sequence[ShapeSpec], dtype: torch.dtype, quantization: str, device: torch.device,
    chunk: int, hint: int, cache_dir: Path | None = None,
) -> KernelPolicy:  # fmt: skip
    """The cached choice for this machine and these shapes, else a fresh measurement."""
    specs = tuple(dict.fromkeys(specs))  # one measurement per distinct shape
    features = detect(device)
    key = cache_key(features, dtype, quantization, specs, chunk, hint)
    path = cache_dir / CACHE_FILE if cache_dir is not None else None
    entry = _read_cache(path).get(key) if path is not None else None
    if entry is not None:
        try:
            return KernelPolicy.from_json(entry)
        except (KeyError, TypeError, ValueError):
            log.warning("%s: unreadable entry for this machine; measuring again", path)
    policy = measure_policy(specs, dtype, quantization, device, chunk, hint)
    if path is not None and _quiet("kernels"):
        _write_cache(path, key, policy.to_json())
    return policy


def _quiet(what: str) -> bool:
    """Whether a measurement just taken may be cached: not when other processes held the
    cores (the times may be theirs; used for this run only, measured again at the next start
    or with `genserve doctor`)."""
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy > BUSY_LOAD * (os.cpu_count() or 1):
        log.warning("%s measured under load (load average %.1f): not cached", what, busy)
        return False
    return True


def cache_key(
    f: Features, dtype: torch.dtype, quantization: str, specs: Sequence[ShapeSpec],
    chunk: int, hint: int,
) -> str:  # fmt: skip
    what = _machine(f) + [str(dtype), quantization, chunk, hint, [asdict(s) for s in specs]]
    what += [TIMING_METHOD]
    offered = kernels.available(dtype, torch.device(f.device), quantization)
    what += [offered]  # new ones: measure
    if {"gemv", "amx", "dp"} & set(offered):  # genserve's kernels changed: measured again
        what += [native.build_id()]
    return _digest(what)


def _machine(f: Features) -> list:
    """What a measurement on this machine depends on, for the cache's keys."""
    return [f.device, f.model, f.flags, f.isa_cap, f.capability, f.threads, torch.__version__]


def _digest(what: list) -> str:
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Merged with what is there, written whole through a temporary file and a rename, so a
    reader never sees half a file. A cache that cannot be written only costs a re-measure."""
    data = _read_cache(path)
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    except OSError as e:
        log.warning("kernel choice not cached (%s): %s", path, e)


def auto_dtype(
    device: torch.device, specs: Sequence[ShapeSpec], cache_dir: Path | None = None
) -> torch.dtype:
    """`--dtype auto`: bf16 (fp16 on GPUs without it) on CUDA; on a CPU, bf16 where it has
    bf16 units (AMX, AVX512-BF16) that oneDNN may use and where bf16 kernels are measured
    clearly faster (BF16_GAIN) than fp32 ones on these shapes at decode row counts; tiny
    models, whose calls cost their overhead, stay fp32. Else fp32.

    The choice is cached with the kernels' (per CPU, threads, torch and shapes), and a
    measurement taken under load is not: two servers started at the same second timed each
    other's work, and one of them served in fp32 on an AMX CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    features = detect(device)
    if not specs or not features.bf16:
        return torch.float32
    specs = sorted(specs, key=lambda s: -s.out_features * s.in_features)[:2]  # the MLP's
    key = _digest(["dtype auto", *_machine(features), [asdict(s) for s in specs]])
    path = cache_dir / CACHE_FILE if cache_dir is not None else None
    entry = _read_cache(path).get(key) if path is not None else None
    if isinstance(entry, dict) and entry.get("dtype") in ("bfloat16", "float32"):
        return getattr(torch, entry["dtype"])
    with torch.inference_mode():
        fp32 = sum(_decode_time(s, torch.float32, device) for s in specs)
        bf16 = sum(_decode_time(s, torch.bfloat16, device) for s in specs)
    log.info("dtype auto: decode linears %.0f us in bf16, %.0f us in fp32", bf16, fp32)
    chosen = torch.bfloat16 if bf16 <= BF16_GAIN * fp32 else torch.float32
    if path is not None and _quiet("dtype auto"):
        name = str(chosen).removeprefix("torch.")
        _write_cache(path, key, {"dtype": name, "bf16_us": round(bf16), "fp32_us": round(fp32)})
    return chosen


def _decode_time(spec: ShapeSpec, dtype: torch.dtype, device: torch.device) -> float:
    """The fastest kernel's time summed over one row and a full decode batch's rows."""
    fns = candidates(spec, dtype, "none", device, BUCKET_ROWS[-1])
    if not fns:
        return float("inf")
    rows = (BUCKET_ROWS[0], BUCKET_ROWS[-1])
    x = torch.randn(rows[-1], spec.in_features).to(dtype=dtype, device=device)
    times = time_kernels(fns, [x[:r] for r in rows], device, rounds=3)
    return sum(min(t[b] for t in times.values()) for b in range(len(rows)))


def model_specs(config, chunk: int, sample_rows: int) -> tuple[ShapeSpec, ...]:  # noqa: ANN001
    """The fast path's weight shapes for a transformers config: stacked qkv, o, stacked
    gate/up, down (up to a prefill chunk of rows), and the LM head (the sampled rows)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden, inter = config.hidden_size, config.intermediate_size
    layer = ((heads + 2 * kv) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden)
    layer += ((hidden, inter),)
    head = (config.vocab_size, hidden)
    step = config.num_hidden_layers * sum(o * i for o, i in layer) + head[0] * head[1]
    return (
        *(ShapeSpec(o, i, chunk, step) for o, i in layer),
        ShapeSpec(*head, sample_rows, step),
    )
