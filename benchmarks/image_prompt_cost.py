"""Image prompts: seconds per sampling step with one IP-Adapter, one ControlNet and both, against plain generation.

    PYTHONPATH=. python benchmarks/image_prompt_cost.py           # CPU: the demo model, 128², fp32
    PYTHONPATH=. python benchmarks/image_prompt_cost.py --gpu     # CUDA: real-size SDXL 1024², fp16

Each row times our denoise loop (CFG 7, DPM++ 2M Karras, every reference applying at every step: stop 1)
and divides by the steps; the best of ``--runs``. What runs once per job (the image encoder, the
preprocessors, loading) is not counted. On CPU the time is the process's CPU time (run it with
OMP_NUM_THREADS=1 on a shared machine), on CUDA wall-clock time. The adapters have random weights of the
right layout: on the CPU the demo model's own companions (its canny ControlNet, an adapter for its tiny
encoder); with ``--gpu`` an SDXL IP-Adapter "plus" for a ViT-H encoder (16 tokens, 1280 wide) and a
ControlNet made from the SDXL UNet (``ControlNetModel.from_unet``, as SDXL ControlNets are), on SDXL's
architecture (benchmarks/realsize.py; nothing is downloaded; speed does not depend on the weights).
"""

from __future__ import annotations

import time

import torch

from backend.engine.conditioning import encode
from backend.engine.demo_companions import ip_adapter_weights
from backend.engine.denoise import DenoiseSpec, denoise
from backend.engine.image_prompt import Control, References
from backend.engine.ip_adapter import nested
from backend.engine.pipeline import execution_device
from backend.engine.scheduling import make_scheduler
from backend.image_prompts import ImagePrompt
from benchmarks.image_input import picture
from benchmarks.options import parse, sync

PROMPT, NEGATIVE = "a red fox in the snow, photo", "blurry"


def _control(pipe, size: int, demo: bool) -> Control:
    """The demo's canny ControlNet, or one made from the model's UNet, on a picture of the image's size."""
    from diffusers import ControlNetModel

    if demo:
        from backend.engine.controlnet import load_controlnets
        from backend.engine.demo_companions import ensure_companion

        [net] = load_controlnets(pipe, [str(ensure_companion("demo-canny"))])
    else:
        net = ControlNetModel.from_unet(pipe.unet).to(execution_device(pipe), pipe.unet.dtype)
    return Control(ImagePrompt("x", "canny", 1.0, 1.0), net, picture(size))


def _adapter(pipe, encoder_width: int, tokens: int, resampler: dict) -> References:
    """An IP-Adapter "plus" loaded on ``pipe``, and its reference (embeddings drawn at random: the image encoder
    runs once per job)."""
    dtype = pipe.unet.dtype
    torch.manual_seed(0)
    weights = ip_adapter_weights(dict(pipe.unet.config), encoder_width, **resampler)
    pipe.load_ip_adapter([nested({k: v.to(dtype) for k, v in weights.items()})], subfolder=[""], weight_name=[""],
                         image_encoder_folder=None)
    embeds = torch.randn(1, 1, tokens, encoder_width, device=execution_device(pipe), dtype=dtype)  # batch, images, ...
    return References([ImagePrompt("x", "image", 1.0, 1.0)], [embeds], [torch.zeros_like(embeds)])


def time_rows(pipe, size: int, steps: int, runs: int, cases: dict) -> list[tuple[str, float]]:
    """(case, seconds per step), best of ``runs`` after a warm-up round."""
    device = execution_device(pipe)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    with torch.inference_mode():
        cond = encode(pipe, PROMPT, NEGATIVE, True)
    best = {label: float("inf") for label in cases}
    for round_ in range(runs + 1):
        for label, refs in cases.items():
            generator = torch.Generator("cpu").manual_seed(1)
            scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "dpmpp_2m", "karras")
            spec = DenoiseSpec(cond, size, size, steps, 7.0, generator, references=refs)
            with torch.inference_mode():
                sync(device)
                start = clock()
                denoise(pipe, scheduler, spec)
                sync(device)
            if round_:
                best[label] = min(best[label], (clock() - start) / steps)
    return list(best.items())


def print_rows(title: str, rows: list[tuple[str, float]]) -> None:
    print(title)
    plain = rows[0][1]
    print(f"{'case':<26}{'s/step':>10}{'x plain':>10}")
    for label, seconds in rows:
        print(f"{label:<26}{seconds:>10.4f}{seconds / plain:>9.2f}x")


def main() -> None:
    args = parse(__doc__, "real-size SDXL on CUDA, fp16, 1024²",
                 {"steps": ("sampling steps", 20, 20), "runs": ("timed rounds; the best is kept", 2, 3)})
    if args.gpu:
        from benchmarks.realsize import build_pipeline

        pipe, size = build_pipeline(xl=True), 1024
        encoder = (1280, 257, {"hidden_dims": 1280, "heads": 20, "queries": 16})  # ViT-H/14 hidden states, 224²
        title = f"{torch.cuda.get_device_name()}, SDXL (random weights), fp16, {size}², {args.steps} steps, CFG 7"
    else:
        from backend.engine.loader import load_pipeline
        from backend.models import resolve_model

        pipe, size = load_pipeline(resolve_model("demo"), torch.device("cpu"), torch.float32), 128
        encoder = (32, 17, {})  # the demo image encoder's hidden states
        title = f"CPU ({torch.get_num_threads()} threads), demo model, fp32, {size}², {args.steps} steps, CFG 7"
    control = _control(pipe, size, demo=not args.gpu)
    rows = time_rows(pipe, size, args.steps, args.runs,
                     {"plain": None, "1 ControlNet": References([], [], [], [control])})
    adapter = _adapter(pipe, *encoder)  # loaded after: the UNet then needs image embeddings on every call
    both = References(adapter.adapters, adapter.positive, adapter.negative, [control])
    rows += time_rows(pipe, size, args.steps, args.runs, {"1 IP-Adapter": adapter, "IP-Adapter + ControlNet": both})
    print_rows(title, rows)


if __name__ == "__main__":
    main()
