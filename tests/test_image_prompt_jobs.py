"""Image prompts and describe through the service, its worker and the CLI: previews, metadata and reproduce,
the models they need (library, pull --for, the error naming the pull command), and every bad input."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import companions, downloads, library, metadata
from backend.errors import DreamttyError, RequestError
from backend.events import Done, ImageSaved, Note, Preview, TextOutput
from backend.image_prompts import ImagePrompt, convert_image_prompts
from backend.jobkinds.describe import DescribeRequest
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.request import GenerateRequest
from backend.service import Service
from cli_helpers import dreamtty
from image_helpers import gradient, write_image

TIMEOUT = 180


def picture() -> Image.Image:
    """A reference with edges: a dark box on a gradient."""
    image = gradient(96, 80)
    image.paste((10, 10, 40), (20, 15, 60, 50))
    return image


@pytest.fixture
def reference(tmp_path) -> Path:
    return write_image(tmp_path / "reference.png", picture())


async def _run(service, events, request, out) -> list:
    job = service.submit(request, out)
    seen = []
    async for event in service.wait(job, events):
        seen.append(event)
    assert isinstance(seen[-1], Done), seen[-1]
    return seen


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_references_through_the_worker_metadata_and_reproduce(on_job_service, tmp_path, reference):
    image = str(write_image(tmp_path / "in.png"))
    prompts = [f"{reference}:canny:0.8", f"{reference}:face", f"{reference}:depth:0:0.5"]  # the last one is off
    requests = [GenerateRequest.from_dict({"prompt": "a fox", "model": "demo", "steps": 6, "image_prompts": prompts}),
                Img2ImgRequest.from_dict({"prompt": "a fox", "model": "demo-xl", "steps": 6, "image": image,
                                          "strength": 0.7, "image_prompts": prompts[:2]})]
    service, events = on_job_service
    for request in requests:
        seen = await asyncio.wait_for(_run(service, events, request, tmp_path / "out"), TIMEOUT)
        maps = [e for e in seen if isinstance(e, Preview) and e.label]
        assert [e.label for e in maps] == ["canny-1"] and (maps[0].width, maps[0].height) == (128, 128)
        edges = np.frombuffer(maps[0].rgb, dtype=np.uint8)
        assert set(np.unique(edges)) == {0, 255}  # a canny map, sent before sampling starts
        assert seen.index(maps[0]) < min(i for i, e in enumerate(seen) if type(e).__name__ == "Step")
        [path] = [e.path for e in seen if isinstance(e, ImageSaved)]
        meta = metadata.read(path)
        refs = meta["request"]["image_prompts"]
        assert [(r["type"], r["weight"], r["stop"]) for r in refs][:2] == [("canny", 0.8, 0.5), ("face", 0.75, 0.9)]
        assert all(r["path"] == str(reference) and len(r["hash"]) == 12 for r in refs)
        records = meta["prompt"]["image_prompts"]
        assert [(r["index"], r["type"]) for r in records] == [(0, "canny"), (1, "face")]
        assert records[1]["encoder"]["name"] == "demo-image-encoder" and len(records[0]["hash"]) == 10
        text = Image.open(path).text["parameters"]
        family = meta["family"]
        assert (f'ControlNet 0: "Module: canny, Model: {family}-canny [{records[0]["hash"]}], Weight: 0.8, '
                'Guidance Start: 0, Guidance End: 0.5"') in text
        assert f'ControlNet 1: "Module: ip-adapter_clip, Model: {family}-face [' in text
        again_request, warnings = metadata.image_request(path)
        assert warnings == [] and again_request.image_prompts == [ImagePrompt(**r) for r in refs]
        again_request = metadata.as_made(again_request, meta["prompt"])  # as reproduce: each the model it used
        assert [p.model for p in again_request.image_prompts] == [f"{family}-canny", f"{family}-face", None][:len(refs)]
        again = await asyncio.wait_for(_run(service, events, again_request, tmp_path / "again"), TIMEOUT)
        [again_path] = [e.path for e in again if isinstance(e, ImageSaved)]
        assert np.array_equal(_pixels(again_path), _pixels(path))
    # A reference that changed since: reproduce names it, nothing is queued.
    picture().transpose(Image.Transpose.ROTATE_180).save(reference)
    changed = rf"^image_prompt: 1 \(canny\): {reference} changed since the job was made"
    with pytest.raises(RequestError, match=changed):
        service.submit(metadata.image_request(path)[0], tmp_path / "again")


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_what_reading_a_reference_changed_is_kept_in_the_metadata(on_job_service, tmp_path):
    """"has transparency: composited on white" was a note only; an input image's is kept in the metadata."""
    clear = picture().convert("RGBA")
    clear.putalpha(100)
    clear.save(tmp_path / "clear.png")
    request = GenerateRequest.from_dict({"prompt": "a fox", "model": "demo", "steps": 2, "width": 64, "height": 64,
                                         "image_prompts": [f"{tmp_path / 'clear.png'}:face"]})
    service, events = on_job_service
    seen = await asyncio.wait_for(_run(service, events, request, tmp_path / "out"), TIMEOUT)
    [path] = [e.path for e in seen if isinstance(e, ImageSaved)]
    [record] = metadata.read(path)["prompt"]["image_prompts"]
    assert record["warnings"] == [f"{tmp_path / 'clear.png'} has transparency: composited on white"]
    assert any(isinstance(e, Note) and "has transparency" in e.message for e in seen)


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_a_reference_that_stops_before_a_vary_starts_is_left_out_with_a_note(on_job_service, tmp_path, reference):
    """Strength 0.5 of 6 steps runs steps 4..6; a canny reference stopping at 0.5 ends at step 3. It was loaded,
    its map made and recorded, and it changed nothing: now it is left out with a note, and the pixels are the
    ones made without it."""
    image = str(write_image(tmp_path / "in.png"))
    base = {"prompt": "a fox", "model": "demo", "steps": 6, "image": image, "strength": 0.5, "seed": 3}
    with_idle = Img2ImgRequest.from_dict({**base, "image_prompts": [f"{reference}:canny:0.8:0.5", f"{reference}:face"]})
    without = Img2ImgRequest.from_dict({**base, "image_prompts": [f"{reference}:face"]})
    service, events = on_job_service
    seen = await asyncio.wait_for(_run(service, events, with_idle, tmp_path / "out"), TIMEOUT)
    alone = await asyncio.wait_for(_run(service, events, without, tmp_path / "alone"), TIMEOUT)
    assert [e.message for e in seen if isinstance(e, Note)] == [
        "image prompt 1 (canny): it stops at 0.5 of the schedule, before the first step this job runs (4 of 6); "
        "it is left out (raise its stop or the strength to use it)"]
    assert not [e for e in seen if isinstance(e, Preview) and e.label]  # no canny map made
    [path], [alone_path] = ([e.path for e in run if isinstance(e, ImageSaved)] for run in (seen, alone))
    meta = metadata.read(path)
    assert [(r["index"], r["type"]) for r in meta["prompt"]["image_prompts"]] == [(1, "face")]
    assert [r["type"] for r in meta["request"]["image_prompts"]] == ["canny", "face"]  # as asked: reproduce agrees
    assert np.array_equal(_pixels(path), _pixels(alone_path))


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_keep_inputs_keeps_the_references_too_and_reproduce_reads_their_copies(on_job_service, tmp_path,
                                                                                    reference):
    service, events = on_job_service
    image = str(write_image(tmp_path / "in.png"))
    request = Img2ImgRequest.from_dict({"prompt": "a fox", "model": "demo", "steps": 4, "image": image, "seed": 3,
                                        "keep_inputs": True, "image_prompts": [f"{reference}:face"]})
    seen = await asyncio.wait_for(_run(service, events, request, tmp_path / "out"), TIMEOUT)
    [path] = [e.path for e in seen if isinstance(e, ImageSaved)]
    record = metadata.read(path)["prompt"]
    kept = record["kept_inputs"]
    assert sorted(kept) == ["image", "image_prompt 1"]
    assert Path(kept["image_prompt 1"]).parent == tmp_path / "out" / "inputs"
    os.remove(reference)
    again, notes = metadata.image_request(path)[0].with_kept_inputs(record)
    assert again.image_prompts[0].path == kept["image_prompt 1"] and again.image == image
    copy = kept["image_prompt 1"]
    assert notes == [f"image_prompt 1: {reference} is missing or changed; using the copy kept at {copy}"]
    seen = await asyncio.wait_for(_run(service, events, again, tmp_path / "again"), TIMEOUT)
    assert np.array_equal(_pixels(next(e.path for e in seen if isinstance(e, ImageSaved))), _pixels(path))


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_describe_returns_text_through_the_worker(on_job_service, tmp_path, reference):
    from backend.engine.demo_companions import CAPTION_WORDS, TAGS

    service, events = on_job_service
    texts = {}
    for mode in ("photo", "anime"):
        request = DescribeRequest.from_dict({"image": str(reference), "mode": mode, "model": "demo"})
        seen = await asyncio.wait_for(_run(service, events, request, tmp_path / "out"), TIMEOUT)
        [texts[mode]] = [e.text for e in seen if isinstance(e, TextOutput)]
        assert not [e for e in seen if isinstance(e, ImageSaved)] and seen[-1].paths == []
    words = texts["photo"].split()
    assert len(words) == 8 and set(words) <= set(CAPTION_WORDS)
    tags = texts["anime"].split(", ")
    assert tags and set(tags) <= {t.replace("_", " ") if len(t) > 3 else t for t in TAGS[4:]}


def test_cli_image_prompts_show_preprocessed_and_describe(tmp_path, demo_dirs, reference, capsys):
    out = tmp_path / "out"
    r = dreamtty(capsys, "generate", "a fox", "--demo", "--steps", "4", "--image-prompt", f"{reference}:structure",
                 "--image-prompt", f"{reference}:image:1.2:0.3", "--show-preprocessed", "--out", str(out))
    assert r.returncode == 0, r.stderr
    image = Path(r.stdout.strip().splitlines()[-1])
    saved = image.with_suffix(".structure-1.png")
    assert f"preprocessed {saved}" in r.stderr and Image.open(saved).size == (128, 128)
    assert [(p["type"], p["weight"], p["stop"]) for p in metadata.read(image)["request"]["image_prompts"]] == [
        ("structure", 1.0, 0.5), ("image", 1.2, 0.3)]
    r = dreamtty(capsys, "describe", str(reference), "--demo")
    assert r.returncode == 0 and len(r.stdout.split()) == 8, r.stderr


@pytest.fixture
def service(tmp_path):
    """A service that is never started: submit validates, and must queue nothing on error."""
    svc = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    yield svc
    svc.store.close()


def _refused(service, values: dict, tmp_path, message: str, kind=GenerateRequest) -> None:
    with pytest.raises(DreamttyError) as info:
        service.submit(kind.from_dict({"model": "demo", **values}), tmp_path / "out")
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert service.jobs() == []


def test_bad_references_are_refused_in_one_line(service, tmp_path, reference):
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ([str(reference)] * 5, "image_prompt: 5 given; at most 4 reference images"),
        ([f"{reference}:sketch"], "image_prompt: '" + f"{reference}:sketch': unknown type 'sketch'; allowed: image, "
                                  "face, canny, depth, structure"),
        ([{"path": str(reference), "type": "pose"}], "image_prompt: 1: unknown type 'pose'"),
        ([f"{reference}:canny:2.5"], "image_prompt: 1 (canny): weight 2.5 is out of range; allowed 0..2"),
        ([f"{reference}:image:1:1.5"], "image_prompt: 1 (image): stop 1.5 is out of range; allowed 0..1"),
        ([f"{reference}:image:-1"], "image_prompt: 1 (image): weight -1 is out of range"),
        ([f"{reference}:image:2.0000001"], "image_prompt: 1 (image): weight 2.0000001 is out of range"),  # not "2"
        ([{"path": str(reference), "hash": 123}], "image_prompt: 1: hash must be text (the content hash recorded at "
                                                  "submission), got a number"),
        ([{"path": str(reference), "model": ["a"]}], "image_prompt: 1: model must be text (a name of the model "
                                                     "library), got a list"),
        ([{}], "image_prompt: 1: path is missing; give the image's path"),  # "{}: path and type must be text"
        ([{"path": str(reference), "type": None}], "image_prompt: 1: type must be text, got null"),  # "'type': None"
        ([f"{reference}:image:1:0.5:9"], f"image_prompt: '{reference}:image:1:0.5:9': 3 fields after the type "
                                         "'image'; give at most WEIGHT and STOP"),  # "unknown type '9'"
        (["https://example.com/a.png"], "image_prompt: 'https://example.com/a.png' is an address; give an image "
                                        "file's path (nothing is downloaded)"),  # "…/https:/example.com/a.png"
        ([f"{reference}:face:lots"], "image_prompt: 1 (face): weight 'lots' is not a number; allowed 0..2"),
        ([f"{reference}::0.5"], "image_prompt: '" + f"{reference}::0.5': the type is empty; give one of image, "
                                "face, canny, depth, structure (IMAGE[:TYPE[:WEIGHT[:STOP]]])"),  # not "is missing"
        ([f"{reference}:"], "image_prompt: '" + f"{reference}:': the type is empty; give one of image, "
                            "face, canny, depth, structure"),  # not "{reference}: is missing"
        ([str(reference), f"{tmp_path}/gone.png:face"], f"image_prompt: 2 (face): {tmp_path}/gone.png is missing"),
        ([f"{tmp_path}/a::b/gone.png"], f"image_prompt: 1 (image): {tmp_path}/a::b/gone.png is missing"),  # no number
        ([f"{tmp_path}/{'a' * 300}.png"], "image_prompt: 1 (image): cannot read"),  # a name too long: not a 500
        ([{"path": str(reference)}, {"path": str(reference), "weight": "[/]"}],
         "image_prompt: 2: weight '[/]' is not a number; allowed 0..2"),
        ([{"path": str(reference), "stop": "nan"}], "image_prompt: 1: stop 'nan' is not a finite number; allowed 0..1"),
        ([str(tmp_path / "notes.png")], "is not an image PIL can read"),
        ([str(tmp_path)], "is a folder; give an image file"),
        ("photo.png", "image_prompt: 'photo.png' is not allowed; give a list"),
        ([str(reference), None], "image_prompt: 2: null is not IMAGE[:TYPE[:WEIGHT[:STOP]]] or a mapping"),  # "None"
        ([True], "image_prompt: 1: true is not IMAGE[:TYPE[:WEIGHT[:STOP]]] or a mapping"),
        ([{"path": str(reference), "colour": 1}], "image_prompt: unknown key 'colour'"),
    ]
    for prompts, message in cases:
        _refused(service, {"image_prompts": prompts}, tmp_path, message)
    mapping = {"path": str(reference), "type": " IMAGE "}  # a type in any case, as IMAGE:TYPE takes it
    assert convert_image_prompts("image_prompts", [mapping])[0].type == "image"
    stop_only = convert_image_prompts("image_prompts", [f"{reference}:canny::0.3"])[0]  # the type's weight
    assert (stop_only.weight, stop_only.stop) == (None, 0.3)
    _refused(service, {"image": str(reference), "mode": "poem"}, tmp_path,
             "mode: unknown 'poem'; allowed: photo, anime", DescribeRequest)
    _refused(service, {"image": str(tmp_path / "gone.png")}, tmp_path, "image: ", DescribeRequest)


@pytest.mark.parametrize("number,why", [("nan", "is not a finite number"), ("inf", "is not a finite number"),
                                        ("abc", "is not a number"), ("0x1", "is not a number"),
                                        ("1_0", "is not a number"),  # not 10
                                        ("\u0663", "is not a number (write it in ASCII digits)")])
def test_a_text_reference_s_weight_and_stop_are_checked_as_a_mapping_s(service, tmp_path, reference, number, why):
    """IMAGE:TYPE:WEIGHT:STOP numbers the reference and names the setting and its range, as a mapping's error does
    (it said "'ref.png:canny:nan': 'nan' is not a number")."""
    shown = repr(number)
    _refused(service, {"image_prompts": [str(reference), f"{reference}:canny:{number}"]}, tmp_path,
             f"image_prompt: 2 (canny): weight {shown} {why}; allowed 0..2")
    _refused(service, {"image_prompts": [f"{reference}:face: 1 :{number}"]}, tmp_path,
             f"image_prompt: 1 (face): stop {shown} {why}; allowed 0..1")
    _refused(service, {"image_prompts": [{"path": str(reference), "weight": number}]}, tmp_path,
             f"image_prompt: 1: weight {shown} {why}; allowed 0..2")


def test_a_path_holding_a_type_s_name_is_read_as_the_file_that_exists(tmp_path, reference):
    """A file named ``lit:canny`` can be given (it was the file ``lit`` as a canny reference: "lit is missing"),
    alone or with a type; where no reading names a file, the type is read as before."""
    literal = tmp_path / "lit:canny"
    literal.write_bytes(reference.read_bytes())
    (tmp_path / "lit").write_bytes(reference.read_bytes())  # the shorter reading's file exists too

    def read(text: str) -> ImagePrompt:
        return convert_image_prompts("image_prompts", [text])[0]

    assert read(str(literal)) == ImagePrompt(str(literal))
    assert read(f"{literal}:face") == ImagePrompt(str(literal), "face")  # it said "'face' is not a number"
    assert read(f"{literal}:face::0.5") == ImagePrompt(str(literal), "face", stop=0.5)
    assert read(f"{tmp_path}/lit:depth:1") == ImagePrompt(f"{tmp_path}/lit", "depth", 1.0)
    assert read(f"{tmp_path}/gone:canny") == ImagePrompt(f"{tmp_path}/gone", "canny")  # none exists: as before
    with pytest.raises(RequestError, match="^image_prompt: 1 \\(canny\\): weight 'face' is not a number"):
        read(f"{tmp_path}/gone:canny:face")
    [resolved] = GenerateRequest.from_dict({"image_prompts": [f"{literal}:canny"]}).resolved("sd1").image_prompts
    assert (resolved.path, resolved.type, len(resolved.hash)) == (str(literal), "canny", 12)


def test_a_reference_left_out_of_a_text_to_image_job_says_to_raise_the_steps():
    from backend.engine.image_prompt import _running

    notes: list[str] = []
    request = GenerateRequest(steps=2, image_prompts=[ImagePrompt("pose.png", "canny", 1.0, 0.4)])
    assert _running(request, notes.append)[0].weight == 0.0
    assert notes == ["image prompt 1 (canny): it stops at 0.4 of the schedule, before the first step this job runs "
                     "(1 of 2); it is left out (raise its stop or the steps to use it)"]  # it has no strength


def _adapter_file(path: Path, context: int) -> Path:
    """An IP-Adapter file's header with the tensors the library reads (its data is zeros)."""
    from safetensors.numpy import save_file

    save_file({"image_proj.proj_in.weight": np.zeros((8, 1280), np.float16),
               "ip_adapter.1.to_k_ip.weight": np.zeros((8, context), np.float16)}, str(path))
    return path


def _controlnet_folder(path: Path, context: int) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "cross_attention_dim": context}))
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return path


def test_models_each_type_needs_are_found_for_the_family_or_named_with_the_pull_command(tmp_path, monkeypatch):
    for kind in ("ip_adapters", "controlnets", "depth_models"):
        monkeypatch.setenv(f"DREAMTTY_{kind.upper()}", str(tmp_path / kind))
        (tmp_path / kind).mkdir()
    folder = tmp_path / "ip_adapters"
    _adapter_file(folder / "ip-adapter-plus_sd15.safetensors", 768)
    _adapter_file(folder / "ip-adapter-plus-face_sd15.safetensors", 768)
    encoder = folder / "image_encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 1280}))
    _controlnet_folder(tmp_path / "controlnets" / "control_v11p_sd15_canny", 768)
    _controlnet_folder(tmp_path / "controlnets" / "my-controlnet", 2048)

    lib = library.discover(kinds=("ip_adapter", "controlnet"))
    got = {(e.kind, e.name): (e.family, e.variant) for e in lib.entries if e.source != "built-in"}
    assert got == {("ip_adapter", "ip-adapter-plus_sd15"): ("sd1", "image"),
                   ("ip_adapter", "ip-adapter-plus-face_sd15"): ("sd1", "face"),
                   ("ip_adapter", "image_encoder"): ("any", "image_encoder"),
                   ("controlnet", "control_v11p_sd15_canny"): ("sd1", "canny"),
                   ("controlnet", "my-controlnet"): ("sdxl", None)}
    from tui.cli_models import format_table

    table = format_table(lib)
    assert "ip_adapters (8)" in table and "controlnets (8)" in table  # with the demo models' built-in ones
    lines = table.splitlines()
    assert any(line.startswith("  control_v11p_sd15_canny ") and line.endswith("[canny]") for line in lines)
    assert "[type unknown: name it with canny, depth or structure (cpds)]" in table

    ref = "x.png"
    face = companions.plan([GenerateRequest.from_dict({"image_prompts": [f"{ref}:face:1:1"]}).image_prompts[0]], "sd1")
    assert face[0].model.name == "ip-adapter-plus-face_sd15" and face[0].encoder.name == "image_encoder"
    # Of two canny ControlNets, the first by name; the one a reference names (a reproduce: the image's) when here.
    _controlnet_folder(tmp_path / "controlnets" / "a-canny-sd15", 768)
    canny = [ImagePrompt(ref, "canny", 1.0, 1.0, model=name) for name in (None, "control_v11p_sd15_canny", "gone")]
    assert [(need.model.name, need.stand_in) for need in companions.plan(canny, "sd1")] == [
        ("a-canny-sd15", None), ("control_v11p_sd15_canny", None),
        ("a-canny-sd15", "no canny ControlNet named gone here; a-canny-sd15 stands in for it")]

    def refused(kind: str, family: str, message: str) -> None:
        [prompt] = GenerateRequest.from_dict({"image_prompts": [f"{ref}:{kind}:1:1"]}).image_prompts
        with pytest.raises(RequestError) as info:
            companions.plan([prompt], family)
        assert str(info.value) == message

    refused("image", "sdxl", "image_prompt: IP-Adapter ip-adapter-plus_sd15 is for SD 1.x, the model is SDXL; get it "
                             "with: dreamtty models pull --for image --family sdxl")
    refused("face", "sd2", "image_prompt: IP-Adapter ip-adapter-plus-face_sd15 is for SD 1.x, the model is SD 2.x; "
                           "none is known to download for SD 2.x; put one made for it in the ip_adapters folder")
    refused("depth", "sdxl", f"image_prompt: no depth ControlNet for SDXL in {tmp_path / 'controlnets'}; get it with: "
                             "dreamtty models pull --for depth --family sdxl")
    refused("structure", "sd1", f"image_prompt: no structure ControlNet for SD 1.x in {tmp_path / 'controlnets'}; none "
                                "is known to download for SD 1.x; put one made for it in the controlnets folder")
    _controlnet_folder(tmp_path / "controlnets" / "control_v11f1p_sd15_depth", 768)
    refused("depth", "sd1", f"image_prompt: no depth model in {tmp_path / 'depth_models'}; get it with: "
                            "dreamtty models pull --for depth")


class _Hub:
    """A fake Hub: the file list of one repository, downloads written where asked (local_dir)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.downloaded: list[str] = []

    def model_info(self, repo, revision=None, files_metadata=False):
        from types import SimpleNamespace

        return SimpleNamespace(sha="c0ffee", siblings=[SimpleNamespace(rfilename=n, size=len(d), lfs=None)
                                                       for n, d in self.files.items()])

    def hf_hub_download(self, repo, filename, revision=None, local_dir=None, **kwargs):
        self.downloaded.append(filename)
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.files[filename])
        return str(path)


def test_pull_for_downloads_the_usual_files_into_the_library(tmp_path, monkeypatch):
    from backend import config

    monkeypatch.setenv("DREAMTTY_IP_ADAPTERS", str(tmp_path / "ip"))
    hub = _Hub({"models/ip-adapter-plus_sd15.safetensors": b"a" * 10, "models/ip-adapter_sd15.bin": b"b",
                "models/image_encoder/config.json": b"{}", "models/image_encoder/model.safetensors": b"c" * 5,
                "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors": b"d"})
    plans = companions.usual_for("image", "sd1")
    assert [(u.kind, u.variant, u.repo) for u in plans] == [("ip_adapter", "image", "h94/IP-Adapter"),
                                                            ("ip_adapter", "image_encoder", "h94/IP-Adapter")]
    for usual in plans:
        folder = downloads.pull(usual.repo, patterns=usual.files, local_dir=usual.folder(config.load()), api=hub)
    assert folder == tmp_path / "ip" / "h94--IP-Adapter"
    assert sorted(hub.downloaded) == ["models/image_encoder/config.json", "models/image_encoder/model.safetensors",
                                      "models/ip-adapter-plus_sd15.safetensors"]
    assert (folder / "models" / "ip-adapter-plus_sd15.safetensors").read_bytes() == b"a" * 10
    downloads.pull(plans[0].repo, patterns=plans[0].files, local_dir=folder, api=hub)  # already there: kept
    assert len(hub.downloaded) == 4
    with pytest.raises(DreamttyError, match="pull: h94/IP-Adapter has no file models/ip-adapter-plus-face_sd15"):
        face = companions.usual_for("face", "sd1")[0]
        downloads.pull(face.repo, patterns=face.files, local_dir=folder, api=hub)
    assert {u.repo for u in companions.usual_for("image-prompt", "sdxl")} >= {
        "h94/IP-Adapter", "diffusers/controlnet-canny-sdxl-1.0", "depth-anything/Depth-Anything-V2-Small-hf"}
    assert [u.variant for u in companions.usual_for("describe", "sdxl")] == ["photo", "anime"]


def test_pull_for_cli_options(capsys, monkeypatch):
    from tui.cli import main

    assert main(["models", "pull", "org/x", "--for", "canny"]) == 2
    assert "for: takes no id or --file" in capsys.readouterr().err
    assert main(["models", "pull"]) == 2
    assert "id: give a Hugging Face id, or --for" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "pull", "--for", "canny", "--family", "sd1"]) == 2
    assert "lllyasviel/control_v11p_sd15_canny cannot be downloaded" in capsys.readouterr().err
    assert main(["models", "pull", "--for", "structure"]) == 2  # it printed nothing and exited 0
    assert capsys.readouterr().err == ("dreamtty: for: none is known to download for structure (sdxl); put one made "
                                       "for it in the controlnets folder (docs/image-prompts.md)\n")


def test_a_map_that_cannot_be_saved_is_one_line(tmp_path):
    from backend.events import Preview
    from tui.cli_jobs import _save_maps

    edges = Preview(job=1, worker=0, image=0, width=2, height=1, rgb=bytes(6), label="canny")
    saved = tmp_path / "a.png"
    assert _save_maps(str(saved), [edges]) == [f"preprocessed {tmp_path / 'a.canny.png'}"]
    assert Image.open(tmp_path / "a.canny.png").size == (2, 1)
    elsewhere = tmp_path / "on-the-service-machine" / "b.png"  # a folder this machine does not have
    [line] = _save_maps(str(elsewhere), [edges])
    assert line.startswith(f"could not save the preprocessed canny map as {elsewhere.with_suffix('.canny.png')}: ")


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_inpaint_with_a_face_reference_steers_only_the_mask(on_job_service, tmp_path, reference):
    """References compose with the image kinds: inpaint with a face reference changes the repainted box and
    leaves every pixel outside it as the input's."""
    image = write_image(tmp_path / "in.png")
    base = {"prompt": "a fox", "model": "demo", "steps": 6, "seed": 3, "image": str(image), "box": [32, 32, 48, 40],
            "mode": "modify"}
    service, events = on_job_service
    made = []
    for prompts in ([], [f"{reference}:face:1.0"]):
        request = InpaintRequest.from_dict({**base, "image_prompts": prompts})
        seen = await asyncio.wait_for(_run(service, events, request, tmp_path / "out"), TIMEOUT)
        made.append(_pixels(next(e.path for e in seen if isinstance(e, ImageSaved))))
    source = _pixels(image)
    outside = np.ones(source.shape[:2], bool)
    outside[24:80, 24:88] = False  # the box and its feathered border
    for pixels in made:
        assert np.array_equal(pixels[outside], source[outside])
    assert np.abs(made[0][40:64, 40:72] - made[1][40:64, 40:72]).max() > 0  # the reference changed the box


def test_a_job_that_runs_no_model_takes_references_that_change_nothing_and_says_why_it_refuses_others(
        service, tmp_path, reference):
    """A fast upscale, like a tiled one, takes a reference of weight or stop 0 (it changes nothing, loads nothing)
    and records it; one that would steer is refused, and describe says that it runs a captioner."""
    from backend.jobkinds.upscale import UpscaleRequest

    image = str(write_image(tmp_path / "in.png"))
    idle = [f"{reference}:canny:0", f"{reference}:face:1:0"]
    for kind, values, what in (
            (UpscaleRequest, {"image": image, "fast": True}, "a fast upscale (or one at strength 0) runs no model"),
            (Img2ImgRequest, {"image": image, "strength": 0}, "vary at strength 0 gives the input back and runs no "
                                                              "model"),
            (DescribeRequest, {"image": image}, "describe runs a captioner, not an image model")):
        service.submit(kind.from_dict({"model": "demo", **values, "image_prompts": idle}), tmp_path / "out")
        recorded = service.jobs()[-1].request["image_prompts"]
        assert [(p["type"], p["weight"], p["stop"]) for p in recorded] == [("canny", 0.0, 0.5), ("face", 1.0, 0.0)]
        steering = {**values, "image_prompts": [*idle, f"{reference}:image"]}
        with pytest.raises(RequestError) as info:
            service.submit(kind.from_dict({"model": "demo", **steering}), tmp_path / "out")
        assert str(info.value) == f"image_prompt: {what}, so reference images cannot steer it; leave them out"
    assert len(service.jobs()) == 3
