#!/usr/bin/env bash
# The GPU check in one command, for a machine with an NVIDIA GPU and no internet: build the CUDA
# extension from source, run the CUDA tests, `memstate verify`, and the benchmarks, and write a
# log and results under $OUT (./gpu_results when unset).
#
#   bash benchmarks/gpu_check.sh            # MEMSTATE_GPU_CHECK_FULL=1 also runs the CPU tests
#
# Time budget (H200, 16 cores): under 6 minutes in all. Every section runs under its own
# timeout, so a slow one cannot eat the others' time and a partial run still reports:
#   build 170 s (estimated ~2 min of nvcc/g++ on 16 cores; ninja, MAX_JOBS = cores)
#   tests 105 s (the tests marked `cuda`: CPU == CUDA optimizer steps (LAMB and max_grad_norm
#               included) and norms, native step plans and snapshot copy plans, canonical NaNs
#               on CUDA, mixed devices, misaligned sources, one sync per step, graph capture,
#               channels_last/complex parameters, ReplicaCheck / sharded fingerprints / per-rank
#               snapshots with ranks on the GPU(s); the CPU suite runs in CI and takes ~15 min
#               on 2 cores, so it is opt-in here)
#   verify 20 s, bench_fingerprint 20 s, bench_optim 25 s, bench_snapshot 35 s (a 1 GB case in
#   2,000 tensors and host-only times), bench_clip 10 s, bench_replay 50 s (100 CUDA branches +
#   1,000 restored steps, --quick), bench_overhead 30 s (--quick)
# = 480 s at the limits (run it with timeout_s ~500); sections finish well before their limits,
# so a normal run is expected under 6 minutes. The important sections run first. After each section one line "SUMMARY <section>: ok|FAILED|TIMEOUT (<s> s) ..." is
# printed and appended to $OUT/summary.txt, so whatever ran is reported even if the machine
# goes away mid-run.
#
# Files written (few, flat): summary.txt, gpu_check.log (everything), tests.xml (junit),
# bench_*.json (machine-readable rows of each benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MEMSTATE_FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

# section NAME TIMEOUT_S CMD...: runs CMD under a timeout, logs it, prints one summary line.
# The summary carries the last line of the output that matches $SUMMARY_GREP (if set).
section() {
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > >(tee -a "$LOG" > "$OUT/.section.out") 2>&1
  local rc=$?
  sleep 0.2  # let tee flush
  local took=$((SECONDS - start)) verdict=ok
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict=TIMEOUT
  [ "$rc" -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
  [ "$verdict" = ok ] || status=1
  local detail=""
  if [ -n "${SUMMARY_GREP:-}" ]; then
    detail=$(grep -E "$SUMMARY_GREP" "$OUT/.section.out" | tail -n 1 | cut -c1-160)
  fi
  echo "SUMMARY $name: $verdict (${took} s)${detail:+ -- $detail}" | tee -a "$LOG" "$SUMMARY"
  rm -f "$OUT/.section.out"
  return "$rc"
}

SUMMARY_GREP="error|Error" section build 170 $PY setup.py build_ext --inplace || {
  echo "build failed; see $LOG"
  exit 1
}
SUMMARY_GREP="cuda|torch" section info 15 $PY -m memstate info
if [ "${MEMSTATE_GPU_CHECK_FULL:-0}" = 1 ]; then
  SUMMARY_GREP="passed|failed|error" section tests-all 900 $PY -m pytest -q -rs tests -p no:cacheprovider \
    --junitxml="$OUT/tests.xml"
else
  SUMMARY_GREP="passed|failed|error" section tests-cuda 105 $PY -m pytest -q -rs -m cuda tests -p no:cacheprovider \
    --junitxml="$OUT/tests.xml"
fi
SUMMARY_GREP="verify" section verify 20 $PY -m memstate verify
SUMMARY_GREP="cuda" section bench_fingerprint 20 $PY benchmarks/bench_fingerprint.py --device cuda --quick \
  --json "$OUT/bench_fingerprint.json"
SUMMARY_GREP="cuda +adamw.*memstate " section bench_optim 25 $PY benchmarks/bench_optim.py --device cuda --quick \
  --json "$OUT/bench_optim.json"
SUMMARY_GREP="cuda|target" section bench_snapshot 35 $PY benchmarks/bench_snapshot.py --device cuda --quick \
  --json "$OUT/bench_snapshot.json"
SUMMARY_GREP="SUMMARY bench_clip" section bench_clip 10 $PY benchmarks/bench_clip.py --device cuda --quick
SUMMARY_GREP="bench_replay:" section bench_replay 50 $PY benchmarks/bench_replay.py --device cuda --quick --skip c,d \
  --json "$OUT/bench_replay.json"
SUMMARY_GREP="cuda +arm" section bench_overhead 30 $PY benchmarks/bench_overhead.py --device cuda --quick \
  --json "$OUT/bench_overhead.json"
echo "== done, status $status" | tee -a "$LOG"
cat "$SUMMARY"
exit $status
