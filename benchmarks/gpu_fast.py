"""``speed: fast`` and ``fastest`` against stock diffusers on real-size SD1.5 (512²) and SDXL (1024²) with
random weights, fp16, DPM++ 2M with CFG, in one run:

    PYTHONPATH=. python benchmarks/gpu_fast.py [--steps 30] [--runs 3] [--models sd15,sdxl] [--variants ...]

Rows (``--variants``): stock eager; stock with its best knob (channels_last + torch.compile mode
reduce-overhead); ours default; ours fast; ours fastest (fast with torchao's float8 linear layers; not
run by default). Columns: it/s (batch 1, median of ``--runs``, the variants interleaved) and images/s at
batch ``--batch`` (8: stock with ``num_images_per_prompt``, ours a job's images denoised together, each
with its own seed, decoded one by one; both decode to PIL images), and for ours fast the time from a
fresh process's start to its first finished step, with an empty compile cache (first launch) and with
the cache the first launch left (warm launch), each in a child process. Then how far a batched image is
from the same image made alone (ours default; max difference in 0..255), and how far the images of ours
fast and fastest are from ours default's (max and mean difference in 0..255), on the real-size random
weights and on the demo model.
Targets (issue 17): SD1.5 >= 200 it/s, SDXL >= 40 it/s, ours fast >= 1.3x stock's best knob, warm
launch to first step < 10 s, SD1.5 batch 8 >= 10 images/s (stock eager 5.0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backend.engine import fast
from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, denoise
from backend.engine.generate import generate_batch, generate_image
from backend.engine.scheduling import make_scheduler
from backend.request import GenerateRequest
from benchmarks.options import child_env
from benchmarks.realsize import build_pipeline

PROMPT, NEGATIVE = "a red fox in the snow, photo", "blurry"
SIZES = {"sd15": (False, 512), "sdxl": (True, 1024)}
VARIANTS = ("stock eager", "stock best knob", "ours default", "ours fast", "ours fastest")
FAST = {"ours fast", "ours fastest"}


def _timed(run) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _stock(pipe, size: int, steps: int, images: int = 1):
    """Stock diffusers: one image to its latents, or ``images`` (``num_images_per_prompt``) decoded."""
    def run() -> None:
        pipe.scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "dpmpp_2m", "karras")
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
             num_images_per_prompt=images, generator=torch.Generator("cpu").manual_seed(0),
             output_type="latent" if images == 1 else "pil")
    return run


def _job_images(size: int, steps: int, images: int) -> list[GenerateRequest]:
    """The per-image requests of a job of ``images`` (seeds 0..images-1)."""
    job = GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg=7.0, width=size, height=size,
                          seed=0, count=images, sampler="dpmpp_2m", scheduler="karras")
    return [job.per_image(k) for k in range(images)]


def _ours_batch(pipe, size: int, steps: int, images: int):
    """Ours: a job's ``images`` denoised together (backend.engine.generate), decoded one by one."""
    def run() -> None:
        list(generate_batch(pipe, _job_images(size, steps, images)))
    return run


def batch_difference(pipe, size: int, steps: int, images: int) -> int:
    """The largest pixel difference (0..255) between an image of a batch and the same image made alone."""
    requests = _job_images(size, steps, images)
    batched = [np.asarray(image, dtype=int) for image, _, _ in generate_batch(pipe, requests)]
    return max(int(np.abs(np.asarray(generate_image(pipe, r)[0], dtype=int) - batched[k]).max())
               for k, r in enumerate(requests[:2]))


def _ours(pipe, size: int, steps: int, on_step=None):
    def run() -> None:
        with torch.inference_mode():
            cond = encode(pipe, PROMPT, NEGATIVE, True)
            spec = DenoiseSpec(cond, size, size, steps, 7.0, torch.Generator("cpu").manual_seed(0), on_step=on_step)
            denoise(pipe, make_scheduler(pipe.dreamtty.scheduler_config, "dpmpp_2m", "karras"), spec)
    return run


def _best_knob(pipe) -> None:
    """What a user would do by hand with stock diffusers."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)


def _medians(variants: dict, runs: int) -> dict[str, float]:
    """Each variant's median time over ``runs`` (after a warm-up run: compiles, cuDNN autotune, the allocator),
    the variants interleaved."""
    for name, run in variants.items():
        print(f"{name}: first run (compile, autotune) {_timed(run):.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            times[name].append(_timed(run))
    return {name: statistics.median(t) for name, t in times.items()}


def pixel_changes(pipes: dict, size: int, steps: int) -> dict[str, tuple[int, float]]:
    """Max and mean pixel difference (0..255) of the image each of ours fast and fastest makes from ours
    default's (seed 0)."""
    [request] = _job_images(size, steps, 1)
    with torch.inference_mode():
        images = {name: np.asarray(generate_image(pipe, request)[0], dtype=int) for name, pipe in pipes.items()
                  if name.startswith("ours")}
    base = images.pop("ours default")
    differences = {name: np.abs(image - base) for name, image in images.items()}
    return {name: (int(d.max()), float(d.mean())) for name, d in differences.items()}


def _set_up(name: str, pipe) -> bool:
    """Make ``pipe`` the variant ``name``; False, with a line, where that fails (fastest without a float8 GPU
    or torchao): the rest of the table goes on."""
    try:
        if name == "stock best knob":
            _best_knob(pipe)
        elif name in FAST:
            fast.make_fast(pipe, name.removeprefix("ours "))
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: failed to set up: {type(exc).__name__}: {exc}", flush=True)
        return False
    return True


def _variant_pipes(xl: bool, names: list[str]) -> dict:
    """A pipeline per variant that could be set up (ours default runs on stock eager's, the same weights
    and modules)."""
    pipes: dict = {}
    for name in names:
        if name == "ours default" and "stock eager" in pipes:
            pipes[name] = pipes["stock eager"]
            continue
        torch.manual_seed(0)  # the same random weights for each, so that their images compare
        pipe = build_pipeline(xl)
        if _set_up(name, pipe):
            pipes[name] = pipe
    return pipes


def its(model: str, names: list[str], steps: int, runs: int, images: int):
    """it/s at batch 1 and images/s at batch ``images`` per variant, the batched-vs-alone pixel difference
    (None without ours default or a batch), and the pixel changes of ours fast and fastest."""
    xl, size = SIZES[model]
    pipes = _variant_pipes(xl, names)
    batch1 = {name: (_stock if name.startswith("stock") else _ours)(pipe, size, steps) for name, pipe in pipes.items()}
    rates = {name: steps / t for name, t in _medians(batch1, runs).items()}
    per_second, difference = {}, None
    if images:
        batched = {name: (_stock if name.startswith("stock") else _ours_batch)(pipe, size, steps, images)
                   for name, pipe in pipes.items()}
        per_second = {name: images / t for name, t in _medians(batched, runs).items()}
        if "ours default" in pipes:
            with torch.inference_mode():
                difference = batch_difference(pipes["ours default"], size, steps, images)
    changes = pixel_changes(pipes, size, steps) if "ours default" in pipes and pipes.keys() & FAST else {}
    return rates, per_second, difference, changes


def demo_changes(names: list[str], steps: int) -> dict[str, tuple[int, float]]:
    """:func:`pixel_changes` on the demo model (fp16, 256²)."""
    from backend.engine.demo_models import ensure_demo
    from backend.engine.loader import load_pipeline
    from backend.models import resolve_model

    ensure_demo("demo")
    pipes = {}
    for name in ("ours default", *(n for n in names if n in FAST)):
        pipe = load_pipeline(resolve_model("demo"), torch.device("cuda"), torch.float16)
        if _set_up(name, pipe):
            pipes[name] = pipe
    return pixel_changes(pipes, 256, steps)


def launch(model: str, cache_dir: str) -> None:
    """Child process: a fresh fast pipeline to its first finished step, with the compile cache in ``cache_dir``."""
    began = time.perf_counter()
    xl, size = SIZES[model]
    pipe = build_pipeline(xl)
    fast.make_fast(pipe)
    cache = fast.CompileCache(root=Path(cache_dir))
    first: list[float] = []
    on_step = lambda step, total, latents: first or first.append(time.perf_counter() - began)  # noqa: E731
    with fast.compiled_run(pipe, f"realsize-{model}", cache, lambda note: None):
        _ours(pipe, size, 2, on_step)()
    print(json.dumps({"first_step_s": first[0]}))


def _launch_time(model: str, cache_dir: str) -> str:
    """A child's time to its first step, or why it has none (the rest of the table goes on)."""
    out = subprocess.run([sys.executable, __file__, "--launch", model, "--cache", cache_dir], capture_output=True,
                         text=True, env=child_env(os.getcwd()))
    if out.returncode:
        return "failed: " + " | ".join(out.stderr.strip().splitlines()[-3:])
    return f"{json.loads(out.stdout.strip().splitlines()[-1])['first_step_s']:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batch", type=int, default=8, help="images per batch for the images/s column (0: none)")
    parser.add_argument("--no-launch", action="store_true", help="skip the two launch-time measurements")
    parser.add_argument("--variants", default=",".join(VARIANTS[:4]), help=f"rows, of: {', '.join(VARIANTS)}")
    parser.add_argument("--launch", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",")]
    if unknown := set(names) - set(VARIANTS):
        raise SystemExit(f"gpu_fast: unknown variants {sorted(unknown)}; allowed: {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_fast: needs a CUDA GPU")
    if args.launch:
        launch(args.launch, args.cache)
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for model in args.models.split(","):  # each figure printed as soon as it is known
        print(f"\n{model} {SIZES[model][1]}², {args.steps} steps")
        with tempfile.TemporaryDirectory() as cache_dir:
            for launch_kind in () if args.no_launch else ("first launch", "warm launch"):
                print(f"ours fast, time to first step, {launch_kind}: {_launch_time(model, cache_dir)}", flush=True)
        rates, per_second, difference, changes = its(model, names, args.steps, args.runs, args.batch)
        base = "stock best knob" if "stock best knob" in rates else next(iter(rates))
        print(f"{'variant':<18}{'it/s (batch 1)':>15}{f'vs {base}':>20}" + (
            f"{f'images/s (batch {args.batch})':>22}" if per_second else ""))
        for name, rate in rates.items():
            print(f"{name:<18}{rate:>15.1f}{rate / rates[base]:>19.2f}x"
                  + (f"{per_second[name]:>22.2f}" if per_second else ""))
        if difference is not None:
            print(f"ours default, an image of a batch of {args.batch} vs the same image alone: max difference "
                  f"{difference}/255", flush=True)
        _print_changes(f"{model}, random weights", changes)
    if FAST & set(names):
        _print_changes("demo model, 256²", demo_changes(names, args.steps))


def _print_changes(what: str, changes: dict[str, tuple[int, float]]) -> None:
    for name, (largest, mean) in changes.items():
        print(f"{what}: {name} vs ours default, pixels: max difference {largest}/255, mean {mean:.2f}", flush=True)


if __name__ == "__main__":
    main()
