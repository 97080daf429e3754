"""genserve's own CPU kernels (gemv.c, attend.c), built for this CPU and called through ctypes.

- `gemv.c`: the row-by-row linear kernel, one more candidate for the start-up measurement
  (hardware.py) for the weights the fast path holds: bf16, float32 or int8 with a scale per
  output channel.
- `attend.c`: decode attention over the KV lanes (runner.py), measured against SDPA when a
  runner starts.

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
from pathlib import Path

import torch

from genserve.model.cpuinfo import read_cpuinfo

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f) for f in ("gemv.c", "attend.c"))
HEADERS = (Path(__file__).with_name("bf16.h"),)  # part of the build's hash, not compiled alone
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "attend_lanes": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _L, _L, _L, _F, _I, _I],
    "gemv_i8": [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I],
    "gemv_bf16": [_P, _I, _P, _P, _I, _I, _I, _I, _I],
    "gemv_f32": [_P, _I, _P, _P, _I, _I, _I, _I, _I],
}
DTYPES = (torch.float32, torch.bfloat16)  # activations and dense weights it takes


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (once per process), or None where they
    cannot be built here (the reason is logged once)."""
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
    """y = x W^T (times a scale per output column for int8 weights) for x [M, K] in float32
    or bf16; y comes back in x's dtype. Holds the weight (contiguous) and the scales, so the
    pointers handed to C stay valid while it lives."""

    __slots__ = ("scales", "weight")

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()
        self.scales = None if scales is None else scales.to(torch.float32).contiguous()
        _check_weight(self.weight, self.scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _multiply(x, self.weight, self.scales)


def _check_weight(weight: torch.Tensor, scales: torch.Tensor | None) -> None:
    if library() is None or not supports(weight):
        raise ValueError(f"native gemv unavailable for {weight.dtype} on {weight.device}")
    if weight.dtype == torch.int8 and (scales is None or tuple(scales.shape) != weight.shape[:1]):
        raise ValueError("int8 weights need one scale per output row")


def _multiply(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """The C call, on a weight (and float32 scales) already checked and contiguous."""
    lib = library()
    n, k = weight.shape
    if x.dtype not in DTYPES or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} against weight [{n}, {k}]")
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    if weight.dtype == torch.int8:
        fn, extra = lib.gemv_i8, (scales.data_ptr(),)
    else:
        fn, extra = (lib.gemv_bf16 if weight.dtype == torch.bfloat16 else lib.gemv_f32), ()
    args = (x.data_ptr(), bf16, weight.data_ptr(), *extra, y.data_ptr(), bf16)
    if fn(*args, x.shape[0], n, k, torch.get_num_threads()):
        raise MemoryError("gemv: no memory for the activations' float32 copy")
    return y


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
