"""Every reader of a file a user names refuses a FIFO (its read would wait for a writer forever)
and a device at once, with a one-line error, instead of hanging the CLI or a service thread."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend import foreign_metadata, metadata, user_files
from backend.errors import RequestError
from backend.jobkinds import image_input
from backend.prompting.datafiles import DataFile
from backend.prompting.styles import load_styles
from backend.training.config import load_yaml


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _without_waiting(call, fifo):
    """``call()``'s result or exception; a reader that opened the FIFO is let go so the test ends."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=10)
    finally:
        writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # lets a blocked open() return, so the pool can end
        os.close(writer)
        pool.shutdown()


def test_train_yaml(fifo):
    with pytest.raises(RequestError, match=f"^config: cannot read {fifo}: is not a regular file$"):
        _without_waiting(lambda: load_yaml(fifo), fifo)


def test_a_parameters_text(fifo):
    with pytest.raises(RequestError, match=f"^from-text: {fifo} is not a regular file$"):
        _without_waiting(lambda: foreign_metadata.read_text_file(str(fifo)), fifo)


def test_a_style_preset_or_wildcard_file(fifo):
    with pytest.raises(user_files.RefusedFile, match=f"^{fifo} is not a regular file$"):
        _without_waiting(lambda: DataFile("pipe", ".csv", str(fifo), fifo).read_text(), fifo)


def test_a_styles_folder_holding_a_fifo_says_so_without_opening_it_and_loads_the_rest(fifo, monkeypatch):
    (fifo.parent / "mine.csv").write_text("name,prompt,negative_prompt\nMine,{prompt} in ink,\n")
    os.rename(fifo, fifo.parent / "pipe.csv")
    from backend import config

    monkeypatch.setattr(config.Config, "folders", lambda self, kind: [fifo.parent])
    library = _without_waiting(load_styles, fifo.parent / "pipe.csv")
    pipe = fifo.parent / "pipe.csv"
    assert library.warnings == [f"{pipe} is not a regular file; file skipped"] and "pipe" not in library.styles
    assert library.get("Mine").prompt == "{prompt} in ink"


def test_a_recorded_input_that_became_a_fifo_is_not_the_same_content(fifo):
    assert _without_waiting(lambda: image_input._has_content(str(fifo), "0" * 64), fifo) is False


def test_an_image_to_reproduce_or_take_settings_from(fifo):
    with pytest.raises(RequestError, match=f"^image: {fifo} is not a regular file$"):
        _without_waiting(lambda: metadata.image_request(fifo), fifo)


def test_a_file_written_through_replacing_is_whole_or_as_it_was(tmp_path):
    """Presets, the config, the pid file, class images, kept inputs and caches are written this way."""
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        with user_files.replacing(target) as tmp:
            assert tmp.parent == folder and tmp.suffix == ".tmp"  # not .png: a half preset was listed as one
            tmp.write_bytes(b"ha")
            raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"old" and [p.name for p in folder.iterdir()] == ["a.png"]
    with user_files.replacing(target, keep_suffix=True) as tmp:
        assert tmp.suffix == ".png"  # PIL picks the format by it
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in folder.iterdir()] == ["a.png"]
