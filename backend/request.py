"""Job requests: one dataclass per job kind, validated at the boundary.

The same definition serves the CLI, the TUI form, presets, image metadata,
the persistent queue and "reproduce this image".
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields, replace

from backend.errors import RequestError
from backend.families import FAMILIES
from backend.guidance import GuidanceSettings
from backend.samplers import SAMPLERS, SCHEDULES

MAX_STEPS = 500
MAX_COUNT = 64
MAX_SEED = 2**32 - 1
DTYPES = ("auto", "fp16", "bf16", "fp32")


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
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["loras"] = [list(x) for x in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "GenerateRequest":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError(unknown[0], f"unknown field; allowed: {', '.join(sorted(known))}")
        data = dict(data)
        data["guidance"] = GuidanceSettings.from_dict(data.get("guidance") or {})
        data["loras"] = [(str(n), float(w)) for n, w in data.get("loras") or []]
        data["styles"] = list(data.get("styles") or [])
        return cls(**data)

    def per_image(self, i: int) -> "GenerateRequest":
        """The request that reproduces image ``i`` of this batch on its own."""
        return replace(self, seed=self.seed + i, count=1, index=self.index + i)

    # -- validation ----------------------------------------------------
    def resolved(self, family: str) -> "GenerateRequest":
        """Validate against the model family and fill defaults (seed, size, steps).

        Raises RequestError naming the field and what is allowed.
        """
        fam = FAMILIES.get(family)
        _check_type("prompt", self.prompt, str)
        _check_type("negative_prompt", self.negative_prompt, str)
        if self.sampler not in SAMPLERS:
            raise RequestError("sampler", f"unknown {self.sampler!r}; allowed: {', '.join(SAMPLERS)}")
        allowed = SAMPLERS[self.sampler].schedules
        scheduler = self.scheduler or ("karras" if "karras" in allowed else "normal")
        if scheduler not in SCHEDULES:
            raise RequestError("scheduler", f"unknown {scheduler!r}; allowed: {', '.join(SCHEDULES)}")
        if scheduler not in allowed:
            raise RequestError(
                "scheduler", f"{scheduler!r} does not work with {self.sampler}; allowed: {', '.join(allowed)}"
            )
        steps = _int("steps", fam.default_steps if self.steps is None and fam else self.steps)
        if not 1 <= steps <= MAX_STEPS:
            raise RequestError("steps", f"{self.steps} is out of range; allowed 1..{MAX_STEPS}")
        cfg = _float("cfg", self.cfg)
        if not 0.0 <= cfg <= 30.0:
            raise RequestError("cfg", f"{self.cfg} is out of range; allowed 0..30 (1 = no guidance)")
        default = fam.default_size if fam else None
        width = _int("width", default if self.width is None else self.width)
        height = _int("height", default if self.height is None else self.height)
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % 8:
                raise RequestError(name, f"{value} is not allowed; use a positive multiple of 8")
            if fam is not None and value > fam.max_side:
                raise RequestError(name, f"{value} is too large for {fam.label}; allowed up to {fam.max_side}")
        seed = _int("seed", self.seed)
        if seed == -1:
            seed = random.randint(0, MAX_SEED - MAX_COUNT)
        if not 0 <= seed <= MAX_SEED:
            raise RequestError("seed", f"{self.seed} is out of range; allowed -1 (random) or 0..{MAX_SEED}")
        count = _int("count", self.count)
        if not 1 <= count <= MAX_COUNT:
            raise RequestError("count", f"{self.count} is out of range; allowed 1..{MAX_COUNT}")
        if self.dtype not in DTYPES:
            raise RequestError("dtype", f"unknown {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if not 0.0 < float(self.refiner_switch) <= 1.0:
            raise RequestError("refiner_switch", f"{self.refiner_switch} is out of range; allowed (0, 1]")
        for name, weight in self.loras:
            if not -2.0 <= float(weight) <= 2.0:
                raise RequestError("lora", f"weight {weight} for {name} is out of range; allowed -2..2")
        self.guidance.validate(xl=bool(fam and fam.xl), cfg=cfg)
        return replace(
            self, scheduler=scheduler, steps=steps, cfg=cfg, width=width, height=height, seed=seed, count=count
        )


def _check_type(name: str, value: object, kind: type) -> None:
    if not isinstance(value, kind):
        raise RequestError(name, f"must be text, got {type(value).__name__}")


def _int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise RequestError(name, "must be a whole number")
    try:
        as_float = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(name, f"{value!r} is not a whole number") from None
    if not as_float.is_integer():
        raise RequestError(name, f"{value!r} is not a whole number")
    return int(as_float)


def _float(name: str, value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(name, f"{value!r} is not a number") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise RequestError(name, f"{value!r} is not a finite number")
    return out
