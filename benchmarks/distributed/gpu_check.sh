#!/usr/bin/env bash
# Prepared GPU check for checkpoints, resume and the launchers (one GPU, a few minutes, tiny model):
# `train --accelerate-config single-gpu`, a second identical run (GPU determinism), a resume from
# step 4 compared with the uninterrupted run, then FSDP2 on one NCCL process and its resume, then
# (when deepspeed is importable) DeepSpeed ZeRO-2 and ZeRO-3 on one process and a ZeRO-3 resume.
# Not run on a GPU yet (docs/distributed.md). Progress goes to stdout as it happens.
#   bash benchmarks/distributed/gpu_check.sh        (PYTHON=python3 by default)
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
T=${TMPDIR:-/tmp}/cb-distributed-check; rm -rf "$T"
"$PY" -c "import torch, transformers, peft, accelerate; print('versions', torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
"$PY" benchmarks/distributed/make_tiny.py "$T" || exit 1
COMMON=(--no-progress "target_layers=[2,3]" batch_size=4 lr=1e-2 max_length=64 "circuit_breaker_data=[$T/h.jsonl]"
        "retain_data=[$T/b.jsonl]" save_every=2 keep_checkpoints=10 steps=8)
run() {  # name command...: its log in $T/name.log, its status and time on stdout
    local name=$1; shift; local start=$SECONDS
    timeout 240 "$@" > "$T/$name.log" 2>&1; local rc=$?
    echo "run $name: rc=$rc, $((SECONDS - start)) s"; [ $rc = 0 ] || tail -20 "$T/$name.log"
}
partial() {  # a copy of run $1 as it was at step 4, in $2
    mkdir -p "$T/$2/checkpoints"; cp "$T/$1/config.yaml" "$T/$1/train_log.jsonl" "$T/$2/"
    cp -r "$T/$1/checkpoints/step-4" "$T/$2/checkpoints/"
    if [ -d "$T/$1/checkpoints/frozen-cache" ]; then cp -r "$T/$1/checkpoints/frozen-cache" "$T/$2/checkpoints/"; fi
}
run single "$PY" -m circuit_breakers train --accelerate-config single-gpu --out "$T/single" --model "$T/tiny" "${COMMON[@]}"
run single2 "$PY" -m circuit_breakers train --out "$T/single2" --model "$T/tiny" "${COMMON[@]}"
partial single part; run resume "$PY" -m circuit_breakers train --resume "$T/part/checkpoints/step-4" --no-progress
"$PY" benchmarks/distributed/compare.py "$T/single2" "$T/single" "a second identical single-GPU run"
"$PY" benchmarks/distributed/compare.py "$T/part" "$T/single" "resumed at step 4 vs uninterrupted"
FSDP=(env ACCELERATE_USE_FSDP=true FSDP_VERSION=2 "$PY" -m torch.distributed.run --nproc_per_node 1 -m circuit_breakers train)
run fsdp "${FSDP[@]}" --out "$T/fsdp" --model "$T/tiny" "${COMMON[@]}"
partial fsdp fpart; run fsdp-resume "${FSDP[@]}" --resume "$T/fpart/checkpoints/step-4" --no-progress
"$PY" benchmarks/distributed/compare.py "$T/fsdp" "$T/single" "FSDP2 (1 process, NCCL) vs single GPU"
"$PY" benchmarks/distributed/compare.py "$T/fpart" "$T/fsdp" "FSDP2 resumed at step 4 vs uninterrupted"
if "$PY" -c "import deepspeed" 2>/dev/null; then
    # Without LoRA dropout: under ZeRO-3 the rerouting pass runs to the last kept block (no early stop),
    # so dropout would draw other masks than a plain run's.
    run single-nodrop "$PY" -m circuit_breakers train --out "$T/single-nodrop" --model "$T/tiny" "${COMMON[@]}" lora_dropout=0
    for z in 2 3; do
        run zero$z "$PY" -m circuit_breakers train --accelerate-config deepspeed-zero$z --num-processes 1 \
            --out "$T/zero$z" --model "$T/tiny" "${COMMON[@]}" lora_dropout=0
        "$PY" benchmarks/distributed/compare.py "$T/zero$z" "$T/single-nodrop" "DeepSpeed ZeRO-$z (1 process) vs single GPU"
    done
    partial zero3 zpart
    run zero3-resume "$PY" -m circuit_breakers train --accelerate-config deepspeed-zero3 --num-processes 1 \
        --resume "$T/zpart/checkpoints/step-4" --no-progress
    "$PY" benchmarks/distributed/compare.py "$T/zpart" "$T/zero3" "ZeRO-3 resumed at step 4 vs uninterrupted"
else
    echo "deepspeed not importable: the ZeRO checks are skipped"
fi
