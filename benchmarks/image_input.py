"""Image input: the cost of vary at strength s against text to image with the same ``--steps``, and the
peak memory of a 2x upscale.

    PYTHONPATH=. python benchmarks/image_input.py           # CPU: the demo model, 128², fp32
    PYTHONPATH=. python benchmarks/image_input.py --gpu     # CUDA: real-size SDXL 1024², fp16, and a 2x upscale

``--steps`` is the schedule's length for every kind: strength s runs int(steps * s) of them, so the
sampling loop should take about s times as long as text to image. Each row gives the loop alone (the
UNet steps) and the whole image (prompt encoding, the input's VAE encode, the loop, the decode); the
best of ``--runs``. On CPU the time is the process's CPU time (run it with OMP_NUM_THREADS=1 on a shared
machine), on CUDA wall-clock time. The GPU run builds SDXL's architecture with random weights
(benchmarks/realsize.py; nothing is downloaded; speed and memory do not depend on the weights) and then
upscales a 1024² image 2x with a Lanczos resize and the 0.382 repainting pass (tiled denoise and VAE):
the target is a peak of at most 16 GiB.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from PIL import Image

from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, denoise
from backend.engine.generate import generate_image
from backend.engine.img2img import ImageStart, repaint
from backend.engine.pipeline import execution_device
from backend.engine.scheduling import make_scheduler
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.upscale import UpscaleRequest
from backend.request import GenerateRequest
from benchmarks.options import parse, sync

STRENGTHS = (0.25, 0.5, 0.75, 1.0)
PROMPT, NEGATIVE = "a red fox in the snow, photo", "blurry"


def picture(size: int) -> Image.Image:
    """An input image (a diagonal gradient; its content does not change the cost)."""
    ramp = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def _timed(device, clock, run) -> float:
    sync(device)
    start = clock()
    run()
    sync(device)
    return clock() - start


def time_rows(pipe, size: int, steps: int, runs: int) -> list[tuple[str, float, float]]:
    """(label, loop seconds, whole-image seconds) for text to image and vary at each strength (best of ``runs``)."""
    device = execution_device(pipe)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    base = GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, sampler="dpmpp_2m", scheduler="karras",
                           steps=steps, cfg=7.0, width=size, height=size, seed=1)
    image = picture(size)
    with torch.inference_mode():
        cond = encode(pipe, PROMPT, NEGATIVE, True)

    def loop(strength: float | None) -> float:
        generator = torch.Generator("cpu").manual_seed(1)
        with torch.inference_mode():
            start = ImageStart(image, strength).latents(pipe, generator, cond.cond.dtype) if strength else None
            scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "dpmpp_2m", "karras")
            spec = DenoiseSpec(cond, size, size, steps, 7.0, generator, start=start)
            return _timed(device, clock, lambda: denoise(pipe, scheduler, spec))

    def whole(strength: float | None) -> None:
        if strength is None:
            generate_image(pipe, base)
        else:
            repaint(pipe, Img2ImgRequest.from_dict({**base.to_dict(), "strength": strength}), ImageStart(image, strength))

    cases = [("text to image", None)] + [(f"vary s={s:g} ({int(steps * s)} steps)", s) for s in STRENGTHS]
    best: dict[str, list[float]] = {label: [float("inf"), float("inf")] for label, _ in cases}
    for round_ in range(runs + 1):  # a first round warms up
        for label, strength in cases:
            took = loop(strength), _timed(device, clock, lambda: whole(strength))
            if round_:
                best[label] = [min(old, new) for old, new in zip(best[label], took)]
    return [(label, *best[label]) for label, _ in cases]


def print_rows(title: str, rows: list[tuple[str, float, float]]) -> None:
    print(title)
    loop0, whole0 = rows[0][1:]
    print(f"{'job':<26}{'loop s':>10}{'x txt2img':>11}{'image s':>10}{'x txt2img':>11}")
    for label, loop, whole in rows:
        print(f"{label:<26}{loop:>10.3f}{loop / loop0:>10.2f}x{whole:>10.3f}{whole / whole0:>10.2f}x")


def upscale_peak(pipe, steps: int) -> tuple[float, float]:
    """(seconds, peak GiB) of a 2x upscale of a 1024² image: Lanczos, then the 0.382 repainting pass."""
    from backend.engine.upscale import upscale_image

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.png"
        picture(1024).save(path)
        request = UpscaleRequest(image=str(path), prompt=PROMPT, scale=2, upscaler="lanczos", steps=steps,
                                 seed=1).resolved("sdxl")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        sync(execution_device(pipe))
        start = time.perf_counter()
        image, _ = upscale_image(pipe, request)
        sync(execution_device(pipe))
        assert image.size == (2048, 2048)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    args = parse(__doc__, "real-size SDXL on CUDA, fp16, 1024², and a 2x upscale",
                 {"steps": ("schedule length", 30, 20), "runs": ("timed rounds; the best is kept", 2, 3)})
    steps, runs = args.steps, args.runs
    if args.gpu:
        from benchmarks.realsize import build_pipeline

        pipe, size = build_pipeline(xl=True), 1024
        title = f"{torch.cuda.get_device_name()}, SDXL (random weights), fp16, {size}², {steps} steps, DPM++ 2M Karras"
    else:
        from backend.engine.loader import load_pipeline
        from backend.models import resolve_model

        pipe, size = load_pipeline(resolve_model("demo"), torch.device("cpu"), torch.float32), 128
        title = f"CPU ({torch.get_num_threads()} threads), demo model, fp32, {size}², {steps} steps, DPM++ 2M Karras"
    print_rows(title, time_rows(pipe, size, steps, runs))
    if args.gpu:
        seconds, peak = upscale_peak(pipe, steps)
        print(f"\n2x upscale of 1024² (Lanczos, then 0.382 of {steps} steps, tiled): {seconds:.1f} s, "
              f"peak {peak:.1f} GiB (target <= 16)")


if __name__ == "__main__":
    main()
