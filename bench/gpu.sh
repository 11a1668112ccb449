#!/usr/bin/env bash
# One call on the lent GPU: the cuda-marked tests (reliability figures included), then the graph benchmark, each
# step bounded by `timeout` so the script always finishes. Everything lands under $OUT (default bench/results):
# one log per step, steps.log (start, limit, exit code of each), junit XML of the tests, the reports. The lent
# machine returns at most 8 files from $OUT: end a call that writes more with `bash bench/pack_out.sh "$OUT"`.
#
# Usage: bash bench/gpu.sh                  the full run (vit_small fp32 and bf16, vit_base fp32 and bf16)
#        PROFILE=final bash bench/gpu.sh    the final figures in at most 300 s (BUDGET), in order of priority:
#            the graph cuda tests, the other cuda tests, the host cost per call (--host), the whole-chain fp32
#            table (224/384/512/1024 x 1/8/64 without 1024x64), torch.compile and the kernel profile at 224x1, bf16
#            (224/1024 x 1/64, compile and profile at 224x1),
#            vit_base fp32 and bf16 (224/1024 x 1/8). Each step has its own cap and never runs past the
#            deadline: a late step is cut short (the benchmark saves after every case) or skipped. While the tests
#            run, a background run of the compile case fills torch.compile's caches (PREWARM=0: not).
# Extra steps (any profile, after the benchmark): QWEN=1 the Qwen-VL generation benchmark (QWEN_BATCHES, QWEN_LIMIT
# per batch, QWEN_ARGS); EVAL=1 `arrcoc eval` on
# the test seeds (200 per family, both sizes, every reducer); BEFORE=<dir> the graph benchmark of another checkout's
# package (e.g. `git archive <commit> arrcoc | tar -x -C <dir>`) into $OUT/before, for a before/after comparison
# on the same machine; DATASET=1 the data-set benchmark; SWEEP=1 the query-free validation sweep
# (bench/sweep_noquery.py, SWEEP_LIMIT seconds, SWEEP_ARGS passed on); ITEM4=1 the chain against the encoder alone at
# 224 px bf16 batch 64, plain, compiled and head compiled, with the head-compiled-vs-plain agreement and a fresh
# process's start-up, plain and head compiled in the background (ITEM4_RESTART: other --restart-modes, ITEM4_LIMIT:
# its seconds); JOB_COMPILE=1 bench/compile_background_job.sh (JOB_PHOTOS photos); TIMELINE=1
# bench/compile_timeline.py, cold then warm caches (TIMELINE_LIMIT seconds each, TIMELINE_RUNS=cold: the first
# alone); RACE=1 bench/compile_race_probe.py
# (captures beside a background compile); HEAD_AB=<dir> the plain chain against the encoder alone for another
# checkout's package and this tree in turns (HEAD_AB_ROUNDS rounds); PROBE="qwen-host ..." those parts
# of bench/profile_probe.py (PROBE_LIMIT seconds each) into $OUT/probe.
# Knobs: TESTS=0 skips the tests, TEST_FILES="tests/a.py ..." runs only those files' cuda tests (TEST_LIMIT: their
# seconds), BENCH=0 the benchmark, QUICK=1 runs the benchmark's --quick matrix (full run), STAGES=1 adds the eager
# stage benchmark (full run), BUDGET=<s> bounds the whole script (final: 300 by default), DRY=1 prints each step and
# its limit without running it.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
PROFILE="${PROFILE:-full}"
[ "$PROFILE" = final ] && BUDGET="${BUDGET:-300}"
BUDGET="${BUDGET:-}"
START=$(date +%s)
mkdir -p "$OUT" "$OUT/reliability"
export ARRCOC_RELIABILITY_OUT="$OUT/reliability"

step() {  # step NAME SECONDS COMMAND...: run with a time bound, tee the output, never stop the script
  local name=$1 limit=$2; shift 2
  if [ -n "$BUDGET" ]; then  # the deadline: leave 5 s for timeout's kill and 3 s for the summary
    local left=$(( START + BUDGET - $(date +%s) - 8 ))
    if [ "$left" -lt 10 ]; then
      echo "=== $name skipped: ${left}s left of the ${BUDGET}s budget" | tee -a "$OUT/steps.log"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s" | tee -a "$OUT/steps.log"
  if [ "${DRY:-0}" = 1 ]; then
    echo "    $*" | tee -a "$OUT/steps.log"
    return
  fi
  timeout -k 5 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  echo "=== $name exit $? $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s" | tee -a "$OUT/steps.log"
}

cuda_tests() {  # cuda_tests GRAPHS_LIMIT OTHER_LIMIT: the graph tests first, then every other cuda-marked test
  if [ -n "${TEST_FILES:-}" ]; then  # only these files' cuda tests, under the second limit
    step cuda-tests-picked "${TEST_LIMIT:-$2}" python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" --durations=5 \
      --junitxml="$OUT/cuda-tests-picked.xml" $TEST_FILES
    return
  fi
  step cuda-tests-graphs "$1" python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" --durations=15 \
    --junitxml="$OUT/cuda-tests-graphs.xml" tests/test_graphs.py tests/test_graphs_reliability.py
  step cuda-tests-other "$2" python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="" --durations=5 \
    --junitxml="$OUT/cuda-tests-other.xml" tests/ --ignore=tests/test_graphs.py --ignore=tests/test_graphs_reliability.py
}

GRAPHS=(python3 -m arrcoc.tools.bench_graphs --out "$OUT")
step env 20 python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

if [ "$PROFILE" = final ]; then
  # caps sum past the budget on purpose: the deadline decides, and a step that ends early leaves its time to the next
  FAST=(--no-warmup --seconds 0.15 --reps 25)
  COMPILE=(--sizes 224 --batches 1 --compile 224x1 --profile 224x1 --tag compile "${FAST[@]}")
  VITB=(--encoder vit_base_patch16_224 --sizes 224 1024 --batches 1 8 --compile "${FAST[@]}")
  PREWARM_PID=""
  if [ "${BENCH:-1}" = 1 ] && [ "${TESTS:-1}" = 1 ] && [ "${PREWARM:-1}" = 1 ] && [ "${DRY:-0}" != 1 ]; then
    # torch.compile's cold start (dynamo, inductor, Triton builds: about a minute) overlaps the tests on idle CPU
    # cores: a background run of the compile case fills the on-disk caches; its figures (under $OUT/prewarm, taken
    # beside the tests) are not the results. It is stopped when the tests end, before anything is timed.
    mkdir -p "$OUT/prewarm"
    echo "=== prewarm (background, until the tests end) +$(( $(date +%s) - START ))s" | tee -a "$OUT/steps.log"
    timeout -k 5 150 python3 -m arrcoc.tools.bench_graphs --out "$OUT/prewarm" "${COMPILE[@]}" > "$OUT/prewarm/prewarm.log" 2>&1 &
    PREWARM_PID=$!
  fi
  [ "${TESTS:-1}" = 1 ] && cuda_tests 150 100  # the graph tests took 90-113 s; the others (Qwen-VL and decode among them) more
  if [ -n "$PREWARM_PID" ]; then
    kill -TERM "$PREWARM_PID" 2>/dev/null  # timeout passes it on to the benchmark
    wait "$PREWARM_PID"
    echo "=== prewarm exit $? +$(( $(date +%s) - START ))s" | tee -a "$OUT/steps.log"
  fi
  if [ "${BENCH:-1}" = 1 ]; then
    step bench-host 25 "${GRAPHS[@]}" --host --host-reps 5000
    # this step alone keeps the warm-up measurement (5 sizes x 3 batch buckets into one pool: about 10 s)
    step bench-fp32 100 "${GRAPHS[@]}" --sizes 224 384 512 1024 --batches 1 8 64 --skip 1024x64 --compile --seconds 0.15 --reps 25
    step bench-compile 120 "${GRAPHS[@]}" "${COMPILE[@]}"
    step bench-bf16 130 "${GRAPHS[@]}" --dtype bfloat16 --tag bf16 --sizes 224 1024 --batches 1 64 --compile 224x1 \
      --profile 224x1 "${FAST[@]}"
    step bench-vitb-fp32 50 "${GRAPHS[@]}" --tag vitb "${VITB[@]}"
    step bench-vitb-bf16 40 "${GRAPHS[@]}" --dtype bfloat16 --tag vitb-bf16 "${VITB[@]}"
  fi
else
  QUICK_ARGS=()
  [ "${QUICK:-0}" = 1 ] && QUICK_ARGS=(--quick)
  [ "${TESTS:-1}" = 1 ] && cuda_tests 170 150  # the others: Qwen-VL (compiled blocks among them), decode, data sets
  if [ "${BENCH:-1}" = 1 ]; then
    step bench-host 45 "${GRAPHS[@]}" --host
    step bench-fp32 130 "${GRAPHS[@]}" --skip 1024x64 --threads --compile 224x1 --seconds 0.25 "${QUICK_ARGS[@]}"
    step bench-bf16 90 "${GRAPHS[@]}" --dtype bfloat16 --tag bf16 --skip 1024x64 --compile 224x1 --seconds 0.25 "${QUICK_ARGS[@]}"
    step bench-vitb-fp32 50 "${GRAPHS[@]}" --encoder vit_base_patch16_224 --tag vitb \
      --sizes 224 512 1024 --batches 1 8 --skip 1024x8 --no-warmup --compile --seconds 0.25 "${QUICK_ARGS[@]}"
    step bench-vitb-bf16 50 "${GRAPHS[@]}" --encoder vit_base_patch16_224 --dtype bfloat16 \
      --tag vitb-bf16 --sizes 224 512 1024 --batches 1 8 --skip 1024x8 --no-warmup --compile --seconds 0.25 "${QUICK_ARGS[@]}"
  fi
  if [ "${STAGES:-0}" = 1 ]; then
    step stages-fp32 120 python3 -m arrcoc.tools.bench --out "$OUT" --reps 30
    step stages-bf16 120 python3 -m arrcoc.tools.bench --out "$OUT" --reps 30 --dtype bfloat16 --tag bf16
  fi
fi
if [ -n "${BEFORE:-}" ]; then  # the old package's own module path: it predates arrcoc.tools
  mkdir -p "$OUT/before"
  step bench-before 80 bash -c "cd '$BEFORE' && PYTHONPATH=. python3 -m arrcoc.bench_graphs --out '$(realpath "$OUT")/before' \
    --sizes 224 1024 --batches 1 64 --compile --no-warmup --seconds 0.15 --reps 25"
  step bench-after 80 "${GRAPHS[@]}" --tag after --sizes 224 1024 --batches 1 64 --compile --no-warmup --seconds 0.15 --reps 25
fi
# the Qwen-VL benchmark, each batch size of QWEN_BATCHES in a process of its own (a compiled tower that has seen
# another batch's token count runs batch 1 on shapes compiled for both); QWEN_ARGS replaces its options (default:
# the vision blocks and the reducer compiled, one static compile per shape, the rows pruned inside the tower beside the
# post-tower ones)
QWEN_LIMIT="${QWEN_LIMIT:-250}"
if [ "${QWEN:-0}" = 1 ]; then
  for batch in ${QWEN_BATCHES:-8 1}; do
    step "bench-qwen-b$batch" "$QWEN_LIMIT" env TORCH_LOGS=recompiles python3 -m arrcoc.tools.bench_qwen \
      --out "$OUT/qwen-b$batch" --batches "$batch" --time-limit $(( QWEN_LIMIT - 20 )) \
      ${QWEN_ARGS:---compile --static-shapes --compile-reducer --repeats 5 --prune-after auto}
  done
fi
# the query-free validation sweep (issue 21); SWEEP_ARGS picks variants, seeds, sizes, shares
SWEEP_LIMIT="${SWEEP_LIMIT:-300}"
[ "${SWEEP:-0}" = 1 ] && step sweep-noquery "$SWEEP_LIMIT" python3 bench/sweep_noquery.py --out "$OUT/sweep" \
  --time-limit $(( SWEEP_LIMIT - 15 )) ${SWEEP_ARGS:-}
[ "${EVAL:-0}" = 1 ] && step eval 240 python3 -m arrcoc.tools.evaluation --samples-per-family 200 --seed 600000 \
  --out "$OUT" --quiet
# the data-set benchmark (DATASET_ARGS passed on)
[ "${DATASET:-0}" = 1 ] && step bench-dataset "${DATASET_LIMIT:-240}" python3 -m arrcoc.tools.bench_dataset --out "$OUT" \
  ${DATASET_ARGS:-}
# issue 22 item 4: the chain against the encoder alone, plain and compiled, at 224 px bf16 batch 64 (the shipped
# encoder and vit_base), compiled-vs-plain allocations and the start-up of a fresh process
ITEM4_ARGS=(--sizes 224 --batches 64 --compile 224x64 --no-reduce-overhead --no-warmup --seconds 0.15 --reps 25 --dtype bfloat16)
[ "${ITEM4:-0}" = 1 ] && step bench-item4-shipped "${ITEM4_LIMIT:-240}" "${GRAPHS[@]}" --pretrained --tag shipped-bf16 \
  "${ITEM4_ARGS[@]}" --agreement --agreement-mode head --agreement-images 256 --restart \
  --restart-modes ${ITEM4_RESTART:-plain background}
[ "${ITEM4:-0}" = 1 ] && step bench-item4-vitb 90 "${GRAPHS[@]}" --encoder vit_base_patch16_224 --tag vitb-bf16-item4 \
  "${ITEM4_ARGS[@]}"
# item 4's plain graphs for another checkout's package (HEAD_AB=<dir>, e.g. `git archive <commit> arrcoc | tar -x -C
# <dir>`) and this tree, taking turns in fresh processes (HEAD_AB_ROUNDS rounds), the shipped encoder and vit_base
HEAD_AB_ARGS=(--sizes 224 --batches 1 64 --compile --no-warmup --seconds 0.25 --reps 40 --dtype bfloat16)
if [ -n "${HEAD_AB:-}" ]; then
  mkdir -p "$OUT/head-ab"
  for round in $(seq "${HEAD_AB_ROUNDS:-2}"); do
    for side in before after; do
      root=$PWD
      [ "$side" = before ] && root=$(realpath "$HEAD_AB")
      # from the package's own folder: `python -m` puts the working directory ahead of PYTHONPATH
      step "head-ab-$side-$round" 60 bash -c "cd '$root' && PYTHONPATH='$root' python3 -m arrcoc.tools.bench_graphs \
        --out '$(realpath "$OUT")/head-ab' --pretrained '$PWD/weights' --tag shipped-$side-$round ${HEAD_AB_ARGS[*]}"
      step "head-ab-vitb-$side-$round" 60 bash -c "cd '$root' && PYTHONPATH='$root' python3 -m arrcoc.tools.bench_graphs \
        --out '$(realpath "$OUT")/head-ab' --encoder vit_base_patch16_224 --tag vitb-$side-$round ${HEAD_AB_ARGS[*]}"
    done
  done
fi
# compress-dataset --compile off, auto and background, fresh processes, empty compile caches: wall time, exit
[ "${JOB_COMPILE:-0}" = 1 ] && step job-compile-background 240 env OUT="$OUT" PHOTOS="${JOB_PHOTOS:-1000}" \
  bash bench/compile_background_job.sh
# a data-set job's rate before, during and after a background compile, from cold caches, then from warm ones
if [ "${TIMELINE:-0}" = 1 ]; then
  TIMELINE_CACHE=$(mktemp -d)
  for cache in ${TIMELINE_RUNS:-cold warm}; do
    step "compile-timeline-$cache" "${TIMELINE_LIMIT:-200}" env TORCHINDUCTOR_CACHE_DIR="$TIMELINE_CACHE" \
      python3 bench/compile_timeline.py --out "$OUT/compile-timeline-$cache.json" --limit $(( ${TIMELINE_LIMIT:-200} - 60 ))
  done
  rm -rf "$TIMELINE_CACHE"
fi
# a background compile beside the plain graphs' captures: fresh processes, one and two buckets, every warning
[ "${RACE:-0}" = 1 ] && step compile-race 240 python3 bench/compile_race_probe.py --runs 2 --keys 1 2
for part in ${PROBE:-}; do
  step "probe-$part" "${PROBE_LIMIT:-200}" python3 bench/profile_probe.py "$part" --out "$OUT/probe"
done
echo "=== done +$(( $(date +%s) - START ))s (profile $PROFILE${BUDGET:+, budget ${BUDGET}s})" | tee -a "$OUT/steps.log"
cat "$OUT/steps.log"
true
