"""Our denoising loop around a diffusers UNet and scheduler.

With every extra off it performs the same operations, in the same order, as
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.__call__`` (so the
pixels match for a seed), but it checks for cancel between steps, never
decodes unfinished latents, and hands each step to a callback for previews.
Its conditioning may change from step to step (prompt editing: a
StepConditioning). Text to image denoises several images at once from a
BatchConditioning and one generator per image: each image's initial noise, and
the noise an ancestral or SDE sampler adds, comes from its own generator as in a
run of its own (diffusers' ``randn_tensor`` takes a list of generators).

Started from an image (:class:`StartLatents`) it does what the stock
``StableDiffusion(XL)Img2ImgPipeline`` does: the schedule has ``steps`` steps,
the input's latents are noised to the level of step ``steps - int(steps *
strength)`` and only the rest run. Guidance, prompt editing and the refiner
count steps in the whole schedule. With a mask, the part outside it is
re-blended every step with the input's latents noised to that step's level (as
``StableDiffusionInpaintPipeline`` does for 4-channel UNets); a dedicated
inpainting UNet gets the mask and masked image as extra input channels instead.
Large images are denoised in overlapping tiles (backend.engine.tiles). Image prompts
(``spec.references``) steer every UNet call (backend.engine.image_prompt).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from backend.engine.conditioning import BatchConditioning, Conditioning, StepConditioning
from backend.engine.guider import Guider, UNetInputs
from backend.engine.pipeline import execution_device, is_xl, sdxl_time_ids
from backend.engine.tiles import TiledGuider
from backend.guidance_settings import GuidanceSettings
from backend.image_prompts import tiled_control_error

if TYPE_CHECKING:
    from backend.engine.image_prompt import References


class Cancelled(Exception):
    """Raised between steps when the job was cancelled."""


@dataclass
class StartLatents:
    """Image to image: the input's latents and how much of the schedule runs on them."""

    latents: torch.Tensor  # clean, scaled as the UNet sees them
    strength: float  # the last int(steps * strength) steps of the schedule run
    mask: torch.Tensor | None = None  # latent size, 1 = repaint; elsewhere the input is re-blended every step
    from_noise: bool = False  # start from pure noise (strength 1), the input only re-blended
    unet_extra: torch.Tensor | None = None  # an inpainting UNet's extra input channels (mask, masked image latents)


@dataclass
class DenoiseSpec:
    cond: Conditioning | StepConditioning | BatchConditioning
    width: int
    height: int
    steps: int
    cfg: float
    generator: torch.Generator | list[torch.Generator]  # a list: one per image of a batch (text to image only)
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    on_step: Callable[[int, int, torch.Tensor], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    start: StartLatents | None = None  # None: text to image, from pure noise
    tile: int | None = None  # denoise in overlapping tiles of this many pixels a side (large images)
    references: References | None = None  # image prompts (backend.engine.image_prompt)


def _unet_inputs(pipe, spec: DenoiseSpec, dtype: torch.dtype, batch: int, iterations: int) -> UNetInputs:
    device = execution_device(pipe)
    time_ids = neg_time_ids = None
    if is_xl(pipe):
        proj = (
            pipe.text_encoder_2.config.projection_dim
            if pipe.text_encoder_2 is not None
            else int(spec.cond.at(0, 1).pooled.shape[-1])
        )
        time_ids, neg_time_ids = sdxl_time_ids(pipe, spec.width, spec.height, dtype, proj)
        time_ids, neg_time_ids = time_ids.to(device).repeat(batch, 1), neg_time_ids.to(device).repeat(batch, 1)
    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        w = torch.tensor(spec.cfg - 1).repeat(batch)
        timestep_cond = pipe.get_guidance_scale_embedding(w, embedding_dim=pipe.unet.config.time_cond_proj_dim)
        timestep_cond = timestep_cond.to(device=device, dtype=dtype)
    extra = spec.start.unet_extra if spec.start is not None else None
    steering = None if spec.references is None else spec.references.steering(pipe, spec.width, spec.height, iterations)
    return UNetInputs(pipe, spec.cond, time_ids, neg_time_ids, timestep_cond, extra, steering)


def _begin(scheduler, index: int) -> None:
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)


def denoise(pipe, scheduler, spec: DenoiseSpec, make_guider=Guider) -> torch.Tensor:
    """Run the sampling loop and return the final latents."""
    device = execution_device(pipe)
    pipe.scheduler = scheduler
    timesteps, _ = retrieve_timesteps(scheduler, spec.steps, device)
    dtype = spec.cond.at(0, 1).cond.dtype
    start, skip, noise = spec.start, 0, None
    if start is None:  # a batch: each image's noise drawn from its own generator, as alone
        images = len(spec.generator) if isinstance(spec.generator, list) else 1
        latents = pipe.prepare_latents(
            images, pipe.unet.config.in_channels, spec.height, spec.width, dtype, device, spec.generator
        )
    else:  # StableDiffusion(XL)Img2ImgPipeline.get_timesteps and prepare_latents
        skip = (spec.steps - min(int(spec.steps * start.strength), spec.steps)) * scheduler.order
        timesteps = timesteps[skip:]
        _begin(scheduler, skip)
        noise = randn_tensor(start.latents.shape, generator=spec.generator, device=device, dtype=dtype)
        if start.from_noise:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(start.latents, noise, timesteps[:1])
    extra = pipe.prepare_extra_step_kwargs(spec.generator, 0.0)
    whole = len(timesteps) + skip  # iterations of the whole schedule: guidance counts steps in it
    guider = _guider(pipe, spec, dtype, latents, whole,
                     lambda inputs: make_guider(inputs, spec.cfg, spec.guidance, whole))
    if start is None:
        _begin(scheduler, 0)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if spec.should_cancel is not None and spec.should_cancel():
            raise Cancelled()
        noise_pred = guider.predict(scheduler, latents, t, skip + i)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if start is not None and start.mask is not None:
            latents = _reblend(scheduler, start, noise, latents, timesteps, i)
        if spec.on_step is not None:
            spec.on_step(i + 1, total, latents)
    return latents


def _guider(pipe, spec: DenoiseSpec, dtype: torch.dtype, latents: torch.Tensor, iterations: int, make):
    """The guider for the whole latents, or a tiled one when ``spec.tile`` is smaller than the image."""
    factor = pipe.vae_scale_factor
    size = tuple(latents.shape[-2:])
    tile = (min(spec.tile // factor, size[0]), min(spec.tile // factor, size[1])) if spec.tile else size
    if pipe.dreamtty.on_denoise is not None:  # a fast pipeline's compile cache (backend.engine.fast)
        pipe.dreamtty.on_denoise(latents.shape[0], tile[1] * factor, tile[0] * factor)
    if tile == size:
        return make(_unet_inputs(pipe, spec, dtype, latents.shape[0], iterations))
    if spec.start is not None and spec.start.unet_extra is not None:
        raise ValueError("an inpainting UNet's extra channels cannot be tiled")
    if spec.references is not None and spec.references.controls:  # refused at submission since it is known then
        raise tiled_control_error(spec.width, spec.height, spec.tile)
    tile_spec = DenoiseSpec(spec.cond, tile[1] * factor, tile[0] * factor, spec.steps, spec.cfg, spec.generator,
                            guidance=spec.guidance, references=spec.references)
    inputs = _unet_inputs(pipe, tile_spec, dtype, latents.shape[0], iterations)
    return TiledGuider(lambda: make(inputs), size, tile)


def _reblend(scheduler, start: StartLatents, noise, latents, timesteps, i: int) -> torch.Tensor:
    """Outside the mask, the input's latents noised to the next step's level (clean after the last step)."""
    known = start.latents
    if i < len(timesteps) - 1:
        known = scheduler.add_noise(known, noise, timesteps[i + 1:i + 2])
    return (1 - start.mask) * known + start.mask * latents


def encode(pipe, image, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """VAE-encode a PIL image as the stock image-to-image pipelines do: a sample of the latent
    distribution drawn from ``generator``, scaled (SDXL: shifted by latents_mean/std when the VAE has
    them); an fp16 VAE that asks for it (``force_upcast``) encodes in fp32."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    pixels = pipe.image_processor.preprocess(image).to(execution_device(pipe), vae.dtype)
    with torch.no_grad():
        latents = retrieve_latents(vae.encode(pixels), generator=generator)
    if upcast:
        vae.to(torch.float16)
    latents = latents.to(dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, dtype)
        return (latents - mean) * vae.config.scaling_factor / std
    return latents * vae.config.scaling_factor


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
        image = vae.decode(latents, return_dict=False, **({} if is_xl(pipe) else {"generator": generator}))[0]
    if upcast:
        vae.to(torch.float16)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def latent_preview(latents: torch.Tensor, matrix, bias) -> np.ndarray:
    """Latents (1, 4, h, w) -> uint8 RGB (h, w, 3) by a per-family linear map; no VAE."""
    m = torch.tensor(matrix, dtype=torch.float32, device=latents.device)
    b = torch.tensor(bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), m) + b
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
