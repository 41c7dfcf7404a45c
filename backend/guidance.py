"""Guidance settings carried by a request (pure data; the math is in backend.engine).

Every control has a neutral value at which it is off and costs nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from backend.errors import RequestError


@dataclass
class GuidanceSettings:
    perp_neg: float = 0.0  # PerpNeg scale S (0 = off)
    sag: float = 0.0  # Self-Attention Guidance scale (0 = off)
    sharpness: float = 0.0  # 0..30 (0 = off)
    cfg_rescale: float = 0.0  # 0..1 (0 = off)
    adaptive_cfg: float = 0.0  # mimic CFG (0 = off)
    adm_scale: tuple[float, float, float] | None = None  # SDXL (pos, neg, end)
    freeu: tuple[float, float, float, float] | None = None  # (s1, s2, b1, b2)
    clip_skip: int = 1  # 1 = last layer
    pag: float = 0.0
    apg: float = 0.0

    def non_neutral(self) -> dict:
        """The controls that differ from their neutral value."""
        neutral = GuidanceSettings()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(neutral, f.name)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GuidanceSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError("guidance", f"unknown control {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        out = cls(**data)
        for name in ("adm_scale", "freeu"):
            value = getattr(out, name)
            if value is not None:
                setattr(out, name, tuple(float(v) for v in value))
        return out

    def validate(self, xl: bool, cfg: float) -> None:
        _range("sharpness", self.sharpness, 0.0, 30.0)
        _range("cfg_rescale", self.cfg_rescale, 0.0, 1.0)
        _range("perp_neg", self.perp_neg, 0.0, 10.0)
        _range("sag", self.sag, 0.0, 10.0)
        _range("adaptive_cfg", self.adaptive_cfg, 0.0, 30.0)
        _range("pag", self.pag, 0.0, 20.0)
        _range("apg", self.apg, 0.0, 30.0)
        if not 1 <= int(self.clip_skip) <= 12:
            raise RequestError("clip_skip", f"{self.clip_skip} is out of range; allowed 1..12 (1 = last layer)")


def _range(name: str, value: float, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise RequestError(name, f"{value} is out of range; allowed {lo:g}..{hi:g}")
