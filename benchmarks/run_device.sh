#!/usr/bin/env bash
# The one prepared run for a lent GPU (H200): build, correctness, CUDA tests, AVX512 check,
# exit codes, benchmark tables. Every step has its own time limit and its log under $OUT;
# a failing step never stops the next. Usage (from the repository root, on the GPU machine):
#
#   OUT=/tmp/out bash benchmarks/run_device.sh          # ~7 min on an H200
#
# Logs: $OUT/build.log, device_checks.{log,json}, gpu_check.{log,json,md}, cuda_tests.log,
# avx512.log, e2e.log (+ bench_e2e.json); the summary (rc of every step) is printed last.
set -u
OUT=${OUT:-/tmp/gradstats_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
declare -a SUMMARY

step() {  # step NAME SECONDS LOGFILE CMD...
  local name=$1 secs=$2 log=$3; shift 3
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

step build 240 build.log $PY setup.py build_ext --inplace
$PY -c "import gradstats, gradstats.backends.native as n; print(n.describe())" 2>&1 | tee -a "$OUT/build.log"

TAILN=40 step device_checks 200 device_checks.log $PY -X faulthandler benchmarks/device_checks.py --out "$OUT"
TAILN=12 step cuda_tests 180 cuda_tests.log $PY -X faulthandler -m pytest -q -p no:cacheprovider \
  tests/test_optim.py tests/test_telemetry.py tests/test_step_guard.py tests/test_trust.py -k "cuda or guard or subset"
TAILN=8 step avx512 150 avx512.log env GRADSTATS_CPU_CAPABILITY=avx512 $PY -X faulthandler -m pytest -q \
  -p no:cacheprovider tests/test_native.py
TAILN=30 step e2e 240 e2e.log bash -c "$PY benchmarks/bench_e2e.py --out $OUT && $PY benchmarks/bench_e2e.py --batch 2 --arms bare,torch_clip,stable"
TAILN=70 step gpu_check 330 gpu_check.log $PY -X faulthandler benchmarks/gpu_check.py --quick --out "$OUT"

echo "== summary"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
