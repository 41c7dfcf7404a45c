"""Presets: shipped files, precedence (defaults < preset < explicit), user presets, save from a form."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
import yaml

from backend.errors import RequestError
from backend.families import FAMILIES
from backend.prompting.presets import is_preset, list_presets, load_preset, preset_fields, save_preset
from backend.request import GenerateRequest
from backend.request_builder import build


@pytest.fixture
def presets_dir(user_folder):
    return user_folder("presets")


def test_shipped_presets_build_valid_requests():
    names = {p.name for p in list_presets()}
    assert {"default", "sd15", "realistic", "anime", "fast"} <= names
    for name in names:
        request = GenerateRequest.from_dict({**preset_fields(name), "prompt": "a cat"})
        family = "sdxl" if name != "sd15" else "sd1"
        resolved = request.resolved(family)
        assert resolved.preset == name and resolved.model != "demo"
        assert resolved.width <= FAMILIES[family].max_side
    default = load_preset("default")
    assert default["expand"] is True and "xl" in default["model"]
    fast = load_preset("fast")
    assert fast["sampler"] == "lcm" and fast["steps"] <= 8 and 1.0 <= fast["cfg"] <= 2.0 and fast["loras"]


def test_precedence_defaults_then_preset_then_explicit():
    request = build({"prompt": "a cat", "steps": 12, "guidance": {"sag": 0.5}}, "anime", defaults={})
    assert request.steps == 12  # explicit beats preset (28)
    assert request.sampler == "euler_a" and request.cfg == 6.0  # preset beats defaults
    assert request.guidance.clip_skip == 2 and request.guidance.sag == 0.5  # guidance merged control by control
    assert request.refiner_switch == GenerateRequest().refiner_switch  # untouched: dataclass default
    assert (request.width, request.height) == (832, 1216)


def test_other_model_drops_the_presets_size():
    data = preset_fields("default", "demo-xl")
    assert "width" not in data and GenerateRequest.from_dict(data).resolved("demo-xl").width == 128
    assert "width" in preset_fields("default", load_preset("default")["model"])  # its own model: its size
    kept = build({"prompt": "x", "model": "demo-xl", "size": "256x192"}, "default", defaults={})
    assert (kept.width, kept.height) == (256, 192)


def test_a_preset_that_names_no_model_keeps_its_size_with_any_model(user_folder):
    """Its size was dropped, without a word, as soon as a model was named (--model, --demo)."""
    (user_folder("presets") / "small.yaml").write_text("size: 96x64\nsteps: 2\n")
    for model in ("demo", "demo-xl"):
        request = build({"prompt": "x", "model": model}, "small", defaults={})
        assert (request.width, request.height) == (96, 64), model


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(RequestError, match=r"^preset: unknown 'nope'; allowed: anime, default, fast"):
        load_preset("nope")


@pytest.mark.parametrize(
    "text,message",
    [
        ("stpes: 20\n", r"bad.yaml: unknown key 'stpes'; allowed: .*steps"),
        ("seed: 4\n", r"unknown key 'seed'"),
        ("steps: 20\ncfg: [1,\n", r"bad.yaml is not valid YAML at line \d+"),
        ("steps: 20\ncfg: 4\nsteps: 30\n", r"bad.yaml is not valid YAML at line 3 \(the key 'steps' is given twice\)$"),
        ("steps: 2024-01-01\n", r"^steps: in preset .*bad.yaml: '2024-01-01' is not a whole number"),
        ("guidance:\n  sharpnes: 2\n", r"^guidance: in preset .*bad.yaml: unknown control 'sharpnes'"),
        ("guidance:\n  sharpness: 99\n", r"^sharpness: in preset .*bad.yaml: 99.0 is out of range; allowed 0..30$"),
        ("guidance:\n  clip_skip: 0\n", r"^clip_skip: in preset .*bad.yaml: 0 is not allowed"),
        ("guidance:\n  freeu: [1, 2]\n", r"^freeu: in preset .*bad.yaml: 1,2 is not allowed; give 4 numbers"),
        ("styles: [Nope]\n", r"^styles: in preset .*bad.yaml: unknown 'Nope'"),
        ("styles: [Enhance, enhance]\n", r"^styles: in preset .*bad.yaml: 'enhance' is given twice$"),
        ("description: [1, 2]\n", r"^description: in preset .*bad.yaml: \[1, 2\] is not text$"),
        ("size: big\n", r"^size: in preset .*bad.yaml: 'big' is not WxH"),
        ("loras: [[a, b, c]]\n", r"^lora: in preset .*bad.yaml: \[\"a\", \"b\", \"c\"\] must be \[name, weight\] or "
                                r"'name:weight' \(weight a number, -2..2\)$"),
        ("loras: ['ink:1_0']\n", r"^lora: .*bad.yaml: 'ink:1_0' must be \[name, weight\]"),  # not 10, as --lora says
        ("loras: ['ink:\u0663']\n", r"^lora: .*bad.yaml: 'ink:\u0663' must be \[name, weight\]"),  # not 3
        ("sampler: foo\n", r"^sampler: in preset .*bad.yaml: unknown 'foo'; allowed: .*euler"),
        ("sampler: lcm\nscheduler: karras\n", r"^scheduler: in preset .*bad.yaml: 'karras' does not work with lcm"),
        ("steps: 0\n", r"^steps: in preset .*bad.yaml: 0 is out of range"),
        ("size: 65x64\n", r"^width: in preset .*bad.yaml: 65 is not allowed"),
        # a negative prompt, an empty LoRA name: listed usable, then an error at generate that named no preset
        ("negative_prompt: \"(bad\"\n", r"^negative_prompt: in preset .*bad.yaml: '\(' at column 1 is never closed"),
        ("negative_prompt: a AND b\n", r"^negative_prompt: in preset .*bad.yaml: 'AND' at column 3"),
        ("negative_prompt: __nosuch__\n", r"^negative_prompt: in preset .*bad.yaml: unknown wildcard __nosuch__"),
        ("loras: [['', 1]]\n", r"^lora: in preset .*bad.yaml: \[\"\", 1\]: the name is empty$"),
    ],
)
def test_bad_preset_files_are_one_line_errors(presets_dir, text, message):
    (presets_dir / "bad.yaml").write_text(text)
    with pytest.raises(RequestError, match=message) as err:
        load_preset("bad")
    assert "\n" not in str(err.value)
    listed = {p.name: p.description for p in list_presets()}["bad"]
    assert re.search(message.replace("^", "^\\(unusable: ").rstrip("$"), listed), listed
    assert not listed.startswith("(unusable: preset: ")  # the key it names (steps: ...), not "preset"


def test_a_preset_file_that_cannot_be_read_says_why_in_words(presets_dir):
    (presets_dir / "gone.yaml").symlink_to(presets_dir / "nowhere.yaml")
    (presets_dir / "latin.yaml").write_bytes(b"description: caf\xe9\n")
    for name, why in (("gone", "is missing"), ("latin", "is not UTF-8 text")):  # "cannot read: [Errno 2] No such"
        with pytest.raises(RequestError) as err:
            load_preset(name)
        assert str(err.value) == f"preset: {presets_dir / name}.yaml {why}"


def test_user_preset_overrides_shipped(presets_dir):
    (presets_dir / "anime.yml").write_text("description: mine\nsteps: 9\nsize: 640x512\nloras: ['style-lora:0.7']\n")
    info = {p.name: p for p in list_presets()}["anime"]
    assert info.description == "mine" and info.source.endswith("anime.yml")
    assert load_preset("anime") == {"steps": 9, "width": 640, "height": 512, "loras": [["style-lora", 0.7]]}


def test_a_user_preset_hidden_by_another_in_another_case_is_listed_as_such(presets_dir):
    """Good.yaml beside good.yaml: one was used, the other never appeared, without a word."""
    (presets_dir / "Good.yaml").write_text("steps: 3\n")
    (presets_dir / "good.yaml").write_text("steps: 5\n")
    listed = {p.name: p for p in list_presets()}
    assert listed["good"].usable and load_preset("GOOD")["steps"] == 5
    assert not listed["Good"].usable and listed["Good"].description == (
        f"(unusable: hidden by {presets_dir / 'good.yaml'}: preset names match in any case; rename one)")
    assert "fast" in listed and listed["fast"].usable  # a user file over a shipped one hides nothing of the user's


def test_preset_names_match_in_any_case(presets_dir):
    """A user's Fast.yaml stood beside the shipped fast, and --preset FAST was unknown."""
    (presets_dir / "Fast.yaml").write_text("steps: 4\n")
    names = [p.name for p in list_presets()]
    assert names.count("Fast") == 1 and "fast" not in names and is_preset(" FAST ")
    assert load_preset("FAST") == load_preset("fast") == {"steps": 4}
    assert preset_fields(" FAST ")["preset"] == "Fast"  # recorded as its file names it (the form's list has that)


def test_save_preset_round_trips_the_form(presets_dir):
    form = GenerateRequest(
        prompt="a cat", negative_prompt="blurry", model="demo-xl", sampler="euler", steps=12, cfg=4.5,
        width=192, height=128, seed=77, styles=["Watercolor"], expand=True, loras=[("x", 0.5)],
    )
    form.guidance.sharpness = 3.0
    path = save_preset("my-look", form.to_dict(), description="saved from the form")
    assert path == presets_dir / "my-look.yaml"
    saved = yaml.safe_load(path.read_text())
    assert saved["size"] == "192x128" and saved["guidance"] == {"sharpness": 3.0}
    assert "prompt" not in saved and "seed" not in saved
    again = build({"prompt": "a dog", "seed": 1}, "my-look", defaults={})
    assert again.to_dict() == {**form.to_dict(), "prompt": "a dog", "seed": 1, "preset": "my-look"}
    with pytest.raises(RequestError, match="name '../x' is not allowed"):
        save_preset("../x", form.to_dict())


def test_saving_over_a_fifo_is_refused_at_once_and_a_failed_save_keeps_the_old_preset(presets_dir, monkeypatch):
    """The TUI's save waits for this call: a FIFO named like the preset hung it, and a failed write could leave
    half a file."""
    form = GenerateRequest(prompt="a cat", model="demo", steps=12).to_dict()
    os.mkfifo(presets_dir / "piped.yaml")
    with pytest.raises(RequestError, match=rf"^preset: cannot save: {presets_dir}/piped.yaml is not a regular file; "
                                           r"move it away$"):
        save_preset("piped", form)  # the FIFO is never opened: this returns
    mine = save_preset("mine", form)
    before = mine.read_text()
    mine.chmod(0o444)  # the rename replaced a file its owner made read-only
    with pytest.raises(RequestError, match=rf"^preset: cannot save {presets_dir}/mine.yaml: is read-only$"):
        save_preset("mine", GenerateRequest(prompt="a dog", model="demo").to_dict())
    assert mine.read_text() == before
    mine.chmod(0o644)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the temp file was written: it goes, the old file stays
    with pytest.raises(RequestError, match=rf"^preset: cannot save {presets_dir}/mine.yaml: No space left on device$"):
        save_preset("mine", form)
    monkeypatch.undo()
    assert mine.read_text() == before and sorted(p.name for p in presets_dir.iterdir()) == ["mine.yaml", "piped.yaml"]


def test_the_cli_lists_and_shows_presets_as_data(presets_dir, capsys):
    from tui.cli import main

    (presets_dir / "mine.yaml").write_text('description: "red \\x1b[31m"\nsteps: 9\nsize: 640x512\n')
    (presets_dir / "bad.yaml").write_text("stpes: 9\n")
    (presets_dir / "wide.yaml").write_text("width: 1024\n")  # no height: "presets show" raised KeyError
    assert main(["presets", "list"]) == 0
    listed = dict((line.split(None, 1) + [""])[:2] for line in capsys.readouterr().out.splitlines())
    assert listed["mine"] == "red \\x1b[31m" and listed["bad"].startswith("(unusable: ") and "sd15" in listed
    assert main(["presets", "list", "--json"]) == 0  # a script tells the unusable ones without reading descriptions
    usable = {p["name"]: p["usable"] for p in json.loads(capsys.readouterr().out)}
    assert (usable["mine"], usable["bad"], usable["sd15"]) == (True, False, True)
    assert main(["presets", "show", "mine"]) == 0
    assert capsys.readouterr().out.split("\n")[1:] == ["steps:            9", "size:             640x512", ""]
    assert main(["presets", "show", "wide"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "width:            1024"
    assert main(["presets", "show", " ANIME ", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == "shipped:anime.yaml" and shown["fields"]["guidance"] == {"clip_skip": 2}
    assert shown["name"] == "anime"  # as its file names it, not as typed
    assert main(["presets", "show", "bad"]) == 2
    assert capsys.readouterr().err.startswith("dreamtty: preset: ") and main(["presets", "show", "nope"]) == 2


def test_unknown_preset_error_allows_only_usable_presets(presets_dir):
    """An unusable preset was listed among the allowed ones; choosing it only gave another error."""
    (presets_dir / "broken.yaml").write_text("steps: [oops\n")
    (presets_dir / "Loud.yaml").write_text("cfg: 99\n")
    with pytest.raises(RequestError) as err:
        load_preset("nope")
    allowed, _, unusable = err.value.message.partition("; unusable: ")
    assert "broken" not in allowed and "Loud" not in allowed and "anime" in allowed
    assert unusable == "Loud, broken"
    assert [p.name for p in list_presets() if not p.usable] == ["Loud", "broken"]


@pytest.mark.parametrize("stem", ["ev\x1b[31mil [b]\n", " lead", "trail\t"])
def test_a_preset_named_with_white_space_at_an_end_is_listed_unusable_and_never_allowed(presets_dir, stem):
    """Its name was listed as allowed in the very error that refused it (a name given is stripped)."""
    (presets_dir / f"{stem}.yaml").write_text("steps: 3\n")
    [listed] = [p for p in list_presets() if p.name == stem]
    assert not listed.usable and listed.description == (
        "(unusable: its name starts or ends with white space, which a preset's name is read without; rename it)")
    assert not is_preset(stem)
    with pytest.raises(RequestError) as err:
        load_preset(stem)
    allowed, _, unusable = err.value.message.partition("; allowed: ")[2].partition("; unusable: ")
    assert stem not in allowed.split(", ") and unusable == stem


def test_a_preset_whose_file_name_is_not_utf8_is_listed_unusable_and_never_allowed(presets_dir):
    """``presets list`` offered it, and every job that named it failed: no request may hold undecodable text."""
    stem = os.fsdecode(b"bad\xff")
    (presets_dir / f"{stem}.yaml").write_text("steps: 3\n")
    [listed] = [p for p in list_presets() if p.name == stem]
    assert not listed.usable and listed.description == (
        "(unusable: its name is not valid UTF-8 text (byte 0xff at character 4); give text, and paths, in UTF-8; "
        "rename it)")
    assert not is_preset(stem)


def test_a_preset_file_whose_suffix_is_upper_case_is_found(presets_dir):
    """``Mine.YAML`` was passed over in silence."""
    (presets_dir / "Mine.YAML").write_text("steps: 7\n")
    assert load_preset("mine") == {"steps": 7} and is_preset("MINE")
