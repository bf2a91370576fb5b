#!/usr/bin/env bash
# Issue 13's CUDA rows in one prepared run, sized for at most 9 minutes on one H200:
#   1. the CUDA tests (bf16 finetuning, positions, batch_size auto's probe, the SDPA
#      window attention against MONAI's on the GPU)                     ~1.5 min
#   2. the levers, one row each (benchmarks/levers_bench.py): s/step, crops/s, step
#      peak memory, GPU idle share, TFLOP/s and share of bf16 peak; then the FLOPs
#      and on-device sampling of the cuda section                      <= 4.5 min
#   3. our step against the authors' (benchmarks/authors_bench.py), when a copy
#      of Luffy03/VoCo is given in VOCO_AUTHORS_REPO (never committed)   ~1.5 min
# Results: JSON files under $OUT (default benchmarks/results) and one line each.
#
# A machine with torch and CUDA but without MONAI/nibabel: carry their wheels and set
# VOCO_WHEELS to that folder (rows: docs/benchmarks.md, "Not measured yet: needs a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
section() { echo "== $1 (t = $(( $(date +%s) - start )) s)"; }

if [ -n "${VOCO_WHEELS:-}" ]; then
  section "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$VOCO_WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD/src:${PYTHONPATH:-}"
else
  export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
fi
$PY -c "import torch, monai, voco_core; assert torch.cuda.is_available(), 'no CUDA'; \
print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name(0))" \
  || exit 1
mkdir -p "$OUT"

section "CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15

section "levers + cuda (base preset)"
timeout 330 $PY benchmarks/pretrain_bench.py --device cuda --sections levers,cuda --steps 4 \
    --levers-budget 240 --out "$OUT/pretrain_bench_levers_cuda.json" 2>&1 | tail -12

section "authors"
if [ -n "${VOCO_AUTHORS_REPO:-}" ]; then
  timeout 120 $PY benchmarks/pretrain_bench.py --device cuda --sections authors --steps 4 \
      --authors-repo "$VOCO_AUTHORS_REPO" --out "$OUT/pretrain_bench_authors_cuda.json" \
      2>&1 | tail -8
else
  echo "skipped: set VOCO_AUTHORS_REPO to a copy of Luffy03/VoCo"
fi
section "done"
