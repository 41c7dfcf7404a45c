"""What every image-input kind (vary, upscale, inpaint, outpaint) shares: the input image and its
hash, the strength, keeping copies of the inputs.

``steps`` means the length of the whole noise schedule, for every kind: a job of strength ``s``
runs the last ``int(steps * s)`` of them, as diffusers' image-to-image pipelines do (Fooocus instead
stretches the schedule so that ``steps`` of it run). Strength 0 runs none and gives the input back.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from backend import user_files
from backend.errors import RequestError
from backend.families import FAMILIES, Family
from backend.input_images import MAX_BYTES, InputImage, content_hash, read_image
from backend.request import GenerateRequest, optional, text_value
from backend.values import absolute, shown, to_bool, to_float

# Named strengths (Fooocus's "Vary (Subtle)" and "Vary (Strong)").
STRENGTHS = {"subtle": 0.5, "strong": 0.85}
MAX_OUTPUT_SIDE = 8192  # upscale and inpaint results; a model denoises them in crops or tiles


def parse_strength(name: str, value: object) -> float:
    """A number, or one of the named strengths."""
    if isinstance(value, str) and value.strip().lower() in STRENGTHS:
        return STRENGTHS[value.strip().lower()]
    try:
        return to_float(name, value)
    except RequestError:
        raise RequestError(name, f"{shown(value)} is not a number 0..1 or one of: {', '.join(STRENGTHS)}") from None


@dataclass
class OneImageRequest(GenerateRequest):
    """A job that reads an input image (an abstract base: the image-input kinds, describe)."""

    image: str = ""  # the input image's path
    image_hash: str | None = None  # its content hash, recorded at submission

    @classmethod
    def converters(cls) -> dict:
        return {**super().converters(), "image": text_value, "image_hash": optional(text_value)}

    def input_files(self) -> dict[str, tuple[str, str | None]]:
        return {"image": (self.image, self.image_hash)}

    def read_input(self) -> InputImage:
        """The input image (checked against its recorded hash)."""
        return read_image(self.image, "image", self.image_hash)


@dataclass
class ImageInputRequest(OneImageRequest):
    """A job that starts from an input image (an abstract base: each kind is a subclass)."""

    strength: float | None = None  # how much is repainted, 0..1; None = the kind's default
    keep_inputs: bool = False  # copy the input files into the output folder

    default_strength: ClassVar[float] = 0.5
    kind_label: ClassVar[str] = "this kind"  # for messages: "upscale makes a 256x256 image ..."

    @classmethod
    def converters(cls) -> dict:
        return {**super().converters(), "strength": optional(parse_strength), "keep_inputs": to_bool}

    # -- validation --------------------------------------------------------------------
    def resolved(self, family: str) -> "ImageInputRequest":
        """Read the input (and the kind's other files), record their hashes, derive the size; then
        the common checks. Raises RequestError naming the field."""
        fam = FAMILIES.get(family)
        source = self.read_input()
        strength = self.strength_default() if self.strength is None else to_float("strength", self.strength)
        if not 0.0 <= strength <= 1.0:
            raise RequestError("strength", f"{self.strength} is out of range; allowed 0..1 (0 gives the input back)")
        with_input = replace(self, image=absolute(self.image), image_hash=source.hash, strength=strength,
                             **self.from_input(source, fam))
        out = GenerateRequest.resolved(with_input, family)
        if out.uses_model and 0 < strength and int(out.steps * strength) == 0:
            default = f" ({self.kind_label}'s default)" if self.strength is None else ""
            raise RequestError("strength", f"{strength:g}{default} of {out.steps} steps runs no step; "
                                           "raise the steps or the strength (0 gives the input back)")
        return out

    def first_iteration(self) -> int:
        """Strength ``s`` skips all but the last ``int(steps * s)`` iterations (of a resolved request)."""
        return self.steps - int(self.steps * self.strength)

    def strength_default(self) -> float:
        return self.default_strength

    @classmethod
    def strength_hint(cls) -> str:
        """What the strength field takes, in a few words (a form's placeholder)."""
        return f"{cls.default_strength:g}; 0..1"

    def from_input(self, source: InputImage, fam: Family | None) -> dict:
        """Fields the kind derives from its input (the size, other files' hashes)."""
        return {}

    def derived_size(self, size: tuple[int, int]) -> dict:
        """``width``/``height`` fields for a result of ``size``; RequestError("size") when the request asks another."""
        asked = (self.width, self.height)
        if asked != (None, None) and asked != size:
            raise RequestError("size", f"{self.kind_label} makes a {size[0]}x{size[1]} image from this input; "
                                       "leave the size out (the TUI's Size: the input image's)")
        return {"width": size[0], "height": size[1]}

    def check_size(self, fam, width: int, height: int) -> None:
        for name, value in (("width", width), ("height", height)):
            if not 0 < value <= MAX_OUTPUT_SIDE:
                raise RequestError(name, f"{value} is out of range; the result may be up to {MAX_OUTPUT_SIDE} pixels a side")

    # -- metadata and reproduce ----------------------------------------------------------
    def a1111_fields(self) -> list[tuple[str, object]]:
        return [("Denoising strength", self.strength), ("Input image hash", self.image_hash)]

    def kept_files(self) -> dict[str, tuple[str, str | None]]:
        """What ``keep_inputs`` copies, {role: (path, recorded hash)}: the input files, and each image prompt's
        reference as ``image_prompt N``."""
        references = {f"image_prompt {i + 1}": (p.path, p.hash) for i, p in enumerate(self.image_prompts)}
        return {**self.input_files(), **references}

    def reading(self, role: str, path: str) -> "ImageInputRequest":
        """This request with the file of ``role`` (see :meth:`kept_files`) read from ``path``."""
        if role.startswith("image_prompt "):
            index = int(role.split()[1]) - 1
            prompts = list(self.image_prompts)
            prompts[index] = replace(prompts[index], path=path)
            return replace(self, image_prompts=prompts)
        return replace(self, **{role: path})

    def keep_inputs_in(self, out: Path) -> tuple[dict[str, str], list[str]]:
        """Copy each input and reference to ``out/inputs/<hash><suffix>`` (once per content) when ``keep_inputs``;
        one that cannot be copied is a note, and the image is made all the same."""
        if not self.keep_inputs:
            return {}, []
        folder = out / "inputs"
        kept, notes = {}, []
        for role, (path, digest) in self.kept_files().items():
            if not path or not digest:
                continue
            copy = folder / f"{digest}{Path(path).suffix.lower()}"
            try:
                if not _has_content(str(copy), digest):  # a file of that name with other bytes is replaced
                    folder.mkdir(parents=True, exist_ok=True)
                    with user_files.replacing(copy) as tmp:  # never half a copy (a full disk)
                        shutil.copyfile(os.path.expanduser(path), tmp)
            except OSError as exc:
                notes.append(f"keep_inputs: cannot copy the {role} to {folder} ({exc.strerror or exc}); the image "
                             "records its path only")
                continue
            kept[role] = str(copy.resolve())
        return kept, notes

    def with_kept_inputs(self, record: dict, image: Path | None = None) -> tuple["ImageInputRequest", list[str]]:
        """Where an input is missing or changed, the copy ``--keep-inputs`` kept (when it has the recorded content):
        where the record says, or in the ``inputs`` folder beside the day folder of ``image`` (the result; its
        outputs folder was moved)."""
        kept = record.get("kept_inputs") if isinstance(record, dict) else None
        kept = kept if isinstance(kept, dict) else {}  # a damaged record keeps nothing
        request, notes = self, []
        for role, (path, digest) in self.kept_files().items():
            copy = kept.get(role)
            if not path or not isinstance(copy, str) or not copy or _has_content(path, digest):
                continue
            places = [copy, *([str(image.parent.parent / "inputs" / Path(copy).name)] if image else [])]
            found = next((place for place in places if _has_content(place, digest)), None)
            if found:
                request = request.reading(role, found)
                notes.append(f"{role}: {path} is missing or changed; using the copy kept at {found}")
            else:
                notes.append(f"{role}: the copy kept at {copy} is missing or changed too")
        return request, notes


def _has_content(path: str, digest: str | None) -> bool:
    try:
        return content_hash(user_files.read_bytes(os.path.expanduser(path), MAX_BYTES)) == digest
    except (OSError, ValueError):  # ValueError: a NUL or an unpaired surrogate in a recorded path
        return False
