"""Upscale: an upscaler model (or a Lanczos resize) enlarges the input, then a low-strength image
to image pass restores detail (Fooocus's 0.382); ``fast`` stops after the enlarging."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

from backend import config, library
from backend.errors import RequestError
from backend.families import FAMILIES, Family
from backend.image_prompts import steers_tiles, tiled_control_error
from backend.input_images import InputImage
from backend.jobkinds.image_input import MAX_OUTPUT_SIDE, ImageInputRequest
from backend.jobkinds.img2img import MIN_SIDE
from backend.request import optional, text_value
from backend.values import to_bool, to_float

SCALES = (1.5, 2.0, 4.0)
LANCZOS = "lanczos"  # the upscaler name that means a plain Lanczos resize
INSTALL = "pip install 'dreamtty[upscale]'"


def spandrel_installed() -> bool:
    """Whether spandrel (the upscaler loader, an optional extra) can be found, without importing it (torch)."""
    return importlib.util.find_spec("spandrel") is not None


def default_upscaler() -> str:
    """The first upscaler model in the library by name, else Lanczos."""
    names = sorted(library.names("upscaler"), key=str.lower)
    return names[0] if names and spandrel_installed() else LANCZOS


@dataclass
class UpscaleRequest(ImageInputRequest):
    scale: float = 2.0
    fast: bool = False  # the upscaler alone, no denoising pass
    upscaler: str | None = None  # a model in the upscalers folder, "lanczos"; None = the first model found

    default_strength = 0.382
    kind_label = "upscale"
    no_model = "a fast upscale (or one at strength 0) runs no model"

    @classmethod
    def converters(cls) -> dict:
        return {**super().converters(), "scale": to_float, "fast": to_bool, "upscaler": optional(text_value)}

    @classmethod
    def check_given(cls, given: dict) -> None:
        super().check_given(given)
        if to_bool("fast", given.get("fast", False)) and given.get("strength") is not None:
            raise RequestError("strength", "is unused with fast (the upscaler alone repaints nothing); "
                                           "leave it out or turn fast off")

    @classmethod
    def from_dict(cls, data: object) -> "UpscaleRequest":
        """As the base's; a fast upscale holds no strength (images of older versions recorded the default, which
        ``check_given`` refuses when the request is queued again)."""
        request = super().from_dict(data)
        return replace(request, strength=None) if to_bool("fast", request.fast) else request

    @property
    def uses_model(self) -> bool:
        return not self.fast and self.strength != 0

    def from_input(self, source: InputImage, fam: Family | None) -> dict:
        scale = to_float("scale", self.scale)
        if scale not in SCALES:
            raise RequestError("scale", f"{self.scale} is not allowed; allowed: {', '.join(f'{s:g}' for s in SCALES)}")
        width, height = source.size
        size = (round(width * scale), round(height * scale))
        if max(size) > MAX_OUTPUT_SIDE:
            raise RequestError("scale", f"{scale:g}x of {width}x{height} is {size[0]}x{size[1]}; "
                                        f"allowed up to {MAX_OUTPUT_SIDE} pixels a side")
        return {"scale": scale, "upscaler": check_upscaler(self.upscaler), **self.derived_size(size)}

    def resolved(self, family: str) -> "UpscaleRequest":
        # A hub model not downloaded yet is checked as SDXL; its tiles are known when it runs (the engine refuses then)
        out = super().resolved(family)
        if out.fast:
            out = replace(out, strength=None)  # not used: not recorded
        fam = FAMILIES.get(family)
        side = fam.tile_side(out.width, out.height) if fam else None
        if out.uses_model and side and steers_tiles(out.image_prompts):
            raise tiled_control_error(out.width, out.height, side)
        return out

    def check_size(self, fam, width: int, height: int) -> None:
        if self.uses_model and min(width, height) < MIN_SIDE:  # the repaint would see a few latents a side
            raise RequestError("image", f"{self.image} upscaled is {width}x{height}; repainting needs at least "
                                        f"{MIN_SIDE} pixels a side: turn fast on (--fast), give strength 0 or a "
                                        "larger scale")
        super().check_size(fam, width, height)

    def a1111_fields(self) -> list[tuple[str, object]]:
        fields = [("Upscale by", self.scale), ("Upscaler", self.upscaler)]
        if self.uses_model:
            return [*super().a1111_fields(), *fields]
        return [("Input image hash", self.image_hash), *fields, ("Upscale", "fast")]


def check_upscaler(name: str | None) -> str:
    """The upscaler a request names (None: the default); RequestError("upscaler") when it cannot be used."""
    if name is None:
        return default_upscaler()
    if name.strip().lower() == LANCZOS:
        return LANCZOS
    from backend.extras_check import find_extra

    find_extra("upscaler", name, config.load())  # unknown, damaged, or a pickle without --allow-pickle
    if not spandrel_installed():
        raise RequestError("upscaler", f"{name} needs spandrel to load it: {INSTALL}")
    return name
