"""The describe kind: an image turned into a prompt, a job whose result is text, not an image.

``photo`` asks a captioning model (BLIP) for a sentence; ``anime`` asks an image-classifier tagger (a
WD-style tagger) for its tags. The captioner comes from the model library (backend.companions); a demo
model uses its built-in tiny one. The job runs in a worker like every kind and sends its text as a
``text`` event.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from backend import companions
from backend.errors import RequestError
from backend.jobkinds.image_input import OneImageRequest
from backend.request import GenerateRequest, text_value
from backend.values import absolute

MODES = ("photo", "anime")


@dataclass
class DescribeRequest(OneImageRequest):
    mode: str = "photo"

    no_model = "describe runs a captioner, not an image model"

    @classmethod
    def converters(cls) -> dict:
        return {**super().converters(), "mode": text_value}

    @property
    def uses_model(self) -> bool:
        return False  # only the captioner: no Stable Diffusion pipeline

    def resolved(self, family: str) -> "DescribeRequest":
        """Check the image, the mode and that the captioner is there (RequestError naming the field)."""
        if self.mode not in MODES:
            raise RequestError("mode", f"unknown {self.mode!r}; allowed: {', '.join(MODES)}")
        source = self.read_input()
        companions.find_model("captioner", self.mode, family, "describe", field="describe")
        out = replace(self, image=absolute(self.image), image_hash=source.hash)
        return GenerateRequest.resolved(out, family)
