"""One request builder: defaults < config defaults < preset < explicit, for the CLI's flags and a form's text."""

from __future__ import annotations

import json
import re

import pytest

from backend import config, request_builder
from backend.config import config_path
from backend.errors import RequestError
from backend.jobkinds.upscale import UpscaleRequest
from tui import cli, cli_jobs


def _config(text: str) -> None:
    config_path().write_text(text)


@pytest.fixture
def _cli(monkeypatch):
    """``dreamtty generate ARGV``, all the way through ``main``, stopping at the request it would queue."""
    seen = []
    monkeypatch.setattr(cli_jobs, "cmd_generate", lambda args: seen.append(cli_jobs.request_from_args(args)))

    def run(*argv: str):
        assert cli.main(["generate", *argv]) == 0
        return seen.pop()

    return run


# (config default_model, argv) -> (model, width, height): the whole precedence table.
TABLE = [
    (None, [], ("demo", None, None)),  # the request's own default
    ("demo-xl", [], ("demo-xl", None, None)),  # the config's default
    ("demo-xl", ["--preset", "anime"], ("cagliostrolab/animagine-xl-3.1", 832, 1216)),  # a preset beats the config
    (None, ["--preset", "anime", "--model", "demo"], ("demo", None, None)),  # explicit wins; the preset's size goes with its model
    (None, ["--preset", "anime", "--size", "64x96"], ("cagliostrolab/animagine-xl-3.1", 64, 96)),
    ("demo-xl", ["--model", "demo", "--size", "64x64"], ("demo", 64, 64)),
]


@pytest.mark.parametrize("default_model, argv, expected", TABLE)
def test_precedence_in_the_cli(default_model, argv, expected, _cli):
    _config(f"default_model: {default_model}\n" if default_model else "{}\n")
    request = _cli("a fox", *argv)
    assert (request.model, request.width, request.height) == expected


@pytest.mark.parametrize("default_model, argv, expected", TABLE)
def test_the_builder_gives_the_cli_and_a_form_the_same_request(default_model, argv, expected, _cli):
    """The same inputs as a form holds them (texts) build the very request the flags build."""
    _config(f"default_model: {default_model}\n" if default_model else "{}\n")
    flags = dict(zip(argv[::2], argv[1::2]))
    form = {"prompt": "a fox", "model": flags.get("--model"), "size": flags.get("--size")}
    assert request_builder.build(form, flags.get("--preset")) == _cli("a fox", *argv)


def test_guidance_and_loras_from_text():
    request = request_builder.build({"loras": "fox:0.5, org/hub-lora", "guidance": {"sag": "0.5", "freeu": "default",
                                                                                     "adm_scale": ""}})
    assert request.loras == [("fox", 0.5), ("org/hub-lora", 1.0)]
    assert (request.guidance.sag, request.guidance.freeu, request.guidance.adm_scale) == (0.5, (), None)
    assert request_builder.build({}, preset="fast").loras  # the preset's LCM LoRA
    assert request_builder.build({"loras": [" None"]}, preset="fast").loras == []  # --lora none: not even those


def test_a_comma_in_a_loras_name_is_written_escaped_in_the_forms_one_text_and_read_back():
    """The form read "style, v2:0.5" as two LoRAs, "style" and "v2" (an image's parameters loaded into it too)."""
    loras = [("style, v2", 0.5), ("fox", 1.0), ("a,b,", 0.25)]
    text = request_builder.loras_text(loras)
    assert text == "style\\, v2:0.5, fox:1, a\\,b\\,:0.25"
    assert request_builder.build({"loras": text}).loras == loras


@pytest.mark.parametrize("values, error", [
    ({"loras": "fox:lots"}, "lora: 'fox:lots': weight must be a number"),
    ({"loras": "fox:1_0"}, "lora: 'fox:1_0': weight must be a number"),  # not 10
    ({"loras": ["ink:nan"]}, "lora: 'ink:nan': weight must be a finite number, -2..2"),  # "loras: nan is not ..."
    ({"loras": [":0.5"]}, "lora: ':0.5': the name is empty"),  # "lora:  not found"
    ({"loras": ["none", "ink"]}, "lora: none (no LoRAs at all) cannot go with other LoRAs"),
    ({"size": "64×"}, "size: '64×' is not WxH"),
    ({"guidance": {"sag": "much"}}, "sag: 'much' is not a number"),
    ({"guidance": {"clip_skip": "1.5"}}, "clip_skip: '1.5' is not a whole number"),
    ({"guidance": {"freeu": "1,x"}}, "freeu: '1,x' is not a comma-separated list of numbers"),
])
def test_bad_text_is_a_one_line_error_naming_the_field(values, error):
    with pytest.raises(RequestError) as caught:
        request_builder.build(values)
    assert str(caught.value).startswith(error)


def test_off_turns_a_presets_list_controls_off(_cli, user_folder):
    (user_folder("presets") / "xl.yaml").write_text("model: demo-xl\nguidance: {adm_scale: [1.5, 0.8, 0.3], "
                                                     "freeu: [0.9, 0.2, 1.3, 1.4]}\n")
    assert _cli("x", "--preset", "xl").guidance.adm_scale == (1.5, 0.8, 0.3)
    request = _cli("x", "--preset", "xl", "--adm-scale", "off", "--freeu", "OFF", "--model", "demo")
    assert (request.guidance.adm_scale, request.guidance.freeu) == (None, None)
    request.resolved("sd1")  # an SD1 model takes it: no SDXL-only control is left on
    assert request_builder.build({"guidance": {"freeu": " off "}}, preset="xl").guidance.freeu is None  # the form


def test_controls_that_cannot_run_together_say_where_the_one_not_given_came_from(_cli, user_folder):
    """--pag with a preset's perp_neg: "pag: cannot be combined with perp_neg", and the user had never set it."""
    (user_folder("presets") / "mine.yaml").write_text("guidance: {perp_neg: 1.5}\n")
    why = r"^pag: cannot be combined with perp_neg \(.*\); set one of them to 0 "
    with pytest.raises(RequestError, match=why + r"\(perp_neg comes from preset mine\)$"):
        request_builder.build({"guidance": {"pag": "1"}}, "mine")
    with pytest.raises(RequestError, match=why + r"\(perp_neg comes from the input image's settings\)$"):
        request_builder.build({"guidance": {"pag": "1"}}, source={"guidance": {"perp_neg": 1.5}}, defaults={})
    config_path().write_text("default_preset: mine\n")
    with pytest.raises(RequestError, match=why + r"\(perp_neg comes from the config's default_preset mine\)$"):
        request_builder.build({"guidance": {"pag": "1"}})
    both = request_builder.build({"guidance": {"pag": "1", "perp_neg": "1"}}, defaults={})  # the service says it
    assert (both.guidance.pag, both.guidance.perp_neg) == (1.0, 1.0)
    assert _cli("x", "--preset", "mine", "--pag", "1", "--perp-neg", "0").guidance.pag == 1.0
    needs = r"^perp_neg: needs cfg > 1 \(.*\); raise cfg or set perp_neg to 0 "  # no word of where it came from
    with pytest.raises(RequestError, match=needs + r"\(perp_neg comes from preset mine\)$"):
        request_builder.build({"cfg": "1"}, "mine")
    with pytest.raises(RequestError, match=needs + r"\(perp_neg comes from the config's default_preset mine\)$"):
        request_builder.build({"cfg": "1"})
    assert request_builder.build({"cfg": "1", "guidance": {"perp_neg": "1"}}, defaults={}).cfg == 1.0  # given


def test_the_upscaler_alone_refuses_a_strength_it_would_not_use():
    with pytest.raises(RequestError, match="^strength: is unused with fast"):
        request_builder.build({"image": "in.png", "fast": True, "strength": "0.3"}, kind=UpscaleRequest)
    assert request_builder.build({"image": "in.png", "fast": False, "strength": "0.3"}, kind=UpscaleRequest).strength
    assert request_builder.build({"image": "in.png", "fast": True, "strength": ""}, kind=UpscaleRequest).fast


def test_source_image_layer_sits_between_config_defaults_and_a_preset(tmp_path):
    """A job on an image: its settings < --preset < explicit; a new seed; the size from the image."""
    from PIL import Image

    from backend import metadata
    from backend.jobkinds.img2img import Img2ImgRequest
    from backend.guidance_settings import GuidanceSettings
    from backend.outputs import save_image
    from backend.request import GenerateRequest

    _config("default_model: demo-xl\n")
    made = GenerateRequest(prompt="a red fox", model="demo", steps=12, cfg=4.0, seed=9, styles=["Watercolor"],
                           guidance=GuidanceSettings(sag=0.5, sharpness=2.0)).resolved("demo").to_dict()
    path = save_image(Image.new("RGB", (128, 128)), {"kind": "generate", "family": "demo", "request": made,
                                                    "prompt": {}}, tmp_path)
    source, warnings = request_builder.source_settings(path)
    assert warnings == [] and {"seed", "width", "height", "count", "index"}.isdisjoint(source)
    values = {"image": str(path), "guidance": {"sag": "1.5"}}
    request = request_builder.build(values, kind=Img2ImgRequest, source=source)
    assert (request.model, request.prompt, request.steps, request.cfg, request.styles) == ("demo", "a red fox", 12, 4.0, ["Watercolor"])
    assert (request.guidance.sag, request.guidance.sharpness) == (1.5, 2.0)  # merged control by control
    assert (request.seed, request.width) == (-1, None)
    with_preset = request_builder.build(values, "anime", Img2ImgRequest, source=source)
    assert with_preset.model == "cagliostrolab/animagine-xl-3.1" and with_preset.width is None  # not the preset's size
    assert request_builder.source_settings(tmp_path / "none.png") == ({}, [])
    assert metadata.read(path)["request"]["seed"] == 9
    from PIL.PngImagePlugin import PngInfo

    info, broken = PngInfo(), tmp_path / "broken.png"
    info.add_text(metadata.CHUNK, json.dumps({**metadata.read(path), "request": {**made, "steps": "abc"}}))
    Image.new("RGB", (128, 128)).save(broken, pnginfo=info)
    source, warnings = request_builder.source_settings(broken)  # all its settings, the prompt too, were dropped
    assert (source["prompt"], source["steps"], warnings) == ("a red fox", "abc", [])
    with pytest.raises(RequestError, match=r"^steps: 'abc' is not a whole number \(the setting of the input image "):
        request_builder.build({"image": str(broken)}, kind=Img2ImgRequest, source=source)
    given = request_builder.build({"image": str(broken), "steps": "3"}, kind=Img2ImgRequest, source=source)
    assert (given.prompt, given.steps) == ("a red fox", 3)  # a value given overrides it
    info, unknown = PngInfo(), tmp_path / "unknown.png"
    info.add_text(metadata.CHUNK, json.dumps({"version": 99, "request": made}))  # what no field of it reads as
    Image.new("RGB", (128, 128)).save(unknown, pnginfo=info)
    source, warnings = request_builder.source_settings(unknown)
    assert source == {} and warnings[0].endswith("(a newer one wrote it?); its settings are not used")
    for odd in ({"guidance": "abc"}, {"sampler": ["euler"]}):  # what layering them raised on: a traceback
        info = PngInfo()
        info.add_text(metadata.CHUNK, json.dumps({**metadata.read(path), "request": {**made, **odd}}))
        Image.new("RGB", (128, 128)).save(unknown, pnginfo=info)
        source, warnings = request_builder.source_settings(unknown)
        assert source == {} and warnings[0].endswith("; its settings are not used"), odd
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert request_builder.source_settings(plain) == ({}, [])


@pytest.mark.parametrize("explicit, expected", [
    ({"sampler": "euler_a"}, ("euler_a", None)),  # karras does not work with euler_a: its own default
    ({"sampler": "euler"}, ("euler", "karras")),  # it does with euler: kept
    ({"sampler": "euler_a", "scheduler": "normal"}, ("euler_a", "normal")),
    ({"scheduler": "exponential"}, ("dpmpp_2m", "exponential")),
])
def test_a_sampler_given_over_a_sources_drops_a_schedule_that_does_not_work_with_it(explicit, expected):
    source = {"model": "demo", "sampler": "dpmpp_2m", "scheduler": "karras"}  # as an image's metadata records it
    request = request_builder.build(explicit, defaults={}, source=source)
    assert (request.sampler, request.scheduler) == expected
    request.resolved("demo")  # a schedule the sampler takes


def test_a_style_is_chosen_once():
    with pytest.raises(RequestError, match="^styles: 'watercolor' is given twice$"):
        request_builder.build({"styles": ["Watercolor", "watercolor"]})
    assert request_builder.build({"styles": ["Random Style", "random style"]}).styles  # a pick each


def test_the_configs_default_preset_applies_unless_a_preset_is_named(_cli, tmp_path, capsys, monkeypatch):
    """As in the TUI's form: the config's default preset beats its default model; a named preset replaces
    it; a job on an image keeps the image's own settings over it; a name that is no preset is said once."""
    from PIL import Image

    from backend.jobkinds.img2img import Img2ImgRequest
    from backend.outputs import save_image
    from backend.request import GenerateRequest

    _config("default_model: demo-xl\ndefault_preset: anime\n")
    request = _cli("a fox")
    assert (request.model, request.width, request.steps, request.preset) == ("cagliostrolab/animagine-xl-3.1", 832, 28,
                                                                             "anime")
    assert request.guidance.clip_skip == 2 and request.styles == ["Anime", "Clean Negative"]
    mine = _cli("a fox", "--model", "demo")  # the preset's size goes with its model
    assert (mine.model, mine.width, mine.steps) == ("demo", None, 28)
    fast = _cli("a fox", "--preset", "fast")
    assert (fast.preset, fast.steps, fast.styles, fast.guidance.clip_skip) == ("fast", 6, [], 1)  # nothing of anime

    made = GenerateRequest(prompt="a red fox", model="demo", steps=12, seed=9).resolved("demo").to_dict()
    path = save_image(Image.new("RGB", (128, 128)), {"kind": "generate", "family": "demo", "request": made,
                                                    "prompt": {}}, tmp_path)
    source, _ = request_builder.source_settings(path)
    on_image = request_builder.build({"image": str(path)}, kind=Img2ImgRequest, source=source)
    assert (on_image.model, on_image.steps, on_image.width, on_image.styles) == ("demo", 12, None, [])  # its own

    _config("default_model: demo-xl\ndefault_preset: '[red]nope'\n")
    capsys.readouterr()
    assert (_cli("a fox").model, _cli("a fox").preset) == ("demo-xl", None)
    assert capsys.readouterr().err.splitlines() == [f"dreamtty: config: default_preset of {config_path()}: unknown "
                                                    "'[red]nope'; allowed: anime, default, fast, realistic, sd15; "
                                                    "no preset is applied"] * 2
    monkeypatch.setenv("DREAMTTY_DEFAULT_PRESET", "nope")
    assert _cli("a fox").preset is None
    assert capsys.readouterr().err.startswith("dreamtty: config: DREAMTTY_DEFAULT_PRESET: unknown 'nope'")


def test_a_job_reads_the_default_preset_once(monkeypatch):
    """It was read three times: to see that it loads, to lay it, and to see that it loads again."""
    from backend.prompting import presets

    _config("default_preset: anime\n")
    read = []
    real = presets._read
    monkeypatch.setattr(presets, "_read", lambda file: read.append(file.label) or real(file))
    request = request_builder.build({"prompt": "a fox"})
    assert (request.preset, request.steps, len(read)) == ("anime", 28, 1)


def test_the_default_preset_leaves_an_init_images_size_and_describe_alone(tmp_path, monkeypatch):
    """``generate --init-image`` took the default preset's size and stretched the image; describe took its
    model (which picks the captioner) and recorded it."""
    from PIL import Image

    queued = []

    async def run_jobs(args, requests, out):
        queued.extend(requests)
        return 0, []

    monkeypatch.setattr(cli_jobs, "_run_jobs", run_jobs)
    monkeypatch.setattr(cli_jobs, "_fetch_if_missing", lambda request: None)
    Image.new("RGB", (96, 64)).save(tmp_path / "in.png")
    _config("default_model: demo-xl\ndefault_preset: anime\n")
    for argv in (["generate", "a fox", "--init-image", str(tmp_path / "in.png")], ["describe", str(tmp_path / "in.png")]):
        assert cli.main(argv) == 0
    init, described = queued
    assert (init.model, init.steps, init.width, init.height) == ("cagliostrolab/animagine-xl-3.1", 28, None, None)
    assert (described.model, described.preset) == ("demo-xl", None)
    _config("default_model: demo-xl\ndefault_preset: broken\n")
    from backend.prompting.datafiles import user_dir

    user_dir("presets").mkdir(parents=True, exist_ok=True)
    broken = user_dir("presets") / "broken.yaml"  # in the session's home: removed, or later tests list it
    broken.write_text("steps: 9999\n")
    try:  # said as an unknown name is, and not applied: a bad value in the config never stops a job
        assert request_builder.build({"prompt": "a fox"}).preset is None
        problem = request_builder.config_preset(config.load())
        assert problem[0] is None and re.fullmatch(
            rf"config: default_preset of {re.escape(str(config_path()))}: steps: in preset .*broken.yaml: 9999 is "
            r"out of range.*; no preset is applied", problem[1])
    finally:
        broken.unlink()
