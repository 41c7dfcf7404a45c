"""The inpaint and outpaint kinds: repaint the masked part of an image; every pixel outside it stays.

The masked region is cropped with context around it (Fooocus's "respective field": the mask's box
grown 1.15 times, then until it covers ``context`` of the image's width and height), resized so its
area is the model's default (e.g. 1024² for SDXL), repainted there, resized back and pasted with an
alpha that is 0 outside the mask and rises to 1 over ``feather`` pixels inside it: the pixels outside
the mask are the input's, exactly. Any model inpaints by re-blending the unmasked latents every step
(backend.engine.denoise); a dedicated inpainting model (9-channel UNet) gets the mask as input.

Before repainting at full strength, a hole is filled from its surroundings by box blurs from 512 down
to 3 pixels, each keeping the known pixels (as Fooocus does), so the model starts from the colours
around it. Outpainting grows the canvas by repeating the edge pixels, then fills and repaints the
new area and a seam of ``feather`` pixels inside the original.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

from backend.engine.img2img import LANCZOS, ImageStart, input_record, repaint
from backend.families import FAMILIES
from backend.jobkinds.image_input import ImageInputRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.jobkinds.outpaint import OutpaintRequest

GROW = 1.15  # the mask's box grows by this much before the context rule
MIN_CROP = 64  # pixels: a tiny mask is repainted with at least this much around it
FILL_RADII = (512, 256, 128, 64, 32, 16, 8, 4, 3)


def crop_box(mask: np.ndarray, context: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the region repainted for ``mask``: it holds every masked pixel."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    box = []
    for lo, hi, side in ((x0, x1, width), (y0, y1, height)):
        size = min(side, math.ceil(max((hi - lo) * GROW, context * side, MIN_CROP)))
        start = min(max(round((lo + hi - size) / 2), 0), side - size)
        start = max(min(start, lo), hi - size)  # rounding must not cut the mask
        box.append((start, start + size))
    (left, right), (top, bottom) = box
    return left, top, right, bottom


def model_size(width: int, height: int, family: str) -> tuple[int, int]:
    """``width`` x ``height`` scaled to the family's default area, each side a multiple of 8 within its limits."""
    fam = FAMILIES[family]
    scale = math.sqrt(fam.default_size ** 2 / (width * height))
    return tuple(min(fam.max_side, max(64, round(side * scale / 8) * 8)) for side in (width, height))  # type: ignore[return-value]


def prefill(image: Image.Image, hole: np.ndarray) -> Image.Image:
    """``image`` with ``hole`` filled from around it: box blurs from coarse to fine, known pixels kept.

    Only known pixels change nothing, so the blurs run on the hole's bounding box grown by the largest
    radius (what a hole pixel reads), not on the whole image: a small box in a large input costs its box.
    """
    pixels = np.asarray(image)
    rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
    if not len(rows):
        return image
    reach = max(FILL_RADII)
    top, bottom = max(rows[0] - reach, 0), min(rows[-1] + 1 + reach, hole.shape[0])
    left, right = max(cols[0] - reach, 0), min(cols[-1] + 1 + reach, hole.shape[1])
    window, inside = pixels[top:bottom, left:right].astype(np.float32), hole[top:bottom, left:right]
    window[inside] = pixels[~hole].mean(axis=0, dtype=np.float32)
    for radius in FILL_RADII:
        blurred = ndimage.uniform_filter(window, size=(2 * radius + 1, 2 * radius + 1, 1), mode="nearest")
        window[inside] = blurred[inside]
    filled = pixels.copy()
    filled[top:bottom, left:right] = np.round(window).clip(0, 255).astype(np.uint8)
    return Image.fromarray(filled)


def feathered(mask: np.ndarray, feather: int) -> np.ndarray:
    """Paste alpha: 0 outside ``mask``, rising linearly to 1 over ``feather`` pixels inside it."""
    if feather <= 0:
        return mask.astype(np.float32)
    inside = ndimage.distance_transform_edt(mask)  # distance to the nearest kept pixel
    return np.clip(inside / feather, 0.0, 1.0).astype(np.float32)


def paste(original: Image.Image, patch: Image.Image, box: tuple[int, int, int, int], alpha: np.ndarray) -> Image.Image:
    """``patch`` blended into ``original`` at ``box`` by ``alpha``; where alpha is 0 the original's bytes stay."""
    left, top, right, bottom = box
    out = np.asarray(original).copy()
    region = out[top:bottom, left:right]
    a = alpha[top:bottom, left:right, None]
    mixed = np.round(a * np.asarray(patch, dtype=np.float32) + (1 - a) * region).astype(np.uint8)
    out[top:bottom, left:right] = np.where(a > 0, mixed, region)
    return Image.fromarray(out)


def repaint_masked(pipe, request: ImageInputRequest, image: Image.Image, mask: np.ndarray, *, context: float,
                   feather: int, hole: np.ndarray | None, from_noise: bool, on_step=None, should_cancel=None):
    """Repaint ``mask`` of ``image`` (the crop, the model size, the paste); ``hole`` is pre-filled first."""
    if request.strength == 0:
        return image, {}
    box = crop_box(mask, context)
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    size = model_size(crop_w, crop_h, pipe.dreamtty.family)
    start_image = prefill(image, hole) if hole is not None else image
    crop = start_image.crop(box).resize(size, LANCZOS)
    crop_mask = Image.fromarray(mask[box[1]:box[3], box[0]:box[2]].astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    start = ImageStart(crop, request.strength, mask=np.asarray(crop_mask) > 127, from_noise=from_noise)
    patch, record = repaint(pipe, request, start, on_step, should_cancel)
    result = paste(image, patch.resize((crop_w, crop_h), LANCZOS), box, feathered(mask, feather))
    return result, {**record, "crop": {"box": list(box), "size": list(size)}}


def inpaint_image(pipe, request: InpaintRequest, on_step=None, should_cancel=None, device=None):
    source = request.read_input()
    mask, mask_file = request.read_mask(source.size)
    notes = [*source.warnings, *(mask_file.warnings if mask_file else [])]
    fill_first = request.mode == "fill" and request.strength > 0.99
    image, record = repaint_masked(
        pipe, request, source.image, mask, context=request.context, feather=request.feather,
        hole=mask if fill_first else None, from_noise=request.mode == "modify",
        on_step=on_step, should_cancel=should_cancel,
    )
    return image, {**record, **input_record(request, warnings=notes)}


def grow_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int) -> tuple[Image.Image, np.ndarray]:
    """The image on a larger canvas (new pixels repeat the edge) and the mask of the new area."""
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    new = np.ones(pixels.shape[:2], dtype=bool)
    new[top:top + image.height, left:left + image.width] = False
    return Image.fromarray(pixels), new


def outpaint_image(pipe, request: OutpaintRequest, on_step=None, should_cancel=None, device=None):
    source = request.read_input()
    canvas, new = grow_canvas(source.image, request.left, request.right, request.top, request.bottom)
    seam = ndimage.binary_dilation(new, iterations=request.feather) if request.feather else new
    image, record = repaint_masked(
        pipe, request, canvas, seam, context=1.0, feather=request.feather, hole=new if request.strength > 0.99 else None,
        from_noise=False, on_step=on_step, should_cancel=should_cancel,
    )
    return image, {**record, **input_record(request, warnings=list(source.warnings))}
