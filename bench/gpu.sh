#!/usr/bin/env bash
# One call on the lent GPU: the cuda-marked tests, then the stage benchmark (fp32 and bf16 encoder).
# Usage (device tool): bash bench/gpu.sh   — everything lands under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/cuda-tests.log"
python3 -m arrcoc.bench --out "$OUT" --reps 30 2>&1 | tail -n 20
python3 -m arrcoc.bench --out "$OUT" --reps 30 --dtype bfloat16 --tag bf16 2>&1 | tail -n 20
