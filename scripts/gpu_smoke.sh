#!/usr/bin/env bash
# GPU smoke test (issue 20, item 6): run on a machine with an NVIDIA GPU, in under 8 minutes.
#
#   scripts/gpu_smoke.sh               # from the repository root
#
# 1. A venv of its own (.venv-gpu, beside the CPU one, which stays untouched) with a CUDA torch
#    build of the pinned version (pyproject.toml), then genserve from this checkout.
#    GENSERVE_TORCH_INDEX picks the wheel index (default: PyTorch's cu128); GENSERVE_GPU_VENV
#    an existing venv to reuse (nothing installed then: genserve runs from this checkout).
# 2. The model-side unit tests on CUDA: parity with transformers in fp32 and bf16, batch
#    invariance (fixed-row calls where cuBLAS needs them), fused and per-row LoRA against peft,
#    penalties / logit_bias / grammar / logprobs on the device, device placement and the one
#    copy per step (tests/unit/test_on_device.py, test_device_placement.py); on CUDA the
#    runner attends through FlexAttention (genserve/model/flex.py), compiled on first use;
#    then the sampler's and LoRA's own unit tests, which run on the CPU in the same
#    interpreter as a check, and the flex masks' CPU test; then bench/invariance_probe.py
#    (which part of a step, if any, makes a row depend on its batch), then the
#    seeded-reproducibility integration test with its servers on CUDA (GENSERVE_DEVICE=cuda).
# 3. bench/throughput.py --device cuda: transformers' generate and raw B=32 decode on the GPU,
#    then `genserve serve --device cuda --dtype auto` on the SmolLM2-135M-shaped random model
#    at 1 and 32 streams (temperature 0.8, and top_p 0.95) and a 512-token prompt's TTFT.
# Everything prints to stdout; the exit code is the tests' (the benchmark only reports).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
INDEX="${GENSERVE_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
OUT="${OUT:-$ROOT/var/gpu-smoke}"
mkdir -p "$OUT"
started=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - started ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
  echo "no NVIDIA GPU here: nothing to smoke-test" >&2; exit 2; }

if [[ -n "${GENSERVE_GPU_VENV:-}" ]]; then
  VENV="$GENSERVE_GPU_VENV"
else
  VENV="$ROOT/.venv-gpu"
  TORCH_PIN=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml | head -1)
  stamp "venv $VENV: torch==$TORCH_PIN from $INDEX, then genserve[dev,ray]"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==$TORCH_PIN" --index-url "$INDEX"
  "$VENV/bin/pip" install -q -e ".[dev]"
fi
PY="$VENV/bin/python"
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, "
      f"{p.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
EOF

stamp "unit tests on CUDA"
status=0
"$PY" -m pytest -q -rxX -p no:cacheprovider \
  tests/unit/test_on_device.py tests/unit/test_device_placement.py \
  tests/unit/test_sampler.py tests/unit/test_batched_sampling.py tests/unit/test_lora.py \
  tests/unit/test_runner.py tests/unit/test_training_device.py \
  tests/unit/test_flex_attention.py \
  2>&1 | tee "$OUT/unit.txt" || status=$?

stamp "which part of a step depends on its batch (bench/invariance_probe.py), fp32 and bf16"
for dt in fp32 bf16; do
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/invariance_probe.py --device cuda \
    --dtype "$dt" 2>&1 | tee -a "$OUT/invariance.txt" || true
done

stamp "seeded outputs alone and under load, served on CUDA (fp32, default and --deterministic)"
GENSERVE_DEVICE=cuda "$PY" -m pytest -q -rxX -p no:cacheprovider \
  tests/integration/test_reproducibility.py 2>&1 | tee "$OUT/seeds.txt" || status=$?

stamp "bench/throughput.py --device cuda: transformers on the GPU, then genserve --dtype auto"
# The bench starts the server itself (--device cuda) on the SmolLM2-135M-shaped random model.
"$PY" bench/throughput.py --device cuda --precisions "${GENSERVE_SMOKE_PRECISIONS:-auto}" \
  --samplings temp,top_p --concurrency 1 32 --rounds 2 1 --long-prompt 512 \
  --long-prompt-rounds 3 --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt" || true

stamp "done: tests exit $status; files in $OUT"
exit "$status"
