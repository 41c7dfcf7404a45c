"""Hand-made or hostile input (presets, image metadata, data files, prompts) fails as one line naming the field."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from backend.errors import DreamttyError, ModelError, RequestError
from backend.guidance_settings import GuidanceSettings
from backend.metadata import CHUNK, request_from_image
from backend.models import resolve_model
from backend.prompting import build_prompt, check_prompts
from backend.prompting.presets import load_preset
from backend.prompting.styles import RANDOM_STYLE, load_styles
from backend.prompting.weights import MAX_WEIGHT, parse_weights
from backend.prompting.wildcards import MAX_CHARS, expand_wildcards, load_wildcards
from backend.request import MAX_SEED, GenerateRequest, parse_size
from backend.values import to_int
from backend.samplers import SAMPLERS
from backend.service import Service
from tui.cli import main


def _one_line(err: DreamttyError, field: str) -> str:
    text = str(err)
    assert text.startswith(f"{field}: ") and "\n" not in text
    return text


# -- GenerateRequest.from_dict (presets, metadata, queue) -------------------------
@pytest.mark.parametrize(
    "data,field,fragment",
    [
        ({"loras": 5}, "loras", "[name, weight] pairs"),
        ({"loras": [["x"]]}, "loras", "[name, weight] pairs"),
        ({"loras": [["x", "heavy"]]}, "loras", "'heavy' is not a number"),
        ({"guidance": 5}, "guidance", "mapping of controls"),
        ({"guidance": {"freeu": 5}}, "freeu", "list of numbers"),
        ({"guidance": {"sag": "lots"}}, "sag", "not a number"),
        ({"model": 5}, "model", "must be text, got a number"),
        ({"model": ["a"]}, "model", "must be text, got a list"),
        ({"vae": False}, "vae", "must be text, got false"),
        ({"sampler": ["euler"]}, "sampler", "must be text"),
        ({"styles": "Watercolor"}, "styles", "list of style names"),
        ({"styles": 5}, "styles", "5 is not allowed; give a list of style names"),
        ({"styles": [None]}, "styles", "[null] is not allowed"),
        ({"refiner_switch": "x"}, "refiner_switch", "'x' is not a number"),
        ({"cfg": 10**400}, "cfg", "not a finite number"),
        ({"steps": True}, "steps", "true is not a whole number"),
        ({"guidance": {"freeu": True}}, "freeu", "true is not allowed; give a list of numbers"),
        ({"expand": "maybe"}, "expand", "true or false"),
        ({"expand": 2}, "expand", "true or false"),
    ],
)
def test_from_dict_names_the_field_of_a_wrong_type(data, field, fragment):
    with pytest.raises(RequestError) as err:
        GenerateRequest.from_dict(data)
    assert err.value.field == field and fragment in _one_line(err.value, field)


@pytest.mark.parametrize("data", [[1, 2], 5, None, "x"])
def test_from_dict_needs_a_mapping(data):
    with pytest.raises(RequestError, match="^request: expected a mapping"):
        GenerateRequest.from_dict(data)


def test_from_dict_converts_what_files_hold():
    request = GenerateRequest.from_dict(
        {"expand": "No", "loras": [["x", "0.5"]], "styles": None, "steps": "20", "guidance": {"freeu": [1, 1, 1, 1]}}
    )
    assert request.expand is False and request.loras == [("x", 0.5)] and request.styles == []
    assert request.steps == 20 and request.guidance.freeu == (1.0, 1.0, 1.0, 1.0)
    assert GenerateRequest.from_dict({"expand": "YES"}).expand is True


def test_guidance_from_dict_needs_a_mapping():
    with pytest.raises(RequestError, match="^guidance: expected a mapping"):
        GuidanceSettings.from_dict([1])


# -- reproduce: metadata in a PNG --------------------------------------------------
def _png(tmp_path, meta: object):
    info = PngInfo()
    info.add_text(CHUNK, json.dumps(meta))
    path = tmp_path / "hand-made.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("meta", [[1, 2], 5, {"version": 1}, {"request": None}, {"request": [1]}])
def test_metadata_without_a_request_is_one_line(tmp_path, meta):
    with pytest.raises(DreamttyError, match="^image: .* has dreamtty metadata without a request$"):
        request_from_image(_png(tmp_path, meta))


@pytest.mark.parametrize(
    "request_data,field",
    [({"loras": [["x"]]}, "loras"), ({"loras": 5}, "loras"), ({"guidance": 5}, "guidance"),
     ({"guidance": {"freeu": 5}}, "freeu"), ({"model": 5}, "model"), ({"refiner_switch": "x"}, "refiner_switch")],
)
def test_metadata_with_a_wrong_type_names_field_and_image(tmp_path, request_data, field):
    path = _png(tmp_path, {"version": 1, "request": {"prompt": "a fox", "model": "demo", "seed": 1, **request_data}})
    with pytest.raises(RequestError) as err:
        request_from_image(path)
    assert err.value.field == field and f"in the metadata of {path}" in _one_line(err.value, field)


@pytest.mark.parametrize("meta, says", [
    ({"version": 1, "request": {}}, "without prompt, model, seed: edited or damaged; it cannot be reproduced"),
    ({"version": 1, "request": {"prompt": "a fox", "model": "demo"}}, "without seed: edited or damaged"),
    ({"version": 99, "request": {}}, "of version 99; this dreamtty reads version 1 (a newer one wrote it?)"),
    ({"version": "1", "request": {}}, "of version '1'; this dreamtty reads version 1"),
    ({"version": None, "request": {}}, "without prompt, model, seed"),
])
def test_metadata_that_lacks_what_every_version_records_is_refused_not_run_with_defaults(tmp_path, capsys, meta, says):
    """Reproduce made a new image, with a random seed, of hand-edited metadata, and exited 0."""
    path = _png(tmp_path, meta)
    with pytest.raises(DreamttyError) as err:
        request_from_image(path)
    assert str(err.value).startswith(f"image: {path} has dreamtty metadata ") and says in str(err.value)
    assert main(["reproduce", str(path)]) == 2


def test_cli_reproduce_of_hand_made_metadata_exits_2(tmp_path, capsys):
    assert main(["reproduce", str(_png(tmp_path, {"version": 1}))]) == 2
    assert capsys.readouterr().err.startswith("dreamtty: image: ")


# -- presets ---------------------------------------------------------------------
@pytest.fixture
def presets_dir(user_folder):
    return user_folder("presets")


@pytest.mark.parametrize(
    "text,field,fragment",
    [
        ("loras: 5\n", "lora", "loras 5 must be a list"),
        ("model: 5\n", "model", "must be text"),
        ("model: [a]\n", "model", "must be text"),
        ("vae: 5\n", "vae", "must be text"),
        ("styles: Watercolor\n", "styles", "list of style names"),
        ("styles: 5\n", "styles", "list of style names"),
        ("guidance: 5\n", "guidance", "mapping of controls"),
        ("refiner_switch: abc\n", "refiner_switch", "'abc' is not a number"),
        ("expand: maybe\n", "expand", "'maybe' is not true or false"),
        ("size: ²x64\n", "size", "'²x64' is not WxH"),
        ("size: 64\n", "size", "64 is not WxH"),
        ("size: 64x64\nwidth: 128\n", "size", "give size, or width and height, not both"),  # width was dropped
        ("5: x\nfoo: y\n", "preset", "unknown key 5"),
    ],
)
def test_preset_values_of_the_wrong_type(presets_dir, text, field, fragment):
    (presets_dir / "bad.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(RequestError) as err:
        load_preset("bad")
    assert err.value.field == field and "bad.yaml" in str(err.value) and fragment in _one_line(err.value, field)


def test_preset_values_come_back_converted(presets_dir):
    (presets_dir / "mine.yaml").write_text("expand: 'no'\nloras: [[x, '0.5']]\nstyles: [Random Style]\n")
    assert load_preset("mine") == {"expand": False, "loras": [["x", 0.5]], "styles": [RANDOM_STYLE]}


def test_size_needs_ascii_digits():
    assert parse_size(" 64 x 128 ") == (64, 128) and parse_size("64×128") == (64, 128)
    with pytest.raises(RequestError, match="^size: '²x64' is not WxH"):
        parse_size("²x64")
    with pytest.raises(RequestError, match="^width: a number of 5000 digits is out of range$"):
        parse_size("9" * 5000 + "x64")  # more digits than int() takes
    with pytest.raises(RequestError, match="^steps: a number of 101 digits is out of range$"):
        to_int("steps", "1" * 101)
    assert to_int("seed", "1e30") == 10**30 and to_int("steps", "2.50e1") == 25  # exact: a float made it 1e30+...
    assert to_int("steps", "0e500") == 0
    for text, said in (("1e400", "is out of range"), ("1.0000000000000000001", "is not a whole number"),
                       ("inf", "is not a whole number"), ("-Infinity", "is not a whole number"),  # a traceback
                       ("1e9999999999999999999", "is out of range"),  # past Decimal's exponents: a traceback
                       ("1e-9999999999999999999", "is not a whole number")):
        with pytest.raises(RequestError, match=f"^steps: '{re.escape(text)}' {said}$"):
            to_int("steps", text)


# -- request ranges ----------------------------------------------------------------
def test_every_seed_of_a_batch_stays_in_range():
    with pytest.raises(RequestError, match=rf"^seed: {MAX_SEED} is out of range; allowed .*0\.\.{MAX_SEED - 1} for 2"):
        GenerateRequest(seed=MAX_SEED, count=2).resolved("sd1")
    last = GenerateRequest(seed=MAX_SEED - 1, count=2).resolved("sd1").per_image(1)
    assert last.seed == MAX_SEED
    assert GenerateRequest(seed=MAX_SEED).resolved("sd1").seed == MAX_SEED


def test_pndm_needs_its_warm_up_steps():
    from diffusers import PNDMScheduler

    need = SAMPLERS["pndm"].min_steps
    PNDMScheduler().set_timesteps(need)
    with pytest.raises(ValueError):  # what the worker met before the request check
        PNDMScheduler().set_timesteps(need - 1)
    with pytest.raises(RequestError, match=f"^steps: pndm needs at least {need}; got {need - 1}$"):
        GenerateRequest(sampler="pndm", steps=need - 1).resolved("sd1")
    assert GenerateRequest(sampler="pndm", steps=need).resolved("sd1").steps == need


# -- prompt weights ----------------------------------------------------------------
def test_weights_must_stay_in_range():
    limits = f"(a:{MAX_WEIGHT:g}) (b:-{MAX_WEIGHT:g})"
    assert [f.weight for f in parse_weights(limits) if f.text.strip()] == [MAX_WEIGHT, -MAX_WEIGHT]
    for text in ("a (red:" + "9" * 400 + ") fox", "(red:101)", "(red:-101)", "(((red:90)))"):
        with pytest.raises(RequestError, match=rf"^prompt: weight .* out of range; allowed -{MAX_WEIGHT:g}\.\."):
            parse_weights(text)


# -- wildcards ---------------------------------------------------------------------
@pytest.fixture
def wildcards_dir(user_folder):
    return user_folder("wildcards")


def test_unreadable_wildcard_file_is_skipped_with_one_warning(wildcards_dir, caplog):
    (wildcards_dir / "broken.txt").write_bytes(b"\xff\xfe not utf-8\n")
    (wildcards_dir / "pet.txt").write_text("axolotl\n")
    with caplog.at_level(logging.WARNING, logger="dreamtty.wildcards"):
        check_prompts(GenerateRequest(prompt="a __pet__", seed=1, count=3))
        assert "broken" not in load_wildcards()
    assert [r.getMessage() for r in caplog.records] == [
        f"dreamtty: warning: {wildcards_dir / 'broken.txt'} is not UTF-8 text; wildcard file skipped"]
    assert build_prompt(GenerateRequest(prompt="a __pet__", seed=1)).positive == "a axolotl"
    # Using it names the reason, not "unknown wildcard ... add broken.txt" (the TUI shows no log warnings).
    with pytest.raises(RequestError, match=r"^prompt: wildcard __broken__: .*broken.txt is not UTF-8 text$"):
        check_prompts(GenerateRequest(prompt="a __broken__", seed=1))
    # a FIFO (reading it would wait forever) or a dangling link: named as such, not "unknown ... add u.txt"
    os.mkfifo(wildcards_dir / "fifo.txt")
    (wildcards_dir / "gone.txt").symlink_to(wildcards_dir / "nowhere")
    with pytest.raises(RequestError, match=r"^prompt: wildcard __fifo__: [^:]*fifo.txt is not "
                                           r"a regular file$"):
        check_prompts(GenerateRequest(prompt="a __fifo__", seed=1))
    with pytest.raises(RequestError, match=r"^prompt: wildcard __gone__: [^:]*gone.txt is missing$"):
        check_prompts(GenerateRequest(prompt="a __gone__", seed=1))


def test_a_user_folder_that_cannot_be_listed_is_said(user_folder, caplog, monkeypatch):
    from backend.prompting import datafiles

    presets = user_folder("presets")
    listdir = os.listdir

    def refused(path):
        if Path(path) == presets:
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(datafiles.os, "listdir", refused)
    with caplog.at_level(logging.WARNING, logger="dreamtty.datafiles"):
        datafiles.data_files("presets", "presets", (".yaml",))
        datafiles.data_files("presets", "presets", (".yaml",))
    assert [r.getMessage() for r in caplog.records] == [
        f"dreamtty: warning: {presets}: cannot list: Permission denied; its presets are not found"]



def test_a_skipped_wildcard_files_warning_shows_controls_in_its_path(wildcards_dir, caplog):
    (wildcards_dir / "bad\x1b]0;pwned\x07.txt").write_bytes(b"\xff\n")
    with caplog.at_level(logging.WARNING, logger="dreamtty.wildcards"):
        load_wildcards()
    (message,) = [r.getMessage() for r in caplog.records]
    assert "bad\\x1b]0;pwned\\x07.txt is not UTF-8 text" in message and "\x1b" not in message


def test_wildcards_that_multiply_stop_quickly(wildcards_dir):
    for i in range(14):
        (wildcards_dir / f"w{i}.txt").write_text(" ".join([f"__w{i + 1}__"] * 3) + "\n")
    (wildcards_dir / "w14.txt").write_text("word\n")
    start = time.monotonic()
    with pytest.raises(RequestError, match=r"^prompt: .*__w\d+__.*include each other"):
        build_prompt(GenerateRequest(prompt="__w0__", seed=1))
    assert time.monotonic() - start < 5


def test_wildcard_expanding_past_the_size_cap_is_named():
    table = {"long": ["x" * (MAX_CHARS // 2 + 1)], "twice": ["__long__ __long__"]}
    with pytest.raises(RequestError, match=f"^prompt: wildcard __twice__ expands to more than {MAX_CHARS}"):
        expand_wildcards("a __twice__", table, random.Random(0), "prompt")


# -- styles ------------------------------------------------------------------------
def test_csv_with_a_huge_field_is_reported_and_skipped(user_folder, capsys):
    styles = user_folder("styles")
    (styles / "huge.csv").write_text("name,prompt\nWatercolor,small\nBig," + "a" * (129 * 1024) + "\n")
    library = load_styles()
    assert library.warnings == [f"{styles / 'huge.csv'} line 3: not valid CSV (field larger than field limit "
                                "(131072)); file skipped"]
    assert library.get("Watercolor").source.startswith("shipped:")  # the skipped file changed nothing
    assert main(["styles", "list"]) == 0
    assert "not valid CSV" in capsys.readouterr().err


def test_random_style_can_be_shown(capsys):
    assert main(["styles", "show", "random style", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == RANDOM_STYLE


# -- model fields ------------------------------------------------------------------
def test_model_errors_name_the_field_that_named_the_model(tmp_path):
    junk = tmp_path / "random.safetensors"
    junk.write_bytes(b"junk")
    for name in ("nope", str(junk)):
        with pytest.raises(ModelError, match="^refiner: "):
            resolve_model(name, field="refiner")
        with pytest.raises(ModelError, match="^model: "):
            resolve_model(name)


def _unblocked(fifos: list[Path], call: Callable[[], object]) -> object:
    """``call()`` while each FIFO has a writer that never ends its stream, so a read of one would wait for ever;
    after 10 s the writers are closed, which ends such a read: a regression fails instead of hanging."""
    writers = [os.open(fifo, os.O_RDWR) for fifo in fifos]

    def close() -> None:
        while writers:
            os.close(writers.pop())

    timer = threading.Timer(10, close)
    timer.start()
    try:
        return call()
    finally:
        timer.cancel()
        timer.join()
        close()


def _fifo_model(root: Path, fifo: str) -> tuple[Path, Path]:
    """(the model to name, the FIFO): a FIFO called like a checkpoint, or a diffusers folder with one config a FIFO."""
    folder = root / "diffusers"
    configs = {"model_index.json": {"_class_name": "StableDiffusionPipeline"}, "unet/config.json": {"in_channels": 4},
               "text_encoder/config.json": {"num_hidden_layers": 12}}
    for name, data in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data))
    (root / fifo).unlink(missing_ok=True)
    os.mkfifo(root / fifo)
    return (folder if fifo.startswith("diffusers/") else root / fifo), root / fifo


@pytest.mark.parametrize("field,fifo", [
    *[(field, fifo) for field in ("model", "refiner")
      for fifo in ("model.safetensors", "diffusers/model_index.json", "diffusers/unet/config.json")],
    ("model", "diffusers/text_encoder/config.json"),  # read for clip_skip's check
])
def test_a_fifo_as_a_model_file_is_refused_unread(tmp_path, field, fifo):
    model, pipe = _fifo_model(tmp_path, fifo)
    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    request = GenerateRequest(prompt="a fox", **{"model": "demo", field: str(model)})
    try:
        with pytest.raises(ModelError) as info:
            _unblocked([pipe], lambda: service.validate(request))
    finally:
        service.store.close()
    assert str(info.value) == f"{field}: {pipe} is not a regular file"


@pytest.mark.parametrize("flag", ["--model", "--refiner"])
def test_cli_refuses_a_fifo_as_a_model_at_once(tmp_path, capsys, flag):
    model, pipe = _fifo_model(tmp_path, "model.safetensors")
    assert _unblocked([pipe], lambda: main(["generate", "a fox", "--model", "demo", flag, str(model)])) == 2
    assert capsys.readouterr().err.strip() == f"dreamtty: {flag[2:]}: {pipe} is not a regular file"


def test_models_list_names_a_fifo_and_goes_on(tmp_path, monkeypatch, capsys):
    fifos = [tmp_path / "ckpt" / name for name in ("pipe.safetensors", "pipe.ckpt", "folder/model_index.json")]
    fifos[-1].parent.mkdir(parents=True)
    for fifo in fifos:
        os.mkfifo(fifo)
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(tmp_path / "ckpt"))
    assert _unblocked(fifos, lambda: main(["models", "list", "--json"])) == 0
    problems = json.loads(capsys.readouterr().out)["problems"]  # "folder" is a damaged model folder, not read
    assert sorted(problems) == [f"model: {fifo} is not a regular file" for fifo in sorted(fifos)]


def test_vae_and_refiner_errors_name_their_own_field(tmp_path, capsys):
    from tui import cli

    garbage = tmp_path / "random.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for flags, start in ((["--vae", str(garbage)], "dreamtty: vae: "), (["--refiner", "nope"], "dreamtty: refiner: nope")):
        assert cli.main(["generate", "a fox", "--model", "demo", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and len(err.splitlines()) == 1, err


def test_refiner_of_another_latent_space_is_refused_before_queueing(capsys):
    from tui import cli

    assert cli.main(["generate", "a fox", "--model", "demo", "--refiner", "demo-xl"]) == 2
    assert capsys.readouterr().err.strip() == ("dreamtty: refiner: demo-xl (demo-xl) does not share the latent space "
                                               "of the model (demo)")


def test_numbers_beyond_float_range_in_guidance_are_one_line_errors():
    for guidance, allowed in (({"sag": 10**400}, "; allowed 0..10"),
                              ({"freeu": [10**400, 1, 1, 1]}, "; allowed 0..3 each"),
                              ({"adm_scale": [1, 10**400, 0.3]}, "; allowed POS,NEG 0.1..3 and END 0..1")):
        with pytest.raises(RequestError, match=rf"^(sag|freeu|adm_scale): \d{{199}}… is not a finite number"
                                               rf"{re.escape(allowed)}$"):
            GenerateRequest.from_dict({"guidance": guidance})
    for data, error in (({"cfg": "nan"}, "cfg: 'nan' is not a finite number; allowed 0..30 (1 = no guidance)"),
                        ({"cfg": float("inf")}, "cfg: inf is not a finite number; allowed 0..30 (1 = no guidance)"),
                        ({"guidance": {"pag": "lots"}}, "pag: 'lots' is not a number; allowed 0..20")):
        with pytest.raises(RequestError) as err:  # what is allowed, as an out-of-range value is told
            GenerateRequest.from_dict(data)
        assert str(err.value) == error


def test_sdxl_preset_with_sdxl_only_guidance_loads(user_folder):
    (user_folder("presets") / "xl.yaml").write_text("model: demo-xl\nguidance:\n  adm_scale: [1.5, 0.8, 0.3]\n")
    assert tuple(load_preset("xl")["guidance"]["adm_scale"]) == (1.5, 0.8, 0.3)


def test_clip_skip_deeper_than_the_text_encoder_is_refused_before_queueing(capsys, demo_dirs):
    assert main(["generate", "a fox", "--model", "demo", "--clip-skip", "5"]) == 2
    assert capsys.readouterr().err.strip() == ("dreamtty: clip_skip: 5 is deeper than this model's text encoder; "
                                               "allowed 1..4")


LONG = "a" * 300  # a file name past the kernel's 255 bytes: os.stat fails with ENAMETOOLONG


@pytest.mark.parametrize("args,field", [
    (["generate", "x", "--model", LONG], "model"),
    (["generate", "x", "--vae", LONG], "vae"),
    (["generate", "x", "--refiner", LONG], "refiner"),
    (["generate", "x", "--lora", LONG], "lora"),
    (["generate", f"<lora:{LONG}:1>"], "lora"),
    (["generate", "x", "--out", f"/tmp/{LONG}"], "out"),
    (["upscale", "{image}", "--upscaler", LONG], "upscaler"),
    (["train", "--model", LONG, "--instance-dir", "{folder}", "--instance-prompt", "x"], "model"),
    (["train", "--instance-dir", f"/tmp/{LONG}", "--instance-prompt", "x"], "instance_dir"),
])
def test_names_too_long_for_a_file_are_one_line_errors(args, field, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    args = [a.format(image=tmp_path / "in.png", folder=tmp_path) for a in args]
    assert main([*args, "--model", "demo"] if "--model" not in args else args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dreamtty: {field}: ") and len(err.splitlines()) == 1, err


def test_a_wrong_value_quoted_in_an_error_shows_its_controls():
    with pytest.raises(RequestError) as err:
        GenerateRequest.from_dict({"styles": ["\u202e\x9b31m", 5]})
    assert str(err.value).startswith('styles: ["\\u202e\\x9b31m", 5] is not allowed')  # written out, not raw


def test_a_huge_wrong_value_is_cut_and_what_is_allowed_still_shows():
    """A YAML alias tree of styles filled the 2,000 characters of an error line before its advice."""
    nested: list = ["Enhance"] * 10
    for _ in range(5):
        nested = [nested] * 10
    with pytest.raises(RequestError) as err:
        GenerateRequest.from_dict({"styles": nested})
    assert len(str(err.value)) < 300 and str(err.value).endswith("… is not allowed; give a list of style names, "
                                                                    "e.g. [Watercolor]")
