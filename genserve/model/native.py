"""genserve's own CPU kernels (gemv.c, attend.c, decode.c), built for this CPU and called
through ctypes.

- `gemv.c`: the row-by-row linear kernel, one more candidate for the start-up measurement
  (hardware.py) for the weights the fast path holds: bf16, float32 or int8 with a scale per
  output channel.
- `attend.c`: decode attention over the KV lanes (runner.py), measured against SDPA when a
  runner starts.
- `amx.c`: a bf16 linear kernel on AMX tiles for the 9-64 rows of a batched decode step
  (and prefill chunks), one more candidate where the CPU has AMX; and a prompt chunk's
  causal attention on the tiles.
- `dp.c`: the same two with AVX512-BF16 dot products, for CPUs with those and no AMX: a
  bf16 linear for 9-64 rows and a prompt chunk's attention (prompt.h: what the two
  attentions share).
- `sample.c`: temperature, softmax and the inverse-CDF draw of a step's sampled rows
  (sampler.py's first draw, one row per thread).
- `decode.c`: every decoder layer of a step of a few free decodes in one call (the glue
  between gemv's linears and attend.c's attention in C), where the runner measured it faster.

The C files are compiled once per machine kind with the system's C compiler (`cc -O3
-march=native -fopenmp`, about a second on 2 cores) into one library kept in the user's
cache directory, named by a hash of the sources, the compiler and the CPU, so a restart loads
it. Without a compiler, or where the build fails, these kernels are simply not offered:
torch's serve as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from genserve.model.cpuinfo import read_cpuinfo

log = logging.getLogger(__name__)

C_FILES = ("gemv.c", "attend.c", "decode.c", "amx.c", "dp.c", "sample.c")
SOURCES = tuple(Path(__file__).with_name(f) for f in C_FILES)
# part of the build's hash, not compiled alone
HEADERS = tuple(Path(__file__).with_name(f) for f in ("bf16.h", "vexp.h", "prompt.h"))
# 512-bit vectors where the compiler vectorises plain loops itself (gcc prefers 256 for
# -march=native on Xeons): decode.c's 512 prompt rows' residual+norm 170 -> 140 us, SiLU
# 339 -> 262 us (2-core AMX Xeon). Loops written with intrinsics are unaffected.
_WIDE = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
FLAGS = ("-O3", "-march=native", *_WIDE, "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "attend_lanes": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _L, _L, _L, _F, _I, _I],
    "decode_layers": [_P, _I, _P, _P],
    "glue_norm": [_P, _P, _P, _P],
    "glue_residual_norm": [_P, _P, _P, _P, _P],
    "glue_attend": [_P, _P, _P, _P, _P, _P],
    "glue_silu_mul": [_P, _P, _P],
    "glue_rotate_write": [_P, _P, _P, _P],
    "gemv_i8": [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I],
    "gemv_i8_vnni": [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I],
    "gemv_vnni_available": [],
    "gemv_bf16": [_P, _I, _P, _P, _I, _I, _I, _I, _I],
    "gemv_f32": [_P, _I, _P, _P, _I, _I, _I, _I, _I],
    "amx_init": [],
    "amx_linear_bf16": [_P, _P, _P, _I, _I, _I, _I, _I],
    "amx_glu_bf16": [_P, _P, _P, _I, _I, _I, _I, _I],
    "amx_attend_causal": [_P, _L, _P, _P, _L, _P, _L, _I, _I, _I, _I, _I, _F, _I],
    "dp_available": [],
    "dp_linear_bf16": [_P, _P, _P, _I, _I, _I, _I, _I],
    "dp_attend_causal": [_P, _L, _P, _P, _L, _P, _L, _I, _I, _I, _I, _I, _F, _I],
    "sample_rows": [_P, _L, _I, _I, _P, _P, _P, _P, _P, _I],
    "nucleus_rows": [_P, _L, _I, _I, _P, _P, _P, _P, _I],
}
DTYPES = (torch.float32, torch.bfloat16)  # activations and dense weights it takes


_SWITCH = {"on": True}  # --no-native-kernels turns it off (set_enabled)


def set_enabled(on: bool) -> None:
    """Offer these kernels or not (`--native-kernels`), before a runner or policy is built:
    off, library() is None, so nothing here is offered or measured."""
    if _SWITCH["on"] != on:
        _SWITCH["on"] = on
        library.cache_clear()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (once per process), or None where they
    cannot be built here or are switched off (the reason is logged once)."""
    if not _SWITCH["on"]:
        log.info("native kernels off (--no-native-kernels): torch's kernels only")
        return None
    if platform.system() != "Linux":  # -fopenmp and -march=native are gcc/clang on Linux
        log.info("native kernels not built: %s", platform.system())
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.info("native kernels not built: no C compiler (cc) on PATH")
        return None
    try:
        path = _built(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernels not built (%s): torch's kernels only", e)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def build_id() -> str | None:
    """Names the loaded build (a hash of its sources, compiler and CPU), or None where none is:
    kernel choices cached against another build are measured again (hardware.cache_key)."""
    lib = library()
    return None if lib is None else Path(lib._name).stem


def _built(cc: str) -> Path:
    """The shared library for these sources, compiler and CPU: from the cache, else compiled
    into it (through a temporary name and a rename, so a concurrent start never loads half a
    file)."""
    sources = [f.read_bytes() for f in (*SOURCES, *HEADERS)]
    model, flags = read_cpuinfo()  # -march=native: the build fits this CPU kind only
    what = (sources, cc, FLAGS, platform.machine(), model, sorted(flags))
    key = hashlib.sha256(repr(what).encode()).hexdigest()[:16]
    out = _cache_dir() / f"native-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(
        [cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp), "-lm"],
        capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{cc} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    tmp.replace(out)
    return out


def _cache_dir() -> Path:
    """The user's cache directory where it is writable, else a fresh temporary one."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genserve"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="genserve-native-"))


def supports(weight: torch.Tensor) -> bool:
    """Whether the kernel can multiply by this weight (on this machine)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (*DTYPES, torch.int8)
        and weight.dim() == 2
        and library() is not None
    )


class Gemv:
    """y = x W^T (times a scale per output column for int8 weights) (+ bias) for x [M, K] in
    float32 or bf16; y comes back in x's dtype. Holds the weight (contiguous), the scales and
    the bias, so the pointers handed to C stay valid while it lives. `vnni` (int8 weights,
    where vnni_ready()): x's rows quantized to int16 and summed exactly with VPDPWSSD
    (gemv.c's gemv_i8_vnni) instead of widened to float32."""

    __slots__ = ("bias", "scales", "vnni", "weight")

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor | None = None,
        bias: torch.Tensor | None = None, vnni: bool = False,
    ) -> None:  # fmt: skip
        self.weight = weight.contiguous()
        self.scales = None if scales is None else scales.to(torch.float32).contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.vnni = vnni
        _check_weight(self.weight, self.scales)
        if vnni and (weight.dtype != torch.int8 or not vnni_ready()):
            raise ValueError("the VNNI gemv needs int8 weights and a CPU with AVX512-VNNI")

    @property
    def format(self) -> int:
        """How decode.c reads the weight (its FORMAT_* codes)."""
        return _VNNI_FORMAT if self.vnni else _FORMATS[self.weight.dtype]

    def __call__(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """y in x's dtype, or float32 sums as they are (`float_out`: a model's logits)."""
        y = _multiply(x, self.weight, self.scales, float_out, self.vnni)
        return y if self.bias is None else y.add_(self.bias)


def _check_weight(weight: torch.Tensor, scales: torch.Tensor | None) -> None:
    if library() is None or not supports(weight):
        raise ValueError(f"native gemv unavailable for {weight.dtype} on {weight.device}")
    if weight.dtype == torch.int8 and (scales is None or tuple(scales.shape) != weight.shape[:1]):
        raise ValueError("int8 weights need one scale per output row")


def _multiply(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, float_out: bool = False,
    vnni: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The C call, on a weight (and float32 scales) already checked and contiguous."""
    lib = library()
    n, k = weight.shape
    if x.dtype not in DTYPES or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} against weight [{n}, {k}]")
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32 if float_out else x.dtype)
    if x.shape[0] == 0:
        # No rows: a step whose chunks all end mid-prompt asks the LM head for none, and an
        # empty float32 x has no data pointer, which the C side read as a failed allocation.
        return y
    bf16 = int(x.dtype == torch.bfloat16)
    if weight.dtype == torch.int8:
        fn, extra = (lib.gemv_i8_vnni if vnni else lib.gemv_i8), (scales.data_ptr(),)
    else:
        fn, extra = (lib.gemv_bf16 if weight.dtype == torch.bfloat16 else lib.gemv_f32), ()
    y_bf16 = int(y.dtype == torch.bfloat16)
    args = (x.data_ptr(), bf16, weight.data_ptr(), *extra, y.data_ptr(), y_bf16)
    if fn(*args, x.shape[0], n, k, torch.get_num_threads()):
        raise MemoryError("gemv: no memory for the activations' float32 copy")
    return y


def vnni_ready() -> bool:
    """Whether gemv.c's int8 kernel on AVX512-VNNI runs here (built where the CPU has it, and
    not capped off by ONEDNN_MAX_CPU_ISA: a run can stand for an older CPU)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap not in ("", "ALL", "DEFAULT") and not any(t in cap for t in ("VNNI", "BF16", "AMX")):
        return False
    lib = library()
    return lib is not None and lib.gemv_vnni_available() == 1


@functools.cache
def amx_ready() -> bool:
    """Whether amx.c's kernel runs here: built with AMX (the CPU has it) and the kernel let
    this process use the tiles (Linux asks each process to request them)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap not in ("", "ALL", "DEFAULT") and "AMX" not in cap:
        return False  # oneDNN's cap caps this kernel too: a run can stand for a CPU without AMX
    lib = library()
    return lib is not None and lib.amx_init() == 0


class Amx:
    """y = x W^T (+ bias) on AMX tiles for bf16 x [M, K] and a bf16 weight [N, K] with N a
    multiple of 16 and K of 32, packed here into amx.c's tile layout (a copy).

    `glu`: the weight is a gated MLP's [gate; up] (N = 2I, I a multiple of 16, no bias),
    packed with each gate column block beside its up block, so that `silu_mul` can give
    SiLU(gate) * up [M, I] straight from the tiles' sums (amx_glu_bf16). Called, it still
    gives the [M, 2I] product of the weight as given."""

    __slots__ = ("bias", "glu", "n", "packed")

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.packed.shape[1] * 32

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, glu: bool = False
    ) -> None:
        n, k = weight.shape
        if not amx_ready() or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError(f"the AMX kernel is unavailable for {weight.dtype} here")
        if n % 16 or k % 32:
            raise ValueError(f"the AMX kernel needs [16n, 32k] weights, not [{n}, {k}]")
        if glu and (n % 32 or bias is not None):
            raise ValueError(f"gate/up tiles need [32n, 32k] weights and no bias, not [{n}, {k}]")
        if glu:  # [gate; up] -> gate block 0, up block 0, gate block 1, ... (16 rows each)
            weight = weight.reshape(2, n // 32, 16, k).transpose(0, 1).reshape(n, k)
        # [N/16][K/32][16 pairs of k][16 columns][2]: TDPBF16PS's tiles, one after another
        tiles = weight.reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4)
        self.packed = tiles.contiguous()
        self.n, self.glu = n, glu
        self.bias = None if bias is None else bias.contiguous()

    def __call__(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """y in bf16, or float32 sums as they are (`float_out`: a model's logits)."""
        x = self._operand(x)
        if self.glu:
            if float_out:
                raise ValueError("amx: gate/up tiles give bf16 only")
            return self._glu(x, self.n, silu=False)
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32 if float_out else torch.bfloat16)
        rc = library().amx_linear_bf16(
            x.data_ptr(), self.packed.data_ptr(), y.data_ptr(), int(not float_out), x.shape[0],
            self.n, x.shape[1], torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise MemoryError("amx: no memory for the rows' padded copy")
        return y if self.bias is None else y.add_(self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(x gate^T) * (x up^T) [M, I] in bf16, rounded step by step as decode.c's
        glue_silu_mul rounds the product's halves: the same bits."""
        if not self.glu:
            raise ValueError("amx: silu_mul needs gate/up tiles (glu)")
        return self._glu(self._operand(x), self.n // 2, silu=True)

    def _operand(self, x: torch.Tensor) -> torch.Tensor:
        k = self.packed.shape[1] * 32
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"amx: x {tuple(x.shape)} {x.dtype} against weight [{self.n}, {k}]")
        return x.contiguous()

    def _glu(self, x: torch.Tensor, width: int, silu: bool) -> torch.Tensor:
        y = torch.empty(x.shape[0], width, dtype=torch.bfloat16)
        rc = library().amx_glu_bf16(
            x.data_ptr(), self.packed.data_ptr(), y.data_ptr(), x.shape[0], self.n // 2,
            x.shape[1], torch.get_num_threads(), int(silu),
        )  # fmt: skip
        if rc:
            raise MemoryError("amx: no memory for the rows' padded copy")
        return y


class Dp:
    """y = x W^T (+ bias) with AVX512-BF16 dot products (dp.c) for bf16 x [M, K] and a bf16
    weight [N, K] with N a multiple of 16 and K even, packed here as amx.c packs it,
    [N/16][K/2][16 columns][2] (a copy): each 16-column block one stream of k pairs."""

    __slots__ = ("bias", "n", "packed")

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.packed.shape[1] * 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        n, k = weight.shape
        if not dp_ready() or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError(f"the AVX512-BF16 kernel is unavailable for {weight.dtype} here")
        if n % 16 or k % 2:
            raise ValueError(f"the AVX512-BF16 kernel needs [16n, 2k] weights, not [{n}, {k}]")
        self.packed = weight.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        self.n = n
        self.bias = None if bias is None else bias.contiguous()

    def __call__(self, x: torch.Tensor, float_out: bool = False) -> torch.Tensor:
        """y in bf16, or float32 sums as they are (`float_out`: a model's logits)."""
        k = self.packed.shape[1] * 2
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"dp: x {tuple(x.shape)} {x.dtype} against weight [{self.n}, {k}]")
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32 if float_out else torch.bfloat16)
        if x.shape[0]:
            rc = library().dp_linear_bf16(
                x.data_ptr(), self.packed.data_ptr(), y.data_ptr(), int(not float_out),
                x.shape[0], self.n, k, torch.get_num_threads(),
            )  # fmt: skip
            if rc:
                raise ValueError(f"dp linear failed ({rc})")
        return y if self.bias is None else y.add_(self.bias)


AMX_ATTEND_MAX_DIM = 128  # amx.c's PA_MAX_DIM
DP_ATTEND_DIMS = (32, 64, 128)  # head dims dp.c takes


def dp_ready() -> bool:
    """Whether dp.c's AVX512-BF16 attention runs here (built where the CPU has those dot
    products, and not capped off by ONEDNN_MAX_CPU_ISA: a run can stand for an older CPU)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap not in ("", "ALL", "DEFAULT") and "BF16" not in cap and "AMX" not in cap:
        return False
    lib = library()
    return lib is not None and lib.dp_available() == 1


def amx_attend_causal(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
) -> torch.Tensor:
    """A prompt chunk's causal attention on AMX tiles (amx.c): q [n, heads, D] bf16, the rows
    at positions start .. start + n - 1; keys/values [kv_heads, start + n, D] bf16, each head's
    rows contiguous (a view of a layer's cache is fine). Row i sees positions 0 .. start + i."""
    return _attend_causal("amx", q, keys, values, start)


def dp_attend_causal(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
) -> torch.Tensor:
    """amx_attend_causal's work with AVX512-BF16 dot products (dp.c), head dims 32, 64
    or 128."""
    return _attend_causal("dp", q, keys, values, start)


def _attend_causal(
    kind: str, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int
) -> torch.Tensor:
    n, heads, dim = q.shape
    kv, end, _ = keys.shape
    ok = q.dtype == keys.dtype == values.dtype == torch.bfloat16 and end == start + n
    same = keys.stride() == values.stride() and keys.stride()[1:] == (dim, 1)
    ready = amx_ready() if kind == "amx" else dp_ready() and dim in DP_ATTEND_DIMS
    if not (ready and ok and same and tuple(values.shape) == tuple(keys.shape)):
        raise ValueError(f"{kind} attention: q {tuple(q.shape)} against keys {tuple(keys.shape)}")
    q = q.contiguous()
    out = torch.empty_like(q)
    fn = library().amx_attend_causal if kind == "amx" else library().dp_attend_causal
    rc = fn(
        q.data_ptr(), heads * dim, keys.data_ptr(), values.data_ptr(), keys.stride(0),
        out.data_ptr(), heads * dim, n, start, heads, kv, dim, dim**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise (MemoryError if rc == -1 else ValueError)(f"{kind} attention failed ({rc})")
    return out


@dataclass(frozen=True, slots=True)
class Draws:
    """sample.c's first draws: a token per row and its status: STANDS, OUTSIDE (a top_p draw
    outside its nucleus: drawn again inside it with a second uniform, `redraw_rows`) or
    CANNOT (no finite logit: sampler.py reports the row)."""

    tokens: torch.Tensor  # [rows] int64
    status: list[int]


STANDS, OUTSIDE, CANNOT = 1, 0, -1


def _sampling_args(
    x: torch.Tensor, inv_temperature: torch.Tensor, u: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = x.shape[0]
    if library() is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        raise ValueError(f"sample_rows: x {tuple(x.shape)} {x.dtype} on {x.device}")
    if x.stride(1) != 1:
        raise ValueError("sample_rows: x's rows must be contiguous")
    t, u, p = _as(inv_temperature, torch.float32), _as(u, torch.float64), _as(top_p, torch.float64)
    if not t.numel() == u.numel() == p.numel() == rows:
        raise ValueError("sample_rows: one temperature, uniform and top_p per row")
    return t, u, p


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous `dtype` tensor; itself when it is one (a sampled step's common case:
    no dispatch, which right after a step's weights streamed through the caches costs)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def draw_rows(
    x: torch.Tensor, inv_temperature: torch.Tensor, u: torch.Tensor, top_p: torch.Tensor
) -> Draws:
    """Each row of float32 logits x [rows, V] drawn with its own uniform u (float64), after
    temperature (inv_temperature float32 [rows]); top_p (float64 [rows], 1: none) decides
    which draws stand."""
    t, u, p = _sampling_args(x, inv_temperature, u, top_p)
    rows, vocab = x.shape
    tokens = torch.empty(rows, dtype=torch.int32)
    status = torch.empty(rows, dtype=torch.int8)
    rc = library().sample_rows(
        x.data_ptr(), x.stride(0), rows, vocab, t.data_ptr(), u.data_ptr(), p.data_ptr(),
        tokens.data_ptr(), status.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise MemoryError("sample_rows: no memory for a row's weights")
    return Draws(tokens.long(), status.tolist())


def redraw_rows(
    x: torch.Tensor, inv_temperature: torch.Tensor, u2: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Rows whose first draw fell OUTSIDE their nucleus, drawn inside it with second uniforms
    u2: [rows] int64 tokens (-1 where a row cannot draw)."""
    t, u2, p = _sampling_args(x, inv_temperature, u2, top_p)
    rows, vocab = x.shape
    tokens = torch.empty(rows, dtype=torch.int32)
    rc = library().nucleus_rows(
        x.data_ptr(), x.stride(0), rows, vocab, t.data_ptr(), u2.data_ptr(), p.data_ptr(),
        tokens.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise MemoryError("nucleus_rows: no memory for a row's weights")
    return tokens.long()


@functools.cache
def op():  # noqa: ANN201 - torch's custom-op object
    """`genserve::gemv(x, weight, scales)` as a torch custom op, for graphs that torch.compile
    builds (compiled.py): inductor calls it as an opaque kernel. Registered on first use, not
    at import."""

    @torch.library.custom_op("genserve::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        return _multiply(x, weight.contiguous(), scales)

    @gemv.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    return gemv


def attend_lanes(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lanes: torch.Tensor,
    lengths: torch.Tensor, row0: int, lane_len: int,
) -> torch.Tensor:  # fmt: skip
    """One decode token per sequence against its lane of a layer's cache (attend.c): q [B,
    heads, D]; keys/values [kv_heads, rows, D], contiguous; row j of q reads the lengths[j]
    positions from row row0 + lanes[j] * lane_len. lanes and lengths are int32 [B]."""
    lib = library()
    b, heads, dim = q.shape
    kv, rows, _ = keys.shape
    if b == 0:
        return q.new_empty(q.shape)
    last = row0 + int(lanes.max()) * lane_len + int(lengths.max())  # an upper bound
    if lib is None or q.dtype != keys.dtype or last > rows or int(lengths.min()) < 1:
        raise ValueError(f"attend_lanes: q {tuple(q.shape)} against a cache of {rows} rows")
    if lanes.dtype != torch.int32 or lengths.dtype != torch.int32:
        raise ValueError("attend_lanes: lanes and lengths are int32")
    q = q.contiguous()
    out = torch.empty_like(q)
    rc = lib.attend_lanes(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), lanes.data_ptr(),
        lengths.data_ptr(), b, heads, kv, dim, rows, row0, lane_len, dim**-0.5,
        int(q.dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise ValueError(f"attend_lanes failed ({rc}): {heads} heads over {kv}, dim {dim}")
    return out


class _Lin(ctypes.Structure):
    _fields_ = [
        ("w", _P), ("scales", _P), ("bias", _P), ("format", _L), ("n", _L), ("k", _L),
        ("tiles", _P), ("tiles_from", _L), ("glu", _L), ("tiles_dp", _L),
        ("lora_a", _P), ("lora_bt", _P), ("lora_owner", _P), ("lora_rank", _L),
        ("lora_lo", _L), ("lora_n", _L),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _P), ("post_norm", _P), ("qkv", _Lin), ("o", _Lin), ("gate_up", _Lin),
        ("down", _Lin), ("k_cache", _P), ("v_cache", _P),
    ]  # fmt: skip


class _Step(ctypes.Structure):
    _fields_ = [
        *((name, _L) for name in (
            "rows", "hidden", "heads", "kv_heads", "dim", "inter", "cache_rows", "bf16", "threads"
        )),
        ("eps", ctypes.c_double), ("scale", ctypes.c_double),
        ("cos", _P), ("sin", _P), ("write", _P), ("starts", _P), ("lengths", _P),
        ("owners", _P),
    ]  # fmt: skip


_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_VNNI_FORMAT = 3  # int8 weights through gemv_i8_vnni
_DP_FORMAT = 4  # bf16 weights packed for dp.c (a Dp's), below a linear's tiles
MAX_HEAD_DIM, MAX_GROUP = 256, 16  # decode.c's and attend.c's fixed buffers


@dataclass(frozen=True, slots=True)
class DecodeShape:
    """The model's shape as decode.c computes it (Llama family, rotate-half rotary, SiLU)."""

    hidden: int
    heads: int
    kv_heads: int
    dim: int
    inter: int
    eps: float
    dtype: torch.dtype  # the activations', norms' and caches' dtype


@dataclass(frozen=True, slots=True)
class LinLora:
    """The loaded adapters' LoRA for one projection of one layer, side by side, as decode.c
    adds it to a row of its own adapter: a [rank, k] and bt = B^T [rank, n] in float32, owner
    [rank] int32 (the adapter index of each rank column), adding to the projection's outputs
    lo .. lo + n."""

    a: torch.Tensor
    bt: torch.Tensor
    owner: torch.Tensor
    lo: int

    def check(self, name: str, shape: tuple[int, int]) -> None:
        rank, (out, k) = self.a.shape[0], shape
        ok = (
            all(t.dtype == torch.float32 and t.is_contiguous() for t in (self.a, self.bt))
            and self.owner.dtype == torch.int32 and self.owner.is_contiguous()
            and tuple(self.a.shape) == (rank, k) and self.bt.shape[0] == rank
            and tuple(self.owner.shape) == (rank,)
            and self.lo >= 0 and self.lo + self.bt.shape[1] <= out
        )  # fmt: skip
        if not ok:
            raise ValueError(f"decode_layers: {name}'s LoRA does not fit [{out}, {k}]")


@dataclass(frozen=True, slots=True)
class DecodeLayer:
    """What decode.c reads of one decoder layer: the runner's own tensors and kernels."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    # Each linear's kernel below its tiles' rows: gemv, or dp.c's packed weight (where the
    # policy runs dp for a lone row and amx for more); None where its tiles take every row
    # count (from one row up): the policy runs amx or dp alone there and keeps no gemv.
    qkv: Gemv | Dp | None
    o: Gemv | Dp | None
    gate_up: Gemv | Dp | None
    down: Gemv | Dp | None
    k_cache: torch.Tensor  # [kv_heads, cache_rows, dim]
    v_cache: torch.Tensor
    # Per linear (qkv, o, gate_up, down): amx.c's or dp.c's packed weight and the rows from
    # which a step multiplies through it (where the policy measured it faster), or None: gemv
    # always.
    tiles: tuple[tuple[Amx | Dp, int] | None, ...] = (None, None, None, None)


class DecodeStep:
    """One step's rows as decode.c reads them: B single-token decodes, row j at position
    lengths[j] - 1 with cos/sin [B, dim] float32 its rotary tables; its key and value go to
    cache row write[j], and it attends over lengths[j] positions from cache row starts[j].
    Checked here against the shape and the caches' rows, so C never reads or writes outside
    them."""

    __slots__ = ("_keep", "owners", "rows", "struct")

    def __init__(
        self, shape: DecodeShape, cache_rows: int, cos: torch.Tensor, sin: torch.Tensor,
        write: Sequence[int], starts: Sequence[int], lengths: Sequence[int],
        owners: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        """`owners`: each row's adapter index in the stack's LoRA (-1: none), or None."""
        b = len(write)
        if not len(starts) == len(lengths) == b or (owners is not None and len(owners) != b):
            raise ValueError("decode step: one write row, start, length (and owner) per row")
        rows = cache_rows
        if any(n < 1 or a < 0 or a + n > rows for a, n in zip(starts, lengths, strict=True)):
            raise ValueError("decode step: a row attends outside its cache")
        tables = _rotary_tables(shape, cache_rows, cos, sin, torch.tensor(write, dtype=torch.int64))
        ints = (torch.tensor(starts, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32))
        self.owners = None if owners is None else torch.tensor(owners, dtype=torch.int32)
        self._keep = (*tables, *ints)  # alive while C reads them
        self.rows = b
        ptrs = [t.data_ptr() for t in self._keep]
        own = None if self.owners is None else self.owners.data_ptr()
        self.struct = _step_struct(shape, b, rows, *ptrs, own)


class GlueRows:
    """Rows of any step (prompt chunks too) for the glue's row-wise stages: the norms, the
    residual and SiLU, which read neither positions nor the cache; with the rotary tables
    cos/sin [rows, dim] float32 and each row's cache row `write`, rotate_write's too.
    DecodeGlue.attend refuses these (they say nothing of what a row attends)."""

    __slots__ = ("_keep", "rotary", "rows", "struct")

    def __init__(
        self, shape: DecodeShape, rows: int, cache_rows: int = 0, cos: torch.Tensor | None = None,
        sin: torch.Tensor | None = None, write: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.rows, self.rotary = rows, cos is not None
        self._keep: tuple[torch.Tensor, ...] = ()
        if cos is not None:
            if sin is None or write is None or write.shape != (rows,):
                raise ValueError("glue rows: sin and one write row per row go with cos")
            self._keep = _rotary_tables(shape, cache_rows, cos, sin, write)
        ptrs = [t.data_ptr() for t in self._keep] or [None] * 3
        self.struct = _step_struct(shape, rows, cache_rows, *ptrs, None, None, None)


def _rotary_tables(
    shape: DecodeShape, cache_rows: int, cos: torch.Tensor, sin: torch.Tensor, write: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos, sin and write checked: [rows, dim] float32 tables, int64 rows inside the cache."""
    b = write.shape[0]
    for t in (cos, sin):
        if t.dtype != torch.float32 or tuple(t.shape) != (b, shape.dim) or not t.is_contiguous():
            raise ValueError(f"decode step: rotary tables [{b}, {shape.dim}] float32")
    write = write.to(torch.int64).contiguous()
    if b and not (int(write.min()) >= 0 and int(write.max()) < cache_rows):
        raise ValueError("decode step: a write row outside the cache")
    return cos, sin, write


def _step_struct(shape: DecodeShape, rows: int, cache_rows: int, *pointers: int | None) -> _Step:
    """decode.c's Step: the shape, the rows and the threads; `pointers`: cos, sin, write,
    starts, lengths and owners (None where the stages given it read no table)."""
    bf16 = int(shape.dtype == torch.bfloat16)
    return _Step(
        rows, shape.hidden, shape.heads, shape.kv_heads, shape.dim, shape.inter, cache_rows,
        bf16, torch.get_num_threads(), shape.eps, shape.dim**-0.5, *pointers,
    )  # fmt: skip


def _check_rows(shape: DecodeShape, step: DecodeStep | GlueRows, **tensors: torch.Tensor) -> None:
    """Each tensor C reads or writes: the model's dtype, contiguous, [rows, width]."""
    widths = {"x": shape.hidden, "h": shape.hidden, "y": shape.hidden, "act": shape.inter,
              "qkv": (shape.heads + 2 * shape.kv_heads) * shape.dim, "gu": 2 * shape.inter,
              "q": shape.heads * shape.dim, "att": shape.heads * shape.dim}  # fmt: skip
    for name, t in tensors.items():
        rows, width = step.rows, widths[name]
        if t.dtype != shape.dtype or t.shape[0] != rows or t.numel() != rows * width:
            raise ValueError(f"decode.c: {name} {tuple(t.shape)} {t.dtype}, not [{rows}, {width}]")
        if not t.is_contiguous():
            raise ValueError(f"decode.c: {name} is not contiguous")


class DecodeStack:
    """Every decoder layer of a step of single-token decodes in one C call (decode.c). Holds
    the layers, so the pointers handed to C stay valid while it lives. Raises ValueError at
    construction for anything decode.c does not compute (the runner then stays eager)."""

    def __init__(self, layers: Sequence[DecodeLayer], shape: DecodeShape) -> None:
        if library() is None:
            raise ValueError("native kernels unavailable here")
        self.shape, self.layers = shape, tuple(layers)
        self.cache_rows = _check_stack(self.layers, shape)
        self._structs = (_Layer * len(self.layers))(*map(_layer_struct, self.layers))

    def with_lora(self, lora: Sequence[Sequence[LinLora | None]]) -> StackLora:
        """The layers again with each projection's LoRA (per layer: qkv, o, gate_up, down),
        for steps whose rows name their adapters (DecodeStep's owners)."""
        if len(lora) != len(self.layers):
            raise ValueError("decode_layers: one LoRA entry per layer")
        names = ("qkv", "o", "gate_up", "down")
        s = self.shape
        widths = ((s.heads + 2 * s.kv_heads) * s.dim, s.hidden, 2 * s.inter, s.hidden)
        ins = (s.hidden, s.heads * s.dim, s.hidden, s.inter)
        for per_layer in lora:
            for name, ll, out, k in zip(names, per_layer, widths, ins, strict=True):
                if ll is not None:
                    ll.check(name, (out, k))
        structs = (_Layer * len(self.layers))(
            *(_layer_struct(layer, ll) for layer, ll in zip(self.layers, lora, strict=True))
        )
        return StackLora(structs, tuple(tuple(x) for x in lora))

    def __call__(self, step: DecodeStep, x: torch.Tensor, lora: StackLora | None = None) -> None:
        """x [B, hidden] (contiguous, the model's dtype) through every layer, in place; with
        `lora`, each row of step's owners adds its adapter's products."""
        _check_rows(self.shape, step, x=x)
        if step.owners is not None and lora is None:
            raise ValueError("decode_layers: rows name adapters, and no LoRA was given")
        structs = lora.structs if lora is not None else self._structs
        rc = library().decode_layers(
            structs, len(self.layers), ctypes.byref(step.struct), x.data_ptr()
        )
        if rc:
            raise ValueError(f"decode_layers failed ({rc})")


@dataclass(frozen=True, slots=True)
class StackLora:
    """decode.c's layers with the adapters' LoRA (DecodeStack.with_lora); holds the tensors
    whose pointers they carry."""

    structs: ctypes.Array
    keep: tuple


class DecodeGlue:
    """decode.c's stages between a layer's linears, for a runner that calls torch's linears
    itself (more decodes than gemv serves well): each stage one C call over every row."""

    def __init__(self, shape: DecodeShape, cache_rows: int) -> None:
        if library() is None:
            raise ValueError("native kernels unavailable here")
        _check_stack((), shape)
        self.shape, self.cache_rows = shape, cache_rows

    def step(
        self, cos: torch.Tensor, sin: torch.Tensor, write: Sequence[int], starts: Sequence[int],
        lengths: Sequence[int],
    ) -> DecodeStep:  # fmt: skip
        return DecodeStep(self.shape, self.cache_rows, cos, sin, write, starts, lengths)

    def rows(
        self, n: int, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
        write: torch.Tensor | None = None,
    ) -> GlueRows:  # fmt: skip
        """n rows of any step, for the row-wise stages (and rotate_write, given the tables)."""
        return GlueRows(self.shape, n, self.cache_rows, cos, sin, write)

    def norm(
        self, st: DecodeStep | GlueRows, x: torch.Tensor, w: torch.Tensor, h: torch.Tensor
    ) -> None:
        """h = RMSNorm(x) * w"""
        _check_rows(self.shape, st, x=x, h=h)
        _check_norm(self.shape, w)
        if library().glue_norm(ctypes.byref(st.struct), x.data_ptr(), w.data_ptr(), h.data_ptr()):
            raise MemoryError("glue_norm: no memory for a row's float32 copy")

    def residual_norm(
        self,
        st: DecodeStep | GlueRows,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        h: torch.Tensor,
    ) -> None:
        """x += y, then h = RMSNorm(x) * w"""
        _check_rows(self.shape, st, x=x, y=y, h=h)
        _check_norm(self.shape, w)
        rc = library().glue_residual_norm(
            ctypes.byref(st.struct), x.data_ptr(), y.data_ptr(), w.data_ptr(), h.data_ptr()
        )
        if rc:
            raise MemoryError("glue_residual_norm: no memory for a row's float32 copy")

    def attend(
        self, st: DecodeStep, k_cache: torch.Tensor, v_cache: torch.Tensor, qkv: torch.Tensor,
        q: torch.Tensor, att: torch.Tensor,
    ) -> None:  # fmt: skip
        """Rotary on qkv's q and k (in place), k and v into the caches, att = attention."""
        if not isinstance(st, DecodeStep):
            raise ValueError("decode.c: attention needs a DecodeStep's positions and cache rows")
        _check_rows(self.shape, st, qkv=qkv, q=q, att=att)
        _check_caches(self.shape, self.cache_rows, k_cache, v_cache)
        rc = library().glue_attend(
            ctypes.byref(st.struct), k_cache.data_ptr(), v_cache.data_ptr(), qkv.data_ptr(),
            q.data_ptr(), att.data_ptr(),
        )  # fmt: skip
        if rc:
            raise ValueError(f"glue_attend failed ({rc})")

    def rotate_write(
        self, st: DecodeStep | GlueRows, k_cache: torch.Tensor, v_cache: torch.Tensor,
        qkv: torch.Tensor,
    ) -> None:  # fmt: skip
        """Rotary on qkv's q and k (in place), k and v into the caches at the rows' write rows."""
        if isinstance(st, GlueRows) and not st.rotary:
            raise ValueError("decode.c: rotate_write needs the rows' rotary tables")
        if st.struct.cache_rows != self.cache_rows:
            raise ValueError("decode.c: rows built for another cache")
        _check_rows(self.shape, st, qkv=qkv)
        _check_caches(self.shape, self.cache_rows, k_cache, v_cache)
        if library().glue_rotate_write(
            ctypes.byref(st.struct), k_cache.data_ptr(), v_cache.data_ptr(), qkv.data_ptr()
        ):
            raise ValueError("glue_rotate_write: a head past decode.c's buffers")

    def silu_mul(self, st: DecodeStep | GlueRows, gu: torch.Tensor, act: torch.Tensor) -> None:
        """act = silu(gate) * up, gu being [gate | up]"""
        _check_rows(self.shape, st, gu=gu, act=act)
        library().glue_silu_mul(ctypes.byref(st.struct), gu.data_ptr(), act.data_ptr())


def _check_norm(s: DecodeShape, w: torch.Tensor) -> None:
    if w.dtype != s.dtype or not w.is_contiguous() or tuple(w.shape) != (s.hidden,):
        raise ValueError(f"decode.c: norm weight {tuple(w.shape)} {w.dtype}")


def _check_stack(layers: Sequence[DecodeLayer], s: DecodeShape) -> int:
    """The caches' row count, once every tensor is checked against the shape."""
    if s.dtype not in DTYPES or s.dim % 2 or s.dim > MAX_HEAD_DIM or s.heads % s.kv_heads:
        raise ValueError(f"decode.c computes no {s.dtype}, head_dim {s.dim}")
    if s.heads // s.kv_heads > MAX_GROUP:  # attend.c's fixed buffers
        raise ValueError(f"decode.c attends at most {MAX_GROUP} query heads per KV head")
    qkv = (s.heads + 2 * s.kv_heads) * s.dim
    linears = {"qkv": (qkv, s.hidden), "o": (s.hidden, s.heads * s.dim),
               "gate_up": (2 * s.inter, s.hidden), "down": (s.hidden, s.inter)}  # fmt: skip
    rows = layers[0].k_cache.shape[1] if layers else 0
    for layer in layers:
        for (name, shape), tile in zip(linears.items(), layer.tiles, strict=True):
            _check_linear(name, shape, getattr(layer, name), tile, s.dtype)
        for t in (layer.input_norm, layer.post_norm):
            if t.dtype != s.dtype or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("decode_layers: norms in the model's dtype, contiguous")
        _check_caches(s, rows, layer.k_cache, layer.v_cache)
    return rows


def _check_linear(
    name: str, shape: tuple[int, int], g: Gemv | Dp | None, tile: tuple[Amx | Dp, int] | None,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    """One linear as decode.c reads it: gemv's weight (or dp.c's packed one), or tiles from
    one row up, or both."""
    if g is None and (tile is None or tile[1] > 1):
        raise ValueError(f"decode_layers: {name} has no kernel for a lone row")
    if isinstance(g, Dp) and (dtype != torch.bfloat16 or g.shape != shape):
        raise ValueError(f"decode_layers: {name}'s dp weight is not its bf16 weight")
    weight, bias = (g.weight, g.bias) if isinstance(g, Gemv) else (None, (g or tile[0]).bias)  # type: ignore[index,union-attr]
    if weight is not None and tuple(weight.shape) != shape:
        raise ValueError(f"decode_layers: {name} {tuple(weight.shape)}, not {shape}")
    if bias is not None and bias.dtype != dtype:
        raise ValueError(f"decode_layers: {name}'s bias is not {dtype}")
    if tile is not None and (dtype != torch.bfloat16 or tile[0].shape != shape):
        raise ValueError(f"decode_layers: {name}'s tiles are not its bf16 weight")


def _check_caches(s: DecodeShape, rows: int, *caches: torch.Tensor) -> None:
    """A layer's caches as decode.c indexes them: [kv_heads, rows, dim] in the model's dtype,
    contiguous, on the CPU."""
    for cache in caches:
        if (
            cache.dtype != s.dtype
            or not cache.is_contiguous()
            or cache.device.type != "cpu"
            or tuple(cache.shape) != (s.kv_heads, rows, s.dim)
        ):
            raise ValueError(f"decode.c: cache {tuple(cache.shape)} {cache.dtype}")


def _lin_struct(
    g: Gemv | Dp | None, tile: tuple[Amx | Dp, int] | None, lora: LinLora | None = None
) -> _Lin:
    tiles, start = (tile[0].packed.data_ptr(), tile[1]) if tile is not None else (None, 0)
    dp = int(tile is not None and isinstance(tile[0], Dp))
    glu = int(tile is not None and not dp and tile[0].glu)  # type: ignore[union-attr]
    adds = _lora_fields(lora)
    if isinstance(g, Dp):  # dp.c's packed weight below the tiles' rows
        bias = g.bias.data_ptr() if g.bias is not None else None
        fmt = _DP_FORMAT
        return _Lin(g.packed.data_ptr(), None, bias, fmt, *g.shape, tiles, start, glu, dp, *adds)
    if g is None:  # tiles from one row up (_check_stack): decode.c never reaches gemv
        packed = tile[0]  # type: ignore[index]
        bias = packed.bias.data_ptr() if packed.bias is not None else None
        fmt = _FORMATS[torch.bfloat16]
        return _Lin(None, None, bias, fmt, *packed.shape, tiles, start, glu, dp, *adds)
    scales = g.scales.data_ptr() if g.scales is not None else None
    bias = g.bias.data_ptr() if g.bias is not None else None
    n, k = g.weight.shape
    return _Lin(g.weight.data_ptr(), scales, bias, g.format, n, k, tiles, start, glu, dp, *adds)


def _lora_fields(lora: LinLora | None) -> tuple:
    if lora is None:
        return (None, None, None, 0, 0, 0)
    ptrs = (lora.a.data_ptr(), lora.bt.data_ptr(), lora.owner.data_ptr())
    return (*ptrs, lora.a.shape[0], lora.lo, lora.bt.shape[1])


def _layer_struct(layer: DecodeLayer, lora: Sequence[LinLora | None] | None = None) -> _Layer:
    gemvs = (layer.qkv, layer.o, layer.gate_up, layer.down)
    adds = lora if lora is not None else (None,) * 4
    lins = (_lin_struct(g, t, a) for g, t, a in zip(gemvs, layer.tiles, adds, strict=True))
    return _Layer(
        layer.input_norm.data_ptr(), layer.post_norm.data_ptr(), *lins,
        layer.k_cache.data_ptr(), layer.v_cache.data_ptr(),
    )  # fmt: skip
