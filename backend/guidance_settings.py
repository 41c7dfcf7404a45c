"""Guidance settings carried by a request (pure data; the math is in backend.engine).

Every control has a neutral value at which it is off and costs nothing:
0 for the scales, ``None`` for ``adm_scale`` and ``freeu``, 1 for ``clip_skip``.
``freeu == ()`` means "on, with the model family's documented defaults"
(see :func:`freeu_defaults`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from backend.errors import RequestError
from backend.families import FAMILIES
from backend.values import is_whole, kind_of, shown, to_float

# Allowed range of each scalar control; its neutral value (0 = off) is the low end.
RANGES: dict[str, tuple[float, float]] = {
    "perp_neg": (0.0, 10.0),
    "sag": (0.0, 10.0),
    "sharpness": (0.0, 30.0),
    "cfg_rescale": (0.0, 1.0),
    "adaptive_cfg": (0.0, 30.0),
    "pag": (0.0, 20.0),
    "apg": (0.0, 30.0),
}
ADM_SCALE_RANGE = (0.1, 3.0)  # POS and NEG (Fooocus's range); END is a fraction 0..1
FREEU_RANGE = (0.0, 3.0)
_LIST_ALLOWED = {"adm_scale": f"POS,NEG {ADM_SCALE_RANGE[0]:g}..{ADM_SCALE_RANGE[1]:g} and END 0..1",
                 "freeu": f"{FREEU_RANGE[0]:g}..{FREEU_RANGE[1]:g} each"}  # the list controls' values, as said
CLIP_SKIP_MAX = 12

# FreeU defaults documented by diffusers (using-diffusers/image_quality.md): s1, s2, b1, b2.
_FREEU_SD1 = (0.9, 0.2, 1.5, 1.6)
_FREEU_SD2 = (0.9, 0.2, 1.4, 1.6)
_FREEU_SDXL = (0.9, 0.2, 1.3, 1.4)

# Controls that only act on classifier-free guidance, so need cfg > 1.
_NEEDS_CFG = {
    "perp_neg": "it replaces the CFG formula with three predictions",
    "apg": "it replaces the CFG formula",
    "cfg_rescale": "it rescales the CFG result",
}
# Pairs that cannot run together, with the reason.
_EXCLUSIVE = (
    ("apg", "perp_neg", "both replace the CFG formula"),
    ("pag", "perp_neg", "PAG's perturbed batch expects plain uncond/cond branches"),
    ("pag", "sag", "both guide away from a degraded mid-block self-attention pass"),
)


def freeu_defaults(family: str) -> tuple[float, float, float, float]:
    """The documented FreeU (s1, s2, b1, b2) for a model family (SD1.5, SD2.1 or SDXL values)."""
    fam = FAMILIES.get(family)
    if fam is not None and fam.xl:
        return _FREEU_SDXL
    if family.startswith("sd2"):
        return _FREEU_SD2
    return _FREEU_SD1


@dataclass
class GuidanceSettings:
    perp_neg: float = 0.0  # PerpNeg scale S (0 = off); needs cfg > 1
    sag: float = 0.0  # Self-Attention Guidance scale (0 = off)
    sharpness: float = 0.0  # 0..30 (0 = off)
    cfg_rescale: float = 0.0  # 0..1 (0 = off); needs cfg > 1
    adaptive_cfg: float = 0.0  # mimic CFG (0 = off); acts only while cfg > adaptive_cfg
    adm_scale: tuple[float, float, float] | None = None  # SDXL (pos, neg, end)
    freeu: tuple[float, ...] | None = None  # (s1, s2, b1, b2); () = family defaults
    clip_skip: int = 1  # 1 = last layer
    pag: float = 0.0  # Perturbed-Attention Guidance scale (0 = off)
    apg: float = 0.0  # Adaptive Projected Guidance norm threshold (0 = off); needs cfg > 1

    def non_neutral(self) -> dict:
        """The controls that differ from their neutral value."""
        neutral = GuidanceSettings()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(neutral, f.name)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> "GuidanceSettings":
        """Settings from a mapping of controls; a wrong key or type is a RequestError naming it."""
        if not isinstance(data, dict):
            raise RequestError("guidance", f"expected a mapping of controls, got {kind_of(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise RequestError("guidance", f"unknown control {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        out = cls(**data)
        for name, (low, high) in RANGES.items():
            setattr(out, name, to_float(name, getattr(out, name), f"{low:g}..{high:g}"))
        for name in ("adm_scale", "freeu"):
            value = getattr(out, name)
            if value is None:
                continue
            if not isinstance(value, (tuple, list)):
                raise RequestError(name, f"{shown(value)} is not allowed; give a list of numbers")
            setattr(out, name, tuple(to_float(name, v, _LIST_ALLOWED[name]) for v in value))
        return out

    def validate(self, xl: bool, cfg: float) -> None:
        """Raise RequestError for an out-of-range value or a combination that makes no sense."""
        self.check_values()
        self._validate_adm(xl)
        if problem := self.cfg_problem(cfg):
            raise cfg_error(*problem)
        if conflict := self.conflict():
            raise conflict_error(*conflict)

    def cfg_problem(self, cfg: float) -> tuple[str, str] | None:
        """The first control that is on and needs a ``cfg`` over 1 it does not have, and why (None: no such)."""
        return next(((name, why) for name, why in _NEEDS_CFG.items() if getattr(self, name) > 0 and cfg <= 1.0), None)

    def conflict(self) -> tuple[str, str, str] | None:
        """The first two controls that are on together but cannot run together, and why (None: no such two)."""
        return next(((a, b, why) for a, b, why in _EXCLUSIVE if getattr(self, a) > 0 and getattr(self, b) > 0), None)

    def check_values(self) -> None:
        """The checks that hold for any model and settings: each control's range. RequestError otherwise."""
        for name, (lo, hi) in RANGES.items():
            _range(name, getattr(self, name), lo, hi)
        if not is_whole(self.clip_skip) or not 1 <= self.clip_skip <= CLIP_SKIP_MAX:
            raise RequestError("clip_skip", f"{self.clip_skip} is not allowed; use a whole number 1..{CLIP_SKIP_MAX} "
                                            "(1 = last layer; a model's text encoder may allow fewer)")
        self._validate_freeu()
        self._validate_adm_values()

    def _validate_adm(self, xl: bool) -> None:
        if self.adm_scale is not None and not xl:
            raise RequestError("adm_scale", "only for SDXL models (it scales SDXL's size conditioning)")

    def _validate_adm_values(self) -> None:
        if self.adm_scale is None:
            return
        values = _numbers("adm_scale", self.adm_scale, 3, "POS,NEG,END")
        lo, hi = ADM_SCALE_RANGE
        if not (lo <= values[0] <= hi and lo <= values[1] <= hi and 0.0 <= values[2] <= 1.0):
            raise RequestError("adm_scale", f"{_as_typed(self.adm_scale)} is out of range; allowed "
                                            f"{_LIST_ALLOWED['adm_scale']}")

    def _validate_freeu(self) -> None:
        if not self.freeu:  # None = off, () = family defaults
            return
        values = _numbers("freeu", self.freeu, 4, "s1,s2,b1,b2 (or none for the model's defaults)")
        lo, hi = FREEU_RANGE
        if not all(lo <= v <= hi for v in values):
            raise RequestError("freeu", f"{_as_typed(self.freeu)} is out of range; allowed {_LIST_ALLOWED['freeu']}")


def cfg_error(name: str, why: str, origin: str = "") -> RequestError:
    """RequestError(name) for a control on with cfg 1 or less (``origin``: where the control came from)."""
    return RequestError(name, f"needs cfg > 1 ({why}); raise cfg or set {name} to 0{origin}")


def conflict_error(a: str, b: str, why: str, origin: str = "") -> RequestError:
    """RequestError(a) for controls ``a`` and ``b`` on together (``origin``: where one of them came from)."""
    return RequestError(a, f"cannot be combined with {b} ({why}); set one of them to 0{origin}")


def check_clip_skip(clip_skip: int, depth: int) -> None:
    """``clip_skip`` must not reach below the first layer of a text encoder ``depth`` layers deep."""
    if clip_skip > depth:
        raise RequestError("clip_skip", f"{clip_skip} is deeper than this model's text encoder; allowed 1..{depth}")


def format_guidance_value(value: object) -> str:
    """A control's value as the CLI and the form take it (``0.9,0.2``; ``default`` for the family's FreeU), the
    text ``backend.request_builder.parse_guidance_value`` reads back as ``value``."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" for v in value) if value else "default"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _as_typed(values: object) -> str:
    """A list control's value in an error: as typed when it is a list of numbers, else as JSON writes it."""
    if isinstance(values, (tuple, list)) and values and all(isinstance(v, (int, float)) for v in values):
        return format_guidance_value(values)
    return shown(values)


def _numbers(name: str, values: object, count: int, shape: str) -> tuple[float, ...]:
    """``count`` finite numbers; RequestError saying ``shape`` (a wrong count) or what is allowed (a value that
    is no number)."""
    if not isinstance(values, (tuple, list)) or len(values) != count:
        raise RequestError(name, f"{_as_typed(values)} is not allowed; give {count} numbers {shape}")
    return tuple(to_float(name, v, _LIST_ALLOWED[name]) for v in values)


def _range(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise RequestError(name, f"{value} is out of range; allowed {lo:g}..{hi:g}")
