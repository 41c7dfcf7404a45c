"""Jobs on an image the user already has, as the gallery's keys queue them: the image's own settings
(its metadata: prompt, model, styles, ...), a new seed, and the operation's values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from backend import request_builder
from backend.errors import DreamttyError
from backend.input_images import read_image
from backend.jobkinds.image_input import ImageInputRequest
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.jobkinds.outpaint import SIDES, OutpaintRequest
from backend.jobkinds.upscale import UpscaleRequest

OUTPAINT_SHARE = 0.3  # an outpaint key adds this share of the image's width (left, right) or height (top, bottom)


@dataclass(frozen=True)
class Operation:
    label: str  # for people: "vary (subtle)"
    kind: type[ImageInputRequest]
    values: dict = field(default_factory=dict)  # the request's fields, as the CLI's flags give them
    side: str | None = None  # outpaint: the side that grows


OPERATIONS = {
    "vary_subtle": Operation("vary (subtle)", Img2ImgRequest, {"strength": "subtle"}),
    "vary_strong": Operation("vary (strong)", Img2ImgRequest, {"strength": "strong"}),
    "upscale_1.5": Operation("upscale 1.5×", UpscaleRequest, {"scale": 1.5}),
    "upscale_2": Operation("upscale 2×", UpscaleRequest, {"scale": 2.0}),
    **{f"outpaint_{side}": Operation(f"outpaint {side}", OutpaintRequest, side=side) for side in SIDES},
    "inpaint": Operation("inpaint", InpaintRequest),  # values: the mask painted in the editor
}


def outpaint_pixels(size: tuple[int, int], side: str) -> int:
    """Pixels an outpaint key adds on ``side`` of an image of ``size``: :data:`OUTPAINT_SHARE` of that axis."""
    return math.ceil(OUTPAINT_SHARE * size[0 if side in ("left", "right") else 1])


@dataclass(frozen=True)
class ImageJob:
    """A job on an image, as built: its request and the warnings about the image's settings (metadata that is
    not used, another tool's settings not carried over)."""

    request: ImageInputRequest
    warnings: list[str]
    source: dict  # the image's own settings
    values: dict  # the fields the operation gave

    def explained(self, exc: DreamttyError) -> DreamttyError:
        """``exc``, a refusal of the job when it is queued, saying so when it refuses a setting of the image."""
        explicit = request_builder.from_text(self.values)
        return request_builder.inherited(exc, self.request.to_dict(), self.source, explicit)


def request_on_image(kind: type[ImageInputRequest], image: str, values: dict) -> ImageJob:
    """The job of ``kind`` on ``image``: defaults < the config's < the image's own settings < ``values``, with a
    new seed (as the CLI's verbs build it). Reads the image's metadata: call it in a thread."""
    source, warnings = request_builder.source_settings(image)
    request = request_builder.build({"image": image, **values}, kind=kind, source=source)
    return ImageJob(request, warnings, source, values)  # type: ignore[arg-type]


def gallery_request(name: str, image: str, values: dict | None = None) -> ImageJob:
    """The job that operation ``name`` queues on ``image`` (``values``: more fields, e.g. inpaint's mask). Reads
    the image (an outpaint's size): call it in a thread; RequestError("image") when it cannot be used."""
    op = OPERATIONS[name]
    extra = dict(values or {})
    if op.side is not None:
        extra[op.side] = outpaint_pixels(read_image(image).size, op.side)
    return request_on_image(op.kind, image, {**op.values, **extra})
