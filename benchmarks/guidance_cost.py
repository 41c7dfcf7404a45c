"""Cost of each guidance control: seconds per denoising step, and the ratio to plain CFG.

    PYTHONPATH=. python benchmarks/guidance_cost.py            # CPU: demo and demo-xl, 128², fp32
    PYTHONPATH=. python benchmarks/guidance_cost.py --gpu      # CUDA: real-size SD1.5 UNet, 512², fp16

The GPU run builds the SD1.5 architecture with random weights (benchmarks/realsize.py;
nothing is downloaded; speed does not depend on the weights). Only the denoising loop
is timed (no prompt encoding, no VAE decode); each figure is the best of ``--runs``.
Expected: PerpNeg and SAG about 1.5× (three branches instead of two; one extra
single-branch call), PAG about 1.5×, the others about 1.0×.
"""

from __future__ import annotations

import argparse
import time

import torch

from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, denoise
from backend.engine.scheduling import make_scheduler
from backend.guidance import GuidanceSettings

PROMPT, NEGATIVE, CFG = "a red fox in the snow, photo", "blurry", 7.0
# (label, settings, cfg, SDXL only)
CONTROLS = [
    ("plain CFG 7", GuidanceSettings(), CFG, False),
    ("cfg 1 (no uncond)", GuidanceSettings(), 1.0, False),
    ("cfg_rescale 0.7", GuidanceSettings(cfg_rescale=0.7), CFG, False),
    ("perp_neg 1", GuidanceSettings(perp_neg=1.0), CFG, False),
    ("sag 0.75", GuidanceSettings(sag=0.75), CFG, False),
    ("sharpness 2", GuidanceSettings(sharpness=2.0), CFG, False),
    ("adaptive_cfg 4", GuidanceSettings(adaptive_cfg=4.0), CFG, False),
    ("adm_scale 1.5,0.8,0.3", GuidanceSettings(adm_scale=(1.5, 0.8, 0.3)), CFG, True),
    ("freeu (defaults)", GuidanceSettings(freeu=()), CFG, False),
    ("pag 3", GuidanceSettings(pag=3.0), CFG, False),
    ("apg 15", GuidanceSettings(apg=15.0), CFG, False),
    ("plain CFG 7 (again)", GuidanceSettings(), CFG, False),  # shows the run-to-run noise
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(pipe, settings: GuidanceSettings, cfg: float, size: int, steps: int, runs: int) -> float:
    """Best-of-``runs`` time of the denoising loop, per step (after one warm-up run)."""
    device = pipe._execution_device
    with torch.inference_mode():
        cond = encode(pipe, PROMPT, NEGATIVE, cfg > 1.0, settings.clip_skip)
        times = []
        for _ in range(runs + 1):
            scheduler = make_scheduler(pipe.dreamtty_scheduler_config, "dpmpp_2m", "karras")
            spec = DenoiseSpec(cond, size, size, steps, cfg, torch.Generator("cpu").manual_seed(0), guidance=settings)
            _sync(device)
            start = time.perf_counter()
            denoise(pipe, scheduler, spec)
            _sync(device)
            times.append(time.perf_counter() - start)
    return min(times[1:]) / steps


def print_table(pipes: dict[str, object], size: int, steps: int, runs: int) -> None:
    """One row per control, printed as soon as it is measured."""
    head = f"{'control':<24}" + "".join(f"{name + ' s/step':>20}{'ratio':>8}" for name in pipes)
    print(head, "-" * len(head), sep="\n", flush=True)
    for pipe in pipes.values():  # warm up kernels and clocks before the baseline is timed
        seconds_per_step(pipe, GuidanceSettings(), CFG, size, steps, runs=1)
    base = {}
    for label, settings, cfg, xl_only in CONTROLS:
        row = f"{label:<24}"
        for name, pipe in pipes.items():
            if xl_only and not hasattr(pipe, "text_encoder_2"):
                row += f"{'n/a':>20}{'':>8}"
                continue
            sec = seconds_per_step(pipe, settings, cfg, size, steps, runs)
            base.setdefault(name, sec)
            row += f"{sec:>20.4f}{sec / base[name]:>7.2f}x"
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="real-size SD1.5 UNet on CUDA, fp16, 512²")
    parser.add_argument("--steps", type=int, help="steps per run (default 15 on GPU, 8 on CPU)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per control (best is kept)")
    args = parser.parse_args()
    if args.gpu:
        from benchmarks.realsize import build_pipeline

        pipes, size, steps = {"SD1.5 512²": build_pipeline(xl=False)}, 512, args.steps or 15
        title = f"{torch.cuda.get_device_name()}, fp16, {steps} steps, DPM++ 2M Karras"
    else:
        from backend.engine.loader import load_pipeline
        from backend.models import resolve_model

        load = lambda name: load_pipeline(resolve_model(name), torch.device("cpu"), torch.float32)  # noqa: E731
        pipes, size, steps = {"demo": load("demo"), "demo-xl": load("demo-xl")}, 128, args.steps or 8
        title = f"CPU ({torch.get_num_threads()} threads), fp32, 128², {steps} steps, DPM++ 2M Karras"
    print(title, flush=True)
    print_table(pipes, size, steps, args.runs)


if __name__ == "__main__":
    main()
