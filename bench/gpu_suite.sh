#!/usr/bin/env bash
# GPU acceptance suite: the one command to run on a CUDA machine (under 9 minutes).
#
#   bash bench/gpu_suite.sh            # logs and JSON under ${OUT:-bench/out}
#   bash bench/gpu_suite.sh --smoke    # the same steps, tiny: under a minute, on the CPU when there is no GPU
#
# Needs only what the GPU machine has: torch (CUDA), transformers, safetensors, numpy, and
# pytest for the test step. Nothing is installed or downloaded: the repository is used in
# place through PYTHONPATH (no `pip install`, so no fastapi/uvicorn/prometheus is needed;
# the server tests are not part of this suite). Building cuda_ext needs nvcc and ninja; without
# them the suite reports the build failure and everything runs on the torch reference.
# If pytest is missing, point WHEELS at a folder holding its wheel: it is installed from there
# with `pip install --no-index --no-deps`.
#
# Steps: versions -> build cuda_ext -> pytest tests/gpu, tests/engine/test_parity.py and the CUDA ordering test ->
# bench/gpu_bench.py on the default-model trace in tests/data (recorded first if absent).
# Exit status: non-zero if the tests failed or the benchmark did not run.

set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    *) echo "usage: bash bench/gpu_suite.sh [--smoke]" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/moepager-torch-extensions}"
export TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
DEADLINE=$((SECONDS + 525))  # 8 min 45 s for everything
rc=0

step() { printf '\n== %s (%ds elapsed)\n' "$*" "$SECONDS"; }
left() { local s=$((DEADLINE - SECONDS - ${1:-0})); echo $((s > 10 ? s : 10)); }

step "machine"
{
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'PYEOF'
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
print(f"cuda available: {torch.cuda.is_available()}" +
      (f", {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
       if torch.cuda.is_available() else ""))
PYEOF
} 2>&1 | tee "$OUT/machine.log"

step "benchmark preparation (background)"
TRACE=""
for candidate in tests/data/trace_heldout.safetensors tests/data/*.safetensors; do
  if [ -f "$candidate" ] && "$PY" -c "import sys; from traces.format import load_trace; load_trace(sys.argv[1], hidden=False)" \
      "$candidate" 2>/dev/null; then
    TRACE="$candidate"; break
  fi
done
PREDICTOR=""
for candidate in tests/data/*predictor*.safetensors; do
  [ -f "$candidate" ] && PREDICTOR="$candidate" && break
done
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
BENCH_ARGS=(--out "$OUT/gpu_bench.json" --tokens 48)
TESTS=(tests/gpu tests/engine/test_parity.py tests/engine/test_cuda_ordering.py)
if [ "$SMOKE" -eq 1 ]; then
  BENCH_ARGS=(--out "$OUT/gpu_bench.json" --small --tokens 4 --fractions 0.25 --policies lru --prefetch none)
  [ "$HAS_CUDA" -eq 1 ] || BENCH_ARGS+=(--device cpu)
  TESTS=(tests/gpu tests/engine/test_cuda_ordering.py)
fi
if [ -n "$TRACE" ]; then
  echo "trace: $TRACE"; BENCH_ARGS+=(--trace "$TRACE")
else
  echo "no trace in tests/data: gpu_bench records one from the default model (Engine record_trace)"
fi
[ -n "$PREDICTOR" ] && echo "predictor: $PREDICTOR" && BENCH_ARGS+=(--predictor "$PREDICTOR")
# The benchmark checkpoint (a few GB of random weights) is written while the kernels build and the tests run.
"$PY" -m bench.gpu_bench "${BENCH_ARGS[@]}" --prepare-only >"$OUT/gpu_bench_prepare.log" 2>&1 &
PREP_PID=$!

step "build cuda_ext"
if [ "$SMOKE" -eq 1 ] && [ "$HAS_CUDA" -eq 0 ]; then
  echo "smoke run without CUDA: build skipped (the torch reference runs)" | tee "$OUT/cuda_ext_build.log"
else
  timeout "$(left 360)" "$PY" -m cuda_ext.build --quiet 2>&1 | tee "$OUT/cuda_ext_build.log"
  echo "cuda_ext build exit status: ${PIPESTATUS[0]}"
fi

step "tests: ${TESTS[*]}"
if ! "$PY" -c "import pytest" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" pytest iniconfig pluggy packaging 2>&1 | tail -2
  fi
fi
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout "$(left 200)" "$PY" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" \
    --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
  test_rc=${PIPESTATUS[0]}
  echo "pytest exit status: $test_rc"
  [ "$test_rc" -eq 0 ] || rc=1
else
  echo "pytest is not installed (set WHEELS to a folder with its wheel): tests NOT run" | tee "$OUT/gpu_tests.log"
  rc=1
fi

step "decode benchmark grid"
wait "$PREP_PID" || echo "benchmark preparation failed: see $OUT/gpu_bench_prepare.log"
timeout "$(left 5)" "$PY" -m bench.gpu_bench "${BENCH_ARGS[@]}" --time-budget "$(left 40)" 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_bench exit status: $bench_rc"
[ "$bench_rc" -eq 0 ] || rc=1

step "done: exit status $rc; logs and JSON in $OUT"
exit $rc
