"""Test helpers: input images (with dreamtty metadata or without) and masks written to disk, and a tiny
inpainting model (9-channel UNet)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(width: int = 128, height: int = 128) -> Image.Image:
    """A smooth RGB picture (no two neighbouring pixels alike in every channel)."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
                           .astype(np.uint8))


def write_image(path: Path, image: Image.Image | None = None, **save) -> Path:
    (image or gradient()).save(path, **save)
    return path


def dreamtty_png(path: Path, size: tuple[int, int] = (128, 128), **request) -> Path:
    """A gradient PNG with the metadata a text-to-image job of ``request`` on the demo model saves (no job run)."""
    from backend import metadata
    from backend.request import GenerateRequest

    made = GenerateRequest.from_dict({"model": "demo", "width": size[0], "height": size[1], **request}).resolved("demo")
    meta = metadata.build(made, "demo", {"positive": made.prompt, "negative": made.negative_prompt})
    gradient(*size).save(path, pnginfo=metadata.png_info(meta))
    return path


def write_mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (128, 128)) -> Path:
    """A black mask with a white rectangle (x, y, w, h)."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x, y, w, h = box
    mask[y:y + h, x:x + w] = 255
    Image.fromarray(mask).save(path)
    return path


def box_array(box: tuple[int, int, int, int], size: tuple[int, int] = (128, 128)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    x, y, w, h = box
    mask[y:y + h, x:x + w] = True
    return mask


def inpaint_model(folder: Path, xl: bool = False) -> Path:
    """A tiny demo-family inpainting model: the demo pipeline with a seeded 9-input-channel UNet."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from backend.engine.demo_models import build_sd

    base = build_sd(xl=xl)
    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    parts = {k: v for k, v in base.components.items() if k not in ("unet", "safety_checker", "feature_extractor",
                                                                     "image_encoder")}
    if xl:
        pipe = StableDiffusionXLInpaintPipeline(**parts, unet=unet, requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionInpaintPipeline(**parts, unet=unet, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "dreamtty_demo.json").write_text(json.dumps({"family": "demo-xl" if xl else "demo"}))
    return folder
