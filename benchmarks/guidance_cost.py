"""Cost of each guidance control: seconds per denoising step, and the ratio to plain CFG.

    PYTHONPATH=. python benchmarks/guidance_cost.py            # CPU: demo and demo-xl, 128², fp32
    PYTHONPATH=. python benchmarks/guidance_cost.py --gpu      # CUDA: real-size SD1.5 UNet, 512², fp16

The GPU run builds the SD1.5 architecture with random weights (benchmarks/realsize.py;
nothing is downloaded; speed does not depend on the weights). Only the denoising loop
is timed (no prompt encoding, no VAE decode); each figure is the best of ``--runs``.
On CPU the time is the process's CPU time (robust on a shared machine; run it with
OMP_NUM_THREADS=1 so that is also the work done), on CUDA wall-clock time.
Measured (H100, torch 2.11, diffusers 0.42.1, 2026-11): there a batch of 1, 2 or 3
branches takes the same time (the eager UNet at 512² is bound by overhead, not math), so PerpNeg and
PAG about 1.0×, SAG about 2× (its extra UNet call cannot be batched: it needs the
first call's output), the rest about 1.0×. On the CPU demo models work grows with
the batch: PerpNeg and PAG about 1.2-1.4×, SAG about 1.6-1.7×.
"""

from __future__ import annotations

import time

import torch

from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, denoise
from backend.engine.scheduling import make_scheduler
from backend.guidance_settings import GuidanceSettings
from benchmarks.options import parse, sync

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
    ("plain CFG 7 (again)", GuidanceSettings(), CFG, False),  # shows what is noise
]


def seconds_per_step(pipe, size: int, steps: int, runs: int) -> list[float | None]:
    """Per control (None where it does not apply): the best time of the denoising loop over
    ``runs`` rounds, per step. Rounds run every control once, in turn, so noise from a
    shared machine spreads evenly; a first round warms up and is not counted."""
    device = pipe._execution_device
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    xl = hasattr(pipe, "text_encoder_2")
    cases = [(settings, cfg) if xl or not xl_only else None for _, settings, cfg, xl_only in CONTROLS]
    best: list[float | None] = [None] * len(cases)
    with torch.inference_mode():
        conds = [case and encode(pipe, PROMPT, NEGATIVE, case[1] > 1.0) for case in cases]
        for round_ in range(runs + 1):
            for i, case in enumerate(cases):
                if case is None:
                    continue
                scheduler = make_scheduler(pipe.dreamtty_scheduler_config, "dpmpp_2m", "karras")
                generator = torch.Generator("cpu").manual_seed(0)
                spec = DenoiseSpec(conds[i], size, size, steps, case[1], generator, guidance=case[0])
                sync(device)
                start = clock()
                denoise(pipe, scheduler, spec)
                sync(device)
                took = (clock() - start) / steps
                if round_:
                    best[i] = took if best[i] is None else min(best[i], took)
    return best


def print_table(pipes: dict[str, object], size: int, steps: int, runs: int) -> None:
    columns = {name: seconds_per_step(pipe, size, steps, runs) for name, pipe in pipes.items()}
    head = f"{'control':<24}" + "".join(f"{name + ' s/step':>20}{'ratio':>8}" for name in pipes)
    print(head, "-" * len(head), sep="\n")
    for row, (label, *_) in enumerate(CONTROLS):
        cells = []
        for times in columns.values():
            sec = times[row]
            cells.append(f"{'n/a':>20}{'':>8}" if sec is None else f"{sec:>20.4f}{sec / times[0]:>7.2f}x")
        print(f"{label:<24}" + "".join(cells))


def main() -> None:
    args = parse(__doc__, "real-size SD1.5 UNet on CUDA, fp16, 512²", gpu=(15, 3), cpu=(4, 8))
    steps, runs = args.steps, args.runs
    if args.gpu:
        from benchmarks.realsize import build_pipeline

        pipes, size = {"SD1.5 512²": build_pipeline(xl=False)}, 512
        title = f"{torch.cuda.get_device_name()}, fp16, {steps} steps, DPM++ 2M Karras"
    else:
        from backend.engine.loader import load_pipeline
        from backend.models import resolve_model

        load = lambda name: load_pipeline(resolve_model(name), torch.device("cpu"), torch.float32)  # noqa: E731
        pipes, size = {"demo": load("demo"), "demo-xl": load("demo-xl")}, 128
        title = f"CPU ({torch.get_num_threads()} threads), fp32, 128², {steps} steps, DPM++ 2M Karras"
    print(title, flush=True)
    print_table(pipes, size, steps, runs)


if __name__ == "__main__":
    main()
