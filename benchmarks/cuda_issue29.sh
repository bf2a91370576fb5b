#!/usr/bin/env bash
# Issue 29's GPU readings in one prepared run, sized for at most 9 minutes on one H100
# or H200; every `voco compare` resumes, so a second lend continues where this stopped.
#   1. phantoms: 16 classic unlabelled (seed 1001, 96x96x64) for pretraining; 10 varied
#      labelled (seed 11, 160x160x96: the CPU reading's 4 are the first 4)     <= 0.5 min
#   2. VoCo pretraining, the recipe of the CPU readings (tiny, v2 loss, head teacher,
#      feature dropout 0.2, 4 mm grid, 150 steps; compare_varied_tiny_cpu.json) <= 1.5 min
#   3. varied style, <= 2 labelled: 2 folds x 4 paired seeds = 8 pairs, tiny
#      finetuning preset (amp auto: bf16), 400 steps, held-out Dice every 40   <= 3 min
#   4. Dice against labelled cases: --labelled 1,2,4,8 --held-out 2, 2 seeds   <= 2 min
#   5. the base preset (feature size 48, bf16): a short pretraining, then one
#      fold pair of step 3's data (BASE=0 leaves it out)                        <= 2 min
# Results: each comparison's compare.json copied to $OUT (default benchmarks/results)
# as compare_*_cuda.json, its one line printed; figures beside them in $WORK.
# QUICK=1: the same commands with 2 steps and 4 varied phantoms (a check on any
# machine, CPU included: DEVICE=cpu). VOCO_WHEELS: as in cuda_issue13.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/voco-issue29}
DEVICE=${DEVICE:-cuda}
. benchmarks/cuda_env.sh
VOCO="$PY -m voco_core.cli"

if [ "${QUICK:-0}" = 1 ]; then
  N_VARIED=4; PRE_STEPS=2; STEPS=2; EVERY=1; SEEDS=1; LABELLED=1,2; SHAPE="64 64 48"
  VSHAPE="96 96 64"; TAG=quick
else
  N_VARIED=10; PRE_STEPS=150; STEPS=400; EVERY=40; SEEDS=4; LABELLED=1,2,4,8
  SHAPE="96 96 64"; VSHAPE="160 160 96"; TAG=cuda
fi
JOBS=${JOBS:-4}
mkdir -p "$WORK"

section "phantoms"
[ -f "$WORK/pre/dataset.json" ] || $VOCO make-phantoms --out "$WORK/pre" -n 16 --seed 1001 \
    --shape $SHAPE
[ -f "$WORK/varied/dataset.json" ] || $VOCO make-phantoms --out "$WORK/varied" \
    -n "$N_VARIED" --seed 11 --shape $VSHAPE --style varied
# the CPU reading's population: the first 4 varied subjects
$PY - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
data = json.loads((work / "varied" / "dataset.json").read_text())
data["training"] = [{k: str((work / "varied" / v).resolve()) for k, v in case.items()}
                    for case in data["training"][:4]]
(work / "varied4.json").write_text(json.dumps(data, indent=1))
EOF

section "pretraining (tiny, the CPU readings' recipe)"
if [ -d "$WORK/pre_run" ]; then RUN=(--resume "$WORK/pre_run"); else RUN=(--out "$WORK/pre_run"); fi
timeout 90 $VOCO pretrain --data "$WORK/pre" "${RUN[@]}" --preset tiny --device "$DEVICE" \
  --steps "$PRE_STEPS" --set loss.variant=v2 --set data.resample=spacing \
  --set 'data.target_spacing=[4,4,4]' --set geometry.resize_crops=false \
  --set optim.batch_size=2 --set geometry.num_random_crops=2 --set model.feature_dropout=0.2 \
  --set model.teacher=head --set augment.flip_prob=0 --set augment.rot90_prob=0 \
  --set data.intensity=ct --set data.cache=memory --set run.checkpoint_every=50 2>&1 | tail -3

compare() {  # name, timeout, pretraining run, then voco compare's arguments
  local name=$1 limit=$2 pretrained=$3; shift 3
  section "compare: $name"
  timeout "$limit" $VOCO compare --pretrained "$pretrained" --device "$DEVICE" \
      --jobs "$JOBS" --out "$WORK/$name" "$@" 2>&1 | grep -v '^\[' | tail -4
  if [ -f "$WORK/$name/compare.json" ]; then
    cp "$WORK/$name/compare.json" "$OUT/compare_${name}_${TAG}.json"
  fi
}
compare varied_8pairs 180 "$WORK/pre_run" --data "$WORK/varied4.json" --folds 2 \
  --seeds "$SEEDS" --steps "$STEPS" --val-every "$EVERY"
compare varied_labelled 120 "$WORK/pre_run" --data "$WORK/varied" --labelled "$LABELLED" \
  --held-out 2 --seeds 2 --steps "$STEPS" --val-every "$EVERY"

if [ "${BASE:-1}" = 1 ]; then
  section "pretraining (base)"
  if [ -d "$WORK/pre_base" ]; then RUN=(--resume "$WORK/pre_base"); else RUN=(--out "$WORK/pre_base"); fi
  timeout 60 $VOCO pretrain --data "$WORK/pre" "${RUN[@]}" --preset base --device "$DEVICE" \
    --steps "$PRE_STEPS" --set loss.variant=v2 --set data.intensity=ct \
    --set data.cache=memory --set run.checkpoint_every=20 2>&1 | tail -3
  compare varied_base 60 "$WORK/pre_base" --data "$WORK/varied4.json" --folds 2 --seeds 1 \
    --preset base --steps "$STEPS" --val-every "$EVERY"
fi
section "done"
