#!/usr/bin/env bash
# The whole GPU suite in one command, for a machine with an NVIDIA GPU and no internet:
# build the CUDA extension from source, run the tests (CUDA tests included) and the benchmarks,
# and write a log and results under $OUT (./gpu_results when unset). Budget: under 6 minutes.
#
#   bash benchmarks/gpu_check.sh
#
# Files written (kept to a few, flat): gpu_check.log (everything), tests.txt (pytest summary),
# bench_*.json (machine-readable rows of each benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MEMSTATE_FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
run() { "$@" 2>&1 | tee -a "$LOG"; local rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "!! exit $rc: $*" | tee -a "$LOG"; status=1; }; return "$rc"; }

step "build (CUDA_HOME=$CUDA_HOME, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
if ! run $PY setup.py build_ext --inplace; then
  echo "build failed; see $LOG" ; exit 1
fi
step "memstate info"
run $PY -m memstate info
step "tests (all, CUDA tests included)"
run $PY -m pytest -q -rs tests -p no:cacheprovider --junitxml="$OUT/tests.xml"
grep -E "passed|failed|error" "$LOG" | tail -n 1 >"$OUT/tests.txt"
step "memstate verify (A/A isolation; CPU == CUDA optimizer steps)"
run $PY -m memstate verify
step "bench_fingerprint"
run $PY benchmarks/bench_fingerprint.py --json "$OUT/bench_fingerprint.json"
step "bench_optim (CUDA only; the CPU figures come from the development machine)"
run $PY benchmarks/bench_optim.py --device cuda --rounds 5 --json "$OUT/bench_optim.json"
step "bench_snapshot (CUDA only)"
run $PY benchmarks/bench_snapshot.py --device cuda --rounds 5 --json "$OUT/bench_snapshot.json"
step "done, status $status"
exit $status
