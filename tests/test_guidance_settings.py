"""GuidanceSettings: ranges, combinations and defaults (pure, no torch)."""

from __future__ import annotations

import pytest

from backend.errors import RequestError
from backend.guidance_settings import RANGES, GuidanceSettings, freeu_defaults
from backend.request import GenerateRequest


def _error(settings: GuidanceSettings, xl: bool = False, cfg: float = 7.0) -> RequestError:
    with pytest.raises(RequestError) as info:
        settings.validate(xl=xl, cfg=cfg)
    return info.value


@pytest.mark.parametrize("name", sorted(RANGES))
def test_scalar_ranges(name):
    lo, hi = RANGES[name]
    GuidanceSettings(**{name: hi}).validate(xl=True, cfg=7.0)
    for bad in (hi + 0.5, -0.1, float("nan"), "2", True):
        err = _error(GuidanceSettings(**{name: bad}), xl=True)
        assert err.field == name
        assert f"allowed {lo:g}..{hi:g}" in str(err)
        assert "\n" not in str(err)


@pytest.mark.parametrize("value", [0, 13, 2.5, "2"])
def test_clip_skip_range(value):
    err = _error(GuidanceSettings(clip_skip=value))
    assert str(err).startswith("clip_skip: ") and "1..12" in str(err)


@pytest.mark.parametrize("name", ["perp_neg", "apg", "cfg_rescale"])
@pytest.mark.parametrize("cfg", [1.0, 0.5])
def test_cfg_modifiers_need_cfg_above_one(name, cfg):
    err = _error(GuidanceSettings(**{name: 0.5}), cfg=cfg)
    assert str(err).startswith(f"{name}: needs cfg > 1")
    GuidanceSettings(**{name: 0.5}).validate(xl=False, cfg=1.5)


@pytest.mark.parametrize(
    "a,b", [("apg", "perp_neg"), ("pag", "perp_neg"), ("pag", "sag")]
)
def test_exclusive_pairs(a, b):
    err = _error(GuidanceSettings(**{a: 1.0, b: 1.0}))
    assert str(err).startswith(f"{a}: cannot be combined with {b}")


def test_sensible_combinations_pass():
    GuidanceSettings(perp_neg=1, sag=0.5, sharpness=2, cfg_rescale=0.7, adaptive_cfg=7, freeu=(),
                     adm_scale=(1.5, 0.8, 0.3), clip_skip=2).validate(xl=True, cfg=9.0)
    GuidanceSettings(pag=3, apg=15, sharpness=2, cfg_rescale=0.5).validate(xl=False, cfg=7.0)
    GuidanceSettings(sag=0.75, pag=0, sharpness=10, adaptive_cfg=7).validate(xl=False, cfg=1.0)


def test_adm_scale_only_on_sdxl_and_in_range():
    assert str(_error(GuidanceSettings(adm_scale=(1.5, 0.8, 0.3)), xl=False)).startswith(
        "adm_scale: only for SDXL models"
    )
    for bad in ((1.5, 0.8), (5.0, 0.8, 0.3), (1.5, 0.8, 1.5), (1.5, "x", 0.3)):
        assert _error(GuidanceSettings(adm_scale=bad), xl=True).field == "adm_scale"


def test_freeu_values():
    GuidanceSettings(freeu=()).validate(xl=False, cfg=7.0)
    GuidanceSettings(freeu=(0.9, 0.2, 1.5, 1.6)).validate(xl=False, cfg=7.0)
    for bad in ((0.9, 0.2, 1.5), (0.9, 0.2, 1.5, 9.0)):
        assert _error(GuidanceSettings(freeu=bad)).field == "freeu"


def test_freeu_defaults_per_family():
    assert freeu_defaults("sd1") == freeu_defaults("demo") == (0.9, 0.2, 1.5, 1.6)
    assert freeu_defaults("sd2") == freeu_defaults("sd2-v") == (0.9, 0.2, 1.4, 1.6)
    assert freeu_defaults("sdxl") == freeu_defaults("demo-xl") == freeu_defaults("sdxl-refiner") == (0.9, 0.2, 1.3, 1.4)


def test_round_trip_and_non_neutral():
    g = GuidanceSettings(perp_neg=1.0, freeu=(), adm_scale=(1.5, 0.8, 0.3))
    back = GuidanceSettings.from_dict(g.to_dict())
    assert back == g
    assert back.non_neutral() == {"perp_neg": 1.0, "freeu": (), "adm_scale": (1.5, 0.8, 0.3)}
    assert GuidanceSettings.from_dict({"freeu": [1, 1, 1, 1]}).freeu == (1.0, 1.0, 1.0, 1.0)
    assert GuidanceSettings().non_neutral() == {}


def test_request_resolve_reports_guidance_errors():
    req = GenerateRequest(prompt="x", cfg=1.0, guidance=GuidanceSettings(perp_neg=1.0))
    with pytest.raises(RequestError, match=r"^perp_neg: needs cfg > 1"):
        req.resolved("sd1")
    with pytest.raises(RequestError, match=r"^adm_scale: only for SDXL"):
        GenerateRequest(prompt="x", guidance=GuidanceSettings(adm_scale=(1.5, 0.8, 0.3))).resolved("sd1")
    GenerateRequest(prompt="x", guidance=GuidanceSettings(adm_scale=(1.5, 0.8, 0.3))).resolved("sdxl")
