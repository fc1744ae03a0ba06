#!/bin/bash
# Issue 7: HeadHunter search and VMoBA fine-tuning at 1 and 2 GPUs (random full-size models, toy work).
# Run from the repository root with mixdit importable; writes $OUT (or benchmarks/results) multi-gpu-*.json.
# The 1-GPU runs of both commands go side by side on GPUs 0 and 1 (then the dense training baseline on GPU 0),
# then each command on both GPUs. Only the search (SKIP_TRAIN=1) or only the training (SKIP_SEARCH=1) also work.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" /tmp/mg && cd /tmp/mg
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/mg:${PYTHONPATH:-}
cat > toy_objective.py <<'PY'
import numpy as np
def score(images, prompts):  # deterministic toy objective: prefer mid-grey images
    return [-abs(float(np.asarray(im, dtype=np.float32).mean()) / 255.0 - 0.5) for im in images]
PY
printf 'a photo of a cat\n' > prompts.txt
SEARCH="-m mixdit heads search --model random:sd3.5-medium --prompts prompts.txt --objective toy_objective:score
  --candidates L8-15 --top-k 2 --samples 1 --steps 8 --height 512 --width 512 --batch-size 8 --dtype bfloat16"
TRAIN="-m mixdit train vmoba --model random:wan2.1-1.3b --data synthetic:16 --steps 8 --batch-size 1
  --height 480 --width 832 --frames 81 --mixed-precision bf16 --gradient-checkpointing --no-progress --save-every 0"
L2="accelerate launch --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
SKIP_SEARCH=${SKIP_SEARCH:-0}; SKIP_TRAIN=${SKIP_TRAIN:-0}
[ "$SKIP_SEARCH" = 1 ] || CUDA_VISIBLE_DEVICES=0 python3 $SEARCH --out $OUT/multi-gpu-search-1.json > $OUT/search1.log 2>&1 &
[ "$SKIP_TRAIN" = 1 ] || CUDA_VISIBLE_DEVICES=1 python3 $TRAIN --out /tmp/mg/t1 > $OUT/train1.log 2>&1 &
wait
[ "$SKIP_TRAIN" = 1 ] || CUDA_VISIBLE_DEVICES=0 python3 $TRAIN --no-vmoba --out /tmp/mg/t1dense > $OUT/train1dense.log 2>&1
[ "$SKIP_SEARCH" = 1 ] || $L2 $SEARCH --out $OUT/multi-gpu-search-2.json > $OUT/search2.log 2>&1
[ "$SKIP_TRAIN" = 1 ] || $L2 $TRAIN --out /tmp/mg/t2 > $OUT/train2.log 2>&1
for t in t1 t1dense t2; do [ -f /tmp/mg/$t/train_metrics.json ] && cp /tmp/mg/$t/train_metrics.json $OUT/multi-gpu-train-$t.json; done
for f in search1 train1 train1dense search2 train2; do [ -f $OUT/$f.log ] && { echo "== $f"; grep -v -i "warn" $OUT/$f.log | tail -n 4; }; done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for n in (1, 2):
    p = out / f"multi-gpu-search-{n}.json"
    if p.exists():
        s = json.loads(p.read_text())["run"]
        print(f"search {n} GPU: {s['generations']} candidate generations in {s['seconds']:.1f} s = {s['generations_per_minute']:.1f}/min")
for t, name in (("t1", "VMoBA, 1 GPU"), ("t1dense", "dense, 1 GPU"), ("t2", "VMoBA, 2 GPUs")):
    p = out / f"multi-gpu-train-{t}.json"
    if p.exists():
        m = json.loads(p.read_text())
        print(f"train {name}: {m['samples_per_second']:.3f} samples/s over {m['steps']} steps, {m['seconds']:.1f} s")
PY
