#!/usr/bin/env bash
# One call on the lent GPU: the cuda-marked tests (reliability figures included), then the graph benchmark
# (vit_small fp32 and bf16, vit_base fp32 and bf16), each step bounded so the whole fits in 10 minutes.
# Usage: bash bench/gpu.sh   — everything lands under $OUT (default bench/results).
# Knobs: TESTS=0 skips the tests, BENCH=0 the benchmark, QUICK=1 runs the benchmark's --quick matrix,
# STAGES=1 adds the eager stage benchmark.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT" "$OUT/reliability"
export ARRCOC_RELIABILITY_OUT="$OUT/reliability"
step() {  # step NAME SECONDS COMMAND...: run with a time bound, tee the output, never stop the script
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"
  timeout -k 10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  echo "=== $name exit $? $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"
}
QUICK_ARGS=""
[ "${QUICK:-0}" = 1 ] && QUICK_ARGS="--quick"
step env 60 python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
if [ "${TESTS:-1}" = 1 ]; then
  step cuda-tests-graphs 170 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" --durations=15 \
    --junitxml="$OUT/cuda-tests-graphs.xml" tests/test_graphs.py tests/test_graphs_reliability.py
  step cuda-tests-other 40 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" --durations=5 \
    --junitxml="$OUT/cuda-tests-other.xml" tests/ --ignore=tests/test_graphs.py --ignore=tests/test_graphs_reliability.py
fi
if [ "${BENCH:-1}" = 1 ]; then
  step bench-host 45 python3 -m arrcoc.bench_graphs --host --out "$OUT"
  step bench-fp32 130 python3 -m arrcoc.bench_graphs --out "$OUT" --skip 1024x64 --threads --compile 224x1 --seconds 0.25 $QUICK_ARGS
  step bench-bf16 90 python3 -m arrcoc.bench_graphs --out "$OUT" --dtype bfloat16 --tag bf16 --skip 1024x64 --compile 224x1 --seconds 0.25 $QUICK_ARGS
  step bench-vitb-fp32 50 python3 -m arrcoc.bench_graphs --out "$OUT" --encoder vit_base_patch16_224 --tag vitb \
    --sizes 224 512 1024 --batches 1 8 --skip 1024x8 --no-warmup --compile --seconds 0.25 $QUICK_ARGS
  step bench-vitb-bf16 50 python3 -m arrcoc.bench_graphs --out "$OUT" --encoder vit_base_patch16_224 --dtype bfloat16 \
    --tag vitb-bf16 --sizes 224 512 1024 --batches 1 8 --skip 1024x8 --no-warmup --compile --seconds 0.25 $QUICK_ARGS
fi
if [ "${STAGES:-0}" = 1 ]; then
  step stages-fp32 120 python3 -m arrcoc.bench --out "$OUT" --reps 30
  step stages-bf16 120 python3 -m arrcoc.bench --out "$OUT" --reps 30 --dtype bfloat16 --tag bf16
fi
cat "$OUT/steps.log"
true
