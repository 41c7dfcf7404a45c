"""Bad input images, masks and settings of the image-input kinds: one line naming the field, nothing
queued; and the images that are converted rather than refused (16-bit, grey, CMYK, alpha, animated, EXIF)."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import input_images, user_files
from backend.errors import DreamttyError, RequestError
from backend.image_prompts import ImagePrompt
from backend.input_images import read_image, read_mask
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.jobkinds.outpaint import OutpaintRequest
from backend.jobkinds.upscale import UpscaleRequest
from backend.request import GenerateRequest
from backend.service import Service
from image_helpers import gradient, inpaint_model, write_image, write_mask


@pytest.fixture
def service(tmp_path):
    """A service that is never started: submit validates, and must queue nothing on error."""
    svc = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    yield svc
    svc.store.close()


def _png(width: int, height: int, bit_depth: int = 8, colour: int = 2, rows: bytes | None = None,
         text: bytes = b"") -> bytes:
    """A PNG written by hand: any header, the rows given (or one byte row of zeros per line), and a
    tEXt chunk when ``text`` is given (keyword NUL text)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\0" * (height * 2))
    texts = chunk(b"tEXt", text) if text else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + texts + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _refused(service, request, tmp_path, message: str) -> str:
    with pytest.raises(DreamttyError) as info:
        service.submit(request, tmp_path / "out")
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert service.jobs() == []  # nothing queued
    return text


def test_bad_image_files(service, tmp_path):
    write_image(tmp_path / "ok.png")
    (tmp_path / "notes.png").write_text("not an image")
    whole = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "bomb.png").write_bytes(_png(20000, 20000))  # PIL's own guard refuses it
    (tmp_path / "huge.png").write_bytes(_png(9000, 8000))
    write_image(tmp_path / "tiny.png", gradient().resize((7, 13)))
    write_image(tmp_path / "narrow.png", gradient().resize((64, 4096)))  # 1:64: the model's 512 px make it 8 wide
    cases = [
        (tmp_path / "missing.png", "image: {} is missing"),
        (tmp_path, "is a folder; give an image file"),
        (tmp_path / "notes.png", "is not an image PIL can read"),
        (tmp_path / "cut.png", "is truncated or damaged"),
        (tmp_path / "bomb.png", "is too large to decode safely; allowed up to 67 megapixels"),
        (tmp_path / "huge.png", "image: {} is 9000x8000; allowed up to 67 megapixels"),  # said once, not as damage
        (tmp_path / "tiny.png", "image: {} is 7x13; at least 64 pixels a side are needed"),
        (tmp_path / "narrow.png", "image: {} is 64x4096: scaled to the model's largest side it would be 8x512, "
                                  "under 64 pixels a side; crop it, or give a size (it is then stretched to it)"),
    ]
    for path, message in cases:
        text = _refused(service, Img2ImgRequest(image=str(path)), tmp_path, message.format(path))
        assert text.count(f"{path}") == 1, text


def test_reading_an_images_metadata_says_what_a_job_says_of_it(tmp_path):
    """reproduce quoted PIL: "Image size (400000000 pixels) exceeds limit of ... pixels, could be decompression
    bomb DOS attack"."""
    from backend import metadata

    write_image(tmp_path / "ok.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(_png(20000, 20000))
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    for name, message in (("notes", "is not an image PIL can read"), ("cut", "is truncated or damaged: "),
                          ("bomb", "is too large to decode safely; allowed up to 67 megapixels")):
        with pytest.raises(DreamttyError) as info:
            metadata.image_request(tmp_path / f"{name}.png")
        assert str(info.value).startswith(f"image: {tmp_path / name}.png {message}"), info.value


def test_unreadable_image(service, tmp_path):
    """Mode 0 for a user; root reads files whatever their mode, so it gets one whose read the kernel refuses."""
    if os.geteuid() == 0:
        path = Path("/proc/self/mem")  # reading offset 0 (never mapped) fails with EIO
        if not path.exists():
            pytest.skip("needs Linux procfs to have a file root cannot read")
    else:
        path = write_image(tmp_path / "secret.png")
        path.chmod(0)
    _refused(service, Img2ImgRequest(image=str(path)), tmp_path, "image: cannot read")


def test_bad_settings(service, tmp_path):
    image = str(write_image(tmp_path / "in.png"))
    big = write_image(tmp_path / "big.png", Image.new("RGB", (2100, 1000)))
    mask = str(write_mask(tmp_path / "mask.png", (10, 10, 20, 20)))
    Image.new("L", (128, 128), 0).save(tmp_path / "black.png")
    Image.new("L", (128, 128), 255).save(tmp_path / "white.png")
    dot = Image.new("L", (1024, 1024), 0)
    dot.putpixel((5, 5), 255)  # its one white pixel is lost in the resize to the image's size
    dot.save(tmp_path / "dot.png")
    tiny = str(write_image(tmp_path / "tiny.png", gradient().resize((20, 40))))
    cases = [
        (Img2ImgRequest(image=image, strength=1.5), "strength: 1.5 is out of range; allowed 0..1"),
        (Img2ImgRequest(image=image, strength=-0.1), "strength: -0.1 is out of range"),
        (Img2ImgRequest(image=image, strength=0.05, steps=8), "strength: 0.05 of 8 steps runs no step"),
        (UpscaleRequest(image=image, steps=2), "strength: 0.382 (upscale's default) of 2 steps runs no step"),
        (Img2ImgRequest(image=image, width=100, height=128), "width: 100 is not allowed; use a positive multiple of 8"),
        (InpaintRequest(image=image), "mask: give a mask image or a box X,Y,W,H (one of them)"),
        (InpaintRequest(image=image, mask=mask, box=(1, 1, 8, 8)), "mask: give a mask image or a box"),
        (InpaintRequest(image=image, mask=""), "mask: give a mask image or a box"),
        (InpaintRequest(image=image, mask=str(tmp_path / "black.png")), "mask: {}/black.png is all black"),
        (InpaintRequest(image=image, mask=str(tmp_path / "dot.png")),
         "mask: {}/dot.png resized to the image's 128x128 is all black"),
        (InpaintRequest(image=image, mask=str(tmp_path / "white.png")), "is all white: every pixel would be repainted"),
        (InpaintRequest(image=image, mask=str(tmp_path / "nomask.png")), "mask: {}/nomask.png is missing"),
        (InpaintRequest(image=image, box=(100, 100, 64, 64)), "box: 100,100,64,64 is not inside the 128x128 image"),
        (InpaintRequest(image=image, box=(0, 0, 128, 128)), "box: 0,0,128,128 is the whole 128x128 image: every pixel"),
        (InpaintRequest(image=image, box=(1, 1, 8, 8), mode="erase"), "mode: unknown 'erase'; allowed: fill, detail, modify"),
        (InpaintRequest(image=image, box=(1, 1, 8, 8), context=2), "context: 2 is out of range; allowed 0..1"),
        (OutpaintRequest(image=image), "outpaint: nothing to add; give the pixels to add on the left, right, top or bottom"),
        (OutpaintRequest(image=image, left=-8), "left: -8 is negative"),
        (OutpaintRequest(image=image, right=500), "outpaint: the result would be 632x128, past demo (SD1-style, tiny)'s maximum 512"),
        (OutpaintRequest(image=tiny, top=8), "outpaint: the result would be 20x48, under 64 pixels a side; add more "
                                             "pixels, or start from a larger image"),  # it made a 20x48 image
        (OutpaintRequest(image=str(big), top=8), "image: {}/big.png is 2100x1000, past demo (SD1-style, tiny)'s "
                                                 "maximum 512 a side already; scale it down or crop it first"),
        (UpscaleRequest(image=image, scale=3), "scale: 3 is not allowed; allowed: 1.5, 2, 4"),
        (UpscaleRequest(image=str(big), scale=4, fast=True), "scale: 4x of 2100x1000 is 8400x4000; allowed up to 8192"),
        (UpscaleRequest(image=image, width=512, height=512),
         "size: upscale makes a 256x256 image from this input; leave the size out (the TUI's Size: the input image's)"),
        (UpscaleRequest(image=image, upscaler="nope"), "upscaler: nope not found"),
        (UpscaleRequest(image=tiny), "image: {}/tiny.png upscaled is 40x80; repainting needs at least 64 pixels a side"),
        (UpscaleRequest(image=image, image_prompts=[f"{image}:canny"]),  # known before it is queued, not failed later
         "image_prompt: canny, depth and structure references cannot steer an upscale denoised in tiles (256x256 is, "
         "in tiles of 128)"),
    ]
    for request, message in cases:
        request.model = "demo"
        _refused(service, request, tmp_path, message.format(tmp_path))
    for enlarged_only in (UpscaleRequest(image=tiny, fast=True), UpscaleRequest(image=tiny, strength=0)):
        assert service.prepare(replace(enlarged_only, model="demo")).payload["request"]["width"] == 40
    for untiled in (UpscaleRequest(image=image, scale=1.5, image_prompts=[f"{image}:canny"]),  # 192 is taken whole
                    UpscaleRequest(image=image, image_prompts=[f"{image}:canny:0"])):  # a weight of 0 steers nothing
        assert service.prepare(replace(untiled, model="demo")).payload["request"]["image_prompts"]


def test_inpainting_model_refused_for_vary(service, tmp_path):
    folder = inpaint_model(tmp_path / "inpaint-model")
    image = str(write_image(tmp_path / "in.png"))
    _refused(service, Img2ImgRequest(image=image, model=str(folder)), tmp_path, "is an inpaint checkpoint")
    assert service.prepare(InpaintRequest(image=image, box=(8, 8, 32, 32), model=str(folder))).kind == "inpaint"


def test_changed_input_is_refused_with_both_hashes(service, tmp_path):
    path = write_image(tmp_path / "in.png")
    recorded = service.prepare(Img2ImgRequest(image=str(path))).payload["request"]
    write_image(path, gradient().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    text = _refused(service, Img2ImgRequest.from_dict(recorded), tmp_path, "changed since the job was made")
    assert recorded["image_hash"] in text


def test_sixteen_bit_images_are_scaled_to_eight(tmp_path, monkeypatch):
    monkeypatch.setattr(input_images, "STRIP_ROWS", 1)  # converted a row at a time: every row still is
    grey = np.array([[0, 2570, 40000, 65535]] * 2, dtype=">u2")
    (tmp_path / "g16.png").write_bytes(_png(4, 2, 16, 0, b"".join(b"\0" + row.tobytes() for row in grey)))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    (tmp_path / "rgb16.png").write_bytes(_png(4, 2, 16, 2, b"".join(b"\0" + row.tobytes() for row in rgb)))
    for name in ("g16.png", "rgb16.png"):
        read = read_image(str(tmp_path / name))
        assert read.image.mode == "RGB"
        assert np.asarray(read.image)[..., 0].tolist() == [[0, 10, 156, 255]] * 2  # scaled, not clipped to white
        assert "has 16-bit channels: reduced to 8 bits" in read.warnings[0]
    # a float TIFF of 0..1 with a hole (NaN) and a spike (inf): scaled by its finite values, not made black
    Image.fromarray(np.array([[0, 0.5, 1, np.nan, np.inf]], dtype=np.float32)).save(tmp_path / "holes.tif")
    assert np.asarray(read_image(str(tmp_path / "holes.tif")).image)[0, :, 0].tolist() == [0, 128, 255, 0, 255]
    # 32-bit integers: 16-bit values stored wide scale as 16-bit ones; past 65535, from the full 32-bit range
    for values, grey in (([0, 40000, 65535], [0, 156, 255]), ([0, 2**30, 2**31 - 1], [0, 128, 255])):
        Image.fromarray(np.array([values], dtype=np.int32), "I").save(tmp_path / "i32.tif")
        assert np.asarray(read_image(str(tmp_path / "i32.tif")).image)[0, :, 0].tolist() == grey
    # unsigned 32-bit (SampleFormat 1; Pillow writes signed): the upper half wrapped below zero and read as black
    unsigned = np.array([[0, 2**31, 2**32 - 1]], dtype=np.uint32)
    Image.fromarray(unsigned.view(np.int32), "I").save(tmp_path / "u32.tif")
    signed_tag = b"\x53\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # tag 339 SampleFormat: SHORT, 1 value, 2
    data = (tmp_path / "u32.tif").read_bytes()
    assert data.count(signed_tag) == 1
    (tmp_path / "u32.tif").write_bytes(data.replace(signed_tag, signed_tag[:-2] + b"\x01\x00"))
    read = read_image(str(tmp_path / "u32.tif"))
    assert np.asarray(read.image)[0, :, 0].tolist() == [0, 128, 255] and "32-bit integer" in read.warnings[0]
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)).save(tmp_path / "f32.tif")  # what TIFFs may hold
    assert read_image(str(tmp_path / "f32.tif")).warnings == [f"{tmp_path / 'f32.tif'} has 32-bit float channels: "
                                                               "reduced to 8 bits"]


def test_grey_cmyk_alpha_animated_and_rotated_images(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "grey.png")
    assert read_image(str(tmp_path / "grey.png")).image.getpixel((0, 0)) == (100, 100, 100)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = read_image(str(tmp_path / "cmyk.jpg"))
    assert cmyk.image.mode == "RGB" and "is CMYK: converted to RGB" in cmyk.warnings[0]

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    rgba.save(tmp_path / "alpha.png")
    alpha = read_image(str(tmp_path / "alpha.png"))
    assert alpha.image.getpixel((0, 0)) == (255, 255, 255) and alpha.image.getpixel((1, 1)) == (255, 0, 0)
    assert "has transparency: composited on white" in alpha.warnings[0]
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    assert read_image(str(tmp_path / "opaque.png")).warnings == []  # an alpha channel that is all opaque
    Image.new("RGB", (8, 8), (200, 30, 30)).convert("LAB").save(tmp_path / "lab.tif")  # its band "A" is a colour
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "unused.png", transparency=2)  # the transparent colour no pixel has
    assert [read_image(str(tmp_path / name)).warnings for name in ("lab.tif", "unused.png")] == [[], []]
    palette.putpixel((0, 0), 2)
    palette.save(tmp_path / "used.png", transparency=2)
    used = read_image(str(tmp_path / "used.png"))
    assert used.image.getpixel((0, 0)) == (255, 255, 255) and "has transparency" in used.warnings[0]

    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    anim = read_image(str(tmp_path / "anim.gif"))
    assert anim.image.getpixel((0, 0))[0] > 200 and "is animated (2 frames): the first frame is used" in anim.warnings[0]

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: viewers show it upright
    gradient(64, 32).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(str(tmp_path / "rotated.jpg")).size == (32, 64)


def test_mask_of_another_size_is_resized_with_a_warning(tmp_path):
    write_mask(tmp_path / "small.png", (0, 0, 16, 16), size=(64, 64))
    mask, read = read_mask(str(tmp_path / "small.png"), (128, 128))
    assert mask.shape == (128, 128) and mask[:32, :32].all() and not mask[32:, :].any()
    assert read.warnings == [f"mask: {tmp_path}/small.png is 64x64: resized to the image's 128x128"]
    white = np.asarray(Image.open(tmp_path / "small.png").convert("L")) > 127
    Image.fromarray(white.astype(np.uint16) * 65535).save(tmp_path / "small16.png")  # what it changed says "mask"
    assert read_mask(str(tmp_path / "small16.png"), (128, 128))[1].warnings[0] == (
        f"mask: {tmp_path}/small16.png has 16-bit channels: reduced to 8 bits")
    layer = Image.new("RGBA", (128, 128), (0, 0, 0, 0))  # a stroke painted on a transparent layer
    layer.paste((255, 255, 255, 255), (10, 10, 20, 20))
    layer.save(tmp_path / "layer.png")
    mask, _ = read_mask(str(tmp_path / "layer.png"), (128, 128))
    assert mask.sum() == 100 and mask[15, 15]


def test_devices_are_refused_before_reading(service, tmp_path):
    """A device (/dev/zero would never end) as an image, a mask or an image prompt is not a regular file."""
    image = str(write_image(tmp_path / "in.png"))
    cases = [
        (Img2ImgRequest(image="/dev/null"), "image: /dev/null is not a regular file"),
        (InpaintRequest(image=image, mask="/dev/null"), "mask: /dev/null is not a regular file"),
        (GenerateRequest(image_prompts=[ImagePrompt("/dev/null")]),
         "image_prompt: 1 (image): /dev/null is not a regular file"),
    ]
    for request, message in cases:
        request.model = "demo"
        _refused(service, request, tmp_path, message)


def test_fifo_is_refused_without_waiting_for_its_writer(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # a writer that never ends the stream: a read of it would wait forever
    pool = ThreadPoolExecutor(1)
    try:
        with pytest.raises(DreamttyError) as info:
            pool.submit(read_image, str(fifo)).result(timeout=10)
    finally:
        os.close(writer)  # ends such a read, so a failing test ends too
        pool.shutdown()
    assert str(info.value) == f"image: {fifo} is not a regular file"


def test_a_file_is_read_up_to_the_limit_only(tmp_path):
    """A file whose size says nothing (/proc's say 0) is cut at the limit, not read whole."""
    with pytest.raises(user_files.RefusedFile, match="/proc/self/status is over"):
        user_files.read_bytes("/proc/self/status", 10)
    (tmp_path / "ten").write_bytes(b"0123456789")
    assert user_files.read_bytes(tmp_path / "ten", 10) == b"0123456789"


@pytest.mark.parametrize("record", ["a string", {"kept_inputs": [1, 2]}, {"kept_inputs": {"image": 5}},
                                    {"kept_inputs": {"image": "/tmp/a\0b"}}, {"kept_inputs": {"image": "/tmp/\ud800"}}])
def test_a_damaged_record_of_kept_inputs_keeps_nothing(tmp_path, record):
    """reproduce reads the record from a PNG, which anyone may have written."""
    request = Img2ImgRequest(prompt="x", image=str(tmp_path / "gone.png"), image_hash="d7741e300849")
    again, notes = request.with_kept_inputs(record)
    assert again == request and all(note.endswith("is missing or changed too") for note in notes)



def test_a_kept_copy_with_other_bytes_is_replaced_and_copies_move_with_their_outputs_folder(tmp_path):
    image = write_image(tmp_path / "in.png")
    digest = input_images.content_hash(image.read_bytes())
    request = Img2ImgRequest(prompt="x", image=str(image), image_hash=digest, keep_inputs=True)
    (tmp_path / "out" / "inputs").mkdir(parents=True)
    (tmp_path / "out" / "inputs" / f"{digest}.png").write_text("not this image")  # it was trusted by its name
    kept, notes = request.keep_inputs_in(tmp_path / "out")
    assert notes == [] and Path(kept["image"]).read_bytes() == image.read_bytes()
    (tmp_path / "out").rename(tmp_path / "moved")
    image.unlink()
    result = tmp_path / "moved" / "2026-12-07" / "120000-3.png"  # its record names the copy where it was
    again, notes = request.with_kept_inputs({"kept_inputs": kept}, result)
    assert again.image == str(tmp_path / "moved" / "inputs" / f"{digest}.png")
    assert notes == [f"image: {image} is missing or changed; using the copy kept at {again.image}"]


def test_the_metadata_of_an_image_past_pils_pixel_limit_reads_without_pils_warning(tmp_path):
    """PIL warns (two raw lines on stderr) between its limit, about 89 MP, and twice that."""
    from backend import metadata

    side = 9500  # 90.25 MP, grey
    path = tmp_path / "large.png"
    path.write_bytes(_png(side, side, colour=0, rows=b"\0" * (side + 1) * side, text=b'dreamtty\0{"version": 1}'))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metadata.read(path) == {"version": 1}


def test_an_input_that_cannot_be_kept_is_a_note_and_the_image_is_made_all_the_same(tmp_path):
    """A file where out/inputs goes: the job failed with a raw FileExistsError after its work, saving nothing."""
    image = str(write_image(tmp_path / "in.png"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "inputs").write_text("in the way")
    request = Img2ImgRequest(image=image, image_hash="abc123", keep_inputs=True)
    assert request.keep_inputs_in(tmp_path / "out") == ({}, [
        f"keep_inputs: cannot copy the image to {tmp_path / 'out' / 'inputs'} (File exists); the image records its "
        "path only"])
    (tmp_path / "out" / "inputs").unlink()

    def half_copied(source, target):  # as a full disk leaves it
        Path(target).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("shutil.copyfile", half_copied)
        assert "(No space left on device)" in request.keep_inputs_in(tmp_path / "out")[1][0]
    assert list((tmp_path / "out" / "inputs").iterdir()) == []  # no half copy left behind
    kept, notes = request.keep_inputs_in(tmp_path / "out")
    assert notes == [] and Path(kept["image"]).read_bytes() == Path(image).read_bytes()


def test_an_animated_gif_cut_short_is_said_damaged_naming_the_field(tmp_path):
    """Its frame count raised IndexError or struct.error: "internal error (IndexError)" over the API."""
    from io import BytesIO

    from backend.input_images import read_image

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert("P") for _ in range(5)]
    buffer = BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    whole = buffer.getvalue()
    first = len(whole) // 5  # within the second frame: the first decodes, the count of frames does not
    cuts = [n for n in range(first, len(whole), 3)][:400]
    for n in cuts:
        (tmp_path / "cut.gif").write_bytes(whole[:n])
        try:
            read_image(str(tmp_path / "cut.gif"))
        except RequestError as exc:
            assert str(exc).startswith(f"image: {tmp_path / 'cut.gif'} is truncated or damaged"), exc


def test_damaged_exif_is_a_note_not_a_warning_on_stderr(tmp_path, capfd):
    """PIL warns "Corrupt EXIF data" (a UserWarning): two lines with its source path on a TUI's screen."""
    from io import BytesIO

    from backend.input_images import read_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    buffer = BytesIO()
    Image.new("RGB", (64, 96)).save(buffer, format="JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    start = data.find(b"Exif\x00\x00")
    data[start + 10:start + 30] = b"\xff" * 20  # its entries cut
    (tmp_path / "phone.jpg").write_bytes(bytes(data))
    image = read_image(str(tmp_path / "phone.jpg"))
    assert capfd.readouterr().err == ""
    assert [note for note in image.warnings if "EXIF" in note] == [
        f"{tmp_path / 'phone.jpg'}: Corrupt EXIF data.  Expecting to read 2 bytes but only got 0. (its orientation "
        "may not be applied)"]
