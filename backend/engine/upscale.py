"""The upscale kind: enlarge with an upscaler model (spandrel) or Lanczos, then repaint at low strength.

Upscaler models (ESRGAN, Real-ESRGAN, SwinIR, ...) are loaded with spandrel, an optional extra
(``pip install 'dreamtty[upscale]'``): it reads the architecture from the weights. They run in 512-pixel
tiles overlapping by 32 (halved on out-of-memory, down to 128), as Fooocus runs its ESRGAN; their
output is then resized to the asked scale. The repainting pass is denoised in tiles when the result is
large for the model (backend.engine.tiles), with diffusers' tiled VAE.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from backend import config, library
from backend.engine.extras import load_weights
from backend.engine.img2img import LANCZOS, ImageStart, input_record, repaint
from backend.engine.pipeline import execution_device
from backend.engine.tiles import run_tiled
from backend.errors import ModelError
from backend.extras_check import find_extra
from backend.jobkinds.upscale import INSTALL, LANCZOS as LANCZOS_NAME, UpscaleRequest, spandrel_installed
from backend.safetext import first_line

TILE, OVERLAP, MIN_TILE = 512, 32, 128


def _spandrel():
    """The spandrel module (imported here only: it imports torch); ModelError naming the extra when missing."""
    try:
        import spandrel
    except ImportError as exc:
        raise ModelError(f"upscaler: spandrel cannot be imported ({exc}); {INSTALL}") from None
    return spandrel


@functools.lru_cache(maxsize=1)
def _load(path: str, digest: str, device: str):
    """The upscaler model file at ``path`` (content ``digest``; its pickle policy already checked) on
    ``device``; kept for the next job."""
    spandrel = _spandrel()
    entry = library.find("upscaler", path)
    name = entry.name
    try:
        state = spandrel.canonicalize_state_dict(load_weights(entry))
        model = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise ModelError(f"upscaler: {name}: spandrel does not know its architecture (not ESRGAN, SwinIR, ...)") from None
    except Exception as exc:
        raise ModelError(f"upscaler: cannot load {name}: {first_line(exc)}") from None
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise ModelError(f"upscaler: {name} is a {model.purpose} model, not an image-to-image one")
    if model.input_channels not in (1, 3) or model.output_channels not in (1, 3):
        raise ModelError(f"upscaler: {name} works on {model.input_channels}-channel images; dreamtty feeds RGB")
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" and model.supports_half else torch.float32
    return model.to(dev).to(dtype).eval()


def model_upscale(model, image: Image.Image, tile: int = TILE) -> Image.Image:
    """``image`` through an upscaler ``model`` (a spandrel ImageModelDescriptor), tile by tile."""
    grey = model.input_channels == 1
    pixels = np.asarray(image.convert("L") if grey else image, dtype=np.float32) / 255
    x = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)[None]
    x = x.to(model.device, model.dtype)
    tiled = str(getattr(model.tiling, "name", "SUPPORTED")) != "INTERNAL"
    while True:
        try:
            with torch.inference_mode():
                out = run_tiled(model, x, tile if tiled else max(x.shape[-2:]), OVERLAP, model.scale)
            break
        except torch.OutOfMemoryError:
            if not tiled or tile // 2 < MIN_TILE:
                raise
            torch.cuda.empty_cache()
            tile //= 2
    array = (out[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    result = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return result.convert("RGB")


def enlarge(request: UpscaleRequest, image: Image.Image, device, notes: list[str]) -> tuple[Image.Image, dict]:
    """``image`` at the request's size, by its upscaler (then Lanczos to the exact size) or by Lanczos alone."""
    size = (request.width, request.height)
    if request.upscaler == LANCZOS_NAME:
        notes += [f"upscaled with a Lanczos resize: {why}"] if (why := _why_lanczos()) else []
        return image.resize(size, LANCZOS), {"name": LANCZOS_NAME}
    entry = find_extra("upscaler", request.upscaler, config.load())  # refuses a pickle without --allow-pickle
    digest = library.short_hash(entry.path)
    model = _load(entry.path, digest, str(device or "cpu"))
    big = model_upscale(model, image)
    if big.size != size:
        big = big.resize(size, LANCZOS)
    return big, {"name": entry.name, "hash": digest, "scale": model.scale, "architecture": model.architecture.name}


def _why_lanczos() -> str | None:
    """Why a Lanczos resize stood in for an upscaler model; None when there was a usable model (it was asked for)."""
    found = library.names("upscaler")
    if not found:
        folders = ", ".join(str(p) for p in config.load().folders("upscalers")) or "none configured"
        return f"no upscaler model in {folders} (ESRGAN-type .safetensors or .pth files)"
    if not spandrel_installed():
        return f"upscaler models need spandrel: {INSTALL}"
    return None


def upscale_image(pipe, request: UpscaleRequest, on_step=None, should_cancel=None, device=None):
    """Enlarge the input; unless ``fast`` (or strength 0), repaint it at the request's strength."""
    source = request.read_input()
    notes = list(source.warnings)
    device = execution_device(pipe) if pipe is not None else device
    big, upscaler = enlarge(request, source.image, device, notes)
    more = {"upscaler": upscaler, "warnings": notes}
    if not request.uses_model:
        return big, input_record(request, **more)
    image, record = repaint(pipe, request, ImageStart(big, request.strength, tile=True), on_step, should_cancel)
    return image, {**record, **input_record(request, **more)}
