#!/usr/bin/env bash
# The GPU check: one call on a bare GPU machine (torch and triton, no package registry) that
# answers whether the kernels are right and how fast they are, in at most 8 minutes.
#
#   bench/gpu_check.sh --prep              # where pip reaches a registry: Liger-Kernel's wheel into bench/wheels/
#   bench/gpu_check.sh OUTDIR              # on the GPU machine, from the repository root
#   bench/gpu_check.sh --small OUTDIR      # the dry run: every part at tiny sizes, on a CPU too (~3 min on 2 cores)
#   bench/gpu_check.sh --dry-run OUTDIR    # print the parts and their time limits without running them
#
# Parts, in this order, each under its own `timeout` (bench/gpu_check.py says what each does):
#   setup        pip install --no-index --no-deps --no-build-isolation -e . ; Liger from bench/wheels/
#   env          (a) python3, versions, CUDA, the GPU; what is missing is named
#   correctness  (b) the triton backends against fp64: V=128256, every divergence, T 1 and 2.5,
#                offsets of 1e4, > 2**31 entries, the fused head over 3 chunks, bf16 autocast
#   softmax      (c) softmax-KL forward and backward apart, 4096 x 128256 bf16, vs eager and Liger
#   fused        (d) the fused LM head at N 4096 and 8192 (H 4096, V 128256): triton, Liger, chunked
#   train-*      (e) one training step of a 1.0B student (V 128256, bf16-mixed), fused head off / on
#   pytest       (f) python3 -m pytest -x --tb=short tests/kernels, last: it gets the time left
#   summary      the table and the result file
# Every part appends JSON lines to OUTDIR/gpu-check.jsonl as it goes, so a part killed by its
# limit keeps what it measured; this script adds one line per part with its exit status
# ("timeout" when it hit its limit) and seconds. OUTDIR ends with 5 files:
#   gpu-check.jsonl   every record          gpu-check.log   everything printed
#   pytest.log        the kernel tests      summary.txt     the table
#   gpu-check-DATE.json  command, date, device, versions, records, table: for bench/results/gpu-check/
#
# Without a registry on the GPU machine, Liger-Kernel travels as a wheel: bench/wheels/ is
# ignored by git, so copy it to the GPU machine along with the working tree.
set -uo pipefail

LIGER_VERSION=0.8.5
usage() { echo "usage: bench/gpu_check.sh --prep | [--dry-run|--small] OUTDIR" >&2; exit 2; }
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --small) MODE=small; shift ;;
  --prep) MODE=prep; shift ;;
  -*) usage ;;
esac
COMMAND_LINE="bash bench/gpu_check.sh $( [ "$MODE" = small ] && echo '--small ' )${1:-}"
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-bench/wheels}  # the variable: tests

if [ "$MODE" = prep ]; then
  [ $# -eq 0 ] || usage
  mkdir -p "$WHEELS" || exit 1
  if ls "$WHEELS"/liger_kernel-"$LIGER_VERSION"-*.whl >/dev/null 2>&1; then
    echo "$WHEELS: liger_kernel $LIGER_VERSION already there"
  else
    "$PY" -m pip download "liger-kernel==$LIGER_VERSION" --no-deps -d "$WHEELS" || exit 1
  fi
  # the GPU machine's copy of the tree has no git: the commit it was made from travels here
  commit=$(git rev-parse --short HEAD 2>/dev/null) && {
    [ -n "$(git status --porcelain --untracked-files=no -- hkd bench 2>/dev/null)" ] && commit="$commit+dirty"
    echo "$commit" > "$WHEELS/source-commit.txt"; }
  ls -l "$WHEELS"
  exit 0
fi

[ $# -eq 1 ] || usage
OUT=$1
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
JSONL=$OUT/gpu-check.jsonl
# the limits are the GPU machine's; the dry run on a (shared) CPU gets three times each
SCALE=1; SMALL=()
[ "$MODE" = small ] && SCALE=3 && SMALL=(--small)
BUDGET=${GPU_CHECK_BUDGET_S:-$(( 470 * SCALE ))}  # the whole run, seconds: 8 minutes less starting up
RESERVE=$(( 20 * SCALE ))                          # kept for the summary
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
LIGER_DIR=$WORK/liger
# the tree itself is importable even if the editable install fails; Liger goes to LIGER_DIR
export PYTHONPATH="$LIGER_DIR:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$MODE" != dry ]; then
  : > "$JSONL"
  exec > >(tee -a "$OUT/gpu-check.log") 2>&1
  TEE_PID=$!
fi

LAST_RC=0
PLANNED=0  # --dry-run: the seconds the parts before would take at their limits (the worst case)
# part NAME CAP_S CMD...: CMD under `timeout` (CAP_S, or the time left if that is less; 0: all the
# time left), then one JSON line with its status
part() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - RESERVE - (SECONDS - START) - PLANNED ))
  local limit=$left
  cap=$(( cap * SCALE ))
  if [ "$cap" -gt 0 ] && [ "$cap" -lt "$left" ]; then limit=$cap; fi
  echo "== $name (limit ${limit}s): $*"
  if [ "$MODE" = dry ]; then PLANNED=$(( PLANNED + limit )); return 0; fi
  if [ "$limit" -lt 5 ]; then
    printf '{"part": "%s", "event": "end", "status": "skipped", "reason": "no time left in the %ss budget", "seconds": 0, "limit_s": %s}\n' \
      "$name" "$BUDGET" "$limit" >> "$JSONL"
    LAST_RC=124
    return 0
  fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  LAST_RC=$?
  local status=ok
  case $LAST_RC in 0) ;; 124|137) status=timeout ;; *) status="exit $LAST_RC" ;; esac
  printf '{"part": "%s", "event": "end", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s}\n' \
    "$name" "$status" "$LAST_RC" "$(( SECONDS - t0 ))" "$limit" >> "$JSONL"
  return 0  # a failed part does not stop the ones after it
}

GC=("$PY" bench/gpu_check.py)
COMMON=(--jsonl "$JSONL" "${SMALL[@]}")
# limits (seconds) sum to 405 before the tests, which get what is left of the 450 (at least 45)
part setup 25 "${GC[@]}" setup "${COMMON[@]}" --liger-dir "$LIGER_DIR"
part env 15 "${GC[@]}" env "${COMMON[@]}"
part correctness 90 "${GC[@]}" correctness "${COMMON[@]}"
part softmax 40 "${GC[@]}" softmax "${COMMON[@]}"
part fused 65 "${GC[@]}" fused "${COMMON[@]}"
part train-unfused 85 "${GC[@]}" train --fused off --work "$WORK" "${COMMON[@]}"   # writes the models
part train-fused 85 "${GC[@]}" train --fused on --work "$WORK" "${COMMON[@]}"

# (f) last: the kernel tests compile many kernel variants; in parallel when pytest-xdist is there
PYTEST=("$PY" -m pytest -x --tb=short -q -p no:cacheprovider)
if [ "$MODE" = small ]; then
  PYTEST+=(tests/kernels/test_backend_requests.py)  # the dry run checks the plumbing, not the kernels
else
  PYTEST+=(tests/kernels)
  if "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n "${GPU_CHECK_PYTEST_WORKERS:-4}" --dist loadfile); fi
fi
part pytest 0 bash -c '"$@" > "$0" 2>&1' "$OUT/pytest.log" "${PYTEST[@]}"
PYTEST_RC=$LAST_RC
if [ "$MODE" != dry ]; then
  tail -n 15 "$OUT/pytest.log"
  "${GC[@]}" pytest-record --jsonl "$JSONL" --log "$OUT/pytest.log" --rc "$PYTEST_RC" --command "${PYTEST[*]}"
fi

RESERVE=0
part summary 20 "${GC[@]}" summary "${COMMON[@]}" --out "$OUT" --command "$COMMAND_LINE"
rm -rf "$WORK"
[ "$MODE" = dry ] && exit 0
echo "== done in $(( SECONDS - START ))s; results in $OUT"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
