"""Image to image ("vary"): the input repainted at the given strength, at its own size or ``--size``."""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import RequestError
from backend.families import Family
from backend.input_images import InputImage
from backend.jobkinds.image_input import STRENGTHS, ImageInputRequest
from backend.request import GenerateRequest

MIN_SIDE = 64


def working_size(source: InputImage, fam: Family | None) -> tuple[int, int]:
    """The size ``source`` is repainted at: scaled down (aspect kept) to the family's largest side, then
    each side rounded down to a multiple of 8, as diffusers' image processor does."""
    width, height = source.size
    if min(width, height) < MIN_SIDE:
        raise RequestError("image", f"{source.path} is {width}x{height}; at least {MIN_SIDE} pixels a side are needed")
    scale = min(1.0, fam.max_side / max(width, height)) if fam is not None else 1.0
    size = tuple(int(side * scale) // 8 * 8 for side in (width, height))
    if min(size) < MIN_SIDE:  # the floor would stretch it: say so rather than change its shape
        raise RequestError("image", f"{source.path} is {width}x{height}: scaled to the model's largest side it "
                                    f"would be {size[0]}x{size[1]}, under {MIN_SIDE} pixels a side; crop it, or "
                                    "give a size (it is then stretched to it)")
    return size  # type: ignore[return-value]


@dataclass
class Img2ImgRequest(ImageInputRequest):
    """Vary (subtle 0.5, strong 0.85, or any strength). An explicit ``width``/``height`` resizes the input."""

    kind_label = "vary"
    no_model = "vary at strength 0 gives the input back and runs no model"

    @classmethod
    def strength_hint(cls) -> str:
        return ", ".join(f"{name} {value:g}" for name, value in STRENGTHS.items()) + " or 0..1"

    def from_input(self, source: InputImage, fam: Family | None) -> dict:
        if (self.width is None) != (self.height is None):
            raise RequestError("size", "give both width and height, or neither (the input's own size)")
        if self.width is not None:
            return {}
        width, height = working_size(source, fam)
        return {"width": width, "height": height}

    check_size = GenerateRequest.check_size  # repainted as a whole: a size the model can make

    @property
    def uses_model(self) -> bool:
        return self.strength != 0  # 0 gives the input back, resized: no model is loaded, no reference steers it
