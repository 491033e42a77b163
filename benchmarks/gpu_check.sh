#!/usr/bin/env bash
# GPU column of docs/benchmarks.md: bench_adapters.py on CUDA, bfloat16 (autocast) and
# float32, batch 8 and 64, every method, on ViT-B/16; then, if time is left, torch.compile
# (inductor) on bfloat16 batch 64 for the frozen backbone, LoRA and both ALoRE variants on
# a 2-block model of ViT-B/16's width (compiling all 12 blocks takes minutes per method).
#
# Needs torch (CUDA build), transformers and peft installed; no network. Run from
# the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Writes into $OUT (default benchmarks/results/gpu): env.txt, eager/bench_adapters.{json,md},
# compiled/bench_adapters.{json,md} and the logs. The eager part is cut at 190 s and the
# compiled part at 285 s from the start, so the script ends within 5 minutes.
set -uo pipefail

OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT/eager" "$OUT/compiled"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
start=$(date +%s)

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'peft', peft.__version__); print(torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Eager: every method, both dtypes, batch 8 and 64.
# Results are written after every shape, so a timeout keeps the shapes already measured.
timeout 190 "$PY" benchmarks/bench_adapters.py --device cuda --dtypes bfloat16 float32 --batch-sizes 8 64 \
    --reps 10 --warmup 2 --out-dir "$OUT/eager" > "$OUT/eager/stdout.md" 2> "$OUT/eager/log.txt"
echo "eager: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
tail -n 5 "$OUT/eager/log.txt"

# Compiled: only with enough time left (inductor compiles a train and an eval graph per method).
left=$(( 285 - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
    timeout "$left" "$PY" benchmarks/bench_adapters.py --device cuda --dtypes bfloat16 --batch-sizes 64 \
        --num-layers 2 --methods zero_cost lora alore_seq alore_par --compile --no-memory --reps 10 \
        --warmup 2 --out-dir "$OUT/compiled" > "$OUT/compiled/stdout.md" 2> "$OUT/compiled/log.txt"
    echo "compiled: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
    tail -n 5 "$OUT/compiled/log.txt"
else
    echo "compiled: skipped, ${left} s left" | tee -a "$OUT/env.txt"
fi
