#!/usr/bin/env bash
# All GPU benchmarks in one go, for a lent GPU machine (see each script's docstring).
# Usage: bash benchmarks/run_gpu.sh [LOGFILE]
set -u
log=${1:-/tmp/gpu_bench.log}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
bench() {  # SECONDS SCRIPT [ARGS...]
  local limit=$1
  shift
  echo "== $*" | tee -a "$log"
  timeout "$limit" python3 "$@" 2>&1 | grep -v -i -e warn -e torchvision | tee -a "$log"
}
bench 240 benchmarks/gpu_generate.py
bench 900 benchmarks/gpu_fast.py
bench 240 benchmarks/guidance_cost.py --gpu
bench 300 benchmarks/gpu_train.py --steps 6 --warmup 2 \
  --variants plain,full,full+8bit,full+8bit/separate,full+8bit+ckpt,lora
bench 120 benchmarks/adam8bit_layout.py --device cuda
bench 300 benchmarks/image_input.py --gpu
bench 300 benchmarks/image_prompt_cost.py --gpu
