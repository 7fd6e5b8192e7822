#!/usr/bin/env bash
# The one prepared run for a lent GPU (H200): build, correctness, CUDA tests, AVX512 check,
# exit codes, benchmark tables. Every step has its own time limit and its log under $OUT;
# a failing step never stops the next. Usage (from the repository root, on the GPU machine):
#
#   OUT=/tmp/out bash benchmarks/run_device.sh          # ~7 min on an H200
#
# DEADLINE (default 560 s) bounds the whole run; each step gets min(its limit, what is left).
# Logs: $OUT/build.log, device_checks.{log,json}, gpu_check.{log,json,md}, cuda_tests.log,
# avx512.log, e2e.log (+ bench_e2e.json); the summary (rc of every step) is printed last.
set -u
OUT=${OUT:-/tmp/gradstats_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
declare -a SUMMARY

DEADLINE=${DEADLINE:-560}  # seconds for the whole run: later steps get what is left

step() {  # step NAME SECONDS LOGFILE CMD...
  local name=$1 secs=$2 log=$3; shift 3
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 20 ]; then SUMMARY+=("$name skipped (no time left)"); return; fi
  [ "$secs" -gt "$left" ] && secs=$left
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  SUMMARY+=("$name rc=$rc ($((SECONDS - t0))s)")
  echo "== $name: rc=$rc ($((SECONDS - t0))s); last lines of $log:"
  tail -n "${TAILN:-25}" "$OUT/$log"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
lscpu | grep -i -E "model name|flags" | sed 's/\(flags:.\{0,0\}\).*avx512f.*/\1 ... avx512f .../' >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step build 300 build.log $PY setup.py build_ext --inplace
$PY -c "import gradstats, gradstats.backends.native as n; print(n.describe())" 2>&1 | tee -a "$OUT/build.log"

TAILN=45 step device_checks 150 device_checks.log $PY -X faulthandler benchmarks/device_checks.py --out "$OUT"
TAILN=12 step cuda_tests 120 cuda_tests.log $PY -X faulthandler -m pytest -q -p no:cacheprovider \
  tests/test_optim.py tests/test_telemetry.py tests/test_native_cuda.py tests/test_native_exit.py -k "cuda or exit"
TAILN=8 step avx512 100 avx512.log env GRADSTATS_CPU_CAPABILITY=avx512 $PY -X faulthandler -m pytest -q \
  -p no:cacheprovider tests/test_native.py tests/test_native_range.py -k "AVX512 or avx512 or raise_cleanly" -m "not slow"
TAILN=14 step e2e 150 e2e.log bash -c "$PY benchmarks/bench_e2e.py --out $OUT && $PY benchmarks/bench_e2e.py --batch 2 --arms bare,torch_clip,stable"
GC_BUDGET=$((DEADLINE - SECONDS - 40)); [ "$GC_BUDGET" -lt 30 ] && GC_BUDGET=30
TAILN=45 step gpu_check 330 gpu_check.log $PY -X faulthandler benchmarks/gpu_check.py --quick \
  --budget "$GC_BUDGET" --sections correctness,huge,sync,graphs,perf,sweep --out "$OUT"

echo "== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
