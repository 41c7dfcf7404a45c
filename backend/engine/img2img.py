"""Image to image: where sampling starts from an input image, and the "vary" kind's image function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from backend.engine.denoise import StartLatents, encode
from backend.engine.generate import generate_image
from backend.jobkinds.image_input import ImageInputRequest
from backend.jobkinds.img2img import Img2ImgRequest

LANCZOS = Image.Resampling.LANCZOS


@dataclass
class ImageStart:
    """An input image to start sampling from, at the request's size."""

    image: Image.Image  # RGB
    strength: float
    mask: np.ndarray | None = None  # bool (height, width), True = repaint; the rest is re-blended every step
    from_noise: bool = False  # the repainted area starts from noise (strength 1 only)
    tile: bool = False  # denoise in tiles when the image is large for the model (upscaling)

    def latents(self, pipe, generator: torch.Generator, dtype: torch.dtype) -> StartLatents:
        """Encode the image (drawing the VAE's sample from ``generator`` first, as diffusers does)."""
        latents = encode(pipe, self.image, generator, dtype)
        if self.mask is None:
            return StartLatents(latents, self.strength)
        mask = torch.from_numpy(self.mask.astype(np.float32))[None, None].to(latents.device, dtype)
        if pipe.unet.config.in_channels == 9:  # a dedicated inpainting model, as StableDiffusionInpaintPipeline feeds it
            keep = np.asarray(self.image) * (~self.mask)[..., None] + 128 * self.mask[..., None]
            masked = encode(pipe, Image.fromarray(keep.astype(np.uint8)), generator, dtype)
            small = F.interpolate(mask, size=latents.shape[-2:])
            return StartLatents(latents, self.strength, from_noise=self.strength >= 1.0,
                                unet_extra=torch.cat([small, masked], dim=1))
        # A latent is repainted when any pixel it covers is.
        small = F.max_pool2d(mask, kernel_size=pipe.vae_scale_factor)
        return StartLatents(latents, self.strength, small, from_noise=self.from_noise and self.strength >= 1.0)


def repaint(pipe, request: ImageInputRequest, start: ImageStart, on_step: Callable | None = None,
            should_cancel: Callable[[], bool] | None = None) -> tuple[Image.Image, dict]:
    """Sample from ``start`` (any size: padded by its edge pixels to multiples of 8, cropped back after)."""
    width, height = start.image.size
    padded = (-(-width // 8) * 8, -(-height // 8) * 8)
    if padded != (width, height):
        pad = ((0, padded[1] - height), (0, padded[0] - width))
        start = replace(start, image=Image.fromarray(np.pad(np.asarray(start.image), (*pad, (0, 0)), mode="edge")),
                        mask=None if start.mask is None else np.pad(start.mask, pad))
    image, record = generate_image(pipe, replace(request, width=padded[0], height=padded[1]), on_step, should_cancel,
                                   start=start)
    return image.crop((0, 0, width, height)), record


def input_record(request: ImageInputRequest, **more) -> dict:
    """What the metadata records of a job's inputs."""
    return {"input": {role: {"path": path, "hash": digest} for role, (path, digest) in request.input_files().items()},
            **more}


def vary_image(pipe, request: Img2ImgRequest, on_step=None, should_cancel=None, device=None):
    """The input at the request's size, repainted at its strength (0: the input itself, exactly)."""
    source = request.read_input()
    notes = list(source.warnings)
    image = source.image
    if image.size != (request.width, request.height):
        notes.append(f"input {request.image} is {image.width}x{image.height}: resized to {request.width}x{request.height}")
        image = image.resize((request.width, request.height), LANCZOS)
    if request.strength == 0:
        return image, input_record(request, warnings=notes)
    out, record = repaint(pipe, request, ImageStart(image, request.strength), on_step, should_cancel)
    return out, {**record, **input_record(request, warnings=notes)}
