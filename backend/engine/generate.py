"""Images from per-image requests: prompts -> conditioning -> loop -> decode, one image or a batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import groupby

import torch

from backend.engine.conditioning import batch_shape, encode_schedule, stack
from backend.engine.denoise import DenoiseSpec, decode, denoise
from backend.engine.extras import embedding_records
from backend.engine.refiner import refiner_handover
from backend.engine.scheduling import make_scheduler
from backend.engine.text_embed import make_embedder
from backend.families import FAMILIES
from backend.prompting import build_prompt
from backend.request import GenerateRequest

StepCallback = Callable[[int, int, torch.Tensor], None]


def generate_image(
    pipe,
    request: GenerateRequest,
    on_step: StepCallback | None = None,
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
    tiled = start is not None and start.tile
    tile = FAMILIES[pipe.dreamtty.family].tile_side(request.width, request.height) if tiled else None
    with torch.inference_mode(), _vae_tiling(pipe, tile is not None):
        cond = encode_schedule(pipe, schedule, request.cfg > 1.0, request.guidance.clip_skip)
        latents, generators = _sample(pipe, [request], [cond], [schedule], on_step, should_cancel, start, tile)
        image = decode(pipe, latents, generators[0])
    return image, _record(pipe, plan, schedule)


def generate_batch(
    pipe,
    requests: Sequence[GenerateRequest],
    on_step: Sequence[StepCallback | None] = (),
    should_cancel: Callable[[], bool] | None = None,
    device: torch.device | None = None,
) -> Iterator[tuple[object, dict, tuple[int, int] | None]]:
    """Text to image for several per-image requests of one job (alike but for seed, index and prompts),
    denoised together: yields (PIL image, prompt record, (batch size, position) or None when alone) for
    each, in order, as each is decoded.

    Every image keeps what a run of its own has: its prompts and prompt editing, its seed's noise, its
    own decode. ``on_step[k]`` gets image k's steps (its latents row). Consecutive images whose text
    embeddings differ in shape (prompts of different lengths) are denoised in separate batches.
    """
    embedder = make_embedder(pipe)
    plans = [build_prompt(r, embedder) for r in requests]
    schedules = [plan.schedule(r.steps) for plan, r in zip(plans, requests)]
    with torch.inference_mode():
        conds = [encode_schedule(pipe, s, r.cfg > 1.0, r.guidance.clip_skip) for s, r in zip(schedules, requests)]
    callbacks = list(on_step) or [None] * len(requests)
    for _, run in groupby(range(len(requests)), key=lambda k: batch_shape(conds[k])):
        run = list(run)
        with torch.inference_mode():
            latents, generators = _sample(pipe, [requests[k] for k in run], [conds[k] for k in run],
                                          [schedules[k] for k in run], _fan_out([callbacks[k] for k in run]),
                                          should_cancel)
        for j, k in enumerate(run):
            with torch.inference_mode():
                image = decode(pipe, latents[j:j + 1], generators[j])
            yield image, _record(pipe, plans[k], schedules[k]), (len(run), j) if len(run) > 1 else None


def _sample(pipe, requests: Sequence[GenerateRequest], conds: list, schedules: list, on_step: StepCallback | None,
            should_cancel: Callable[[], bool] | None, start=None, tile: int | None = None):
    """Denoise the images of ``requests`` (with their conditionings and prompt schedules) together; returns
    their latents and their generators (each seeded with its image's seed)."""
    first, alone = requests[0], len(requests) == 1
    generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
    seeds = [r.seed for r in requests]
    scheduler = make_scheduler(pipe.dreamtty.scheduler_config, first.sampler, first.scheduler,
                               seeds[0] if alone else seeds)
    cond = stack(conds)
    spec = DenoiseSpec(
        cond, first.width, first.height, first.steps, first.cfg, generators[0] if alone else generators,
        guidance=first.guidance, on_step=on_step, should_cancel=should_cancel,
        start=start.latents(pipe, generators[0], cond.at(0, 1).cond.dtype) if start is not None else None, tile=tile,
        references=pipe.dreamtty.image_prompts,
    )
    return denoise(pipe, scheduler, spec, **refiner_handover(pipe, first, schedules)), generators


def _fan_out(callbacks: list[StepCallback | None]) -> StepCallback:
    """One step callback for a batch: image j's callback gets row j of the latents."""
    def on_step(step: int, total: int, latents: torch.Tensor) -> None:
        for j, callback in enumerate(callbacks):
            if callback is not None:
                callback(step, total, latents[j:j + 1])
    return on_step


def _record(pipe, plan, schedule) -> dict:
    """What the image's metadata records about its prompts and the pipeline's extras (the embeddings its
    own prompts name)."""
    embeddings = embedding_records(pipe, f"{plan.positive}\n{plan.negative}")
    return {
        "positive": plan.positive, "negative": plan.negative, **plan.record, "schedule": schedule.record(),
        **pipe.dreamtty.extras, **({"embeddings": embeddings} if embeddings else {}),
    }


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
