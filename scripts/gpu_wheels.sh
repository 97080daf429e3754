#!/usr/bin/env bash
# Wheels for a GPU machine without network whose image already has CUDA torch (and numpy,
# safetensors, huggingface-hub, peft, aiohttp, pytest...): genserve's other dependencies at
# the versions this checkout's .venv runs, for that machine's Python.
#
#   scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION]      # defaults: .whl, 3.12
#
# There, from the checkout (genserve runs from it, nothing is built):
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:$PWD GENSERVE_GPU_VENV=<a venv whose bin/python is that python3> \
#     scripts/gpu_smoke.sh
# First used on an H200 image with torch 2.11 and Python 3.12 (README, "On a GPU").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PYV="${2:-3.12}"
# What such an image lacked (pydantic's and the openai client's own needs included).
NAMES=(fastapi starlette pydantic pydantic_core uvicorn sse-starlette llguidance
       python-multipart transformers tokenizers typing-inspection annotated-types openai jiter
       distro httpx2 httpcore2 truststore idna h11 anyio sniffio pytest-asyncio httptools
       opentelemetry-api regex peft)
pins=()
for name in "${NAMES[@]}"; do
  version=$("$ROOT/.venv/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  pins+=("$name${version:+==$version}")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DIR" "${pins[@]}"
ls "$DIR"
