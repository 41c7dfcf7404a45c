"""Saved PNGs: metadata round trip, A1111 text, atomic writes, no overwrite, disk full."""

from __future__ import annotations

import datetime as dt
import errno
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from backend import metadata, outputs
from backend.errors import DreamttyError
from backend.outputs import SAVING, check_out_dir, check_writable, day_folder, save_image, settle
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


def test_a_folder_without_hard_links_saves_and_never_overwrites(tmp_path, monkeypatch):
    """An --out on a FAT or exFAT drive: every save failed with "Operation not permitted" (os.link), after the
    job had run for minutes."""
    import errno

    def no_links(source, target):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(outputs.os, "link", no_links)
    meta = _meta()
    a = save_image(_image(), meta, tmp_path, now=NOW)
    b = save_image(Image.new("RGB", (16, 16)), meta, tmp_path, now=NOW)
    assert (a.name, b.name) == ("103005-7.png", "103005-7-1.png")
    assert Image.open(a).getpixel((0, 0)) == (200, 10, 30) and Image.open(b).getpixel((0, 0)) == (0, 0, 0)
    assert metadata.read(b) == meta and list((tmp_path / ".saving").iterdir()) == []


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    def full(self, fp, *a, **kw):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DreamttyError, match="out: cannot save image .*No space left"):
        save_image(_image(), _meta(), tmp_path, now=NOW)
    assert list((tmp_path / "2026-11-26").iterdir()) == [] and list((tmp_path / SAVING).iterdir()) == []


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


def _save_and_die(out: str, tag: str, dies_writing: bool) -> None:
    """A process killed (no cleanup runs) as it records the image it saved, or while it writes it."""
    if dies_writing:
        Image.Image.save = lambda *args, **kwargs: os._exit(9)
    save_image(_image(), _meta(), Path(out), now=NOW, tag=tag, record=lambda path: os._exit(9))


def killed_while_saving(out: Path, tag: str, dies_writing: bool = False) -> None:
    """Run ``_save_and_die`` in a process of its own (spawned: this one may hold threads)."""
    process = multiprocessing.get_context("spawn").Process(target=_save_and_die, args=(str(out), tag, dies_writing))
    process.start()
    process.join(60)
    assert process.exitcode == 9


def test_an_image_saved_by_a_process_killed_before_it_was_recorded_is_recorded_once(tmp_path):
    """A worker killed between naming its image and recording it: its next attempt must not make it again."""
    killed_while_saving(tmp_path, "q1-7")
    [png] = (tmp_path / "2026-11-26").glob("*.png")
    assert metadata.read(png)["request"]["seed"] == 7
    killed_while_saving(tmp_path, "q1-8")  # another job's: left for it
    recorded: list[Path] = []
    assert settle(tmp_path, "q1-7", recorded.append) == 1 and recorded == [png]
    assert settle(tmp_path, "q1-7", recorded.append) == 0 and recorded == [png]
    assert [p.name.split(".")[0] for p in (tmp_path / SAVING).iterdir()] == ["q1-8"]


def test_an_image_killed_while_written_is_made_again(tmp_path):
    killed_while_saving(tmp_path, "q1-7", dies_writing=True)
    assert len(list((tmp_path / SAVING).iterdir())) == 1  # the temp file of the half-written image
    assert settle(tmp_path, "q1-7", lambda path: pytest.fail("nothing was saved")) == 0
    assert not list((tmp_path / SAVING).iterdir()) and not list(tmp_path.rglob("*.png"))


def test_an_image_that_cannot_be_recorded_yet_is_found_again(tmp_path):
    """The queue takes no writes now: the temp file stays, so a later settle records the image."""
    killed_while_saving(tmp_path, "q1-7")

    def locked(path: Path) -> None:
        raise DreamttyError("queue: cannot use q.sqlite3: database is locked")

    with pytest.raises(DreamttyError, match="database is locked"):
        settle(tmp_path, "q1-7", locked)
    recorded: list[Path] = []
    assert settle(tmp_path, "q1-7", recorded.append) == 1 and len(recorded) == 1


def test_an_outputs_folder_gone_has_nothing_to_settle(tmp_path):
    assert settle(tmp_path / "gone", "q1-7", lambda path: pytest.fail("no image")) == 0


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


def test_a_dry_run_checks_the_out_folder_and_makes_nothing(tmp_path):
    """POST /v1/validate checks ``out`` as a submit does, and leaves no folder behind."""
    base = tmp_path / "base"
    base.mkdir()
    out = base / "not" / "yet"
    check_out_dir(out, create=False)
    assert list(base.iterdir()) == []
    (base / "file").write_text("x")
    with pytest.raises(DreamttyError, match=f"^out: cannot create {base}/file/sub/.*: {base}/file is not a folder$"):
        check_out_dir(base / "file" / "sub", create=False)
    with pytest.raises(DreamttyError, match="^out: cannot write in /proc: "):
        check_out_dir(Path("/proc/nope"), create=False)
    (base / "loop").symlink_to(base / "loop")
    (base / "dangling").symlink_to(base / "nowhere")
    (base / "saving-file").mkdir()
    (base / "saving-file" / SAVING).write_text("x")
    for name, what in (("loop", "loop"), ("dangling", "dangling"), ("saving-file", f"saving-file/{SAVING}")):
        refused = f"^out: cannot create {base}/{name}/.*: {base}/{what} is not a folder$"
        for create in (False, True):  # a dry run says what a submit says
            with pytest.raises(DreamttyError, match=refused):
                check_out_dir(base / name, create=create)
    with pytest.raises(DreamttyError, match="^out: cannot create .*: File name too long$"):
        check_out_dir(base / ("a" * 300), create=False)
    check_out_dir(out)  # a submit makes today's folder (and the one images are written in first)
    assert sorted(p.name for p in out.iterdir()) == sorted([SAVING, day_folder(out).name])
