# Sourced by the prepared CUDA scripts (cuda_issue13.sh, cuda_issue29.sh), from the
# repository root: PY, OUT, section(), the package on PYTHONPATH (with the wheels in
# VOCO_WHEELS installed first, for a machine with torch and CUDA but without MONAI or
# nibabel), and a check of what will run. DEVICE=cpu skips the CUDA check.
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
$PY -c "import sys, torch, monai, voco_core; \
cuda = sys.argv[1] != 'cpu'; assert not cuda or torch.cuda.is_available(), 'no CUDA'; \
print('torch', torch.__version__, 'monai', monai.__version__, \
torch.cuda.get_device_name(0) if cuda else 'cpu')" "${DEVICE:-cuda}" || exit 1
mkdir -p "$OUT"
