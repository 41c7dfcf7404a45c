"""Image metadata: our JSON text chunk plus A1111-style ``parameters`` text."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from backend import jobkinds
from backend.errors import DreamttyError, RequestError
from backend.request import GenerateRequest
from backend.samplers import SAMPLERS

CHUNK = "dreamtty"
VERSION = 1
_SCHEDULE_LABELS = {"normal": "Automatic", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform"}


def build(request: GenerateRequest, family: str, prompt_record: dict, kind: str = "generate") -> dict:
    """The metadata dict saved with an image (request is the per-image request of a job of ``kind``)."""
    return {"version": VERSION, "kind": kind, "family": family, "request": request.to_dict(), "prompt": prompt_record}


def a1111_parameters(meta: dict) -> str:
    """A1111 ``parameters`` text, readable by A1111, Civitai and most image viewers."""
    req = meta["request"]
    prompt = meta.get("prompt", {})
    fields = [
        ("Steps", req["steps"]),
        ("Sampler", SAMPLERS[req["sampler"]].label),
        ("Schedule type", _SCHEDULE_LABELS[req["scheduler"]]),
        ("CFG scale", req["cfg"]),
        ("Seed", req["seed"]),
        ("Size", f"{req['width']}x{req['height']}"),
        ("Model", req["model"]),
    ]
    fields += [(k.replace("_", " ").title(), v) for k, v in sorted(_guidance_non_neutral(req).items())]
    if req.get("styles"):
        fields.append(("Styles", "; ".join(req["styles"])))
    fields.append(("Version", "dreamtty"))
    body = ", ".join(f"{k}: {v}" for k, v in fields)
    return f"{prompt.get('positive', req['prompt'])}\nNegative prompt: {prompt.get('negative', req['negative_prompt'])}\n{body}"


def _guidance_non_neutral(req: dict) -> dict:
    from backend.guidance_settings import GuidanceSettings

    return GuidanceSettings.from_dict(req.get("guidance") or {}).non_neutral()


def png_info(meta: dict) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_text(CHUNK, json.dumps(meta, sort_keys=True))
    return info


def read(path: str | Path) -> dict:
    """Read our metadata from a PNG; a one-line DreamttyError when it has none."""
    try:
        with Image.open(path) as img:
            text = img.text.get(CHUNK) if hasattr(img, "text") else None
    except (OSError, ValueError) as exc:
        raise DreamttyError(f"image: cannot read {path}: {exc}") from None
    if not text:
        raise DreamttyError(f"image: {path} has no dreamtty metadata")
    try:
        return json.loads(text)
    except ValueError:
        raise DreamttyError(f"image: {path} has corrupt dreamtty metadata") from None


def request_from_image(path: str | Path) -> GenerateRequest:
    """The request that reproduces the image at ``path``; a one-line error when the metadata holds none."""
    meta = read(path)
    request = meta.get("request") if isinstance(meta, dict) else None
    if not isinstance(request, dict):
        raise DreamttyError(f"image: {path} has dreamtty metadata without a request")
    try:
        return jobkinds.get(meta.get("kind", "generate")).request(request)
    except RequestError as exc:
        raise RequestError(exc.field, f"in the metadata of {path}: {exc.message}") from None
