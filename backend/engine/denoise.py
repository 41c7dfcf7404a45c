"""Our denoising loop around a diffusers UNet and scheduler.

With every extra off it performs the same operations, in the same order, as
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.__call__`` (so the
pixels match for a seed), but it checks for cancel between steps, never
decodes unfinished latents, and hands each step to a callback for previews.
Its conditioning may change from step to step (prompt editing: a
StepConditioning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from backend.engine.conditioning import Conditioning, StepConditioning
from backend.engine.guider import Guider, UNetInputs
from backend.guidance_settings import GuidanceSettings


class Cancelled(Exception):
    """Raised between steps when the job was cancelled."""


@dataclass
class DenoiseSpec:
    cond: Conditioning | StepConditioning
    width: int
    height: int
    steps: int
    cfg: float
    generator: torch.Generator
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    on_step: Callable[[int, int, torch.Tensor], None] | None = None
    should_cancel: Callable[[], bool] | None = None


def _is_xl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _unet_inputs(pipe, spec: DenoiseSpec, dtype: torch.dtype, batch: int) -> UNetInputs:
    device = pipe._execution_device
    time_ids = neg_time_ids = None
    if _is_xl(pipe):
        proj = (
            pipe.text_encoder_2.config.projection_dim
            if pipe.text_encoder_2 is not None
            else int(spec.cond.at(0, 1).pooled.shape[-1])
        )
        size = (spec.height, spec.width)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=proj)
        time_ids = time_ids.to(device).repeat(batch, 1)
        neg_time_ids = time_ids
    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        w = torch.tensor(spec.cfg - 1).repeat(batch)
        timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=pipe.unet.config.time_cond_proj_dim)
        timestep_cond = timestep_cond.to(device=device, dtype=dtype)
    return UNetInputs(pipe, spec.cond, time_ids, neg_time_ids, timestep_cond)


def denoise(pipe, scheduler, spec: DenoiseSpec, make_guider=Guider) -> torch.Tensor:
    """Run the sampling loop and return the final latents."""
    device = pipe._execution_device
    pipe.scheduler = scheduler
    timesteps, _ = retrieve_timesteps(scheduler, spec.steps, device)
    dtype = spec.cond.at(0, 1).cond.dtype
    latents = pipe.prepare_latents(
        1, pipe.unet.config.in_channels, spec.height, spec.width, dtype, device, spec.generator
    )
    extra = pipe.prepare_extra_step_kwargs(spec.generator, 0.0)
    inputs = _unet_inputs(pipe, spec, dtype, latents.shape[0])
    guider = make_guider(inputs, spec.cfg, spec.guidance, len(timesteps))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if spec.should_cancel is not None and spec.should_cancel():
            raise Cancelled()
        noise_pred = guider.predict(scheduler, latents, t, i)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if spec.on_step is not None:
            spec.on_step(i + 1, total, latents)
    return latents


def decode(pipe, latents: torch.Tensor, generator: torch.Generator | None = None):
    """VAE-decode latents to a PIL image, as the stock pipelines do (incl. SDXL fp16 upcast)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False, **({} if _is_xl(pipe) else {"generator": generator}))[0]
    if upcast:
        vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def latent_preview(latents: torch.Tensor, matrix, bias) -> np.ndarray:
    """Latents (1, 4, h, w) -> uint8 RGB (h, w, 3) by a per-family linear map; no VAE."""
    m = torch.tensor(matrix, dtype=torch.float32, device=latents.device)
    b = torch.tensor(bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), m) + b
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
