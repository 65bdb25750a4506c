#!/bin/bash
# The lite v6 recipe as a training burst on a lent accelerator machine (RECIPE.md "lite v6"), run from the repo
# root there with the packed subset beside it (frvideo/train/pack.py): .gpu_a (eval crops and the
# first train chunk, carried with PyAV's wheel in .whl) and .gpu_b (the rest and the index).
#   gpu_burst.sh smoke SECONDS   install PyAV, train both variants for SECONDS, keep their rate
#   gpu_burst.sh train SECONDS   train both variants for about SECONDS, export them into $OUT
# Two variants side by side, 7 batch workers each (16 cores): a = 128² patches, b = whole 256² faces.
set -u
mode=$1; secs=${2:-60}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PY:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
extra=()
if ! $PY -c "import av" 2>/dev/null; then
  echo "PyAV missing (a fresh machine?): no x264 pass this burst"; extra+=(--set degradation.codec_prob=0.0)
fi
root=.gpu_b/train; [ -f .gpu_b/train/index.jsonl ] || root=.gpu_a/smoke
[ -d .gpu_a ] || { echo "no .gpu_a here (a fresh machine): carry it and .whl first (smoke)"; exit 3; }
ev=.gpu_a/val
echo "data $root eval $ev"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
mkdir -p runs; cp plugins/lite/weights/lite.pth runs/lite_v2.pth
steps=100000
if [ "$mode" = train ]; then
  rate=$(cat /tmp/lite6_rate 2>/dev/null || echo 10)
  steps=$($PY -c "print(int($rate * ($secs - 25) * 0.97))")
fi
echo "mode $mode steps $steps"
declare -A crop=([a]=128 [b]=null)
for v in a b; do
  timeout -s INT $((secs + 20)) $PY -m frvideo train configs/train/lite6_restore.yaml --device ${DEVICE:-cuda} --fresh -q \
    --output runs/lite6$v --steps $steps --set data.root=$root --set data.eval_root=$ev --set train.threads=2 --set train.batch=32 --set train.workers=7 --set train.save_every=500 \
    --set data.crop=${crop[$v]} "${extra[@]}" > /tmp/log_$v.txt 2>&1 &
done
wait
for v in a b; do echo "== $v"; tail -3 /tmp/log_$v.txt; tail -1 runs/lite6$v/train_log.jsonl; done
if [ "$mode" = smoke ]; then
  $PY - <<'PY'
import json
rates = []
for v in "ab":
    try:
        rows = [json.loads(l) for l in open(f"runs/lite6{v}/train_log.jsonl")]
    except OSError:
        rows = []
    if len(rows) >= 3:  # the steady rate, past the first row's start-up
        rates.append((rows[-1]["step"] - rows[1]["step"]) / (rows[-1]["time"] - rows[1]["time"]))
    else:
        rates.append(rows[-1]["step"] / rows[-1]["time"] if rows else 1.0)
    print(v, "steps/s", round(rates[-1], 2), "rows", len(rows))
open("/tmp/lite6_rate", "w").write(str(min(rates)))
PY
  exit 0
fi
for v in a b; do
  $PY -m frvideo train configs/train/lite6_restore.yaml --output runs/lite6$v --export $OUT/lite_v6$v.pth
  cp runs/lite6$v/train_log.jsonl $OUT/train_log_$v.jsonl; cp runs/lite6$v/eval.jsonl $OUT/eval_$v.jsonl
  cp /tmp/log_$v.txt $OUT/log_$v.txt
done
