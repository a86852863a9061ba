#!/usr/bin/env bash
# The trainer on a GPU, end to end, in about 3 minutes on an H200 (after the kernel checks of
# .ci/gpu_check.sh, which builds the extension in place and calls this script last):
#
#   bash .ci/gpu_train_check.sh OUT_DIR
#
#   train      mcsc train with the paper recipe (U-Net + Swin-UNet at 224x224, batch 8 with 4
#              labelled, bfloat16 autocast, TF32) on the synthetic data, 300 iterations,
#              validation and checkpoints every 150
#   evaluate   mcsc evaluate of the best checkpoint on the test split
#   predict    mcsc predict on two synthetic volumes written as NIfTI
#   step       benchmarks/training_step.py: iterations per second, peak GPU memory and the share
#              of a step spent in the contrastive loss for the samplers blocks, balanced and all,
#              and for blocks with a dense PyTorch loss (OUT_DIR/step/training_step.csv)
#
# Each step logs to OUT_DIR/<step>.log and adds a line to OUT_DIR/summary.txt; the exit status
# is the number of failed steps. MCSC_TRAIN_CHECK_DEVICE (default cuda),
# MCSC_TRAIN_CHECK_ITERATIONS (300), MCSC_TRAIN_CHECK_STEPS (timed steps per variant, 10) and
# MCSC_TRAIN_CHECK_CONFIG (a YAML file over the paper recipe, e.g. tiny networks) let the test
# suite run the same script on a CPU in seconds.
#
# It runs the mcsc that Python imports outside the checkout: the installed package, or the
# in-place build that .ci/gpu_check.sh puts on PYTHONPATH.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: bash .ci/gpu_train_check.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$out"  # not the checkout: there `python -m mcsc` would import the source tree
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
device="${MCSC_TRAIN_CHECK_DEVICE:-cuda}"
iterations="${MCSC_TRAIN_CHECK_ITERATIONS:-300}"
steps="${MCSC_TRAIN_CHECK_STEPS:-10}"
every=$(( iterations / 2 > 0 ? iterations / 2 : 1 ))
config=()
[ -n "${MCSC_TRAIN_CHECK_CONFIG:-}" ] && config=(--config "$MCSC_TRAIN_CHECK_CONFIG")
failures=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "$name: $([ $status -eq 0 ] && echo ok || echo "FAILED (exit $status)") in $((SECONDS - start)) s" \
    | tee -a "$out/summary.txt"
  [ $status -eq 0 ] || { failures=$((failures + 1)); tail -n 25 "$out/$name.log"; }
  return $status
}

: >"$out/summary.txt"
run="$out/run"
if step train 150 "$python" -m mcsc train --recipe paper "${config[@]}" --device "$device" \
    --iterations "$iterations" --set train.eval_every="$every" --set train.checkpoint_every="$every" \
    --set train.amp=true --set train.tf32=true --no-progress --out "$run"; then
  "$python" - "$run/metrics.json" "$iterations" <<'PY' | tee -a "$out/summary.txt"
import json, sys
metrics = json.load(open(sys.argv[1]))
iterations = int(sys.argv[2])
print(f"train: {iterations} iterations in {metrics['train_seconds']:.1f} s with validation "
      f"({iterations / metrics['train_seconds']:.2f} iterations/s), test mean Dice {metrics['mean_dice']:.4f}")
PY
  step evaluate 60 "$python" -m mcsc evaluate --checkpoint "$run/checkpoints/best.pt" --device "$device" \
    --out "$out/evaluate"
  "$python" - "$out/volumes" <<'PY'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from mcsc.data.synthetic import make_case

folder = Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
for seed in (101, 102):
    image, _ = make_case(seed)  # (depth, height, width)
    nib.save(nib.Nifti1Image(np.transpose(image, (1, 2, 0)).astype(np.float32), np.eye(4)),
             str(folder / f"case_{seed}.nii.gz"))
PY
  step predict 60 "$python" -m mcsc predict --checkpoint "$run/checkpoints/best.pt" --input "$out/volumes" \
    --device "$device" --out "$out/predictions"
  [ "$(ls "$out/predictions" 2>/dev/null | wc -l)" -eq 2 ] \
    || { echo "predict: expected 2 label maps in $out/predictions" | tee -a "$out/summary.txt"; failures=$((failures + 1)); }
else
  failures=$((failures + 2))
fi
step step 150 "$python" "$root/benchmarks/training_step.py" --device "$device" "${config[@]}" --steps "$steps" \
    --max-seconds 20 --out "$out/step" \
  && tail -n 7 "$out/step.log" | tee -a "$out/summary.txt"
exit "$failures"
