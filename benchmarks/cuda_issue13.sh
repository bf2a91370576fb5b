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
DEVICE=cuda
. benchmarks/cuda_env.sh

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
