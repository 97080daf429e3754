"""Per-step sampler time, batched sampler vs the per-row one it replaced, in one process.

    python bench/sampling.py                       # B=1,8,32, vocab 49152
    python bench/sampling.py --baseline-ref HEAD~3 --repeats 9 --threads 1

The old sampler is git's version at --baseline-ref, written to a temp file and imported beside
the current one; both run on the same logits, interleaved (old, new, old, new, ...), and the
median of the repeats is printed, with the load average before and after (the machine is
shared). Two logit shapes: "flat" is a random-weight model's (the nucleus of top_p 0.95 holds
most of the vocabulary: the case the per-row sort paid most for), "peaked" a trained model's.
The last column checks the new kept set against the definition (a stable full sort) per row.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from genserve.engine.types import SamplingParams  # noqa: E402 - after the path
from genserve.model import sampler as new  # noqa: E402

# The last commit whose sampler sorted each row on its own (issue 14 replaced it).
DEFAULT_BASELINE = "9709d68"
VOCAB = 49152
CONFIGS = {
    "temperature 0.8": {},
    "top_p 0.95": {"top_p": 0.95},
    "top_k 50": {"top_k": 50},
    "min_p 0.05": {"min_p": 0.05},
    "top_k 50 + top_p 0.95": {"top_k": 50, "top_p": 0.95},
}


def load_old(ref: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{ref}:genserve/model/sampler.py"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="old-sampler-")) / "old_sampler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sampler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sampler"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_logits(kind: str, batch: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed))
    return x * (0.5 if kind == "flat" else 4.0)


def rows_for(module: ModuleType, batch: int, kw: dict) -> list:
    # The current row holds the request's SamplingParams; the baseline's repeated its fields.
    # Which one the baseline is, from its dataclass's first field.
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    if module.SamplingRow.__dataclass_fields__.get("params") is not None:
        p = SamplingParams(temperature=0.8, **kw)
        return [module.SamplingRow(p, generator=g) for g in gens]
    return [module.SamplingRow(0.8, generator=gens[i], **kw) for i in range(batch)]


def timed_pair(old: ModuleType, logits: torch.Tensor, kw: dict, repeats: int) -> tuple:
    """Median seconds per step of the old and the new sampler, interleaved."""
    b = logits.shape[0]
    old_rows, new_rows = rows_for(old, b, kw), rows_for(new, b, kw)
    old.sample(logits, old_rows), new.sample(logits, new_rows)  # warm-up
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(repeats):
        for name, module, rows in (("old", old, old_rows), ("new", new, new_rows)):
            start = time.perf_counter()
            module.sample(logits, rows)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["old"]), statistics.median(times["new"])


def full_sort_kept(row_logits: torch.Tensor, r: new.SamplingRow) -> torch.Tensor:
    """The definition on one row: stable full sort, prefix rules in float64."""
    p = r.params
    x = row_logits * torch.tensor(1.0 / p.temperature, dtype=torch.float32)
    probs = x.softmax(-1)
    if p.min_p:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    order = x.sort(descending=True, stable=True).indices
    w = probs[order].double()
    w[min(p.top_k or VOCAB, VOCAB) :] = 0.0
    cum = w.cumsum(0)
    kept = (w > 0) & ((cum - w) < p.top_p * cum[-1]) if p.top_p < 1 else w > 0
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[order[kept]] = True
    return mask


def kept_equal(logits: torch.Tensor, kw: dict) -> str:
    rows = rows_for(new, min(4, logits.shape[0]), kw)
    params = new.DrawParams.of(rows, VOCAB, torch.device("cpu"))
    kept = new.truncated_weights(logits[: len(rows)], params) > 0
    same = sum(torch.equal(kept[i], full_sort_kept(logits[i], rows[i])) for i in range(len(rows)))
    return f"{same}/{len(rows)} rows, {int(kept.sum(-1).float().mean())} kept"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline-ref", default=DEFAULT_BASELINE)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", nargs="+", default=["flat", "peaked"])
    p.add_argument("--threads", type=int, help="torch threads (1 is steadier on a shared CPU)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    old = load_old(a.baseline_ref)
    print(f"baseline: sampler.py at {a.baseline_ref}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()}")  # fmt: skip
    print(f"{'logits':<7}{'B':>3}  {'sampling':<24}{'old ms':>9}{'new ms':>9}{'new/old':>9}"
          f"{'vs temp':>9}  kept set = full sort")  # fmt: skip
    for kind in a.kinds:
        for b in a.batches:
            logits = make_logits(kind, b)
            base_new = None
            for name, kw in CONFIGS.items():
                t_old, t_new = timed_pair(old, logits, kw, a.repeats)
                base_new = base_new or t_new  # temperature only comes first
                print(f"{kind:<7}{b:>3}  {name:<24}{t_old * 1e3:>9.2f}{t_new * 1e3:>9.2f}"
                      f"{t_new / t_old:>9.3f}{t_new / base_new:>9.2f}  "
                      f"{kept_equal(logits, kw)}", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
