#!/usr/bin/env bash
# One RR training step, reference-style vs the project's trainer, Llama-3-8B shape (random weights,
# 21 blocks), batch 16, bf16, on one H100/H200: under 5 minutes. Prints the table; exit 1 if the
# two variants' step-1 losses disagree. Extra arguments go to the script (e.g. --json out.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
if ! "$PY" -c "import circuit_breakers" 2>/dev/null; then
    "$PY" -m pip install -q -e . --no-deps
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/train_step.py --shape llama3-8b --device cuda --batch-size 16 --steps 5 --warmup 2 "$@"
