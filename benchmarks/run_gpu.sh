#!/usr/bin/env bash
# The GPU benchmarks, in parts that each fit one 10-minute call on a lent GPU machine
# (each benchmark's docstring says what it measures; its figures go to the docs named there).
# Usage: bash benchmarks/run_gpu.sh {1|2|3|4|5|fast|all} [LOGFILE]
#   1: image input, image prompts, generation, training, guidance (about 8 min on an H200)
#   2-4 (fast: 2 and 3): speed fast (torch.compile, each part a few compiles): SD1.5 batch 1 with the
#        launch times, SDXL batch 1, SD1.5 batch 8. SD1.5 with batch 8 and the launch times in one call ran
#        past 7 minutes on an H200.
#   5: speed fastest (float8, torchao) against default and fast on SD1.5 and SDXL: it/s and the change in
#        pixels, on the random weights and on the demo model.
set -u
part=${1:-all}
log=${2:-/tmp/gpu_bench.log}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# wheels the GPU machine lacks, downloaded beforehand (benchmarks/README.md)
if compgen -G ".whl/*.whl" >/dev/null && ! out=$(${PYTHON:-python3} -m pip install -q --no-deps .whl/*.whl 2>&1); then
  echo "could not install .whl/*.whl: $(tail -3 <<<"$out")" | tee -a "$log"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$log"
bench() {  # SECONDS SCRIPT [ARGS...]
  local limit=$1 began=$SECONDS
  shift
  echo "== $*" | tee -a "$log"
  timeout "$limit" ${PYTHON:-python3} "$@" 2>&1 | grep -v -i -e warn -e torchvision -e kernels -e "kept in float32" | tee -a "$log"
  echo "-- $((SECONDS - began)) s" | tee -a "$log"
}
if [[ $part == 1 || $part == all ]]; then
  bench 200 benchmarks/image_input.py --gpu --runs 1
  bench 120 benchmarks/image_prompt_cost.py --gpu --runs 1
  bench 120 benchmarks/gpu_generate.py --runs 2
  bench 200 benchmarks/gpu_train.py --steps 5 --warmup 2 --variants plain,full,full+8bit,lora
  bench 60 benchmarks/adam8bit_layout.py --device cuda --tensors 686 --values 589824 --steps 10
  bench 150 benchmarks/guidance_cost.py --gpu
fi
fast() {  # "PARTS" LIMIT ARGS...: one part of gpu_fast.py, run when the part asked for is one of PARTS
  local parts=" $1 all " limit=$2
  shift 2
  if [[ $parts == *" $part "* ]]; then
    bench "$limit" benchmarks/gpu_fast.py --steps 20 --runs 2 "$@"
  fi
}
fast "2 fast" 330 --models sd15 --batch 0
fast "3 fast" 240 --models sdxl --batch 0 --no-launch
fast "4" 300 --models sd15 --batch 8 --no-launch
fast "5" 420 --models sd15,sdxl --batch 0 --no-launch --variants "ours default,ours fast,ours fastest"
