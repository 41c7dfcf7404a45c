"""A1111's dialect: our ``parameters`` text as A1111 reads it, and other tools' images read into requests."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.numpy import save_file

from backend import config, foreign_metadata, library, metadata
from backend.errors import DreamttyError, RequestError
from backend.extras_check import prompt_loras, without_tags
from backend.guidance_settings import GuidanceSettings
from backend.request import GenerateRequest
from cli_helpers import dreamtty

LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"


# -- A1111's reading rules, re-implemented here from its documented behaviour ------------------
def a1111_read(text: str) -> dict[str, str]:
    """What A1111's PNG Info makes of a parameters text.

    Rules (A1111's docs and observed output): the text is trimmed and split into lines; the last line holds
    the parameters when it has at least three ``key: value`` items, else it is prompt text. Each other line
    is trimmed; from a line starting "Negative prompt:" on, lines belong to the negative prompt. A key
    starts with a word character and holds word characters, spaces, hyphens and slashes; a value is a
    JSON string in double quotes (unquoted with JSON's rules) or runs to the next comma.
    """
    *lines, last = text.strip().split("\n")
    params = _a1111_items(last)
    if len(params) < 3:
        lines, params = [*lines, last], {}
    prompt: list[str] = []
    negative: list[str] = []
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:"):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


def _a1111_items(line: str) -> dict[str, str]:
    items: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        match = re.compile(r"\s*(\w[\w \-/]+):\s*").match(line, i)
        if match is None:
            break
        key, i = match.group(1), match.end()
        if i < n and line[i] == '"':  # a quoted value: up to the quote no backslash escapes
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            items[key] = json.loads(line[i:j + 1])
            i = j + 1
        else:
            j = line.find(",", i)
            j = n if j < 0 else j
            items[key] = line[i:j]
            i = j
        i += 1 if i < n and line[i] == "," else 0
    return items


def _meta(record: dict | None = None, family: str = "demo", **kw) -> dict:
    request = GenerateRequest(**{"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7, **kw}).resolved(family)
    return metadata.build(request, family, record or {"positive": request.prompt, "negative": request.negative_prompt})


# -- writing ----------------------------------------------------------------------------------
def test_every_field_reads_back_with_a1111s_rules():
    typed = "a  red fox\n   on snow, (sharp:1.2)\n\nlast  line"
    meta = _meta({"positive": typed, "negative": "blurry, bad hands",
                  "loras": [{"name": "fox", "weight": 0.7, "hash": "abcdef0123"}]},
                 prompt=typed, negative_prompt="blurry, bad hands", sampler="dpmpp_2m_sde", scheduler="karras",
                 steps=12, cfg=6.5, width=96, height=64, model="my, model: v2", styles=["Watercolor", "Enhance"],
                 guidance=GuidanceSettings(clip_skip=2, freeu=(0.9, 0.2, 1.5, 1.6), sharpness=2.0))
    parsed = a1111_read(metadata.a1111_parameters(meta))
    assert parsed == {
        "Prompt": "a  red fox\non snow, (sharp:1.2)\n\nlast  line <lora:fox:0.7>",  # A1111 trims each line
        "Negative prompt": "blurry, bad hands",
        "Steps": "12", "Sampler": "DPM++ 2M SDE", "Schedule type": "Karras", "CFG scale": "6.5", "Seed": "7",
        "Size": "96x64", "Model": "my, model: v2", "Sharpness": "2.0", "FreeU": "(1.5, 1.6, 0.9, 0.2)",
        "Clip skip": "2", "Lora hashes": "fox: abcdef0123", "Styles": "Watercolor; Enhance", "Version": "dreamtty",
    }
    text = metadata.a1111_parameters(meta)
    assert 'FreeU: "(1.5, 1.6, 0.9, 0.2)"' in text and "Clip skip: 2" in text and "Clip Skip" not in text


@pytest.mark.parametrize("sampler,schedule,label,schedule_label", [
    ("dpmpp_2m", "normal", "DPM++ 2M", "Uniform"),  # A1111's Automatic would be Karras
    ("dpmpp_2m", "karras", "DPM++ 2M", "Karras"),
    ("dpmpp_2m_sde", "normal", "DPM++ 2M SDE", "Uniform"),  # A1111's Automatic would be Exponential
    ("dpmpp_2m_sde", "exponential", "DPM++ 2M SDE", "Exponential"),
    ("euler_a", "sgm_uniform", "Euler a", "SGM Uniform"),
    ("pndm", "normal", "PLMS", "Uniform"),
    ("deis", "karras", "DEIS", "Karras"),  # A1111 has no DEIS, TCD or DDPM: our name, and the line still parses
    ("tcd", "normal", "TCD", "Uniform"),
    ("ddpm", "normal", "DDPM", "Uniform"),
])
def test_sampler_and_the_schedule_actually_used(sampler, schedule, label, schedule_label):
    parsed = a1111_read(metadata.a1111_parameters(_meta(sampler=sampler, scheduler=schedule)))
    assert (parsed["Sampler"], parsed["Schedule type"]) == (label, schedule_label)
    assert parsed["Version"] == "dreamtty" and parsed["Prompt"] == "a red fox"


def test_values_that_would_split_the_line_are_quoted():
    meta = _meta(model='C:\\models\\"odd", one.safetensors', family="demo-xl",
                 guidance=GuidanceSettings(adm_scale=(1.5, 0.8, 0.3)))
    text = metadata.a1111_parameters(meta)
    assert 'ADM Guidance: "(1.5, 0.8, 0.3)"' in text
    assert a1111_read(text)["Model"] == 'C:\\models\\"odd", one.safetensors'


def test_styles_are_written_as_applied():
    """A typed "two-prompts" or a Random Style was written as typed: A1111 would apply another style."""
    meta = _meta({"positive": "a red fox", "negative": "", "styles": ["Two Prompts", "Watercolor"]},
                 styles=["two-prompts", "Random Style"])
    assert a1111_read(metadata.a1111_parameters(meta))["Styles"] == "Two Prompts; Watercolor"


def test_freeu_family_defaults_are_written_as_numbers():
    assert 'FreeU: "(1.5, 1.6, 0.9, 0.2)"' in metadata.a1111_parameters(_meta(guidance=GuidanceSettings(freeu=())))


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["request"].pop("scheduler"), "KeyError: 'scheduler'"),
    (lambda m: m.update(prompt=[]), "AttributeError: "),
    (lambda m: m["request"].update(loras=[["x"]]), "ValueError: "),
    (lambda m: m["prompt"].update(image_prompts=[{"index": 3}]), "IndexError: "),  # no image_prompts[3]
])
def test_parameters_of_malformed_metadata_are_one_line(tmp_path, damage, words):
    """Metadata written by hand, or by another tool under our chunk's name, lacking or mistyping a field."""
    meta = _meta()
    damage(meta)
    info = PngInfo()
    info.add_text(metadata.CHUNK, json.dumps(meta))
    Image.new("RGB", (8, 8)).save(tmp_path / "odd.png", pnginfo=info)
    with pytest.raises(DreamttyError) as err:
        metadata.parameters_text(tmp_path / "odd.png")
    assert str(err.value).startswith(f"cannot show its parameters: {words}") and "\n" not in str(err.value)


def _lora_file(tmp_path: Path, monkeypatch, name: str, meta: dict | None = None) -> Path:
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    folder = config.default_folders("loras")[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({LORA_KEY: np.arange(4 * 768, dtype=np.float16).reshape(4, 768)}, str(path), metadata=meta)
    return path


def test_lora_tags_and_a1111_lora_hashes(tmp_path, monkeypatch):
    path = _lora_file(tmp_path, monkeypatch, "ink")
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    addnet = hashlib.sha256(data[8 + header:]).hexdigest()[:12]  # over the tensors only (kohya-ss's "addnet")
    assert library.lora_hash(path) == addnet
    lora = {"name": "ink", "weight": 0.5, "hash": library.short_hash(path), "a1111_hash": library.lora_hash(path)}
    record = {"positive": "a cat", "negative": "", "loras": [lora]}
    parsed = a1111_read(metadata.a1111_parameters(_meta(record)))
    assert parsed["Prompt"] == "a cat <lora:ink:0.5>" and parsed["Lora hashes"] == f"ink: {addnet}"

    stored = _lora_file(tmp_path, monkeypatch, "kohya", {"sshs_model_hash": "ab" * 32})
    assert library.lora_hash(stored) == "ab" * 6  # A1111 takes the trainer's stored hash first
    older = _meta({**record, "loras": [{"name": "ink", "weight": 1.0, "hash": "0000000000"}]})  # before a1111_hash
    assert a1111_read(metadata.a1111_parameters(older))["Lora hashes"] == "ink: 0000000000"


def test_lora_tags_leave_the_rest_of_the_prompt_as_typed():
    assert prompt_loras("a  cat\n  on snow ") == ("a  cat\n  on snow ", [])
    assert prompt_loras("a <lora:fox:0.3>  cat <lora:b>\n<lora:c:2> next") == (
        "a  cat\nnext", [("fox", 0.3), ("b", 1.0), ("c", 2.0)])
    text = "a <lora:fox:0.3>  cat <lora:b>\n  <lora:c:2> <lora:b> next\n<lora:b>"
    assert without_tags(text, lambda name: name == "b") == "a <lora:fox:0.3>  cat\n  <lora:c:2> next\n"
    assert without_tags(text, lambda name: name != "b") == "a  cat <lora:b>\n  <lora:b> next\n<lora:b>"
    assert without_tags("<lora:a> <lora:b> rest", lambda name: name == "a") == "<lora:b> rest"


@pytest.mark.parametrize("tag", ["<lora:fox:abc>", "<lora:>", "<lora:fox:0.5:0.2>"])
def test_a_lora_tag_written_wrong_is_a_one_line_error_not_prompt_text(tag):
    with pytest.raises(RequestError) as err:
        prompt_loras(f"a cat {tag}")
    assert err.value.field == "prompt" and tag in str(err.value) and "<lora:NAME:WEIGHT>" in str(err.value)


def test_cli_records_the_prompt_as_typed_and_reproduces_pasted_text(tmp_path, demo_dirs, capsys):
    typed = "a  red fox\n\non   snow"
    r = dreamtty(capsys, "generate", typed, "--model", "demo", "--seed", "3", "--steps", "2", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    assert metadata.read(path)["request"]["prompt"] == typed
    assert a1111_read(Image.open(path).text["parameters"])["Prompt"] == typed

    pasted = A1111_TEXT.replace("VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, ", "")  # no such VAE here
    r = dreamtty(capsys, "reproduce", "--from-text", "-", "--model", "demo", "--out", str(tmp_path / "b"),
                 stdin=pasted)
    assert r.returncode == 0, r.stderr
    assert "warning: made by A1111 v1.10.1" in r.stderr and "Denoising strength: 0.4" in r.stderr
    again = metadata.read(r.stdout.strip().splitlines()[-1])["request"]
    assert (again["sampler"], again["scheduler"], again["steps"], again["seed"]) == ("dpmpp_2m", "karras", 3, 1234567)

    ours = Image.open(path).text["dreamtty"]  # an image's own metadata, pasted: that request, not Fooocus's
    r = dreamtty(capsys, "reproduce", "--from-text", "-", "--out", str(tmp_path / "c"), stdin=ours)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert np.array_equal(np.asarray(Image.open(r.stdout.strip().splitlines()[-1])), np.asarray(Image.open(path)))


# -- reading other tools' parameters ------------------------------------------------------------
A1111_TEXT = """masterpiece, a  red fox, (snow:1.2) <hypernet:old:1>
second line
Negative prompt: blurry, lowres
Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, Size: 64x64, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, Clip skip: 2, \
Denoising strength: 0.4, Hires upscale: 1.5, Hires upscaler: Latent, Version: v1.10.1
"""

FOOOCUS_JSON = {
    "adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion", "base_model_hash": "aeb7e9e689",
    "clip_skip": 2, "freeu": "(1.01, 1.02, 0.99, 0.95)", "full_negative_prompt": ["(worst quality:1.4)", "blurry"],
    "full_prompt": ["a red fox in the snow", "cinematic still, a red fox, highly detailed"], "guidance_scale": 4,
    "lora_combined_1": "sd_xl_offset_example-lora_1.0 : 0.1", "metadata_scheme": "fooocus", "negative_prompt": "",
    "performance": "Speed", "prompt": "a red fox in the snow", "prompt_expansion": "a red fox in the snow, detailed",
    "refiner_model": "None", "refiner_switch": 0.5, "resolution": "(1152, 896)", "sampler": "dpmpp_2m_sde_gpu",
    "scheduler": "karras", "seed": "1234567890123", "sharpness": 2, "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']", "vae": "Default (model)",
    "refiner_swap_method": "joint", "version": "Fooocus v2.5.5",
}

FOOOCUS_TEXT = """a red fox in the snow, cinematic still
Negative prompt: blurry
Steps: 30, Sampler: DPM++ 2M SDE Karras, Seed: 42, Size: 1152x896, CFG scale: 4, Sharpness: 2, \
ADM Guidance: "(1.5, 0.8, 0.3)", Model: juggernautXL_v8Rundiffusion, Model hash: aeb7e9e689, Performance: Speed, \
Scheduler: sgm_uniform, VAE: Default (model), Raw prompt: a red fox in the snow, \
Lora hashes: "sd_xl_offset_example-lora_1.0: 4852686128", Lora weights: "sd_xl_offset_example-lora_1.0: 0.1", \
Version: Fooocus v2.5.5
"""


def test_a1111_text_becomes_the_closest_request():
    request, warnings = foreign_metadata.from_text(A1111_TEXT)
    assert request == GenerateRequest(
        prompt="masterpiece, a  red fox, (snow:1.2)\nsecond line", negative_prompt="blurry, lowres",
        model="sd_xl_base_1.0", sampler="dpmpp_2m", scheduler="karras", steps=3, cfg=6.5, width=64, height=64,
        seed=1234567, vae="sdxl_vae.safetensors", guidance=GuidanceSettings(clip_skip=2))
    assert warnings == [
        "made by A1111 v1.10.1: the request is the closest dreamtty has; its pixels will differ from the "
        "original's (other samplers, noise and encoders)",
        "not carried over: <hypernet:old:1> (not supported); Denoising strength: 0.4; Hires upscale: 1.5; "
        "Hires upscaler: Latent",
    ]


def test_dreamtty_syntax_in_another_tools_prompt_is_said_and_a_reproduce_blames_no_file():
    """``__pet__`` and ``[[a, b]]`` in an A1111 prompt were text and a down-weight there, a wildcard and an array here:
    the request changed the prompt without a word; and a reproduce of such an image (no dreamtty record) said its
    prompt differed because "a style or wildcard file changed since"."""
    text = "a fox __pet__ [[a, b]]\nNegative prompt: [[blurry, lowres]]\nSteps: 2, Seed: 1, Size: 64x64, Model: demo"
    _, warnings = foreign_metadata.from_text(text)
    assert warnings[-2:] == [
        "prompt: __pet__, [[a, b]] is read as a wildcard or an array here, not as A1111 read it: the prompt made "
        "differs from the image's",
        "negative_prompt: [[blurry, lowres]] is read as a wildcard or an array here, not as A1111 read it: the prompt "
        "made differs from the image's"]
    assert not any("wildcard" in w for w in foreign_metadata.from_text(A1111_TEXT)[1])
    assert metadata.prompt_change({}, {"positive": "a fox", "negative": ""}) is None
    assert metadata.prompt_change({"positive": "a cat"}, {"positive": "a fox"}).startswith("the final prompt differs")


def test_a_reproduce_names_a_lora_whose_file_changed_and_says_it_on_one_line(tmp_path):
    """It said only "pixels: differ (max difference 220/255)": the LoRA hash recorded was never compared."""
    from tui.cli_jobs import _pixels_line

    def record(name: str, digest: str) -> dict:
        return {"positive": "a fox", "negative": "", "loras": [{"name": name, "weight": 0.7, "hash": digest}]}

    then, now = record("fox", "aaaaaaaaaa"), record("fox", "bbbbbbbbbb")
    said = "LoRA fox: its file changed since (hash bbbbbbbbbb, the image's aaaaaaaaaa)"
    assert metadata.prompt_change(then, now) == said
    assert metadata.prompt_change(then, then) is None
    assert metadata.prompt_change({**then, "loras": [{"name": ["fox"]}, 5]}, now) is None  # nothing it can compare
    request = GenerateRequest(prompt="a fox", seed=1).resolved("demo")
    made = tmp_path / "made.png"
    meta = metadata.build(request, "demo", record("fox\x1b[2J\nx", "bbbbbbbbbb"))
    Image.new("RGB", (8, 8), (9, 9, 9)).save(made, pnginfo=metadata.png_info(meta))
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    assert _pixels_line(tmp_path / "image.png", made, record("fox\x1b[2J\nx", "aaaaaaaaaa")) == (
        "pixels: differ (max difference 9/255): LoRA fox\\x1b[2J\\nx: its file changed since (hash bbbbbbbbbb, the "
        "image's aaaaaaaaaa)")


def test_a_reproduce_names_the_model_file_that_changed_or_stood_in():
    """Only LoRA hashes were compared: a VAE, refiner, upscaler, embedding or image-prompt model whose file changed,
    or another ControlNet picked on this machine, left "pixels: differ" unexplained."""
    ref = {"index": 1, "type": "canny", "model": "canny-a", "hash": "c1", "preprocessor": "canny"}
    adapter = {"index": 0, "type": "face", "model": "face", "hash": "f1", "encoder": {"name": "vit-h", "hash": "e1"}}
    then = {"positive": "a fox", "negative": "", "vae": {"name": "vae", "hash": "v1"}, "image_prompts": [adapter, ref],
            "upscaler": {"name": "4x", "hash": "u1"}, "embeddings": [{"name": "easyneg", "hash": "n1"}]}
    assert metadata.prompt_change(then, then) is None
    cases = [
        ({"vae": {"name": "vae", "hash": "v2"}}, "VAE: its file changed since (hash v2, the image's v1)"),
        ({"upscaler": {"name": "2x", "hash": "u2"}}, "upscaler: 2x (hash u2) stood in for the image's 4x (hash u1)"),
        ({"embeddings": [{"name": "easyneg", "hash": "n2"}]},
         "embedding easyneg: its file changed since (hash n2, the image's n1)"),
        ({"image_prompts": [adapter, {**ref, "model": "canny-b", "hash": "c2"}]},
         "image prompt 2's ControlNet: canny-b (hash c2) stood in for the image's canny-a (hash c1)"),
        ({"image_prompts": [{**adapter, "encoder": {"name": "vit-h", "hash": "e2"}}, ref]},
         "image prompt 1's image encoder: its file changed since (hash e2, the image's e1)"),
    ]
    for changes, said in cases:
        assert metadata.prompt_change(then, {**then, **changes}) == said
    damaged = {**then, "image_prompts": [{**ref, "index": "1"}, {**ref, "type": ["canny"]}, 3]}  # edited by hand
    assert metadata.prompt_change(damaged, {**then, "image_prompts": [adapter, {**ref, "hash": "c2"}]}) is None


@pytest.mark.parametrize("fields,sampler,schedule,unmapped", [
    ("Sampler: DPM++ 2M SDE, Version: v1.10.1", "dpmpp_2m_sde", "exponential", None),  # A1111's Automatic
    ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpmpp_2m", "karras", None),
    ("Sampler: DPM++ 2M, Version: v1.6.0", "dpmpp_2m", "normal", None),  # before v1.9: no schedule = uniform
    ("Sampler: DPM++ 2M Karras", "dpmpp_2m", "karras", None),
    ("Sampler: Euler a, Schedule type: Uniform", "euler_a", "normal", None),
    ("Sampler: PLMS", "pndm", "normal", None),
    ("Sampler: DPM++ 3M SDE Exponential", "dpmpp_2m", "exponential", "Sampler: DPM++ 3M SDE (none here"),
    ("Sampler: Euler a, Schedule type: Karras", "euler_a", None, "Schedule type: karras (does not work with Euler a)"),
    ("Sampler: Euler, Schedule type: Beta", "euler", None, "Schedule type: Beta (none here)"),
])
def test_sampler_names_and_schedules_map_to_ours(fields, sampler, schedule, unmapped):
    request, warnings = foreign_metadata.from_text(f"a cat\nSteps: 20, {fields}, Seed: 1, Model: m")
    assert (request.sampler, request.scheduler) == (sampler, schedule)
    assert (unmapped is None) == (len(warnings) == 1)
    assert unmapped is None or unmapped in warnings[1]


def test_fooocus_json_becomes_the_closest_request():
    request, warnings = foreign_metadata.from_text(json.dumps(FOOOCUS_JSON))
    assert request == GenerateRequest(
        prompt="a red fox in the snow, cinematic still, a red fox, highly detailed",
        negative_prompt="(worst quality:1.4), blurry", model="juggernautXL_v8Rundiffusion", sampler="dpmpp_2m_sde",
        scheduler="karras", steps=30, cfg=4.0, width=1152, height=896, seed=1234567890123 % 2**32,
        loras=[("sd_xl_offset_example-lora_1.0", 0.1)], refiner_switch=0.5,
        guidance=GuidanceSettings(sharpness=2.0, adaptive_cfg=7.0, adm_scale=(1.5, 0.8, 0.3),
                                  freeu=(0.99, 0.95, 1.01, 1.02), clip_skip=2))
    assert warnings[0].startswith("made by Fooocus v2.5.5: ")
    assert warnings[1] == ("not carried over: Seed: 1234567890123 (outside 0..4294967295; using 1912276171); "
                           "Refiner Swap Method: joint")


@pytest.mark.parametrize("fields, prompt, kept, unread", [
    ({"loras": 5}, "a fox", [], "loras: 5 (not a [name, weight] pair)"),  # was a TypeError: the TUI quit on F7
    ({"loras": True}, "a fox", [], "loras: true (not a [name, weight] pair)"),
    ({"loras": "[bold]x"}, "a fox", [], 'loras: "[bold]x" (not a [name, weight] pair)'),
    ({"loras": [["a", 0.5], {"b": 1}]}, "a fox", [("a", 0.5)], 'loras: {"b": 1} (not a [name, weight] pair)'),
    ({"prompt": {"text": "a fox"}}, "", [], 'prompt: {"text": "a fox"} (not a text or a list of texts)'),
    ({"resolution": "garbage"}, "a fox", [], "Size: garbage ('garbage' is not WxH"),  # was "Size:  ('' is not"
])
def test_fooocus_json_of_other_shapes_is_read_with_what_was_left_out_said(fields, prompt, kept, unread):
    """Any JSON may be pasted or saved in a PNG: what is not Fooocus's shape is named, not a traceback."""
    request, warnings = foreign_metadata.from_text(json.dumps({"prompt": "a fox", "base_model": "demo", **fields}))
    assert (request.prompt, request.loras) == (prompt, kept)
    assert unread in warnings[-1] and warnings[-1].startswith("not carried over: ")


def test_a_random_seed_is_drawn_and_a_bad_recorded_value_is_said_to_be_recorded(tmp_path, capsys):
    """Fooocus's seed -1 became 4294967295; A1111's Steps: -5 stopped reproduce without a word of where it came
    from (dreamtty's own metadata errors say so). A size or a guidance control out of range is left out, said, as
    a step count is (they stopped it)."""
    from tui.cli import main

    request, warnings = foreign_metadata.from_text(json.dumps({**FOOOCUS_JSON, "seed": "-1"}))
    assert request.seed == -1 and "Seed: -1 (random: a new seed is drawn)" in warnings[1]
    info, path = PngInfo(), tmp_path / "a1111.png"
    info.add_text("parameters", "a fox\nSteps: 5, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 68x64, Model: demo, "
                                "Clip skip: 0")
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    assert main(["reproduce", str(path), "--local", "--out", str(tmp_path / "out")]) == 0  # as Steps: -5 (below)
    assert ("not carried over: Size: 68x64 (68 is not allowed; a positive multiple of 8 up to 2048: the model's "
            "default size is used); Clip skip: 0 (0 is not allowed; use a whole number 1..12 (1 = last layer; a "
            "model's text encoder may allow fewer): the default is used)") in capsys.readouterr().err
    request, warnings = foreign_metadata.from_text("a fox\nSteps: -5, Sampler: Euler a, CFG scale: 99, Size: 64x64")
    assert (request.steps, request.cfg) == (GenerateRequest.steps, GenerateRequest.cfg)  # as F7 fills the form
    assert warnings[1].startswith("not carried over: Steps: -5 (out of range; allowed 1..500: the default is used); "
                                  "CFG scale: 99 (out of range; allowed 0..30: the default is used)")
    request, warnings = foreign_metadata.from_text('a fox\nSteps: 2, ADM Guidance: "(9, 0.8, 0.3)", Model: demo')
    assert request.guidance.adm_scale is None  # it stopped the reproduce: "adm_scale: ... is out of range"
    assert warnings[1] == ('not carried over: ADM Guidance: (9.0, 0.8, 0.3) (9,0.8,0.3 is out of range; allowed POS,NEG '
                           '0.1..3 and END 0..1: the default is used)')
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fine = tmp_path / "fine.png"
    good = PngInfo()
    good.add_text("parameters", "a fox\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: demo")
    Image.new("RGB", (64, 64)).save(fine, pnginfo=good)
    assert main(["reproduce", str(fine), "--local", "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"dreamtty: out: {blocker} is a file; give a folder"  # typed


def test_fooocus_a1111_text_uses_its_own_scheduler_and_lora_weights():
    request, warnings = foreign_metadata.from_text(FOOOCUS_TEXT)
    assert (request.sampler, request.scheduler, request.seed, request.cfg) == ("dpmpp_2m_sde", "sgm_uniform", 42, 4.0)
    assert request.loras == [("sd_xl_offset_example-lora_1.0", 0.1)] and request.prompt.endswith("cinematic still")
    assert request.guidance.adm_scale == (1.5, 0.8, 0.3) and request.guidance.adaptive_cfg == 7.0
    assert warnings == [warnings[0]] and warnings[0].startswith("made by Fooocus v2.5.5: ")


def test_our_own_text_reads_back_exactly():
    meta = _meta(sampler="heun", scheduler="exponential", steps=9, guidance=GuidanceSettings(clip_skip=3, sag=0.5))
    request, warnings = foreign_metadata.from_text(metadata.a1111_parameters(meta))
    assert warnings == []
    assert request == GenerateRequest.from_dict({**meta["request"], "count": 1})


def test_images_from_other_tools_load_with_warnings(tmp_path):
    a1111, fooocus = tmp_path / "a.png", tmp_path / "f.png"
    for path, chunks in ((a1111, {"parameters": A1111_TEXT}),
                         (fooocus, {"parameters": json.dumps(FOOOCUS_JSON), "fooocus_scheme": "fooocus"})):
        info = PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    request, warnings = metadata.image_request(a1111)
    assert request.model == "sd_xl_base_1.0" and len(warnings) == 2
    assert metadata.request_from_image(fooocus).sampler == "dpmpp_2m_sde"


BAD_TEXTS = [
    ("", "no parameters found"),
    ("just a prompt, no settings", "no parameters found"),
    ("Steps: 20, Sampler: Euler", "no parameters found"),  # two items: prompt text, as A1111 reads it
    ("{not json", "Fooocus metadata is not valid JSON"),
    ('{"a": ' * 100_000, "Fooocus metadata is nested too deeply"),
    ("[" * 100_000, "no parameters found"),
    ("x" * 1_000_001, "too long for a parameters text"),
    ("{}", "the JSON holds none of Fooocus's keys (prompt, steps, seed, resolution, ...)"),  # was read as Fooocus's
    ('{"foo": 1}', "the JSON holds none of Fooocus's keys"),
]


def test_reproduce_of_another_tools_image_leaves_out_the_loras_and_vae_not_here_saying_so(capsys, tmp_path):
    """A1111 text naming a LoRA this machine lacks could not be reproduced at all: "lora: foo not found", and
    reproduce has no flag that drops it."""
    text = ("a fox <lora:foo:0.7>, snow\n<lora:foo:0.7> second line\nNegative prompt: blurry <lora:bar:1>\n"
            "Steps: 2, Sampler: Euler a, Seed: 5, Size: 64x64, Model: demo, VAE: nothere.safetensors")
    r = dreamtty(capsys, "reproduce", "--from-text", "-", "--out", str(tmp_path), stdin=text)
    assert r.returncode == 0, r.stderr
    assert ("warning: not carried over: <lora:foo:0.7> (no LoRA foo here); <lora:bar:1> (no LoRA bar here); "
            "VAE: nothere.safetensors (not here; the model's own is used)") in r.stderr
    made = metadata.read(r.stdout.strip().splitlines()[-1])["request"]
    assert (made["prompt"], made["negative_prompt"], made["loras"], made["vae"]) == (
        "a fox, snow\nsecond line", "blurry", [], None)  # the lines as typed


def test_dreamtty_metadata_pasted_without_its_request_fields_is_refused():
    with pytest.raises(RequestError) as err:
        metadata.text_request('{"version": 1, "request": {}}', "from-text: pasted.txt")
    assert str(err.value) == ("from-text: pasted.txt has dreamtty metadata without prompt, model, seed: edited or "
                              "damaged; it cannot be reproduced")


@pytest.mark.parametrize("text,message", BAD_TEXTS)
def test_garbage_texts_are_one_line_errors(text, message):
    with pytest.raises(RequestError) as err:
        foreign_metadata.from_text(text, "from-text: pasted.txt")
    assert str(err.value).startswith("from-text: pasted.txt: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_field_values_are_listed_not_fatal():
    request, warnings = foreign_metadata.from_text("a\nSteps: many, Sampler: Euler, CFG scale: x, Size: big")
    assert request.steps is None and request.cfg == 7.0
    assert "Steps: many ('many' is not a whole number)" in warnings[1] and "Size: big" in warnings[1]
    # not "using demo": the model used is --model's, or the config's default for a job on the image
    assert warnings[1].endswith("; Model: not recorded (the default model is used unless one is given)")


def test_unreadable_images_and_deep_metadata_are_one_line_errors(tmp_path, capsys):
    for name, chunks, message in (
        ("none.png", {}, "has no dreamtty, A1111 or Fooocus metadata"),
        ("comfy.png", {"workflow": "{}"}, "holds a ComfyUI workflow"),
        ("deep.png", {"dreamtty": "[" * 100_000}, "has corrupt dreamtty metadata"),
        ("deepf.png", {"parameters": "[" * 100_000, "fooocus_scheme": "fooocus"}, "nested too deeply"),
    ):
        info = PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        Image.new("RGB", (8, 8)).save(tmp_path / name, pnginfo=info)
        with pytest.raises(DreamttyError, match=message):
            metadata.image_request(tmp_path / name)
    r = dreamtty(capsys, "reproduce", str(tmp_path / "deep.png"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "corrupt dreamtty metadata" in r.stderr
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DreamttyError) as err:  # not PIL's "cannot identify image file <_io.BufferedReader ...>"
        metadata.image_request(tmp_path / "notes.png")
    assert str(err.value) == f"image: {tmp_path / 'notes.png'} is not an image PIL can read (PNG, JPEG, WebP, ...)"


def test_the_prompt_record_of_hand_edited_metadata_is_empty_and_its_request_one_line(tmp_path):
    for name, text in (("list.png", "[1, 2]"), ("text.png", '{"prompt": "a fox", "request": 3}')):
        info = PngInfo()
        info.add_text("dreamtty", text)
        Image.new("RGB", (8, 8)).save(tmp_path / name, pnginfo=info)
        image = metadata.ImageMetadata(tmp_path / name)
        assert image.ours and image.record() == {}
        with pytest.raises(DreamttyError, match=r"^image: .* has dreamtty metadata without a request$"):
            image.request()


@pytest.mark.parametrize("args,message", [
    ([], "reproduce: give an IMAGE or --from-text FILE"),
    (["x.png", "--from-text", "t.txt"], "reproduce: give an IMAGE or --from-text FILE"),
    (["--from-text", "/no/such.txt"], "from-text: /no/such.txt is missing\n"),
    (["--from-text", "GARBAGE"], "from-text: GARBAGE: no parameters found"),
    (["--from-text", "."], "from-text: . is a folder; give a text file (- reads standard input)\n"),
    (["--from-text", "latin1.txt"], "from-text: latin1.txt is not UTF-8 text\n"),  # Python's codec text, before
    (["--from-text", ""], "from-text: is empty; give a text file (- reads standard input)\n"),  # "  is missing"
    ([""], "argument image: is empty; give a value"),  # "image: . is a folder"
])
def test_cli_reproduce_bad_input_is_one_line(args, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "GARBAGE").write_bytes(b"\x00\x01 not parameters")
    (tmp_path / "latin1.txt").write_bytes("a caf\u00e9\nSteps: 20".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    r = dreamtty(capsys, "reproduce", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
