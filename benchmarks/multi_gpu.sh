#!/bin/bash
# HeadHunter search, VMoBA fine-tuning and batch generation at 1 and 2 GPUs (random full-size models, toy work).
# Run from the repository root with mixdit importable; writes $OUT (or benchmarks/results) multi-gpu-*.json.
# The 1-GPU runs of search and training go side by side on GPUs 0 and 1 (then the dense training baseline on
# GPU 0), then each command on both GPUs; then `mixdit batch` (images: SD3.5-medium, videos: Wan2.1-1.3B with
# VMoBA), its two 1-GPU runs side by side, then each on both GPUs. SKIP_SEARCH=1 / SKIP_TRAIN=1 / SKIP_BATCH=1 leave
# a part out.
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
SKIP_SEARCH=${SKIP_SEARCH:-0}; SKIP_TRAIN=${SKIP_TRAIN:-0}; SKIP_BATCH=${SKIP_BATCH:-0}
for i in $(seq 1 16); do echo "a photo of object number $i on a table"; done > batch_prompts.txt
BATCH_IMG="-m mixdit batch batch_prompts.txt --model random:sd3.5-medium --seeds 2 --steps 20 --height 512
  --width 512 --dtype bfloat16 --no-progress"
BATCH_VID="-m mixdit batch batch_prompts.txt --model random:wan2.1-1.3b --seeds 1 --steps 10 --height 480
  --width 832 --frames 21 --dtype bfloat16 --vmoba --video-format gif --no-progress"
[ "$SKIP_SEARCH" = 1 ] || CUDA_VISIBLE_DEVICES=0 python3 $SEARCH --out $OUT/multi-gpu-search-1.json > $OUT/search1.log 2>&1 &
[ "$SKIP_TRAIN" = 1 ] || CUDA_VISIBLE_DEVICES=1 python3 $TRAIN --out /tmp/mg/t1 > $OUT/train1.log 2>&1 &
wait
[ "$SKIP_TRAIN" = 1 ] || CUDA_VISIBLE_DEVICES=0 python3 $TRAIN --no-vmoba --out /tmp/mg/t1dense > $OUT/train1dense.log 2>&1
[ "$SKIP_SEARCH" = 1 ] || $L2 $SEARCH --out $OUT/multi-gpu-search-2.json > $OUT/search2.log 2>&1
[ "$SKIP_TRAIN" = 1 ] || $L2 $TRAIN --out /tmp/mg/t2 > $OUT/train2.log 2>&1
if [ "$SKIP_BATCH" != 1 ]; then
  rm -rf /tmp/mg/b_*
  CUDA_VISIBLE_DEVICES=0 python3 $BATCH_IMG --out /tmp/mg/b_img1 > $OUT/batch_img1.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 python3 $BATCH_VID --out /tmp/mg/b_vid1 > $OUT/batch_vid1.log 2>&1 &
  wait
  $L2 $BATCH_IMG --out /tmp/mg/b_img2 > $OUT/batch_img2.log 2>&1
  $L2 $BATCH_VID --out /tmp/mg/b_vid2 > $OUT/batch_vid2.log 2>&1
  for b in img1 vid1 img2 vid2; do
    [ -f /tmp/mg/b_$b/manifest.jsonl ] && cp /tmp/mg/b_$b/manifest.jsonl $OUT/multi-gpu-batch-$b.jsonl
  done
fi
for t in t1 t1dense t2; do [ -f /tmp/mg/$t/train_metrics.json ] && cp /tmp/mg/$t/train_metrics.json $OUT/multi-gpu-train-$t.json; done
for f in search1 train1 train1dense search2 train2 batch_img1 batch_vid1 batch_img2 batch_vid2; do [ -f $OUT/$f.log ] && { echo "== $f"; grep -v -i "warn" $OUT/$f.log | tail -n 4; }; done
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
# batch: time = the busiest rank's summed job seconds (generation + saving, after model loading). A rank's first job
# includes its warm-up (kernel compilation, or Triton's disk cache from an earlier run, cuDNN plans), so the
# steady-state rate leaves each rank's first job out: that is the scaling measure
for kind in ("img", "vid"):
    for n in (1, 2):
        p = out / f"multi-gpu-batch-{kind}{n}.jsonl"
        if p.exists():
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            done = [r for r in rows if r.get("status") == "done"]
            per_rank = {}
            for r in done:
                per_rank.setdefault(r["rank"], []).append(r["seconds"])
            if not done or len(done) == len(per_rank):
                print(f"batch {kind} {n} GPU: {len(done)} of {len(rows)} jobs done, too few to time")
                continue
            busiest = max(sum(v) for v in per_rank.values())
            steady = max(sum(v[1:]) for v in per_rank.values())
            n_steady = len(done) - len(per_rank)
            print(f"batch {kind} {n} GPU: {len(done)} of {len(rows)} jobs done on ranks {sorted(per_rank)}; "
                  f"busiest rank {busiest:.1f} s = {60 * len(done) / busiest:.1f} jobs/min; without each rank's "
                  f"first job {steady:.1f} s = {60 * n_steady / steady:.1f} jobs/min")
PY
