"""Our denoise loop against the stock diffusers pipeline on real-size SD1.5 (512², 30 steps)
and SDXL (1024², 30 steps) with random weights, fp16, in one run.

    PYTHONPATH=. python benchmarks/gpu_generate.py [--steps 30] [--runs 3]

Prints it/s of each (prompt encoding + denoising loop, no VAE decode, the same work on both
sides) and the ratio (target >= 0.98).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, denoise
from backend.engine.scheduling import make_scheduler
from benchmarks.realsize import build_pipeline

PROMPT, NEGATIVE = "a red fox in the snow, photo", "blurry"


def _stock(pipe, size: int, steps: int) -> float:
    pipe.scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "euler", "normal")
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
         generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _ours(pipe, size: int, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        cond = encode(pipe, PROMPT, NEGATIVE, True)
        spec = DenoiseSpec(cond, size, size, steps, 7.0, torch.Generator("cpu").manual_seed(0))
        denoise(pipe, make_scheduler(pipe.dreamtty.scheduler_config, "euler", "normal"), spec)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(xl: bool, size: int, steps: int, runs: int) -> tuple[float, float]:
    pipe = build_pipeline(xl)
    _stock(pipe, size, steps), _ours(pipe, size, steps)  # warm-up (cuDNN autotune, allocator)
    stock, ours = [], []
    for _ in range(runs):  # interleaved so drift hits both alike
        stock.append(_stock(pipe, size, steps))
        ours.append(_ours(pipe, size, steps))
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    return steps / statistics.median(stock), steps / statistics.median(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_generate: needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'model':<10}{'size':>6}{'stock it/s':>12}{'ours it/s':>11}{'ratio':>8}")
    for name, xl, size in (("SD1.5", False, 512), ("SDXL", True, 1024)):
        stock, ours = bench(xl, size, args.steps, args.runs)
        print(f"{name:<10}{size:>6}{stock:>12.2f}{ours:>11.2f}{ours / stock:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
