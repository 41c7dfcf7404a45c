"""One image from one per-image request: prompts -> conditioning -> loop -> decode."""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.engine.conditioning import encode_schedule
from backend.engine.denoise import DenoiseSpec, decode, denoise
from backend.engine.refiner import refiner_handover
from backend.engine.scheduling import make_scheduler
from backend.engine.text_embed import make_embedder
from backend.prompting import build_prompt
from backend.request import GenerateRequest


def generate_image(
    pipe,
    request: GenerateRequest,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
):
    """Generate image ``request.index`` (count 1, seed resolved). Returns (PIL image, prompt record)."""
    plan = build_prompt(request, make_embedder(pipe))
    schedule = plan.schedule(request.steps)
    with torch.inference_mode():
        cond = encode_schedule(pipe, schedule, request.cfg > 1.0, request.guidance.clip_skip)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        scheduler = make_scheduler(pipe.dreamtty_scheduler_config, request.sampler, request.scheduler, request.seed)
        spec = DenoiseSpec(
            cond, request.width, request.height, request.steps, request.cfg, generator,
            guidance=request.guidance, on_step=on_step, should_cancel=should_cancel,
        )
        latents = denoise(pipe, scheduler, spec, **refiner_handover(pipe, request, schedule))
        image = decode(pipe, latents, generator)
    record = {
        "positive": plan.positive, "negative": plan.negative, **plan.record, "schedule": schedule.record(),
        **getattr(pipe, "dreamtty_extras", {}),
    }
    return image, record
