"""Cost of each guidance control: seconds per denoising step, and the ratio to plain CFG.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/guidance_cost.py   # CPU: demo and demo-xl, 128², fp32
    PYTHONPATH=. python benchmarks/guidance_cost.py --gpu                # CUDA: real-size SD1.5 UNet, 512², fp16

The GPU run builds the SD1.5 architecture with random weights (benchmarks/realsize.py;
nothing is downloaded; speed does not depend on the weights). Only the denoising loop
is timed (no prompt encoding, no VAE decode). On CPU the time is the process's CPU time
(robust on a shared machine; with OMP_NUM_THREADS=1 it is also the work done), on CUDA
wall-clock time.

Each round runs the baseline (plain CFG) between every two controls: A B A C A D ... A.
A control's ratio in a round is its time over the mean of the two baseline runs next to
it, so a clock that drifts (GPU boost and heat, a busy neighbour) shifts both alike. The
table gives the median ratio over the rounds and its spread (lowest-highest); the
baseline's row gives the same for each baseline run against its two neighbours, which
is the noise floor. A first round warms up and is not counted.
Published figures: docs/guidance.md ("Cost").
"""

from __future__ import annotations

import statistics
import time

import torch

from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, denoise
from backend.engine.pipeline import execution_device
from backend.engine.scheduling import make_scheduler
from backend.guidance_settings import GuidanceSettings
from benchmarks.options import parse, sync

PROMPT, NEGATIVE, CFG = "a red fox in the snow, photo", "blurry", 7.0
BASELINE = "plain CFG 7 (noise)"
# (label, settings, cfg, SDXL only); the baseline, plain CFG 7, runs between every two of them
CONTROLS = [
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
]


def interleaved_ratios(pipe, size: int, steps: int, rounds: int) -> dict[str, tuple[float, list[float]]]:
    """Label -> (median seconds per step, ratio to the neighbouring baselines in each round), for the
    baseline (each inner baseline run against its two neighbours) and each control that applies."""
    device = execution_device(pipe)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    xl = hasattr(pipe, "text_encoder_2")
    cases = [(label, settings, cfg) for label, settings, cfg, xl_only in CONTROLS if xl or not xl_only]
    with torch.inference_mode():
        conds = {cfg > 1.0: encode(pipe, PROMPT, NEGATIVE, cfg > 1.0) for cfg in (CFG, 1.0)}

        def per_step(settings: GuidanceSettings, cfg: float) -> float:
            scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "dpmpp_2m", "karras")
            spec = DenoiseSpec(conds[cfg > 1.0], size, size, steps, cfg, torch.Generator("cpu").manual_seed(0),
                               guidance=settings)
            sync(device)
            start = clock()
            denoise(pipe, scheduler, spec)
            sync(device)
            return (clock() - start) / steps

        times: dict[str, list[float]] = {label: [] for label in (BASELINE, *(c[0] for c in cases))}
        ratios: dict[str, list[float]] = {label: [] for label in times}
        for round_ in range(rounds + 1):
            base = [per_step(GuidanceSettings(), CFG)]
            took = []
            for _, settings, cfg in cases:  # A B A C A ...
                took.append(per_step(settings, cfg))
                base.append(per_step(GuidanceSettings(), CFG))
            if not round_:
                continue  # warm-up
            times[BASELINE] += base
            ratios[BASELINE] += [base[k] / ((base[k - 1] + base[k + 1]) / 2) for k in range(1, len(base) - 1)]
            for k, (label, _, _) in enumerate(cases):
                times[label].append(took[k])
                ratios[label].append(took[k] / ((base[k] + base[k + 1]) / 2))
    return {label: (statistics.median(times[label]), ratios[label]) for label in times}


def print_table(pipes: dict[str, object], size: int, steps: int, rounds: int) -> None:
    columns = {name: interleaved_ratios(pipe, size, steps, rounds) for name, pipe in pipes.items()}
    head = f"{'control':<24}" + "".join(f"{name + ' s/step':>18}{'ratio (spread)':>22}" for name in pipes)
    print(head, "-" * len(head), sep="\n")
    for label in (BASELINE, *(c[0] for c in CONTROLS)):
        cells = []
        for found in columns.values():
            if label not in found:
                cells.append(f"{'n/a':>18}{'':>22}")
                continue
            sec, ratios = found[label]
            spread = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            cells.append(f"{sec:>18.4f}{spread:>22}")
        print(f"{label:<24}" + "".join(cells))


def main() -> None:
    args = parse(__doc__, "real-size SD1.5 UNet on CUDA, fp16, 512²",
                 {"steps": ("steps per run", 15, 8), "rounds": ("timed rounds", 5, 10)})
    steps, rounds = args.steps, args.rounds
    if args.gpu:
        from benchmarks.realsize import build_pipeline

        pipes, size = {"SD1.5 512²": build_pipeline(xl=False)}, 512
        title = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16"
    else:
        from backend.engine.loader import load_pipeline
        from backend.models import resolve_model

        load = lambda name: load_pipeline(resolve_model(name), torch.device("cpu"), torch.float32)  # noqa: E731
        pipes, size = {"demo": load("demo"), "demo-xl": load("demo-xl")}, 128
        title = f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, fp32, 128²"
    print(f"{title}, {steps} steps, DPM++ 2M Karras, {rounds} interleaved rounds", flush=True)
    print_table(pipes, size, steps, rounds)


if __name__ == "__main__":
    main()
