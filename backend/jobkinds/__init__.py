"""Job kinds: text to image, the image-input kinds (vary, upscale, inpaint, outpaint) and describe, as
entries of one registry.

A kind is its request type (a :class:`~backend.request.GenerateRequest` or a subclass sharing its
common fields, with its own validation and metadata fields) plus the worker-side function that makes
one result of it: an image (saved with its metadata), or, for a kind whose ``output`` is ``"text"``
(describe), a text the worker sends as a ``text`` event. A kind that can denoise several images at once
(text to image) also names a batch function; the kinds that start from an image run one at a time. The queue, the service, the worker, metadata
and "reproduce" look kinds up here instead of testing for them. Adding a kind: one module in this
package, one line in ``_KINDS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from backend.errors import RequestError
from backend.jobkinds.describe import DescribeRequest
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.jobkinds.outpaint import OutpaintRequest
from backend.jobkinds.upscale import UpscaleRequest
from backend.request import GenerateRequest


@dataclass(frozen=True)
class JobKind:
    name: str  # stored with the job and in image metadata
    label: str  # for people: "text to image"
    request_type: type[GenerateRequest]
    make_image: str  # "module:function" in backend.engine, imported by the worker only (torch)
    output: str = "image"  # what the function makes: "image" (PIL image) or "text"
    make_batch: str | None = None  # "module:function" making several images at once; None: one at a time

    def request(self, data: object) -> GenerateRequest:
        """The request ``data`` (a dict from ``to_dict``) describes; RequestError naming a bad field."""
        return self.request_type.from_dict(data)

    def image_function(self):
        return _function(self.make_image)

    def batch_function(self):
        """The function denoising several of the job's images together, or None (one at a time)."""
        return None if self.make_batch is None else _function(self.make_batch)


def _function(where: str):
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


_KINDS = (
    JobKind("generate", "text to image", GenerateRequest, "backend.engine.generate:generate_image",
            make_batch="backend.engine.generate:generate_batch"),
    JobKind("img2img", "vary", Img2ImgRequest, "backend.engine.img2img:vary_image"),
    JobKind("upscale", "upscale", UpscaleRequest, "backend.engine.upscale:upscale_image"),
    JobKind("inpaint", "inpaint", InpaintRequest, "backend.engine.inpaint:inpaint_image"),
    JobKind("outpaint", "outpaint", OutpaintRequest, "backend.engine.inpaint:outpaint_image"),
    JobKind("describe", "describe", DescribeRequest, "backend.engine.caption:describe_image", output="text"),
)
KINDS: dict[str, JobKind] = {kind.name: kind for kind in _KINDS}


def get(name: str) -> JobKind:
    kind = KINDS.get(name) if isinstance(name, str) else None  # metadata may hold any JSON here
    if kind is None:
        raise RequestError("kind", f"unknown job kind {name!r}; allowed: {', '.join(KINDS)}")
    return kind


def makes_text(name: object) -> bool:
    """Whether jobs of the kind named ``name`` make a text (describe), not images; False for a name no kind has."""
    kind = KINDS.get(name) if isinstance(name, str) else None
    return kind is not None and kind.output == "text"


def kind_of(request: GenerateRequest) -> JobKind:
    """The kind whose request type ``request`` is (exactly: a subclass is another kind)."""
    return next(kind for kind in _KINDS if type(request) is kind.request_type)
