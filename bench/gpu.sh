#!/usr/bin/env bash
# One call on the lent GPU: the cuda-marked tests, the graph benchmark, and (STAGES=1) the eager stage benchmark.
# Usage (device tool): bash bench/gpu.sh   — everything lands under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" -x 2>&1 | tee "$OUT/cuda-tests.log"
python3 -m arrcoc.bench_graphs --out "$OUT" ${GRAPH_ARGS:-} 2>&1 | grep -v "graphs:" | tail -n 40
[ "${STAGES:-0}" = 1 ] && python3 -m arrcoc.bench --out "$OUT" --reps 30 2>&1 | tail -n 20
[ "${STAGES:-0}" = 1 ] && python3 -m arrcoc.bench --out "$OUT" --reps 30 --dtype bfloat16 --tag bf16 2>&1 | tail -n 20
true
