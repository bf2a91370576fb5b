#!/usr/bin/env bash
# More paired seeds for the varied-phantom reading at the plateau on CPU
# (benchmarks/results/compare_varied_seeds_tiny_cpu.json: 2 folds x seeds 0-2, 300 steps),
# when that reading's run folders are gone: its data and backbone are made again with the
# recorded commands, seeds FIRST.. run with `voco compare --first-seed`, and the parts'
# records are joined (benchmarks/compare_join.py) into RESULT with both readings anew.
#
# The backbone is a second pretraining with the recorded recipe, maybe not the same bytes: CPU
# runs agree to float rounding, not bit for bit (run.deterministic: false). The script
# prints its loss means beside the recorded ones (0.6951 -> 0.4452, first/last 10 steps)
# and the joined record lists each part's backbone; say so beside any number it gives.
#
# Cost on 2 cores: the pretraining (150 steps, one process) about 50 min at 21 s/step
# (compare_phantoms_tiny_cpu.json: 3,130 s), then 4 runs of 300 steps per seed, two at
# once, 28-38 min each: about 2 h for one more seed (2 pairs). A GPU does the whole
# 8-pair reading in benchmarks/cuda_issue29.sh instead.
#   FIRST=3 SEEDS=1 WORK=/tmp/varied_seeds bash benchmarks/compare_varied_seeds.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${WORK:-/tmp/voco-varied-seeds}
FIRST=${FIRST:-3}
SEEDS=${SEEDS:-1}
RECORDED=${RECORDED:-$ROOT/benchmarks/results/compare_varied_seeds_tiny_cpu.json}
RESULT=${RESULT:-$ROOT/benchmarks/results/compare_varied_seeds$((FIRST + SEEDS))_tiny_cpu.json}
PY=${PY:-python}
VOCO="$PY -m voco_core.cli"
mkdir -p "$WORK" && cd "$WORK" || exit 1

[ -f pre/dataset.json ] || $VOCO make-phantoms --out pre -n 16 --seed 1001 --shape 96 96 64
[ -f lab_varied/dataset.json ] || $VOCO make-phantoms --out lab_varied -n 4 --seed 11 \
    --style varied
if [ ! -f pre_run/checkpoints/last.pt ] || ! grep -q '"step": 150,' pre_run/log.jsonl; then
  if [ -d pre_run ]; then RUN=(--resume pre_run); else RUN=(--out pre_run); fi
  $VOCO pretrain --data pre "${RUN[@]}" --preset tiny --device cpu --steps 150 \
    --set loss.variant=v2 --set data.resample=spacing --set 'data.target_spacing=[4,4,4]' \
    --set geometry.resize_crops=false --set optim.batch_size=2 \
    --set geometry.num_random_crops=2 --set model.feature_dropout=0.2 \
    --set model.teacher=head --set augment.flip_prob=0 --set augment.rot90_prob=0 \
    --set data.intensity=ct --set data.cache=memory || exit 1
fi
$PY - <<'EOF'
import json
losses = [json.loads(line)["loss"] for line in open("pre_run/log.jsonl")
          if '"loss"' in line and json.loads(line).get("loss") is not None]
print(f"pre_run again: loss first 10 {sum(losses[:10]) / 10:.4f} -> last 10 "
      f"{sum(losses[-10:]) / 10:.4f} (recorded: 0.6951 -> 0.4452)")
EOF
$VOCO compare --data lab_varied --pretrained pre_run --out "cmp_seeds_from$FIRST" --folds 2 \
  --seeds "$SEEDS" --first-seed "$FIRST" --steps 300 --val-every 30 --device cpu --jobs 2 \
  || exit 1
$PY "$ROOT/benchmarks/compare_join.py" "$RECORDED" "cmp_seeds_from$FIRST/compare.json" \
  --out "$RESULT" --figures "$ROOT/docs/figures/$(basename "$RESULT" .json)"
