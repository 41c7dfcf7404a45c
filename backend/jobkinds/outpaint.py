"""Outpaint: the canvas grows by the given pixels on each side; the new area is filled from the edge,
then repainted, and the seam is blended over ``feather`` pixels of the original (the rest of the
original stays exact)."""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import RequestError
from backend.families import Family
from backend.input_images import InputImage
from backend.jobkinds.image_input import ImageInputRequest
from backend.jobkinds.img2img import MIN_SIDE
from backend.jobkinds.inpaint import check_feather
from backend.values import to_int

SIDES = ("left", "right", "top", "bottom")


@dataclass
class OutpaintRequest(ImageInputRequest):
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    feather: int = 16  # width of the blended seam, inside the original

    model_variants = ("inpaint",)
    default_strength = 1.0
    kind_label = "outpaint"

    @classmethod
    def converters(cls) -> dict:
        return {**super().converters(), **{side: to_int for side in SIDES}, "feather": to_int}

    def from_input(self, source: InputImage, fam: Family | None) -> dict:
        grow = {}
        for side in SIDES:
            value = to_int(side, getattr(self, side))
            if value < 0:
                raise RequestError(side, f"{value} is negative; give the pixels to add (0 or more)")
            grow[side] = -(-value // 8) * 8  # up to a multiple of 8
        if not any(grow.values()):
            raise RequestError("outpaint", "nothing to add; give the pixels to add on the left, right, top or bottom")
        width, height = source.size
        if fam is not None and max(width, height) > fam.max_side:  # no pixels to add can help
            raise RequestError("image", f"{source.path} is {width}x{height}, past {fam.label}'s maximum "
                                        f"{fam.max_side} a side already; scale it down or crop it first")
        size = (width + grow["left"] + grow["right"], height + grow["top"] + grow["bottom"])
        feather = check_feather(self.feather)
        return {**grow, "feather": feather, **self.derived_size(size)}

    def check_size(self, fam, width: int, height: int) -> None:
        if fam is not None and max(width, height) > fam.max_side:
            raise RequestError("outpaint", f"the result would be {width}x{height}, past {fam.label}'s maximum "
                                           f"{fam.max_side} a side; add fewer pixels")
        if min(width, height) < MIN_SIDE:  # as vary: the model would see a few latents a side
            raise RequestError("outpaint", f"the result would be {width}x{height}, under {MIN_SIDE} pixels a side; "
                                           "add more pixels, or start from a larger image")
        super().check_size(fam, width, height)

    def a1111_fields(self) -> list[tuple[str, object]]:
        grown = ", ".join(f"{side} {getattr(self, side)}" for side in SIDES if getattr(self, side))
        return [*super().a1111_fields(), ("Outpaint", grown), ("Mask blur", self.feather)]
