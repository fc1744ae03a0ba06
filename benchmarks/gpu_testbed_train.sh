#!/bin/bash
# Train (or, with --resume, continue) both testbed models side by side on one GPU for MINUTES each, then run the
# dense quality check on both and pack the folders into $OUT (the device tool returns <= 8 files of <= 16 MiB).
#   bash benchmarks/gpu_testbed_train.sh 7 --resume      (from the repository root, mixdit importable)
#   KINDS=video bash benchmarks/gpu_testbed_train.sh 9 --resume   (one model, the whole GPU)
#   SWEEP="3:16 8:24" ...   also scores each trained model with these sampler settings (shift:steps)
# Unpack here: python -m mixdit.pipelines.testbed.ship unpack DIR mixdit-shapes-video pipelines/testbed/weights
MIN=${1:-7}; RESUME=${2:-}; KINDS=${KINDS:-video image}
set -o pipefail
OUT=${OUT:-/tmp/testbed-out}
export PYTHONUNBUFFERED=1 MIXDIT_TESTBED_DIR=/tmp/w
REPO=$(pwd)
mkdir -p /tmp/w "$OUT"
[ -n "$RESUME" ] && for kind in $KINDS; do cp -r "$REPO"/pipelines/testbed/weights/mixdit-shapes-$kind /tmp/w/; done
cd /tmp
for kind in $KINDS; do
  python3 -m mixdit train testbed --model $kind --out /tmp/w/mixdit-shapes-$kind --steps 1000000 \
     --max-minutes "$MIN" --save-every 0 --log-every 250 --pack-to "$OUT" $RESUME > "$OUT/train-$kind.log" 2>&1 &
done
wait
tail -n 3 "$OUT"/train-*.log
for kind in $KINDS; do
  timeout 100 python3 "$REPO/benchmarks/quality.py" --model mixdit-shapes-$kind --configs dense --out-dir /tmp/q \
     > /tmp/q-$kind.log 2>&1 &
done
wait
for kind in $KINDS; do
  for setting in ${SWEEP:-}; do
    shift_=${setting%%:*}; steps=${setting##*:}
    timeout 100 python3 "$REPO/benchmarks/quality.py" --model /tmp/w/mixdit-shapes-$kind --configs dense \
       --flow-shift $shift_ --steps $steps --out-dir /tmp/q-sweep > /tmp/q-sweep.log 2>&1
    echo "$kind shift $shift_ steps $steps: $(grep -h "accuracy" /tmp/q-sweep.log)"
    tail -n 1 /tmp/q-sweep/quality-mixdit-shapes-$kind.md | sed "s/^| dense/| $kind shift $shift_ steps $steps/" >> "$OUT"/sweep.md
  done
done
grep -h "accuracy" /tmp/q-*.log
cp /tmp/q/*.json "$OUT"/ 2>/dev/null
