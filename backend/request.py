"""Job requests: one dataclass per job kind, validated at the boundary.

The same definition serves the CLI, the TUI form, presets, image metadata,
the persistent queue and "reproduce this image".
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from backend.errors import RequestError
from backend.families import FAMILIES
from backend.guidance_settings import GuidanceSettings
from backend.image_prompts import ImagePrompt, convert_image_prompts, resolve_image_prompts
from backend.samplers import SAMPLERS, SCHEDULES
from backend.style_names import check_once_each
from backend.values import check_text, kind_of, shown, to_bool, to_float, to_int

MAX_STEPS = 500
MAX_CFG = 30.0
CFG_RANGE = f"0..{MAX_CFG:g} (1 = no guidance)"
MAX_COUNT = 64
MAX_SEED = 2**32 - 1
MAX_LORAS = 5
MAX_STYLES = 64  # a request's styles (Fooocus offers a few hundred; each is applied in turn)
DTYPES = ("auto", "fp16", "bf16", "fp32")
# fast: a compiled UNet on CUDA; fastest: with float8 linear layers (backend/engine/fast.py); the CPU runs default
SPEEDS = ("default", "fast", "fastest")
# About 2,500 tokens: 30 of CLIP's 77-token chunks. More only slows the text encoder (a million
# characters took minutes), and no sampler reads that much.
MAX_PROMPT_CHARS = 10_000
FREE_TEXT = ("prompt", "negative_prompt")  # the only text fields that are neither names nor paths: NUL allowed
_SIZE = re.compile(r"\s*([0-9]+)\s*[xX×]\s*([0-9]+)\s*")  # ASCII digits only: int() refuses "²"


@dataclass
class GenerateRequest:
    prompt: str = ""
    negative_prompt: str = ""
    model: str = "demo"
    sampler: str = "dpmpp_2m"
    scheduler: str | None = None  # None = karras where the sampler supports it, else normal
    steps: int | None = None  # None = the model family's default
    cfg: float = 7.0
    width: int | None = None  # None = the model family's default
    height: int | None = None
    seed: int = -1  # -1 = random, resolved before queueing
    count: int = 1
    index: int = 0  # position of the first image in its batch (for [[a,b]] arrays)
    styles: list[str] = field(default_factory=list)
    preset: str | None = None
    expand: bool = False
    loras: list[tuple[str, float]] = field(default_factory=list)
    vae: str | None = None
    refiner: str | None = None
    refiner_switch: float = 0.8
    dtype: str = "auto"
    speed: str = "default"
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    image_prompts: list[ImagePrompt] = field(default_factory=list)  # reference images (backend.image_prompts)
    max_batch: int | None = None  # at most this many of the job's images denoise together; None: the device's default
    # (size, position) of the batch one image was denoised in (its metadata): a one-image request with it runs that
    # batch again and keeps only its image, since batch-mates change its pixels in the last bits (reproduce).
    batch: tuple[int, int] | None = None

    # Checkpoint variants (library.checkpoint_family) this kind runs with besides regular ones.
    model_variants: ClassVar[tuple[str, ...]] = ()
    # Why reference images cannot steer a request that uses no model (see ``uses_model``).
    no_model: ClassVar[str] = "this job runs no model"

    # -- what a kind adds (overridden by the request types of backend.jobkinds) ---------
    @classmethod
    def converters(cls) -> dict[str, Callable[[str, object], object]]:
        """How ``from_dict`` checks and converts each field (types only; ranges are checked by ``resolved``)."""
        return _CONVERT

    @classmethod
    def check_given(cls, given: dict) -> None:
        """Refuse fields a user gave together that contradict each other (what was typed or posted, not a
        stored request: that is read as it was saved). RequestError naming the field."""
        check_once_each(given.get("styles"))

    @property
    def uses_model(self) -> bool:
        """Whether the worker needs the model's pipeline for this request."""
        return True

    def a1111_fields(self) -> list[tuple[str, object]]:
        """Extra ``Key: value`` pairs for A1111's parameters text (the image-input kinds' settings)."""
        return []

    def first_iteration(self) -> int:
        """The first iteration of the ``steps`` schedule that the job runs (text to image: all of them)."""
        return 0

    def keep_inputs_in(self, out: Path) -> tuple[dict[str, str], list[str]]:
        """Copy the job's input files under ``out`` when asked to: ({role: copy}, a note for each that could not
        be). Text to image has none."""
        return {}, []

    def with_kept_inputs(self, record: dict, image: Path | None = None) -> tuple["GenerateRequest", list[str]]:
        """For ``reproduce`` of result ``image``: the request reading the copies kept in ``record`` where an input
        is gone."""
        return self, []

    def check_size(self, fam, width: int, height: int) -> None:
        """Raise RequestError unless the model can make a ``width`` x ``height`` image."""
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % 8:
                raise RequestError(name, f"{value} is not allowed; use a positive multiple of 8")
            if fam is not None and value > fam.max_side:
                raise RequestError(name, f"{value} is too large for {fam.label}; allowed up to {fam.max_side}")

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["loras"] = [list(x) for x in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: object) -> "GenerateRequest":
        """Build a request from a preset, image metadata or the queue.

        Raises RequestError naming the first unknown key or value of the wrong type, or text that is not
        UTF-8 (or holds a NUL outside the prompts); ranges are checked later by :meth:`resolved`.
        """
        if not isinstance(data, dict):
            raise RequestError("request", f"expected a mapping of fields, got {kind_of(data)}")
        convert = cls.converters()
        unknown = sorted(set(data) - set(convert), key=str)
        if unknown:
            raise RequestError(str(unknown[0]), f"unknown field; allowed: {', '.join(sorted(convert))}")
        for name, value in data.items():
            check_text(name, value, nul=name in FREE_TEXT)
        return cls(**{name: convert[name](name, value) for name, value in data.items()})

    def input_files(self) -> dict[str, tuple[str, str | None]]:
        """{role: (path, recorded hash)} of the files the job reads besides models; a role is also the
        name of the request field holding the path. Text to image reads none."""
        return {}

    def per_image(self, i: int) -> "GenerateRequest":
        """The request that reproduces image ``i`` of this job on its own (denoised alone)."""
        return replace(self, seed=self.seed + i, count=1, index=self.index + i)

    def batch_mates(self) -> list["GenerateRequest"]:
        """The per-image requests of the batch ``self.batch`` names, in order (this one at its position). The
        others stand in for the images made beside it (another job's, in a group: their count is what changes
        its pixels); their seeds wrap around within 0..MAX_SEED."""
        size, position = self.batch or (1, 0)
        first = replace(self, seed=self.seed - position, index=self.index - position, batch=None)
        return [replace(mate, seed=mate.seed % (MAX_SEED + 1)) for mate in map(first.per_image, range(size))]

    # -- validation ----------------------------------------------------
    def resolved(self, family: str) -> "GenerateRequest":
        """Validate against the model family and fill defaults (seed, size, steps).

        Raises RequestError naming the field and what is allowed.
        """
        fam = FAMILIES.get(family)
        for name in FREE_TEXT:
            check_prompt_length(name, text_value(name, getattr(self, name)))
        if self.sampler not in SAMPLERS:
            raise RequestError("sampler", f"unknown {self.sampler!r}; allowed: {', '.join(SAMPLERS)}")
        allowed = SAMPLERS[self.sampler].schedules
        scheduler = self.scheduler or SAMPLERS[self.sampler].default_schedule
        if scheduler not in SCHEDULES:
            raise RequestError("scheduler", f"unknown {scheduler!r}; allowed: {', '.join(SCHEDULES)}")
        if scheduler not in allowed:
            raise RequestError(
                "scheduler", f"{scheduler!r} does not work with {self.sampler}; allowed: {', '.join(allowed)}"
            )
        steps = to_int("steps", fam.default_steps if self.steps is None and fam else self.steps)
        if not 1 <= steps <= MAX_STEPS:
            raise RequestError("steps", f"{self.steps} is out of range; allowed 1..{MAX_STEPS}")
        min_steps = SAMPLERS[self.sampler].min_steps
        if steps < min_steps:
            raise RequestError("steps", f"{self.sampler} needs at least {min_steps}; got {steps}")
        cfg = to_float("cfg", self.cfg, CFG_RANGE)
        if not 0.0 <= cfg <= MAX_CFG:
            raise RequestError("cfg", f"{self.cfg} is out of range; allowed {CFG_RANGE}")
        default = fam.default_size if fam else None
        width = to_int("width", default if self.width is None else self.width)
        height = to_int("height", default if self.height is None else self.height)
        self.check_size(fam, width, height)
        count = to_int("count", self.count)
        if not 1 <= count <= MAX_COUNT:
            raise RequestError("count", f"{self.count} is out of range; allowed 1..{MAX_COUNT}")
        seed = _seed(self.seed, count)
        max_batch = optional(to_int)("max_batch", self.max_batch)
        if max_batch is not None and not 1 <= max_batch <= MAX_COUNT:
            raise RequestError("max_batch", f"{self.max_batch} is out of range; allowed 1..{MAX_COUNT} "
                                            "(left out: the device's default)")
        if self.dtype not in DTYPES:
            raise RequestError("dtype", f"unknown {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.speed not in SPEEDS:
            raise RequestError("speed", f"unknown {self.speed!r}; allowed: {', '.join(SPEEDS)}")
        if not 0.0 < to_float("refiner_switch", self.refiner_switch) <= 1.0:
            raise RequestError("refiner_switch", f"{self.refiner_switch} is out of range; allowed (0, 1]")
        index = to_int("index", self.index)
        if not 0 <= index <= MAX_SEED - count + 1:  # as the seeds: image i is index + i
            raise RequestError("index", f"{self.index} is out of range; allowed 0..{MAX_SEED - count + 1} (the "
                                        "first image's position in its [[a, b]] arrays)")
        check_loras(self.loras)
        self.guidance.validate(xl=bool(fam and fam.xl), cfg=cfg)
        return replace(
            self, scheduler=scheduler, steps=steps, cfg=cfg, width=width, height=height, seed=seed, count=count,
            index=index,
            image_prompts=resolve_image_prompts(self.image_prompts), max_batch=max_batch,
            batch=_checked_batch(self.batch) if count == 1 else None,  # a job of several makes its own batches
        )


def check_loras(loras: list[tuple[str, float]]) -> None:
    """At most MAX_LORAS, each once, each weight in -2..2; RequestError("lora") otherwise."""
    seen = set()
    for name, weight in loras:
        if name in seen:
            raise RequestError("lora", f"{name} is given twice")
        seen.add(name)
        if not -2.0 <= to_float("lora", weight) <= 2.0:
            raise RequestError("lora", f"weight {weight} for {name} is out of range; allowed -2..2")
    if len(loras) > MAX_LORAS:
        raise RequestError("lora", f"{len(loras)} given; at most {MAX_LORAS} LoRA slots")


def parse_size(value: object) -> tuple[int, int]:
    """``"WxH"`` (or ``W×H``) -> (width, height); RequestError("size", ...) for anything else."""
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError("size", f"{shown(value)} is not WxH, e.g. 1024x1024")
    return to_int("width", match[1]), to_int("height", match[2])


def _seed(value: object, count: int) -> int:
    """The batch's first seed: -1 picks one; every image's seed (first + i) must stay within 0..MAX_SEED."""
    seed = to_int("seed", value)
    if seed == -1:
        return random.randint(0, MAX_SEED - MAX_COUNT)
    last = MAX_SEED - count + 1
    if not 0 <= seed <= last:
        batch = f" for {count} images (image i uses seed + i)" if count > 1 else ""
        raise RequestError("seed", f"{value} is out of range; allowed -1 (random) or 0..{last}{batch}")
    return seed


def _checked_batch(batch: tuple[int, int] | None) -> tuple[int, int] | None:
    """A recorded (size, position) of an image made in a batch (see ``GenerateRequest.batch_mates``)."""
    if batch is None:
        return None
    size, position = batch
    if not 2 <= size <= MAX_COUNT or not 0 <= position < size:
        raise RequestError("batch", f"{list(batch)} is not allowed; [size, position] with size 2..{MAX_COUNT} and "
                                    "position 0..size-1")
    return size, position


def check_prompt_length(name: str, text: str, after: str = "") -> None:
    """RequestError(name) for a prompt past MAX_PROMPT_CHARS (``after``: what made it that long)."""
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(name, f"is {len(text):,} characters{after}; allowed up to {MAX_PROMPT_CHARS:,}")


def text_value(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise RequestError(name, f"must be text, got {kind_of(value)}")
    return value


def optional(convert: Callable[[str, object], object]) -> Callable[[str, object], object]:
    """``convert``, letting None (= the default) through."""
    return lambda name, value: None if value is None else convert(name, value)


def _styles(name: str, value: object) -> list[str]:
    """Style names, at most MAX_STYLES."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RequestError(name, f"{shown(value)} is not allowed; give a list of style names, e.g. [Watercolor]")
    if len(value) > MAX_STYLES:
        raise RequestError(name, f"{len(value)} given; at most {MAX_STYLES}")
    return list(value)


def _loras(name: str, value: object) -> list[tuple[str, float]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(_is_lora(pair) for pair in value):
        raise RequestError(name, f"{shown(value)} is not allowed; give a list of [name, weight] pairs")
    return [(n, to_float(name, w)) for n, w in value]


def _is_lora(pair: object) -> bool:
    return isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)


def _batch(name: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RequestError(name, f"{shown(value)} is not allowed; give [size, position], e.g. [4, 1]")
    return to_int(name, value[0]), to_int(name, value[1])


def _guidance(name: str, value: object) -> GuidanceSettings:
    return GuidanceSettings.from_dict({} if value is None else value)


# How ``from_dict`` checks and converts each field (types only; ranges are checked by ``resolved``).
_CONVERT: dict[str, Callable[[str, object], object]] = {
    "prompt": text_value,
    "negative_prompt": text_value,
    "model": text_value,
    "sampler": text_value,
    "scheduler": optional(text_value),
    "steps": optional(to_int),
    "cfg": lambda name, value: to_float(name, value, CFG_RANGE),
    "width": optional(to_int),
    "height": optional(to_int),
    "seed": to_int,
    "count": to_int,
    "index": to_int,
    "styles": _styles,
    "preset": optional(text_value),
    "expand": to_bool,
    "loras": _loras,
    "vae": optional(text_value),
    "refiner": optional(text_value),
    "refiner_switch": to_float,
    "dtype": text_value,
    "speed": text_value,
    "guidance": _guidance,
    "image_prompts": convert_image_prompts,
    "max_batch": optional(to_int),
    "batch": _batch,
}
