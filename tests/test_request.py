"""GenerateRequest validation: every bad value names its field and what is allowed."""

from __future__ import annotations

import pytest

from backend.errors import RequestError
from backend.request import GenerateRequest


def _err(**kw) -> RequestError:
    with pytest.raises(RequestError) as info:
        GenerateRequest(prompt="x", **kw).resolved("sd1")
    return info.value


@pytest.mark.parametrize(
    "kw,field,fragment",
    [
        ({"steps": 0}, "steps", "1..500"),
        ({"steps": -3}, "steps", "1..500"),
        ({"steps": 100000}, "steps", "1..500"),
        ({"steps": "ten"}, "steps", "not a whole number"),
        ({"cfg": -1}, "cfg", "0..30"),
        ({"cfg": float("nan")}, "cfg", "finite"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"height": 0}, "height", "multiple of 8"),
        ({"width": 4096}, "width", "too large"),
        ({"sampler": "nope"}, "sampler", "euler_a"),
        ({"scheduler": "weird"}, "scheduler", "karras"),
        ({"sampler": "euler_a", "scheduler": "karras"}, "scheduler", "does not work with euler_a"),
        ({"seed": -5}, "seed", "-1 (random)"),
        ({"count": 0}, "count", "1..64"),
        ({"dtype": "fp8"}, "dtype", "fp16"),
        ({"loras": [("x", 3.0)]}, "lora", "-2..2"),
    ],
)
def test_bad_values_name_the_field(kw, field, fragment):
    err = _err(**kw)
    assert err.field == field
    assert fragment in str(err)
    assert "\n" not in str(err)


def test_defaults_come_from_the_family():
    sd = GenerateRequest(prompt="x").resolved("sd1")
    xl = GenerateRequest(prompt="x").resolved("sdxl")
    demo = GenerateRequest(prompt="x").resolved("demo")
    assert (sd.width, sd.height, sd.steps) == (512, 512, 30)
    assert (xl.width, xl.height) == (1024, 1024)
    assert (demo.width, demo.height, demo.steps) == (128, 128, 8)


def test_random_seed_is_resolved_and_explicit_seed_kept():
    a = GenerateRequest(prompt="x").resolved("demo")
    assert 0 <= a.seed < 2**32
    assert GenerateRequest(prompt="x", seed=7).resolved("demo").seed == 7


def test_empty_prompt_is_allowed():
    assert GenerateRequest(prompt="").resolved("demo").prompt == ""


def test_round_trip_and_per_image():
    req = GenerateRequest(prompt="p", seed=10, count=3, loras=[("a", 0.5)], styles=["s"]).resolved("demo")
    again = GenerateRequest.from_dict(req.to_dict())
    assert again == req
    third = req.per_image(2)
    assert (third.seed, third.count, third.index) == (12, 1, 2)


def test_unknown_field_in_dict_is_an_error():
    with pytest.raises(RequestError) as info:
        GenerateRequest.from_dict({"prompt": "x", "stepz": 3})
    assert info.value.field == "stepz"


def test_default_schedule_follows_the_sampler():
    assert GenerateRequest(prompt="x", sampler="dpmpp_2m").resolved("demo").scheduler == "karras"
    assert GenerateRequest(prompt="x", sampler="euler_a").resolved("demo").scheduler == "normal"
