"""GenerateRequest validation: every bad value names its field and what is allowed."""

from __future__ import annotations

from dataclasses import fields

import pytest

from backend import jobkinds
from backend.errors import RequestError
from backend.request import FREE_TEXT, GenerateRequest


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
        ({"index": -5}, "index", "out of range; allowed 0..4294967295"),
        ({"index": 2**64}, "index", "out of range"),
        ({"negative_prompt": "x" * 10_001}, "negative_prompt", "is 10,001 characters; allowed up to 10,000"),
    ],
)
def test_bad_values_name_the_field(kw, field, fragment):
    err = _err(**kw)
    assert err.field == field
    assert fragment in str(err)
    assert "\n" not in str(err)


def test_styles_are_not_without_end():
    with pytest.raises(RequestError) as info:  # a megabyte of them took the service a minute
        GenerateRequest.from_dict({"styles": ["3D Render"] * 80_000})
    assert str(info.value) == "styles: 80000 given; at most 64"
    assert GenerateRequest.from_dict({"styles": ["Ink", "ink"]}).styles == ["Ink", "ink"]  # an image made so: as is


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


def _text_fields(kind) -> list[str]:
    """The fields of ``kind``'s request that hold text (names, paths, choices, prompts)."""
    return [f.name for f in fields(kind.request_type) if "str" in str(f.type) and "list" not in str(f.type)]


@pytest.mark.parametrize("kind", list(jobkinds.KINDS.values()), ids=lambda kind: kind.name)
def test_text_that_is_not_utf8_is_refused_in_every_field_of_every_kind(kind):
    """A lone surrogate (JSON's "\\ud800", or a byte of a non-UTF-8 argument) is refused before anything is
    queued: the tokenizer, the queue's database and the terminal all fail on it later."""
    for name in _text_fields(kind) + ["styles", "image_prompts"]:
        for bad, shown in (("a\ud800", "lone surrogate U+D800 at character 2"), ("/x/\udcff", "byte 0xff at character 4")):
            value = {"styles": [bad], "image_prompts": [{"path": bad}]}.get(name, bad)
            with pytest.raises(RequestError) as info:
                kind.request({name: value})
            assert str(info.value) == f"{name}: is not valid UTF-8 text ({shown}); give text, and paths, in UTF-8"


@pytest.mark.parametrize("kind", list(jobkinds.KINDS.values()), ids=lambda kind: kind.name)
def test_nul_is_refused_in_names_and_paths_but_not_in_prompts(kind):
    for name in _text_fields(kind):
        if name in FREE_TEXT:
            assert getattr(kind.request({name: "a\0b"}), name) == "a\0b"
            continue
        with pytest.raises(RequestError) as info:
            kind.request({name: "/a\0b"})
        assert str(info.value) == f"{name}: holds a NUL character (at character 3); no path or name may hold one"


@pytest.mark.parametrize("kw,message", [
    ({"steps": "1_0"}, "steps: '1_0' is not a whole number"),  # int() and float() read it as 10
    ({"cfg": "7_5"}, "cfg: '7_5' is not a number; allowed 0..30 (1 = no guidance)"),
    ({"refiner_switch": "0_5"}, "refiner_switch: '0_5' is not a number"),
])
def test_digit_grouping_underscores_are_not_a_number(kw, message):
    assert str(_err(**kw)) == message


def test_the_field_an_error_names_is_read_the_same_everywhere():
    """The API, the Generate form and the Train form each split "field: message" their own way."""
    from backend.errors import DreamttyError, ModelError, field_and_message

    assert field_and_message(RequestError("lora", "x: y")) == ("lora", "x: y")
    assert field_and_message(ModelError("model: foo does not exist")) == ("model", "foo does not exist")
    assert field_and_message(DreamttyError("cannot reach the service: x")) == (None, "cannot reach the service: x")


def test_minus_zero_is_zero_in_the_request_and_its_metadata():
    """``--cfg -0``, ``--strength -0`` and a weight of -0 were recorded as -0.0 (A1111's text said
    "CFG scale: -0.0")."""
    from backend import metadata
    from backend.jobkinds.img2img import Img2ImgRequest

    request = GenerateRequest.from_dict({"prompt": "x", "cfg": "-0", "seed": 1}).resolved("demo")
    assert "CFG scale: 0.0," in metadata.a1111_parameters(metadata.build(request, "demo", {}))
    image = Img2ImgRequest.from_dict({"image": "x.png", "strength": "-0", "image_prompts": [{"path": "a",
                                                                                            "weight": -0.0}]})
    assert [str(x) for x in (image.strength, image.image_prompts[0].weight)] == ["0.0", "0.0"]
