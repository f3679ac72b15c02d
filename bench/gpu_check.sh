#!/usr/bin/env bash
# The prepared GPU check for the kernels (issue 14): install, kernel tests on CUDA, then the two
# headline benchmarks with eager, Liger and every hkd backend side by side. Bounded to 8 minutes.
#
#   bench/gpu_check.sh OUTDIR              # on the GPU machine, from the repository root
#   bench/gpu_check.sh --dry-run OUTDIR    # print the steps (and check the arguments) without running them
#   bench/gpu_check.sh --small OUTDIR      # tiny shapes, no install / tests: the script end to end on a CPU
#
# The GPU machine may have no package registry: the project is installed with
# `pip install --no-deps --no-build-isolation -e .` (torch, triton, transformers are already there)
# and Liger-Kernel from a wheel under bench/wheels/ when one is present (fetch it beforehand with
# `pip download liger-kernel --no-deps -d bench/wheels`). Without it the Liger rows say why they
# could not run and everything else is measured.
#
# OUTDIR receives: install.log, pytest.log, bench-softmax-kl.log, bench-fused-linear.log, the
# benchmark JSON files (kernels-cuda-*.json, kernels-fused-linear-cuda-*.json) and status.txt
# (each step's exit status; 124 = it hit its time limit).
set -uo pipefail

usage() { echo "usage: bench/gpu_check.sh [--dry-run|--small] OUTDIR" >&2; exit 2; }
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --small) MODE=small; shift ;;
  -*) usage ;;
esac
[ $# -eq 1 ] || usage
OUT=$1
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}
mkdir -p "$OUT" || exit 1
: > "$OUT/status.txt"

# step NAME LIMIT_S LOG CMD...: run CMD under `timeout`, output to OUT/LOG (and the console), status recorded
step() {
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name (limit ${limit}s): $*"
  if [ "$MODE" = dry ]; then echo "$name dry-run" >> "$OUT/status.txt"; return 0; fi
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$log") 2>&1
  local rc=$?
  echo "$name $rc" >> "$OUT/status.txt"
  return 0  # a failed step does not stop the measurements that follow
}

BACKENDS=eager,liger,torch,chunked,triton
if [ "$MODE" = small ]; then
  SOFTMAX_GRID=64x1000; FUSED_GRID=64x32x1000; DTYPE=float32; BACKENDS=eager,liger,chunked
else
  SOFTMAX_GRID=16384x131072; FUSED_GRID=8192x4096x128256; DTYPE=bfloat16
fi

# budget (8 min): install 60 s, tests 150 s, softmax-KL 110 s, fused linear 140 s
if [ "$MODE" != small ]; then
  step install 60 install.log sh -c "$PY -m pip install --no-deps --no-build-isolation -e . && \
    for w in bench/wheels/liger_kernel-*.whl; do [ -e \"\$w\" ] && $PY -m pip install --no-deps \"\$w\"; done; \
    $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'; \
    $PY -c 'import liger_kernel' 2>/dev/null && echo 'liger-kernel: installed' || echo 'liger-kernel: absent (its rows will say so)'"
  step pytest 150 pytest.log "$PY" -m pytest -q -p no:cacheprovider tests/kernels --durations=10
fi
step softmax_kl 110 bench-softmax-kl.log "$PY" bench/kernel_speed.py --grid "$SOFTMAX_GRID" --dtype "$DTYPE" \
  --backends "$BACKENDS" --reps 5 --out "$OUT"
step fused_linear 140 bench-fused-linear.log "$PY" bench/kernel_speed.py --op fused_linear --grid "$FUSED_GRID" \
  --dtype "$DTYPE" --backends "$BACKENDS" --reps 3 --out "$OUT"
echo "== done; step statuses:"
cat "$OUT/status.txt"
