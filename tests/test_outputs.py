"""Saved PNGs: metadata round trip, A1111 text, atomic writes, no overwrite, disk full."""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from backend import metadata
from backend.errors import DreamttyError
from backend.outputs import check_out_dir, check_writable, day_folder, save_image
from backend.request import GenerateRequest

NOW = dt.datetime(2026, 11, 26, 10, 30, 5)


def _meta(**kw):
    req = GenerateRequest(prompt="a red fox", negative_prompt="blurry", seed=7, **kw).resolved("demo")
    return metadata.build(req, "demo", {"positive": "a red fox, sharp", "negative": "blurry"})


def _image():
    return Image.new("RGB", (16, 16), (200, 10, 30))


def test_round_trip_and_a1111_text(tmp_path):
    meta = _meta(sampler="euler_a", scheduler="normal", cfg=5.5)
    path = save_image(_image(), meta, tmp_path, now=NOW)
    assert path == tmp_path / "2026-11-26" / "103005-7.png"
    assert metadata.read(path) == meta
    assert metadata.request_from_image(path) == GenerateRequest.from_dict(meta["request"])
    text = Image.open(path).text["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a red fox, sharp"
    assert lines[1] == "Negative prompt: blurry"
    assert "Steps: 8, Sampler: Euler a, Schedule type: Uniform, CFG scale: 5.5, Seed: 7, Size: 128x128, Model: demo" in lines[2]
    assert Image.open(path).getpixel((3, 3)) == (200, 10, 30)


def test_guidance_is_in_parameters_when_non_neutral(tmp_path):
    meta = _meta()
    meta["request"]["guidance"]["sharpness"] = 2.0
    assert "Sharpness: 2.0" in metadata.a1111_parameters(meta)
    assert "Sharpness" not in metadata.a1111_parameters(_meta())


def test_never_overwrites(tmp_path):
    meta = _meta()
    a = save_image(_image(), meta, tmp_path, now=NOW)
    b = save_image(Image.new("RGB", (16, 16)), meta, tmp_path, now=NOW)
    assert a != b and b.name == "103005-7-1.png"
    assert Image.open(a).getpixel((0, 0)) == (200, 10, 30)


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    def full(self, fp, *a, **kw):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DreamttyError, match="out: cannot save image .*No space left"):
        save_image(_image(), _meta(), tmp_path, now=NOW)
    assert list((tmp_path / "2026-11-26").iterdir()) == []


def test_no_png_is_visible_until_complete(tmp_path, monkeypatch):
    """Galleries and watchers globbing *.png never see a half-written image."""
    seen = []
    write = Image.Image.save

    def watched(self, fp, *a, **kw):
        write(self, fp, *a, **kw)
        seen.append(sorted(p.name for p in (tmp_path / "2026-11-26").glob("*.png")))

    monkeypatch.setattr(Image.Image, "save", watched)
    path = save_image(_image(), _meta(), tmp_path, now=NOW)
    assert seen == [[]] and [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.skipif(not Path("/proc/sys").is_dir(), reason="needs Linux procfs")
def test_unwritable_dir():
    """/proc/sys refuses write access to every user, root included (procfs checks its own mode bits)."""
    with pytest.raises(DreamttyError, match="^out: /proc/sys is not writable$"):
        check_writable(Path("/proc/sys"))


def test_out_dir_under_a_file_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DreamttyError, match="^out: cannot create"):
        check_writable(blocker / "sub")


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_out_dir_that_refuses_files_is_found_before_queueing(tmp_path):
    folder = day_folder(tmp_path)
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i not allowed here")
    try:  # immutable: even root cannot create files in it
        with pytest.raises(DreamttyError, match=f"^out: ({folder} is not writable|cannot write in {folder}: .*)$"):
            check_out_dir(tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(folder)])
    check_out_dir(tmp_path)  # writable again: no error, and no probe file left
    assert list(folder.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DreamttyError, match="^out: .*file is a file; give a folder$"):
        check_out_dir(blocker)


def test_image_without_metadata(tmp_path):
    p = tmp_path / "plain.png"
    _image().save(p)
    with pytest.raises(DreamttyError, match="has no dreamtty metadata"):
        metadata.read(p)
