#!/usr/bin/env bash
# One lent-GPU call of VLM training (python -m arrcoc.world.train), packed for the trip back: the two large
# safetensors as they are, everything else in one tgz (a call returns at most 8 files of 16 MiB).
# Usage: OUT=/some/dir bash bench/train_vlm.sh --resume FOLDER [train options...]
# A fine-tune of the shipped weights that keeps the ViT and the text query encoder bit-identical (only
# vlm.safetensors changes; the run checks the frozen tensors before it saves):
#   LIMIT=540 bash bench/train_vlm.sh --resume weights --freeze-vision --restart-schedule --minutes 8.3 ...
# LIMIT bounds the training process, its start-up and final accuracy check included; --minutes must end first.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/train-out}"
RUN=/tmp/arrcoc-train
mkdir -p "$OUT" "$RUN"
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$RUN/env.log"
# The run stops itself (--minutes); the timeout only guards against a hang.
timeout -k 10 "${LIMIT:-580}" python3 -m arrcoc.world.train --out "$RUN" "$@" 2>&1 | tr '\r' '\n' | grep -v '^train:' | tee "$RUN/train.log"
cp "$RUN/weights/encoder.safetensors" "$RUN/weights/vlm.safetensors" "$OUT/" 2>/dev/null
tar czf "$OUT/run.tgz" -C "$RUN" --exclude ckpt.pt --exclude weights/encoder.safetensors --exclude weights/vlm.safetensors .
ls -la "$OUT"
