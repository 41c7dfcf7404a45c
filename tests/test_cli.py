"""The headless CLI as a user runs it: exit codes, stdout paths, JSON events, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from backend import input_images, metadata
from backend.request import GenerateRequest
from cli_helpers import dreamtty
from image_helpers import dreamtty_png
from tui import cli_jobs
from tui.cli import main


def test_generate_json_then_reproduce_identical(tmp_path, demo_dirs, capsys):
    out = tmp_path / "out"
    r = dreamtty(capsys, "generate", "a red fox", "--model", "demo", "--seed", "11", "-n", "2", "--steps", "5",
                 "--sampler", "euler_a", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert {"queued", "started", "step", "image", "done"} <= {e["type"] for e in events}
    paths = [e["path"] for e in events if e["type"] == "image"]
    assert len(paths) == 2 and all(Path(p).parent.parent == out for p in paths)
    meta = metadata.read(paths[1])
    assert meta["request"]["seed"] == 12 and meta["request"]["sampler"] == "euler_a"
    assert "Steps: 5, Sampler: Euler a" in Image.open(paths[1]).text["parameters"]

    r = dreamtty(capsys, "reproduce", paths[1], "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    again = r.stdout.strip().splitlines()[-1]
    assert "pixels: identical" in r.stderr
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(paths[1])))

    # An image resized after it was made (or an A1111 hires-fix image): its reproduction's size is named
    # (the line reproduce prints, checked on the function: a third job would make the same image again)
    with Image.open(paths[1]) as image:
        image.resize((image.width * 2, image.height * 2)).save(tmp_path / "resized.png")
    said = cli_jobs._pixels_line(tmp_path / "resized.png", Path(again), {})
    assert said == "pixels: differ (size 128x128, the image's is 256x256)"


def test_reproduce_by_a_service_that_saved_where_this_machine_cannot_read_says_so(tmp_path, monkeypatch, capsys):
    """A service on another machine (DREAMTTY_SERVICE) names a path this one cannot open: the job worked and the
    pixels are not compared, said in a line. It was a traceback after the job."""
    image = str(dreamtty_png(tmp_path / "fox.png", prompt="a fox", seed=1, steps=1))
    elsewhere = tmp_path / "on the service's machine" / "\x1b[2Jfox.png"

    async def remote(args, requests, out, adjust=None):  # the service made it (the job itself is not what is tested here)
        assert [r.prompt for r in requests] == ["a fox"]
        return 0, [str(elsewhere)]

    monkeypatch.setattr(cli_jobs, "_run_jobs", remote)
    assert main(["reproduce", image, "--out", str(tmp_path)]) == 0
    said = capsys.readouterr().err.splitlines()[-1]
    assert said == f"pixels: not compared ([Errno 2] No such file or directory: {str(elsewhere)!r})"
    real_open = input_images.open_quietly
    monkeypatch.setattr(input_images, "open_quietly", lambda path: real_open(path) if str(path) != str(elsewhere)
                        else _raises(OSError(f"cannot read\x1b[2J{elsewhere.name}\nthere")))
    said = cli_jobs._pixels_line(Path(image), elsewhere, {})  # the line, as reproduce prints it: one line, escaped
    assert said == "pixels: not compared (cannot read\\x1b[2J\\x1b[2Jfox.png)"


def _raises(exc: Exception):
    raise exc


def test_reproduce_keeps_the_random_style_picks_and_names_a_changed_wildcard(tmp_path, demo_dirs, capsys):
    styles, wildcards = tmp_path / "styles", tmp_path / "wildcards"
    styles.mkdir()
    wildcards.mkdir()
    (wildcards / "pet.txt").write_text("cat\ndog\nowl\n")
    Path(os.environ["DREAMTTY_CONFIG"]).write_text(f"paths:\n  styles: [{styles}]\n  wildcards: [{wildcards}]\n")
    r = dreamtty(capsys, "generate", "a __pet__", "--model", "demo", "--seed", "5", "--steps", "2", "--style",
                 "Random Style", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    made = metadata.read(r.stdout.strip().splitlines()[-1])
    pick, pet = made["prompt"]["styles"], made["prompt"]["wildcards"][0]["pick"]
    pack = [{"name": f"A pack {i}", "prompt": f"pack{i} {{prompt}}"} for i in range(40)]
    (styles / "pack.json").write_text(json.dumps(pack))  # Random Style would now pick another
    (wildcards / "pet.txt").write_text("eel\n")
    first = r.stdout.strip().splitlines()[-1]
    r = dreamtty(capsys, "reproduce", first, "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    again = metadata.read(r.stdout.strip().splitlines()[-1])
    assert again["request"]["styles"] == again["prompt"]["styles"] == pick  # the pick, not a new draw
    assert f"wildcard __pet__ picked 'eel', the image's {pet!r} (its file changed since)" in r.stderr
    r = dreamtty(capsys, "reproduce", "--from-text", "-", "--out", str(tmp_path / "c"),
                 stdin=Image.open(first).text["dreamtty"])  # the image's metadata, pasted
    assert r.returncode == 0, r.stderr
    assert metadata.read(r.stdout.strip().splitlines()[-1])["request"]["styles"] == pick


@pytest.mark.parametrize("record, styles", [
    ({"styles": ["Ink", "VHS", "Neon"]}, ["Ink", "VHS", "Neon"]),
    ({"styles": ["Ink", "VHS"]}, ["Ink", "Random Style", "Neon"]),  # not one pick a style: a damaged record
    ({"styles": ["Ink", 3, "Neon"]}, ["Ink", "Random Style", "Neon"]),
    ({}, ["Ink", "Random Style", "Neon"]),
    ([], ["Ink", "Random Style", "Neon"]),
])
def test_only_a_random_style_is_replaced_by_its_recorded_pick(record, styles):
    request = GenerateRequest(styles=["Ink", "random-style", "Neon"])  # matched as style names are
    expected = ["Ink", "random-style", "Neon"] if "Random Style" in styles else styles
    assert metadata.as_made(request, record).styles == expected


def test_reproduce_of_metadata_whose_kind_is_not_text_is_one_line(tmp_path, capsys):
    info = PngInfo()
    info.add_text("dreamtty", json.dumps({"version": 1, "kind": [], "request": {"prompt": "x", "model": "demo", "seed": 1}}))
    Image.new("RGB", (64, 64)).save(tmp_path / "odd.png", pnginfo=info)
    assert main(["reproduce", str(tmp_path / "odd.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dreamtty: kind: in the metadata of ") and "unknown job kind []; allowed: generate, " in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "0"], "steps: 0 is out of range"),
        (["--cfg", "-2"], "cfg: -2.0 is out of range"),
        (["--size", "500x512"], "width: 500 is not allowed; use a positive multiple of 8"),
        (["--size", "4096x4096"], "width: 4096 is too large"),
        (["--size", "big"], "size: 'big' is not WxH"),
        (["--sampler", "k_euler"], "sampler: unknown 'k_euler'; allowed: euler, euler_a"),
        (["--model", "/no/such/model"], "model: /no/such/model does not exist"),
        (["--model", "someone/not-cached-model"], "not in the local Hugging Face cache"),
        (["--out", "/proc/forbidden"], "out: cannot create /proc/forbidden"),
        (["--steps", "ten"], "argument --steps: steps: 'ten' is not a whole number; allowed 1..500"),  # its range
        (["--steps", "1e3"], "steps: 1000 is out of range; allowed 1..500"),  # a whole number, as presets take it
        (["--max-batch", "0"], "max_batch: 0 is out of range; allowed 1..64 (left out: the device's default)"),
        (["--keep-inputs"], "keep_inputs: needs --init-image (image to image)"),  # it said "unknown field"
        (["--max-batch", "two"], "argument --max-batch: invalid integer value"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    r = dreamtty(capsys, "generate", "x", "--out", str(tmp_path), *args, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_corrupt_weights_fail_the_job_with_exit_1(tmp_path, demo_dirs, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(demo_dirs["demo"], broken)
    (broken / "dreamtty_demo.json").unlink()
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = dreamtty(capsys, "generate", "x", "--model", str(broken), "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "model: cannot load" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "out").rglob("*.png"))


def test_a_subcommand_is_parsed_by_its_own_module_and_each_module_is_named():
    """``dreamtty CMD`` builds only CMD's module's parsers (tui.cli.COMMAND_MODULES): it must name every command."""
    import argparse

    from tui import cli

    def commands(parser) -> set[str]:
        return set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)

    assert commands(cli.build_parser()) == set(cli.COMMAND_MODULES)
    for command in cli.COMMAND_MODULES:
        assert command in commands(cli.build_parser(command))
    assert cli.parse_args(["--demo", "generate", "a fox", "-n", "2"]).count == 2
    assert cli.parse_args(["--device", "cpu"]).command is None  # the TUI


def test_samplers_lists_names(capsys):
    r = dreamtty(capsys, "samplers")
    assert r.returncode == 0
    assert "dpmpp_2m_sde" in r.stdout and "karras" in r.stdout


@pytest.mark.parametrize("command", [[], ["--demo"]])
def test_the_tui_without_a_terminal_is_a_one_line_error(command, tmp_path):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop("TEXTUAL_DRIVER", None)
    r = subprocess.run([sys.executable, "-m", "tui.cli", *command], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("dreamtty: terminal: the TUI needs a terminal on stdin and stdout; in a script, use a "
                        "command such as dreamtty generate (dreamtty --help lists them)\n")


def test_a_service_line_that_is_also_an_event_is_printed_once(capsys, caplog):
    """A --local command printed a worker that cannot start twice: "dreamtty: error: ..." as the service logged it,
    and "dreamtty: service: ..." as the Log event its clients get."""
    import logging

    from backend.events import PUBLISHED
    from tui.cli_output import LastResort

    def record(**extra) -> logging.LogRecord:
        return logging.getLogger("dreamtty.service").makeRecord(
            "dreamtty.service", logging.ERROR, __file__, 1, "worker 0: cannot start", (), None, extra=extra)

    LastResort().emit(record(**{PUBLISHED: True}))
    LastResort().emit(record())
    assert capsys.readouterr().err == "dreamtty: error: worker 0: cannot start\n"
    from types import SimpleNamespace

    from backend.service import Service

    published: list = []
    service = SimpleNamespace(_fanout=SimpleNamespace(publish=published.append))
    with caplog.at_level(logging.WARNING, logger="dreamtty.service"):  # marked: what a command following jobs prints
        Service._say(service, "worker 0: no GPU", "error")
        Service._say(service, "queue: cannot write", "warning")  # not printed as an event: it was lost
    assert [getattr(r, PUBLISHED) for r in caplog.records[-2:]] == [True, False] and len(published) == 2
