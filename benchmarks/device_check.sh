#!/usr/bin/env bash
# The one script to run on a GPU machine (README "Backends and building for CUDA"): build the
# extension in place, run the CUDA tests, compute-sanitizer (memcheck + racecheck) on a small
# scan, the benchmark suite, and print a summary last.
#
#   benchmarks/device_check.sh OUT_DIR        (or with $OUT set: benchmarks/device_check.sh)
#
# Leaves 6 files in OUT_DIR, no subfolders (a GPU run returns at most 8 files): summary.txt,
# bench.json, bench.md, precision.json, tune.json, and logs.tar.gz holding build.log tests.log
# tests.xml precision.log sanitizer.log bench.log (packed after the summary has read them). Every
# step runs under `timeout`; a failing step does not stop the others. Time budget (H200, total
# NNS_CHECK_SECONDS, default 450 s of the 8 min):
#   build ~60-120 s (cap 200) · tests ~30-60 s (cap 110; the CUDA cases of the op tests,
#   conv_li_gather's included, and of the whole-model backend oracles for every conv algorithm)
#   · precision (not yet timed on a GPU): the CUDA cases of the conv_li_gemm /
#   conv_li_gather / precision tests (cap 40) and benchmarks/bench_precision.py on VGG-16 @32,
#   fp32 / tf32 / bf16 / fp16 x gather / gemm / direct against fp32 and fp64, error and time (cap
#   60; it writes precision.json after every configuration, tf32 / fp32 gather first, then the
#   other tensor-core ones; both shrink so that >= 200 s stay for the rest) · the block sizes of
#   the Triton implicit-gather kernel against the cuBLAS gather on VGG-16 @32's main layer shape,
#   benchmarks/tune_implicit.py (cap 50, tune.json) · sanitizers ~20-60 s
#   (cap 65 each) · benchmarks: whatever is left minus 25 s (suite --time-limit 45 s below its hard
#   timeout, so the method running at the limit can finish and the JSON / markdown get written),
#   with --algorithms auto,implicit: per workload and precision the default (auto = the cuBLAS
#   gather on CUDA) and the Triton implicit-gather kernel side by side; the goals are rated on
#   the default and on the faster of the two (direct / gemm are compared by bench_precision on
#   VGG-16 @32) · summary (with the precision table appended).
# Knobs (environment): NNS_CHECK_SECONDS, NNS_SKIP_BUILD=1 (dry runs), BENCH_ARGS (extra arguments for benchmarks.run, e.g.
#   "--workloads vgg16_32,resnet18_32"; they come after the defaults, and argparse keeps the last
#   value, so e.g. BENCH_ARGS="--algorithms auto" overrides the algorithm list), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0).
set -u

OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
  echo "usage: $0 OUT_DIR   (or set \$OUT)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.." || exit 2
REPO="$PWD"
PY="${PYTHON:-python3}"
T_START=$(date +%s)
TOTAL="${NNS_CHECK_SECONDS:-450}"

now() { date +%s; }
left() { echo $(( TOTAL - ($(now) - T_START) )); }
# cap CAP: the step's timeout = min(CAP, time left - RESERVE), at least 10 s
cap() { local c=$1 r=${2:-0} l; l=$(( $(left) - r )); [ "$l" -lt "$c" ] && c=$l; [ "$c" -lt 10 ] && c=10; echo "$c"; }
stamp() { echo "[$(( $(now) - T_START )) s] $*"; }

# captum is not installed on the GPU machines: bring its wheel in .whl/
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$PATH:$CUDA_HOME/bin"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

# ------------------------------------------------------------------ 1. environment + build
stamp "build" >&2
{
  echo "== environment"; date -u; uname -a; nvidia-smi 2>&1 | head -20
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
  nvcc --version 2>&1 | tail -2
  echo "== build"
} > "$OUT_DIR/build.log" 2>&1
B0=$(now)
if [ "${NNS_SKIP_BUILD:-0}" = 1 ]; then  # dry runs of this script on a machine whose build is current
  echo "build skipped (NNS_SKIP_BUILD=1)" >> "$OUT_DIR/build.log"
  BUILD_RC=0
else
  MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 \
    timeout "$(cap 200 150)" "$PY" setup.py build_ext --inplace >> "$OUT_DIR/build.log" 2>&1
  BUILD_RC=$?
fi
BUILD_S=$(( $(now) - B0 ))
{
  echo "== build rc=$BUILD_RC in ${BUILD_S} s"
  "$PY" -c 'import torch, nns_cuda; print("ext_info", nns_cuda.ext_info())' 2>&1
} >> "$OUT_DIR/build.log" 2>&1

# ------------------------------------------------------------------ 2. tests (CUDA ones included)
stamp "tests" >&2
TESTS=""
for t in tests/test_conv_li.py tests/test_conv_li_gather.py tests/test_conv_li_implicit.py tests/test_maxpool_li.py tests/test_place_li.py tests/test_linear_li.py \
         tests/test_li_stats.py tests/test_filter_fold.py tests/test_engine_backends.py; do
  [ -f "$t" ] && TESTS="$TESTS $t"
done
if [ -n "$TESTS" ]; then
  # shellcheck disable=SC2086
  # the CUDA cases only (CI runs the CPU ones), spread over 8 workers where pytest-xdist exists
  XDIST=""
  "$PY" -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"
  timeout "$(cap 110 120)" "$PY" -m pytest -q -p no:cacheprovider -m needs_cuda $XDIST \
    --junitxml="$OUT_DIR/tests.xml" $TESTS > "$OUT_DIR/tests.log" 2>&1
  TESTS_RC=$?
else
  echo "no test files found" > "$OUT_DIR/tests.log"
  TESTS_RC=5
fi
echo "== pytest rc=$TESTS_RC" >> "$OUT_DIR/tests.log"

# ------------------------------------------------------------------ 2b. precision
stamp "precision" >&2
{
  echo "== CUDA cases of tests/test_conv_li_gemm.py tests/test_conv_li_gather.py tests/test_precision.py" \
       "(the CPU ones run in CI)"
  timeout "$(cap 40 220)" "$PY" -m pytest -q -p no:cacheprovider -m needs_cuda \
    tests/test_conv_li_gemm.py tests/test_conv_li_gather.py tests/test_precision.py 2>&1 | tail -n 40
  echo "== pytest rc=${PIPESTATUS[0]}"
  echo "== benchmarks.bench_precision (VGG-16 @32: error at batch 2, time at batch 8, median of 2)"
  timeout "$(cap 60 200)" "$PY" -m benchmarks.bench_precision --device cuda --models vgg16_32 --batch 2 \
    --time-batch 8 --repeats 2 --json "$OUT_DIR/precision.json" 2>&1 | tail -n 40
  echo "== bench_precision rc=${PIPESTATUS[0]}"
} > "$OUT_DIR/precision.log" 2>&1

# ------------------------------------------------------------------ 2c. implicit-gather block sizes
stamp "tune" >&2
{
  echo "== benchmarks.tune_implicit (8x8 grid, 256 -> 256, 3x32x32 windows, batch 8)"
  timeout "$(cap 50 190)" "$PY" -m benchmarks.tune_implicit --time-limit 35 --json "$OUT_DIR/tune.json" 2>&1 | tail -n 40
  echo "== tune_implicit rc=${PIPESTATUS[0]}"
} >> "$OUT_DIR/precision.log" 2>&1

# ------------------------------------------------------------------ 3. compute-sanitizer
stamp "sanitizers" >&2
SAN="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
{
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    if [ ! -x "$SAN" ]; then echo "compute-sanitizer not found"; echo "== $tool rc=127"; continue; fi
    extra=""
    [ "$tool" = memcheck ] && extra="--leak-check no"
    # racecheck looks for shared-memory races, i.e. in our kernels: the direct conv kernel plus
    # the ops every algorithm shares; memcheck also covers the gather's ATen / cuBLAS path
    algos="direct,gather,implicit"
    [ "$tool" = racecheck ] && algos="direct"
    # the caching allocator would hide out-of-bounds accesses inside its pooled blocks
    # shellcheck disable=SC2086
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap 65 90)" "$SAN" --tool "$tool" $extra --error-exitcode 99 \
      "$PY" -m benchmarks.sanitize_scan --algorithms "$algos" 2>&1 | tail -n 60
    echo "== $tool rc=${PIPESTATUS[0]}"
  done
} > "$OUT_DIR/sanitizer.log" 2>&1

# ------------------------------------------------------------------ 4. benchmarks
stamp "benchmarks" >&2
BENCH_T=$(cap 400 25)
BENCH_LIMIT=$(( BENCH_T - 45 )); [ "$BENCH_LIMIT" -lt 20 ] && BENCH_LIMIT=20
# shellcheck disable=SC2086
timeout "$BENCH_T" "$PY" -m benchmarks.run --device cuda --time-limit "$BENCH_LIMIT" \
  --algorithms auto,implicit \
  --json "$OUT_DIR/bench.json" --markdown "$OUT_DIR/bench.md" ${BENCH_ARGS:-} > "$OUT_DIR/bench.log" 2>&1
BENCH_RC=$?
echo "== benchmarks.run rc=$BENCH_RC (timeout ${BENCH_T} s, suite limit ${BENCH_LIMIT} s)" >> "$OUT_DIR/bench.log"
rm -f "$OUT_DIR"/*.tmp
if [ -f "$OUT_DIR/bench.json" ] && [ ! -f "$OUT_DIR/bench.md" ]; then  # killed by the timeout
  timeout 60 "$PY" -m benchmarks.run --render "$OUT_DIR/bench.json" --markdown "$OUT_DIR/bench.md" >/dev/null 2>&1
fi

# ------------------------------------------------------------------ 5. summary (printed last)
stamp "summary" >&2
timeout 60 "$PY" -m benchmarks.bench_summary "$OUT_DIR" --build-seconds "$BUILD_S" --build-rc "$BUILD_RC" \
  --tests-rc "$TESTS_RC" --bench-rc "$BENCH_RC" --wall-seconds "$(( $(now) - T_START ))" \
  > "$OUT_DIR/summary.txt" 2>&1
{
  echo
  echo "== precision: $(grep -E '^== (pytest|bench_precision) rc=' "$OUT_DIR/precision.log" | tr '\n' ' ')"
  if [ -f "$OUT_DIR/precision.json" ]; then
    timeout 30 "$PY" -m benchmarks.bench_precision --render "$OUT_DIR/precision.json"
  else
    echo "no precision.json (see precision.log)"
  fi
  echo
  echo "== implicit-gather block sizes: $(grep -E '^== tune_implicit rc=' "$OUT_DIR/precision.log")"
  sed -n '/^== benchmarks.tune_implicit/,/^== tune_implicit rc=/p' "$OUT_DIR/precision.log" | grep -E '^(fp32|tf32)'
} >> "$OUT_DIR/summary.txt" 2>&1
# at most 8 files come back from the device machine: pack the logs
( cd "$OUT_DIR" && tar -czf logs.tar.gz --ignore-failed-read build.log tests.log tests.xml precision.log \
    sanitizer.log bench.log 2>/dev/null && rm -f build.log tests.log tests.xml precision.log sanitizer.log bench.log )
cat "$OUT_DIR/summary.txt"
exit 0
