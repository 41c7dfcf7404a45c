#!/usr/bin/env bash
# All GPU benchmarks in one go, for a lent GPU machine (see each script's docstring).
# Usage: bash benchmarks/run_gpu.sh [LOGFILE]
set -u
log=${1:-/tmp/gpu_bench.log}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
bench() {
  echo "== $*" | tee -a "$log"
  timeout 240 python3 "$@" 2>&1 | grep -v -i -e warn -e torchvision | tee -a "$log"
}
bench benchmarks/gpu_generate.py
bench benchmarks/guidance_cost.py --gpu
bench benchmarks/gpu_train.py
