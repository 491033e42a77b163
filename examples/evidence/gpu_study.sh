#!/usr/bin/env bash
# The evidence study on one CUDA GPU, as one command, about 4 minutes on an H100.
#
# Needs: the bundle written on a CPU machine by `python examples/evidence/bundle.py --out .evidence_bundle`
# (about 41 MiB; carry it with the working tree), Python 3 with torch (CUDA), transformers, peft,
# safetensors, numpy (matplotlib for the report). No internet, no `datasets`, no Hugging Face Hub.
# If .whl/peft-*.whl is present it is unpacked into a private folder and used instead of the installed peft.
#
# Environment: OUT (default ./out) receives study/results.json (rewritten after every run, so a cut-off
# run keeps its finished part), study/log.txt and docs/ (results.md + img/ from report.py).
# BUDGET_S (default 200): seconds the study may take, which `--epochs auto` plans for. STOP_AFTER_S (default 225):
# no run starts after this many seconds. ABLATION=1 also runs the ALoRE ablation afterwards (9 variants x 4
# settings at the study's epoch count: roughly as long again as the DINOv2 part of the study).
# DEVICE (default cuda) and EXTRA_ARGS (e.g. "--quick") exist to dry-run this script on a CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT="${OUT:-$PWD/out}"
BUNDLE="${BUNDLE:-.evidence_bundle}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/study"

peft_wheel=$(ls .whl/peft-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$peft_wheel" ]; then
  if python3 -m pip install -q --no-deps --target "${TMPDIR:-/tmp}/evidence-peft" "$peft_wheel"; then
    export PYTHONPATH="${TMPDIR:-/tmp}/evidence-peft:$PYTHONPATH"
  else
    echo "could not unpack $peft_wheel; using the installed peft"
  fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, alore_peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| alore_peft', alore_peft.__version__)"

status=0
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of options
python3 examples/evidence/study.py --bundle "$BUNDLE" --device "${DEVICE:-cuda}" --out "$OUT/study" ${EXTRA_ARGS:-} \
  --budget-s "${BUDGET_S:-200}" --stop-after-s "${STOP_AFTER_S:-225}" 2>&1 | tee "$OUT/study/log.txt" || status=$?

if [ "${ABLATION:-0}" = 1 ] && [ "$status" = 0 ]; then
  # Same epochs as the study, so the variants compare with its ALoRE and LoRA rows; seed 0, full grid each.
  epochs=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['config']['epochs'])" "$OUT/study/results.json")
  # shellcheck disable=SC2086
  python3 examples/evidence/study.py --bundle "$BUNDLE" --device "${DEVICE:-cuda}" --out "$OUT/study" --ablation \
    --seeds 0 --epochs "$epochs" ${EXTRA_ARGS:-} 2>&1 | tee "$OUT/study/ablation_log.txt" || status=$?
fi

# The report also renders a partial JSON (a run cut short keeps its finished part).
if [ -f "$OUT/study/results.json" ]; then
  report_args=(--results "$OUT/study/results.json" --out "$OUT/docs")
  if [ -f "$OUT/study/ablation.json" ]; then report_args+=(--ablation "$OUT/study/ablation.json"); fi
  python3 examples/evidence/report.py "${report_args[@]}" || echo "report.py failed; the JSON is in $OUT/study"
fi
exit "$status"
