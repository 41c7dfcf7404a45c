"""Image-input jobs through the service and its worker, and through the CLI: metadata, warnings,
kept inputs, and reproduce giving identical pixels (or naming the input that is gone)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import metadata
from backend.errors import RequestError
from backend.events import Done, ImageSaved, Note
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.jobkinds.outpaint import OutpaintRequest
from backend.jobkinds.upscale import UpscaleRequest
from cli_helpers import dreamtty
from image_helpers import box_array, dreamtty_png, gradient, inpaint_model, write_image, write_mask

TIMEOUT = 180


async def _run(service, events, request, out) -> tuple[list[str], list]:
    job = service.submit(request, out)
    seen = []
    async for event in service.wait(job, events):
        seen.append(event)
    assert isinstance(seen[-1], Done), seen[-1]
    return [e.path for e in seen if isinstance(e, ImageSaved)], seen


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_every_kind_reproduces_identically(on_job_service, tmp_path):
    image = str(write_image(tmp_path / "in.png"))
    mask = str(write_mask(tmp_path / "mask.png", (30, 30, 50, 40)))
    common = {"image": image, "prompt": "a red fox", "model": "demo", "steps": 6}
    requests = {
        "img2img": Img2ImgRequest(**common, strength=0.6, count=2),
        "upscale": UpscaleRequest(**common, scale=1.5),
        "inpaint": InpaintRequest(**common, mask=mask, keep_inputs=True),
        "outpaint": OutpaintRequest(**common, right=24),
    }
    service, events = on_job_service
    made = {}
    for kind, request in requests.items():
        paths, seen = await asyncio.wait_for(_run(service, events, request, tmp_path / "out"), TIMEOUT)
        made[kind] = paths
        if kind == "upscale":
            assert any(isinstance(e, Note) and "Lanczos" in e.message for e in seen)
    assert len(made["img2img"]) == 2
    for kind, paths in made.items():
        meta = metadata.read(paths[-1])
        assert meta["kind"] == kind and meta["request"]["image_hash"] == meta["prompt"]["input"]["image"]["hash"]
        request, warnings = metadata.image_request(paths[-1])
        assert type(request) is type(requests[kind]) and warnings == []
        again, _ = await asyncio.wait_for(_run(service, events, request, tmp_path / "again"), TIMEOUT)
        assert np.array_equal(_pixels(again[0]), _pixels(paths[-1])), kind
    assert Image.open(made["outpaint"][0]).size == (152, 128)
    assert Image.open(made["upscale"][0]).size == (192, 192)
    inside = box_array((30, 30, 50, 40))
    assert np.array_equal(_pixels(made["inpaint"][0])[~inside], _pixels(image)[~inside])
    text = Image.open(made["img2img"][0]).text["parameters"]
    assert "Denoising strength: 0.6, Input image hash: " in text

    # --keep-inputs: the inputs' copies reproduce the job once the originals are gone.
    record = metadata.read(made["inpaint"][0])["prompt"]
    kept = record["kept_inputs"]
    assert sorted(kept) == ["image", "mask"] and all(Path(p).parent == tmp_path / "out" / "inputs" for p in kept.values())
    os.remove(image)
    request, _ = metadata.image_request(made["inpaint"][0])
    with pytest.raises(RequestError, match=f"image: {image} is missing"):
        service.submit(request, tmp_path / "again")
    request, notes = request.with_kept_inputs(record)
    assert request.image == kept["image"] and "using the copy kept at" in notes[0]
    again, _ = await asyncio.wait_for(_run(service, events, request, tmp_path / "again"), TIMEOUT)
    assert np.array_equal(_pixels(again[0]), _pixels(made["inpaint"][0]))
    Path(kept["image"]).write_bytes(b"damaged")  # the copy fails its check: said, not passed over
    request, notes = metadata.image_request(made["inpaint"][0])[0].with_kept_inputs(record)
    assert request.image == str(image) and notes == [f"image: the copy kept at {kept['image']} is missing or "
                                                     "changed too"]


def test_cli_vary_takes_the_image_settings_and_reproduces(tmp_path, demo_dirs, capsys):
    out = tmp_path / "out"
    source = dreamtty_png(tmp_path / "source.png", prompt="a red fox", seed=5, steps=6, cfg=5, styles=["Watercolor"])
    r = dreamtty(capsys, "vary", str(source), "--strength", "strong", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    varied = next(e["path"] for e in events if e["type"] == "image")
    req = metadata.read(varied)["request"]
    assert (req["prompt"], req["steps"], req["cfg"], req["styles"], req["strength"]) == ("a red fox", 6, 5.0, ["Watercolor"], 0.85)
    assert req["seed"] != 5 and req["image"] == str(Path(source).resolve())

    r = dreamtty(capsys, "reproduce", varied, "--out", str(tmp_path / "again"))
    assert r.returncode == 0 and "pixels: identical" in r.stderr, r.stderr


def test_cli_inpaint_box_and_bad_mask(tmp_path, demo_dirs, capsys):
    image = write_image(tmp_path / "photo.png", gradient())
    r = dreamtty(capsys, "inpaint", str(image), "--box", "16,16,40,40", "--prompt", "a cat", "--demo", "--steps", "4",
                 "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    inside = box_array((16, 16, 40, 40))
    assert np.array_equal(_pixels(path)[~inside], _pixels(image)[~inside])
    assert metadata.read(path)["request"]["prompt"] == "a cat"  # an image without metadata: flags and defaults

    model = inpaint_model(tmp_path / "inpaint-model")  # an inpainting checkpoint is allowed where the kind takes one
    r = dreamtty(capsys, "inpaint", str(image), "--box", "16,16,40,40", "--prompt", "a cat", "--model", str(model),
                 "--steps", "2", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert metadata.read(r.stdout.strip().splitlines()[-1])["request"]["model"] == str(model)

    Image.new("L", (128, 128), 0).save(tmp_path / "black.png")
    r = dreamtty(capsys, "inpaint", str(image), "--mask", str(tmp_path / "black.png"), "--demo", "--out",
                 str(tmp_path / "bad"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "mask: " in r.stderr and "is all black" in r.stderr
    assert not list((tmp_path / "bad").rglob("*.png"))
