#!/usr/bin/env bash
# The GPU validation of the CUDA kernels, as one script for a machine with an NVIDIA GPU, nvcc
# and a CUDA build of torch already installed. It fits one 10-minute command: the whole run
# gets a budget (MCSC_GPU_CHECK_BUDGET seconds, default 540), the steps run in order, each
# within its own limit cut to the time left, and a step that no longer fits is reported as
# skipped.
#
#   bash .ci/gpu_check.sh OUT_DIR
#
# Steps, each logged to OUT_DIR/<step>.log and summarised in OUT_DIR/summary.txt:
#   build       the extension, in place, for this GPU's architecture only (sm_90 on an H100 or
#               H200)
#   registered  .ci/check_cuda_build.py for that architecture
#   tests-wmma, tests-mma
#               tests/test_cuda.py (the single-set and the reference-set call) and the CUDA
#               cases of tests/test_supcon_contract.py, once per fp16/bf16 kernel family
#               (MCSC_CUDA_KERNELS=wmma: the WMMA kernels validated on hardware; mma: the
#               mma.sync/ldmatrix/cp.async kernels, whose fragment layouts only hardware can
#               confirm)
#   memcheck, racecheck, synccheck, initcheck
#               compute-sanitizer's four tools on tests/sanitizer_case.py: one small varlen
#               forward and backward per multiply path, then a reference-set forward (with the
#               anchors' gradients) and backward (the keys' gradient), checked against the
#               reference
#   bench       benchmarks/run.py --device cuda --targets: the GPU targets with fused, flex,
#               dense, compiled and gemm in one run (OUT_DIR/bench)
#   memory_bank benchmarks/memory_bank.py --device cuda: a batch against a cross-batch memory,
#               fused vs pytorch-metric-learning vs dense, fp32 and bf16 (OUT_DIR/memory_bank)
#   train       .ci/gpu_train_check.sh OUT_DIR/train, where that script exists: the trainer
#               end to end on the GPU
# Last it prints one table of the steps (status, seconds), then the benchmark's targets table.
# The exit status is the number of failed or skipped steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash .ci/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
failures=0
deadline=$((SECONDS + ${MCSC_GPU_CHECK_BUDGET:-540}))
rows=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped (the budget is spent)" | tee -a "$out/summary.txt"
    rows+=("| $name | skipped (the budget is spent) | 0 |")
    failures=$((failures + 1))
    return 1
  fi
  [ "$seconds" -le "$left" ] || seconds=$left
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local status=$?
  local result
  result=$([ $status -eq 0 ] && echo ok || echo "FAILED (exit $status)")
  [ $status -eq 124 ] && result="FAILED (timed out after $seconds s)"
  echo "$name: $result in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  rows+=("| $name | $result | $((SECONDS - start)) |")
  [ $status -eq 0 ] || { failures=$((failures + 1)); tail -n 25 "$out/$name.log"; }
  return $status
}

summary() {
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${rows[@]}"
  echo "($failures failed or skipped; logs in $out)"
  local targets
  for targets in "$out/bench/targets.md" "$out/bench/table.md"; do
    if [ -f "$targets" ]; then
      echo
      cat "$targets"
      break
    fi
  done
}

: >"$out/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
echo "torch $("$python" -c 'import torch; print(torch.__version__)'), sm_${arch/./}" | tee -a "$out/summary.txt"

if ! step build 300 env MCSC_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
    "$python" setup.py build_ext --inplace; then
  summary
  exit "$failures"
fi
step registered 60 "$python" .ci/check_cuda_build.py --arch "${arch/./}"
for kernels in wmma mma; do
  step "tests-$kernels" 150 env MCSC_CUDA_KERNELS="$kernels" \
      "$python" -m pytest tests/test_cuda.py tests/test_supcon_contract.py -k "test_cuda.py or cuda-" \
      -q -rs --tb=short --durations=8 -p no:cacheprovider
done
case=(--error-exitcode 1 "$python" tests/sanitizer_case.py)
step memcheck 90 compute-sanitizer --tool memcheck "${case[@]}"
step racecheck 150 compute-sanitizer --tool racecheck "${case[@]}"
step synccheck 90 compute-sanitizer --tool synccheck "${case[@]}"
step initcheck 90 compute-sanitizer --tool initcheck "${case[@]}"
step bench 300 "$python" benchmarks/run.py --device cuda --targets --out "$out/bench"
step memory_bank 300 "$python" benchmarks/memory_bank.py --device cuda --time-budget-s 200 \
  --out "$out/memory_bank"
if [ -f .ci/gpu_train_check.sh ]; then
  step train 420 bash .ci/gpu_train_check.sh "$out/train"  # its own steps: 150 + 60 + 60 + 150 s
fi
summary
exit "$failures"
