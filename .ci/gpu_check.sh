#!/usr/bin/env bash
# The GPU validation of the CUDA kernels (issue #3), as one script for a machine with an NVIDIA
# GPU, nvcc and a CUDA build of torch already installed. It fits one 10-minute command: the
# whole run gets a budget (MCSC_GPU_CHECK_BUDGET seconds, default 540), the steps run in order
# of importance, each within its own limit cut to the time left, and a step that no longer fits
# is reported as skipped.
#
#   bash .ci/gpu_check.sh OUT_DIR
#
# Steps, each logged to OUT_DIR/<step>.log and summarised in OUT_DIR/summary.txt:
#   build       the extension, in place, for this GPU's architecture only (fast)
#   registered  .ci/check_cuda_build.py for that architecture
#   tests       tests/test_cuda.py (reference, CPU op, fp16/bf16 rule, 262144 rows, N*D > 2^31,
#               determinism, TF32 switch, gradcheck, torch.compile, opcheck)
#   memcheck    compute-sanitizer on tests/sanitizer_case.py: one small varlen forward and
#               backward per multiply path, checked against the reference
#   bench       benchmarks/run.py --device cuda --targets: the GPU targets with fused, flex,
#               dense, compiled and gemm in one run (targets.csv, targets.md, targets.json and
#               table.md in OUT_DIR/bench); its targets table is printed again last
#   racecheck, synccheck, initcheck
#               compute-sanitizer's other tools on the same case
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

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped (the budget is spent)" | tee -a "$out/summary.txt"
    failures=$((failures + 1))
    return 1
  fi
  [ "$seconds" -le "$left" ] || seconds=$left
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local status=$?
  local line="$name: $([ $status -eq 0 ] && echo ok || echo "FAILED (exit $status)") in $((SECONDS - start)) s"
  echo "$line" | tee -a "$out/summary.txt"
  [ $status -eq 0 ] || { failures=$((failures + 1)); tail -n 25 "$out/$name.log"; }
  return $status
}

: >"$out/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
echo "torch $("$python" -c 'import torch; print(torch.__version__)'), sm_${arch/./}" | tee -a "$out/summary.txt"

if ! step build 300 env MCSC_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
    "$python" setup.py build_ext --inplace; then
  exit "$failures"
fi
step registered 60 "$python" .ci/check_cuda_build.py --arch "${arch/./}"
step tests 240 "$python" -m pytest tests/test_cuda.py -q -rs --tb=short --durations=8 \
    -p no:cacheprovider
case=(--error-exitcode 1 "$python" tests/sanitizer_case.py)
step memcheck 90 compute-sanitizer --tool memcheck "${case[@]}"
step bench 300 "$python" benchmarks/run.py --device cuda --targets --out "$out/bench"
step racecheck 150 compute-sanitizer --tool racecheck "${case[@]}"
step synccheck 90 compute-sanitizer --tool synccheck "${case[@]}"
step initcheck 90 compute-sanitizer --tool initcheck "${case[@]}"
[ -f "$out/bench/targets.md" ] && cat "$out/bench/targets.md"
exit "$failures"
