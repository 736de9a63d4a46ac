#!/usr/bin/env bash
# Every GPU check in one run, for a short turn on a machine with an NVIDIA GPU (CI never needs one):
#   1. bench_gpu.py: the Triton int4 kernel against the reference, batch invariance on CUDA, and bench-1b decode
#      against transformers;
#   2. parity_table.py --device cuda: every family's variants against transformers, on the GPU;
#   3. gpu_tp.sh: tensor-parallel logits parity and bench_tp on the GPUs there are.
#
#   benchmarks/gpu_check.sh [LOG_DIR]    (default bench-out/gpu-check; PYTHON picks the interpreter)
#
# Each stage has its own time limit in seconds (BENCH_GPU_S, PARITY_S, GPU_TP_S; default 300, 150, 150) and log
# (LOG_DIR/<stage>.log); one that fails is named at the end, and the others still run. bench_gpu.py runs its
# decode figures right after the Triton check, so a short limit still gets them. Exit code 1 when any failed, 2
# without a CUDA GPU. The parity reference is the test extra's transformers (4.x): under another line, parity and
# the transformers rows may fail or differ, and the script says so first.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${1:-bench-out/gpu-check}"
PYTHON="${PYTHON:-python}"
CACHE="${BENCH_OUT:-bench-out}"  # where the bench checkpoints are written once
mkdir -p "$LOGS" "$CACHE"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU visible to torch ($PYTHON); run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$LOGS/gpu.log"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOGS/gpu.log"
import transformers
if int(transformers.__version__.split(".")[0]) != 4:
    print(f"gpu_check.sh: transformers {transformers.__version__} here; the parity reference is 4.x "
          "(pip install 'transformers>=4.44,<5'), so parity and the transformers rows may fail or differ")
EOF
failed=()
stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, its output also in LOGS/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}
stage bench_gpu "${BENCH_GPU_S:-300}" "$PYTHON" benchmarks/bench_gpu.py --out "$CACHE"
stage parity "${PARITY_S:-150}" "$PYTHON" benchmarks/parity_table.py --device cuda
stage gpu_tp "${GPU_TP_S:-150}" env PYTHON="$PYTHON" benchmarks/gpu_tp.sh --out "$CACHE" --new-tokens 32 --repeats 1
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check.sh: every stage passed"
