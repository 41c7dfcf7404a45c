"""One image from one per-image request: prompts -> conditioning -> loop -> decode."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from backend.engine.conditioning import encode_schedule
from backend.engine.denoise import DenoiseSpec, decode, denoise
from backend.engine.refiner import refiner_handover
from backend.engine.scheduling import make_scheduler
from backend.engine.text_embed import make_embedder
from backend.engine.tiles import tile_size
from backend.prompting import build_prompt
from backend.request import GenerateRequest


def generate_image(
    pipe,
    request: GenerateRequest,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    device: torch.device | None = None,
    start=None,
):
    """Generate image ``request.index`` (count 1, seed resolved). Returns (PIL image, prompt record).

    ``device`` is the worker's (every kind's function is called with it; a pipeline has its own).
    ``start`` (a backend.engine.img2img.ImageStart) starts from an input image instead of noise.
    """
    plan = build_prompt(request, make_embedder(pipe))
    schedule = plan.schedule(request.steps)
    tile = tile_size(pipe.dreamtty.family, request.width, request.height) if start is not None and start.tile else None
    with torch.inference_mode(), _vae_tiling(pipe, tile is not None):
        cond = encode_schedule(pipe, schedule, request.cfg > 1.0, request.guidance.clip_skip)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        scheduler = make_scheduler(pipe.dreamtty.scheduler_config, request.sampler, request.scheduler, request.seed)
        spec = DenoiseSpec(
            cond, request.width, request.height, request.steps, request.cfg, generator,
            guidance=request.guidance, on_step=on_step, should_cancel=should_cancel,
            start=start.latents(pipe, generator, cond.at(0, 1).cond.dtype) if start is not None else None, tile=tile,
            references=pipe.dreamtty.image_prompts,
        )
        latents = denoise(pipe, scheduler, spec, **refiner_handover(pipe, request, schedule))
        image = decode(pipe, latents, generator)
    record = {
        "positive": plan.positive, "negative": plan.negative, **plan.record, "schedule": schedule.record(),
        **pipe.dreamtty.extras,
    }
    return image, record


@contextmanager
def _vae_tiling(pipe, on: bool):
    """diffusers' tiled VAE encode and decode while ``on`` (large images)."""
    if not on:
        yield
        return
    pipe.vae.enable_tiling()
    try:
        yield
    finally:
        pipe.vae.disable_tiling()
