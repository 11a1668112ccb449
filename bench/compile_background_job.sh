#!/usr/bin/env bash
# `arrcoc compress-dataset --compile off`, `auto` (the default) and `background` on the same folder, each in a fresh
# process with an empty torch.compile cache: the whole job's wall time and exit code, its last lines (the decode hint
# among them), and whether a job that ends before its compile does exits cleanly (the compile thread is a daemon).
# Usage: OUT=dir [PHOTOS=1000] bash bench/compile_background_job.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
WORK=$(mktemp -d)
mkdir -p "$OUT"
python3 -c "import sys; from arrcoc.tools.bench_dataset import make_images
make_images(sys.argv[1], int(sys.argv[2]), sides=(640, 1600), seed=3)" "$WORK/photos" "${PHOTOS:-1000}"
for mode in off auto background; do
  export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-$mode"
  start=$(date +%s.%N)
  timeout -k 5 90 python3 -m arrcoc compress-dataset "$WORK/photos" "$WORK/out-$mode" --budget 64 --dtype bfloat16 \
    --compile "$mode" 2>&1 | tr '\r' '\n' > "$WORK/$mode.log"
  rc=${PIPESTATUS[0]}
  echo "--compile $mode: exit $rc, $(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start") s \
from process start to exit; log tail:" | tee -a "$OUT/compile-background-job.txt"
  grep -v 'img/s' "$WORK/$mode.log" | tail -5 | tee -a "$OUT/compile-background-job.txt"
done
rm -rf "$WORK"
