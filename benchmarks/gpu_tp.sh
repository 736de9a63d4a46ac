#!/usr/bin/env bash
# Tensor parallelism on NVIDIA GPUs: the logits parity check, then bench_tp, one rank per GPU (torchrun, NCCL).
#
#   benchmarks/gpu_tp.sh [--model-size 1b] [extra bench_tp.py options...]
#
# Needs torch with CUDA and at least one GPU; fails at once, in one line, without them. PYTHON picks the
# interpreter (default: python). The parity check uses small random checkpoints; bench_tp compares 1 GPU with all.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
if [ "$GPUS" -lt 1 ]; then
  echo "gpu_tp.sh: no CUDA GPU visible to torch ($PYTHON); this script needs at least one NVIDIA GPU" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$GPUS")
echo "== logits parity, $GPUS GPU(s)"
timeout 900 "${RUN[@]}" benchmarks/tp_parity.py --device cuda --dtype float32
timeout 900 "${RUN[@]}" benchmarks/tp_parity.py --device cuda --dtype bfloat16
RANKS=(1)
[ "$GPUS" -gt 1 ] && RANKS+=("$GPUS")
echo "== bench_tp, ranks ${RANKS[*]}"
"$PYTHON" benchmarks/bench_tp.py --device cuda --ranks "${RANKS[@]}" --timeout 1800 "$@"
