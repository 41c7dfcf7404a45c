"""Inpaint: repaint the masked part of an image; every pixel outside the mask stays the input's.

Modes (Fooocus's): ``fill`` (strength 1, context 0.618; the hole is first filled from its
surroundings), ``detail`` (strength 0.5, context 0: improve a face or a hand), ``modify`` (strength 1,
context 0; the masked area starts from noise, not from the input). ``context`` is Fooocus's
"respective field": the fraction of the image's width and height the repainted crop covers at least
(0: the mask's box grown 1.15 times; 1: the whole image).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backend.errors import RequestError
from backend.families import Family
from backend.input_images import InputImage, box_mask, read_mask
from backend.jobkinds.image_input import ImageInputRequest
from backend.request import optional, text_value
from backend.values import absolute, shown, to_float, to_int

# mode -> (strength, context)
MODES = {"fill": (1.0, 0.618), "detail": (0.5, 0.0), "modify": (1.0, 0.0)}
MAX_FEATHER = 256
_BOX = re.compile(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", re.ASCII)


def parse_box(name: str, value: object) -> tuple[int, int, int, int]:
    """``"X,Y,W,H"`` or four whole numbers -> (x, y, w, h)."""
    if isinstance(value, str):
        match = _BOX.fullmatch(value)
        if match is None:
            raise RequestError(name, f"{value!r} is not X,Y,W,H (whole pixels, e.g. 32,48,64,64)")
        return tuple(to_int(name, v) for v in match.groups())  # type: ignore[return-value]
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise RequestError(name, f"{shown(value)} is not X,Y,W,H")
    return tuple(to_int(name, v) for v in value)  # type: ignore[return-value]


def check_feather(value: object) -> int:
    feather = to_int("feather", value)
    if not 0 <= feather <= MAX_FEATHER:
        raise RequestError("feather", f"{value} is out of range; allowed 0..{MAX_FEATHER} pixels")
    return feather


@dataclass
class InpaintRequest(ImageInputRequest):
    mask: str | None = None  # a mask image (white = repaint) ...
    mask_hash: str | None = None
    box: tuple[int, int, int, int] | None = None  # ... or a rectangle X, Y, W, H
    mode: str = "fill"
    context: float | None = None  # None = the mode's
    feather: int = 8  # pixels over which the repainted area fades in, inside the mask

    model_variants = ("inpaint",)
    kind_label = "inpaint"

    @classmethod
    def converters(cls) -> dict:
        return {**super().converters(), "mask": optional(text_value), "mask_hash": optional(text_value),
                "box": optional(parse_box), "mode": text_value, "context": optional(to_float), "feather": to_int}

    def input_files(self) -> dict[str, tuple[str, str | None]]:
        files = super().input_files()
        if self.mask:
            files["mask"] = (self.mask, self.mask_hash)
        return files

    def strength_default(self) -> float:
        return MODES[self.mode][0] if self.mode in MODES else 1.0

    @classmethod
    def strength_hint(cls) -> str:
        return "the mode's: " + ", ".join(f"{mode} {strength:g}" for mode, (strength, _) in MODES.items())

    def read_mask(self, size: tuple[int, int]):
        """The mask (bool array, True = repaint) for an image of ``size``, and the mask file read (None for a box)."""
        if self.mask:
            return read_mask(self.mask, size, self.mask_hash)
        return box_mask(self.box, size), None

    def from_input(self, source: InputImage, fam: Family | None) -> dict:
        if self.mode not in MODES:
            raise RequestError("mode", f"unknown {self.mode!r}; allowed: {', '.join(MODES)}")
        if (not self.mask) == (self.box is None):
            raise RequestError("mask", "give a mask image or a box X,Y,W,H (one of them)")
        context = MODES[self.mode][1] if self.context is None else to_float("context", self.context)
        if not 0.0 <= context <= 1.0:
            raise RequestError("context", f"{self.context} is out of range; allowed 0..1 (1 = the whole image)")
        _, mask_file = self.read_mask(source.size)
        return {"context": context, "feather": check_feather(self.feather), "mask": absolute(self.mask) if self.mask else None,
                "mask_hash": mask_file.hash if mask_file else None, **self.derived_size(source.size)}

    def a1111_fields(self) -> list[tuple[str, object]]:
        where = ("Mask hash", self.mask_hash) if self.mask else ("Inpaint box", ",".join(map(str, self.box or ())))
        return [*super().a1111_fields(), ("Inpaint mode", self.mode), ("Inpaint context", self.context),
                ("Mask blur", self.feather), where]
