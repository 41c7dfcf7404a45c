"""The Generate form loses nothing: every request field of every job kind round-trips image -> form -> request
(a field the form forgets fails), and the form follows the same precedence as the CLI (config default <
preset < a model named on the command line)."""

from __future__ import annotations

import asyncio
from dataclasses import fields

import pytest
from textual.widgets import Input, TextArea

from backend import jobkinds
from backend.client import LocalClient
from backend.config import config_path
from backend.guidance_settings import GuidanceSettings
from backend.image_prompts import ImagePrompt
from backend.jobkinds.image_input import ImageInputRequest
from backend.request import GenerateRequest
from backend.service import Service
from test_tui import NoWorkers, idle_service, make_app, opened, settle  # noqa: F401  (idle_service is a fixture)
from tui.app import DreamttyApp
from tui.widgets.input_image import own_fields

# A value for every request field, none of them the default: a field the form forgets fails the test.
NOT_DEFAULT = {
    "prompt": "  a red\nfox [[in snow, at dusk]]  ", "negative_prompt": "blurry\n", "model": "demo-xl",
    "sampler": "euler_a", "scheduler": "sgm_uniform", "steps": 12, "cfg": 4.5, "width": 96, "height": 64,
    "seed": 1234, "count": 3, "index": 1, "styles": ["Watercolor"], "preset": "anime", "expand": True,
    "loras": [("fox", 0.5), ("org/hub-lora", 1.0)], "vae": "alt", "refiner": "my-refiner", "refiner_switch": 0.7,
    "dtype": "bf16", "speed": "fast", "max_batch": 4, "batch": (3, 1),
    "image_prompts": [ImagePrompt("/refs/a face.png", "face", 0.8, 0.6, "0123456789ab"), ImagePrompt("/refs/b.png")],
    "guidance": GuidanceSettings(perp_neg=1.5, sag=0.5, sharpness=3.0, cfg_rescale=0.7, adaptive_cfg=5.0,
                                 adm_scale=(1.5, 0.8, 0.3), freeu=(1.1, 1.2, 0.9, 0.2), clip_skip=2, pag=1.0, apg=2.0),
}


# The same for the fields each image-input kind adds (by job kind name).
IMAGE_NOT_DEFAULT = {
    "img2img": {},
    "upscale": {"scale": 4.0, "fast": True, "upscaler": "4x-Ultra [x]"},
    "inpaint": {"mask": "/masks/a mask.png", "mask_hash": "0123456789ab", "box": (1, 2, 3, 4), "mode": "detail",
                "context": 0.3, "feather": 20},
    "outpaint": {"left": 8, "right": 16, "top": 24, "bottom": 32, "feather": 4},
}
IMAGE_COMMON = {"image": "/photos/a fox [1].png", "image_hash": "abcdef012345", "strength": 0.7, "keep_inputs": True}


def image_request(kind: str):
    """A request of ``kind`` with no field at its default, read as an image's record is (a fast upscale keeps no
    strength)."""
    request_type = jobkinds.get(kind).request_type
    return request_type.from_dict(request_type(**NOT_DEFAULT, **IMAGE_COMMON, **IMAGE_NOT_DEFAULT[kind]).to_dict())


def test_the_table_names_every_field():
    assert set(NOT_DEFAULT) == {f.name for f in fields(GenerateRequest)}
    defaults = GenerateRequest()
    for f in fields(GuidanceSettings):
        assert getattr(NOT_DEFAULT["guidance"], f.name) != getattr(defaults.guidance, f.name), f.name
    for name, value in NOT_DEFAULT.items():
        assert value != getattr(defaults, name), name
    image_kinds = {k.name for k in jobkinds.KINDS.values() if issubclass(k.request_type, ImageInputRequest)}
    assert set(IMAGE_NOT_DEFAULT) == image_kinds
    for kind, table in IMAGE_NOT_DEFAULT.items():
        request_type = jobkinds.get(kind).request_type
        assert set(IMAGE_COMMON) | set(table) == set(own_fields(request_type)), kind
        defaults = request_type()
        for name, value in {**IMAGE_COMMON, **table}.items():
            assert value != getattr(defaults, name), (kind, name)


async def test_image_parameters_round_trip_through_the_form_field_by_field(idle_service, tmp_path):
    request = GenerateRequest(**NOT_DEFAULT)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        form = app.screen.form
        form.fill(request.to_dict())
        await settle(pilot)
        back = form.read_request()
    for f in fields(GenerateRequest):
        assert getattr(back, f.name) == getattr(request, f.name), f.name


@pytest.mark.parametrize("kind", list(IMAGE_NOT_DEFAULT))
async def test_image_kinds_round_trip_through_the_form_field_by_field(idle_service, tmp_path, kind):
    request = image_request(kind)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        form = app.screen.form
        form.fill(request.to_dict(), kind=kind)
        await settle(pilot)
        back = form.read_request()
        assert type(back) is type(request)
        for f in fields(request):
            assert getattr(back, f.name) == getattr(request, f.name), f.name

        # The recorded hash goes with its path: another image is hashed anew when queued.
        form.query_one("#in-image", Input).value = "/photos/another.png"
        await pilot.pause()
        assert form.read_request().image_hash is None
        # A text-to-image request's parameters set the operation back to none.
        form.fill(GenerateRequest(**NOT_DEFAULT).to_dict(), kind="generate")
        assert type(form.read_request()) is GenerateRequest


def _app(tmp_path, model: str | None) -> DreamttyApp:
    db = tmp_path / "queue.sqlite3"
    service = Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))
    return DreamttyApp(model=model, out=tmp_path / "out", client=LocalClient(service))


@pytest.mark.parametrize("default_model, model, preset, expected", [
    ("demo-xl", None, None, ("demo-xl", None)),  # the config's default
    ("demo-xl", None, "anime", ("cagliostrolab/animagine-xl-3.1", (832, 1216))),  # a preset beats the config
    ("demo-xl", "demo", "anime", ("demo", None)),  # the command line wins; the preset's size goes with its model
])
async def test_precedence_in_the_form(tmp_path, default_model, model, preset, expected):
    config_path().write_text(f"default_model: {default_model}\n" + (f"default_preset: {preset}\n" if preset else ""))
    app = _app(tmp_path, model)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        request = app.screen.form.read_request()
    size = (request.width, request.height)
    assert (request.model, size if expected[1] else None) == expected
    if expected[1] is None:
        assert size != (832, 1216)


async def test_a_job_queued_at_once_uses_the_default_preset(tmp_path, user_folder, monkeypatch):
    """ctrl+g pressed before the default preset (read in a thread after the first frame) is in the form
    waits for it: the job gets the preset's values, not the form's first ones."""
    import threading

    from backend.prompting import presets

    (user_folder("presets") / "mine.yaml").write_text("steps: 13\ncfg: 3.5\n")
    config_path().write_text("default_preset: mine\n")
    release, real = threading.Event(), presets.list_presets
    monkeypatch.setattr("tui.screens.generate_form.list_presets", lambda: (release.wait(10), real())[1])
    app = _app(tmp_path, "demo")
    async with app.run_test(size=(120, 40)) as pilot:  # (pilot.press would wait for the blocked thread)
        await asyncio.wait_for(app.screen.form_mounted.wait(), 10)  # the form, not yet ready
        app.screen.form.query_one("#prompt", TextArea).text = "a fox"
        app.action_generate()  # ctrl+g at once
        await asyncio.sleep(0.3)
        assert await app.client.jobs() == []  # still waiting for the preset
        release.set()
        await settle(pilot)
        [job] = await app.client.jobs()
    assert (job.request["steps"], job.request["cfg"], job.request["preset"]) == (13, 3.5, "mine")


def test_loaded_steps_pick_a_performance_only_where_it_gives_them():
    """An 8-step DPM++ image is not "Extreme speed" (which is 8 LCM steps at CFG 1)."""
    from textual.widgets import Select

    from tui.screens.generate_form import performance_of

    assert performance_of({"steps": 8, "sampler": "dpmpp_2m", "cfg": 7.0}) is Select.NULL
    assert performance_of({"steps": 8, "sampler": "lcm"}) == "extreme"
    assert performance_of({"steps": 30, "sampler": "euler_a"}) == "speed"
    assert performance_of({"steps": 31}) is Select.NULL
