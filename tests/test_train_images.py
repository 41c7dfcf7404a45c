"""Training images: high-bit-depth decoding, the instance scan's warnings, and the class-image cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.errors import DreamttyError
from backend.models import resolve_model
from backend.training import class_images
from backend.training.class_images import class_dir, ensure_class_images
from backend.training.data import load_sample
from backend.training.images import open_rgb, scan_images

CPU = torch.device("cpu")
LEVELS = np.tile(np.arange(256, dtype=np.uint8), (64, 1))[:, ::4]  # 64x64, 0 .. 252 left to right


def _photo(path: Path, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _grey(img_path: Path) -> np.ndarray:
    """The decoded image's single grey channel (all three RGB channels must agree)."""
    rgb = np.asarray(open_rgb(img_path))
    assert rgb.dtype == np.uint8 and (rgb == rgb[..., :1]).all()
    return rgb[..., 0]


# -- high bit depth ---------------------------------------------------------------------
@pytest.mark.parametrize("name, values", [
    ("grey16.png", LEVELS.astype(np.uint16) * 257),  # PIL mode I;16
    ("grey16be.tif", (LEVELS.astype(np.uint16) * 257).astype(">u2")),  # I;16B
    ("grey32.tif", LEVELS.astype(np.int32) * 257),  # I holding 16-bit data
    ("unit.tif", LEVELS.astype(np.float32) / 255),  # F in 0..1
])
def test_high_bit_depth_greys_decode_to_the_right_8_bit_values(tmp_path, name, values):
    path = tmp_path / name
    Image.fromarray(values).save(path)
    assert _grey(path).tolist() == LEVELS.tolist()
    # The training path: a 64 px image at resolution 64 keeps its pixels, in [-1, 1].
    sample = load_sample(path, 64, center_crop=True, flip=False, gen=None)
    assert torch.allclose(sample.pixels[0], torch.from_numpy(LEVELS / 127.5 - 1).float(), atol=1e-6)


@pytest.mark.parametrize("name, row, expected", [
    ("f.tif", np.array([-0.5, 0.0, 0.5, 1.0, 2.0, 300.0, np.nan], np.float32), [0, 0, 0, 1, 2, 255, 0]),  # 0..255
    ("i8.tif", np.array([-5, 0, 7, 255], np.int32), [0, 0, 7, 255]),  # 8-bit data in mode I stays
    ("i20.tif", np.array([-5, 0, 1 << 19, 1 << 20], np.int32), [0, 0, 128, 255]),  # wider: scaled by its peak
])
def test_other_float_and_int_ranges_are_scaled_and_clipped(tmp_path, name, row, expected):
    Image.fromarray(np.tile(row, (40, 1))).save(tmp_path / name)
    assert _grey(tmp_path / name)[0].tolist() == expected


# -- the instance scan --------------------------------------------------------------------
def test_scan_warns_about_links_and_special_files_without_reading_them(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = [_photo(folder / f"dog{i}.png", seed=i) for i in range(3)]
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.png")  # opening it to read would block this test until its timeout
    (folder / "linked.png").symlink_to(good[0])
    (folder / "sub").mkdir()
    scan = scan_images(folder, 64)
    assert scan.files == [folder / "dog0.png", folder / "dog1.png", folder / "dog2.png", folder / "linked.png"]
    assert sorted(scan.warnings) == [
        "instance_dir: skipping gone.png: broken link",
        "instance_dir: skipping loop.png: symlink loop",
        "instance_dir: skipping pipe.png: not a regular file",
        "instance_dir: skipping zero.png: not a regular file",
    ]


def test_scan_warns_when_few_images_are_usable(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "dog0.png")
    (folder / "notes.txt").write_text("hello")
    assert scan_images(folder, 64).warnings == [
        "instance_dir: skipping notes.txt: not an image",
        "instance_dir: only 1 usable image; 3-20 photos of the subject work best",
    ]
    _photo(folder / "dog1.png", seed=1)
    assert scan_images(folder, 64).warnings[-1] == ("instance_dir: only 2 usable images; "
                                                    "3-20 photos of the subject work best")
    _photo(folder / "dog2.png", seed=2)
    assert not any("usable image" in w for w in scan_images(folder, 64).warnings)


def test_scan_takes_large_images_without_a_decompression_bomb_warning(tmp_path, monkeypatch, recwarn, capfd):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # as a 10000x10000 photo is to the real limit
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"big{i}.png", size=80, seed=i)  # 6400 pixels: over the limit, under twice it
    _photo(folder / "huge.png", size=100)  # 10000 pixels: over twice the limit
    scan = scan_images(folder, 64)
    assert [p.name for p in scan.files] == ["big0.png", "big1.png", "big2.png"]
    assert scan.warnings == ["instance_dir: skipping huge.png: image too large to decode safely"]
    assert np.asarray(load_sample(scan.files[0], 64, True, False, None).pixels).shape == (3, 64, 64)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert capfd.readouterr().err == ""


def test_an_image_broken_during_training_is_named(tmp_path):
    path = _photo(tmp_path / "dog.png")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DreamttyError, match=f"cannot read training image {path}: "):
        load_sample(path, 64, True, False, None)


# -- the class-image cache ------------------------------------------------------------------
@pytest.fixture
def fake_generate(tmp_path, monkeypatch):
    """Fresh cache; class images "generated" as grey squares of the run's size. Records the indices."""
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))
    made: list[list[int]] = []

    def generate(ref, prompt, indices, resolution, seed, device, folder, progress):
        made.append(list(indices))
        for i in indices:
            Image.new("RGB", (resolution, resolution), (i, i, i)).save(folder / f"class-{i:05d}.png")
        progress(len(indices))

    monkeypatch.setattr(class_images, "_generate", generate)
    return made


def _ensure(resolution: int, warnings: list[str], count: int = 3, report=lambda done, total: None,
            processes: int = 1) -> list[Path]:
    return ensure_class_images(resolve_model("demo"), "a photo of dog", count, resolution, 0, CPU, 0, processes,
                               report, lambda: None, warnings.append)


@pytest.mark.parametrize("processes", [1, 2])
def test_class_image_progress_is_said_once_per_count_and_never_past_the_total(fake_generate, processes):
    said: list[tuple[int, int]] = []
    _ensure(64, [], report=lambda done, total: said.append((done, total)), processes=processes)
    assert said == [(0, 3), (3, 3)]  # process 0 of 2 makes 2 of the 3, and counts the other's 1 too
    assert fake_generate == [[0, 1, 2][::processes]]


def test_class_images_are_reused_at_their_resolution_and_another_resolution_keeps_them(fake_generate):
    warnings: list[str] = []
    files = _ensure(64, warnings)
    assert fake_generate == [[0, 1, 2]] and [Image.open(f).size for f in files] == [(64, 64)] * 3
    stamps = [f.stat().st_mtime_ns for f in files]
    assert _ensure(64, warnings) == files and fake_generate == [[0, 1, 2]]  # reused
    larger = _ensure(128, warnings)  # its own folder: a run at 64 px resumed later trains on the same images
    assert fake_generate[-1] == [0, 1, 2] and larger[0].parent != files[0].parent
    assert [Image.open(f).size for f in larger] == [(128, 128)] * 3
    assert [Image.open(f).size for f in files] == [(64, 64)] * 3 and [f.stat().st_mtime_ns for f in files] == stamps
    assert _ensure(64, warnings) == files and len(fake_generate) == 2
    assert (files[0].parent / "prompt.txt").read_text() == "demo\na photo of dog\n64\n"
    assert warnings == []


def test_corrupt_cached_class_images_are_generated_again_with_a_warning(fake_generate):
    warnings: list[str] = []
    files = _ensure(64, warnings)
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    files[2].unlink()
    files[2].symlink_to(files[2].with_name("nowhere.png"))  # a broken link
    assert _ensure(64, warnings) == files
    assert fake_generate[-1] == [1, 2]
    prefix = f"class_prompt: generating the cached class image {class_dir(resolve_model('demo'), 'a photo of dog', 64)}"
    assert warnings[0].startswith(f"{prefix}/class-00001.png again: corrupt image (")
    assert warnings[1] == f"{prefix}/class-00002.png again: broken link"
    assert [np.asarray(open_rgb(f))[0, 0].tolist() for f in files] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]


def test_a_class_image_that_cannot_be_saved_is_named_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from types import SimpleNamespace

    def pipe(prompt, height, width, **_):
        return SimpleNamespace(images=[Image.new("RGB", (width, height))] * len(prompt))

    pipe.dreamtty = SimpleNamespace(family="demo")
    monkeypatch.setattr("backend.engine.loader.load_pipeline", lambda *args: pipe)
    folder = tmp_path / "cache"
    (folder / "class-00001.png").mkdir(parents=True)  # what the cache holds in its place
    with pytest.raises(DreamttyError) as err:
        class_images._generate(resolve_model("demo"), "a dog", [0, 1], 64, 0, CPU, folder, lambda done: None)
    assert str(err.value) == (f"class_prompt: cannot save the class image {folder / 'class-00001.png'}: Is a "
                              "directory; resume with --resume latest (ctrl+r on the Train screen) once it can be "
                              "written")
    assert sorted(p.name for p in folder.iterdir()) == ["class-00000.png", "class-00001.png"]
