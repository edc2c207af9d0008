#!/usr/bin/env bash
# One prepared GPU check, under 5 minutes on one H100/H200: the CUDA-only trainer tests, then one RR
# training step reference-style against the trainer's variants, Llama-3-8B shape (random weights,
# 21 blocks kept), batch 16, bf16, twice: batches drawn with the trainer's length grouping (its
# default), then random batches (padding to the longest item alone). The variant timed right after the
# reference ran slow on the H200 whichever it was (benchmarks/RESULTS.md), so ckpt-all goes first.
# Prints the tables; writes JSON to $OUT (or benchmarks/out). Exit 1 if any variant's step-1 losses disagree with the reference's.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/training/test_memory.py
fi
BENCH=("$PY" benchmarks/train_step.py --shape llama3-8b --device cuda --batch-size 16 --steps 4 --warmup 1
       --match-reference-memory)
"${BENCH[@]}" --group-by-length --variants ckpt-all,trainer,compiled-loss,joint-frozen --json "$OUT/llama3-8b-grouped.json"
"${BENCH[@]}" --variants ckpt-all,trainer --json "$OUT/llama3-8b-random.json"
