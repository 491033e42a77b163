#!/usr/bin/env bash
# GPU column of docs/benchmarks.md, in under 5 minutes: bench_adapters.py on CUDA, ViT-B/16.
#   1. eager, bfloat16 autocast, batch 64, every method (train step, peak memory, unmerged and
#      merged inference against the base model);
#   2. eager, float32, batch 8, every method;
#   3. torch.compile (inductor), bfloat16 batch 64, on a 2-block model of ViT-B/16's width
#      (compiling all 12 blocks takes minutes per method): the frozen backbone, LoRA and both
#      ALoRE variants, in the default mode, then with CUDA graphs (mode="reduce-overhead").
#
# Needs torch (CUDA build), transformers and peft installed; no network. Run from the repository
# root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Writes into $OUT (default benchmarks/results/gpu): env.txt and one folder per step with its
# bench_adapters.{json,md} and log. Each step has a time limit; results are written after every
# shape, so a step cut short keeps what it measured.
set -uo pipefail

OUT="${OUT:-benchmarks/results/gpu}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
start=$(date +%s)
mkdir -p "$OUT"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'peft', peft.__version__); print(torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # name, seconds (counted from the script's start), bench_adapters arguments...
    local name=$1 until=$2
    shift 2
    local left=$(( until - ($(date +%s) - start) ))
    if [ "$left" -lt 30 ]; then
        echo "$name: skipped, ${left} s left" | tee -a "$OUT/env.txt"
        return
    fi
    mkdir -p "$OUT/$name"
    timeout "$left" "$PY" benchmarks/bench_adapters.py --device cuda --warmup 2 --out-dir "$OUT/$name" "$@" \
        > "$OUT/$name/stdout.md" 2> "$OUT/$name/log.txt"
    echo "$name: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
    tail -n 4 "$OUT/$name/log.txt"
}

step eager_bf16_b64 120 --dtypes bfloat16 --batch-sizes 64 --reps 10
step eager_fp32_b8 180 --dtypes float32 --batch-sizes 8 --reps 10
step compiled 240 --dtypes bfloat16 --batch-sizes 64 --num-layers 2 --methods zero_cost lora alore_seq alore_par \
    --compile --no-memory --reps 10
step compiled_cudagraphs 290 --dtypes bfloat16 --batch-sizes 64 --num-layers 2 \
    --methods zero_cost lora alore_seq alore_par --compile --compile-mode reduce-overhead --no-memory --reps 10
