"""Image prompts: reference images that steer a new image (Fooocus's "Image Prompt"), without torch.

A request holds up to :data:`MAX_IMAGE_PROMPTS` references, each ``IMAGE[:TYPE[:WEIGHT[:STOP]]]``:

- ``image`` (IP-Adapter: content and style) and ``face`` (the IP-Adapter face model) add the
  reference's CLIP image features to the UNet's cross-attention, ``weight`` times;
- ``canny``, ``depth`` and ``structure`` (Fooocus's CPDS) run a preprocessor on the reference and
  feed the map to a ControlNet, whose residuals are added ``weight`` times.

Each applies in the first ``stop`` of the steps of the whole schedule (loop iteration ``i`` of ``n``
while ``(i + 1) / n <= stop``, diffusers' ``control_guidance_end`` rule). The defaults (stop,
weight) are Fooocus's. A reference with weight 0 or stop 0 changes nothing and loads nothing.
Reference images are read and hashed like input images (backend.input_images).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

from backend.errors import RequestError
from backend.input_images import InputImage, read_image
from backend.values import absolute, kind_of, shown, to_float

FIELD = "image_prompt"  # the request's errors name the CLI flag's field
MAX_IMAGE_PROMPTS = 4
MAX_WEIGHT = 2.0
SETTING_MOST = {"weight": MAX_WEIGHT, "stop": 1.0}  # the largest weight and stop of a reference; both from 0


@dataclass(frozen=True)
class PromptType:
    name: str
    model: str  # the library kind that carries it: ip_adapter | controlnet
    stop: float  # Fooocus's defaults
    weight: float
    about: str


TYPES: dict[str, PromptType] = {t.name: t for t in (
    PromptType("image", "ip_adapter", 0.5, 0.6, "IP-Adapter: content and style"),
    PromptType("face", "ip_adapter", 0.9, 0.75, "IP-Adapter face model: the face"),
    PromptType("canny", "controlnet", 0.5, 1.0, "ControlNet on the edges (Canny)"),
    PromptType("depth", "controlnet", 0.5, 1.0, "ControlNet on a depth map"),
    PromptType("structure", "controlnet", 0.5, 1.0, "ControlNet on contrast-preserving decolorised structure (CPDS)"),
)}
_WORD = re.compile(r"[A-Za-z][A-Za-z_-]*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, hf://


@dataclass
class ImagePrompt:
    """One reference image; ``weight``/``stop`` None = the type's default (filled by :func:`resolve_image_prompts`)."""

    path: str
    type: str = "image"
    weight: float | None = None
    stop: float | None = None
    hash: str | None = None  # the file's content hash, recorded at submission
    model: str | None = None  # its IP-Adapter or ControlNet by library name (a reproduce: the image's); None: the first

    @property
    def active(self) -> bool:
        """Whether it changes anything at all (weight and stop above 0)."""
        return bool(self.weight) and bool(self.stop)

    def applies(self, iteration: int, iterations: int) -> bool:
        """Whether it applies at loop iteration ``iteration`` of ``iterations`` (diffusers' control_guidance_end
        rule)."""
        return self.active and (iteration + 1) / iterations <= self.stop

    def label(self, index: int) -> str:
        return f"{index + 1} ({self.type})"


def parse(text: str, index: int = 0) -> ImagePrompt:
    """``IMAGE[:TYPE[:WEIGHT[:STOP]]]``, reference ``index`` of the field. A path may itself hold ``:``: of the
    readings (the whole text a path, or a type in one of the last three ``:`` fields), the one whose file exists is
    taken, the longest path first; with none, the type is the first of those fields that names one. RequestError
    naming the field otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(FIELD, "is empty; give IMAGE[:TYPE[:WEIGHT[:STOP]]]")
    if _URL.match(text.strip()):
        raise RequestError(FIELD, f"{text!r} is an address; give an image file's path (nothing is downloaded)")
    parts = text.strip().split(":")
    exists = _exists(text.strip())
    typed = [at for at in range(max(1, len(parts) - 3), len(parts)) if parts[at].strip().lower() in TYPES]
    if typed and not exists:
        at = next((at for at in reversed(typed) if _exists(":".join(parts[:at]))), typed[0])
        prompt = ImagePrompt(":".join(parts[:at]), parts[at].strip().lower())
        which = f"{prompt.label(index)}: "
        numbers = {name: _setting(name, part.strip(), which)
                   for name, part in zip(("weight", "stop"), parts[at + 1:]) if part.strip()}  # empty: the default
        return replace(prompt, **numbers)
    tail = parts[-1].strip()
    extra = next((at for at in range(1, len(parts) - 3) if parts[at].strip().lower() in TYPES), None)
    if extra is not None and not exists:
        raise RequestError(FIELD, f"{text!r}: {len(parts) - extra - 1} fields after the type {parts[extra].strip()!r}; "
                                  "give at most WEIGHT and STOP (IMAGE[:TYPE[:WEIGHT[:STOP]]])")
    if len(parts) > 1 and _WORD.fullmatch(tail) and not exists:
        raise RequestError(FIELD, f"{text!r}: unknown type {tail!r}; allowed: {', '.join(TYPES)}")
    if not exists and any(not parts[at].strip() and all(map(_is_number, parts[at + 1:]))
                          for at in range(max(1, len(parts) - 3), len(parts))):  # IMAGE::WEIGHT or IMAGE: left out
        raise RequestError(FIELD, f"{text!r}: the type is empty; give one of {', '.join(TYPES)} "
                                  "(IMAGE[:TYPE[:WEIGHT[:STOP]]])")
    return ImagePrompt(text.strip())


def _exists(path: str) -> bool:
    """Whether ``path`` (``~`` expanded) exists; False for a name too long, where Path raises."""
    return os.path.exists(os.path.expanduser(path))


def _is_number(part: str) -> bool:
    """Whether ``part`` reads as a number, as a weight or a stop must (:func:`_setting`)."""
    try:
        to_float(FIELD, part.strip())
    except RequestError:
        return False
    return True


_KEYS = ("path", "type", "weight", "stop", "hash", "model")


def convert_image_prompts(name: str, value: object) -> list[ImagePrompt]:
    """The request field from a preset, the queue or metadata: a list of texts or of mappings with
    ``path``, ``type``, ``weight``, ``stop`` (and ``hash``, ``model``)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise RequestError(FIELD, f"{shown(value)} is not allowed; give a list of IMAGE[:TYPE[:WEIGHT[:STOP]]]")
    return [_one(item, i) for i, item in enumerate(value)]


def _one(item: object, index: int) -> ImagePrompt:
    """Item ``index`` of the field: a text as typed, or a mapping (errors about its numbers name ``index + 1``)."""
    if isinstance(item, ImagePrompt):
        return item
    if isinstance(item, str):
        return parse(item, index)
    if not isinstance(item, dict):
        raise RequestError(FIELD, f"{index + 1}: {shown(item)} is not IMAGE[:TYPE[:WEIGHT[:STOP]]] or a mapping")
    unknown = sorted(set(item) - set(_KEYS), key=str)
    if unknown:
        raise RequestError(FIELD, f"unknown key {unknown[0]!r}; allowed: {', '.join(_KEYS)}")
    if "path" not in item:
        raise RequestError(FIELD, f"{index + 1}: path is missing; give the image's path")
    for key in ("path", "type"):
        if not isinstance(item.get(key, ""), str):
            raise RequestError(FIELD, f"{index + 1}: {key} must be text, got {kind_of(item[key])}")
    for key, what in (("hash", "the content hash recorded at submission"), ("model", "a name of the model library")):
        if not isinstance(item.get(key, ""), (str, type(None))):
            raise RequestError(FIELD, f"{index + 1}: {key} must be text ({what}), got {kind_of(item[key])}")
    numbers = {k: None if item.get(k) is None else _setting(k, item[k], f"{index + 1}: ")
               for k in ("weight", "stop")}
    return ImagePrompt(item["path"], item.get("type", "image").strip().lower(), numbers["weight"], numbers["stop"],
                       item.get("hash"), item.get("model") or None)


def steers_tiles(prompts: list[ImagePrompt]) -> bool:
    """Whether any active reference feeds a ControlNet, whose map cannot be cut to a tile."""
    return any(p.active and TYPES[p.type].model == "controlnet" for p in prompts)


def tiled_control_error(width: int, height: int, side: int) -> RequestError:
    return RequestError(FIELD, f"canny, depth and structure references cannot steer an upscale denoised in tiles "
                               f"({width}x{height} is, in tiles of {side}); use a smaller scale or input, or image "
                               "and face references only")


def _setting(name: str, value: object, which: str = "") -> float:
    """A reference's weight or stop as a number; RequestError naming it (after ``which``, the reference) and its
    range otherwise."""
    try:
        return to_float(FIELD, value, f"0..{SETTING_MOST[name]:g}")
    except RequestError as exc:
        raise RequestError(FIELD, f"{which}{name} {exc.message}") from None


def setting_value(name: str, value: object, which: str = "") -> float:
    """:func:`_setting`, in range too (0..2 for a weight, 0..1 for a stop)."""
    number = _setting(name, value, which)
    if not 0.0 <= number <= SETTING_MOST[name]:
        raise RequestError(FIELD, f"{which}{name} {number:.12g} is out of range; allowed 0..{SETTING_MOST[name]:g}")
    return number


def resolve_image_prompts(prompts: list[ImagePrompt]) -> list[ImagePrompt]:
    """Check every reference (count, type, weight 0..2, stop 0..1, the file as an input image) and fill
    the type's defaults, the absolute path and the content hash. RequestError("image_prompt") otherwise."""
    prompts = convert_image_prompts(FIELD, prompts)
    if len(prompts) > MAX_IMAGE_PROMPTS:
        raise RequestError(FIELD, f"{len(prompts)} given; at most {MAX_IMAGE_PROMPTS} reference images")
    out = []
    for i, prompt in enumerate(prompts):
        kind = TYPES.get(prompt.type)
        if kind is None:
            raise RequestError(FIELD, f"{i + 1}: unknown type {prompt.type!r}; allowed: {', '.join(TYPES)}")
        which = f"{prompt.label(i)}: "
        weight = kind.weight if prompt.weight is None else setting_value("weight", prompt.weight, which)
        stop = kind.stop if prompt.stop is None else setting_value("stop", prompt.stop, which)
        source = read_reference(prompt, i)
        out.append(replace(prompt, path=absolute(prompt.path), weight=weight, stop=stop,
                           hash=source.hash))
    return out


def read_reference(prompt: ImagePrompt, index: int) -> InputImage:
    """Reference ``index``'s image, read as an input image (its recorded hash checked); RequestError naming which
    reference (``2 (face): ...``) otherwise."""
    try:
        return read_image(prompt.path, FIELD, prompt.hash)
    except RequestError as exc:
        raise RequestError(FIELD, f"{prompt.label(index)}: {exc.message}") from None
