"""Single-file checkpoints in each family's original key layout: detected and loaded offline."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from backend.engine.generate import generate_image
from backend.engine.loader import family_config, load_pipeline
from backend.errors import ModelError
from backend.models import ModelRef, resolve_model
from backend.request import GenerateRequest
from ckpt_helpers import LAYOUT_OF, pipeline_to_ldm, save_single_file, tiny_refiner, tiny_xl, write_family_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny pipelines, their config folders (DREAMTTY_MODEL_CONFIGS) and single files per family."""
    from backend.engine.demo_models import build_sd

    root = tmp_path_factory.mktemp("single-file")
    pipes = {"sd1": build_sd(False), "sdxl": tiny_xl(), "sdxl-refiner": tiny_refiner()}
    pipes["sd2-v"] = pipes["sd1"]  # same tiny weights, SD2 key layout (OpenCLIP text tower)
    paths = {}
    for family, pipe in pipes.items():
        write_family_config(pipe, root / "configs" / family)
        paths[family] = save_single_file(pipe, LAYOUT_OF[family], root / "ckpt" / f"tiny-{family}.safetensors")
    # The SD2 config folder has no tokenizer: the CLIP tokenizer built from the shipped BPE is used.
    shutil.rmtree(root / "configs" / "sd2-v" / "tokenizer")
    scheduler = root / "configs" / "sd2-v" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    return {"root": root, "pipes": pipes, "paths": paths}


@pytest.fixture(autouse=True)
def _configs(files, monkeypatch):
    monkeypatch.setenv("DREAMTTY_MODEL_CONFIGS", str(files["root"] / "configs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(a, name, None), getattr(b, name, None)
        assert (ma is None) == (mb is None), name
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl", "sdxl-refiner"])
def test_family_detected_and_loaded_offline(files, family):
    ref = resolve_model(str(files["paths"][family]))
    assert (ref.kind, ref.family) == ("file", family)
    pipe = load_pipeline(ref, CPU, torch.float32)
    assert pipe.dreamtty.family == family
    _same_weights(files["pipes"][family], pipe)
    if family == "sd2-v":
        assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.pad_token == "!"
    if family == "sdxl-refiner":
        assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"


def test_image_kinds_run_on_an_sd2_v_model(files, tmp_path):
    """Vary, inpaint, outpaint and upscale on SD 2.x (v-prediction, OpenCLIP layout): sizes, and the pixels
    outside the mask or the new canvas stay exactly the input's."""
    import numpy as np

    from backend.engine.img2img import vary_image
    from backend.engine.inpaint import inpaint_image, outpaint_image
    from backend.engine.upscale import upscale_image
    from backend.jobkinds.img2img import Img2ImgRequest
    from backend.jobkinds.inpaint import InpaintRequest
    from backend.jobkinds.outpaint import OutpaintRequest
    from backend.jobkinds.upscale import UpscaleRequest
    from image_helpers import box_array, gradient, write_image, write_mask

    path = str(files["paths"]["sd2-v"])
    pipe = load_pipeline(resolve_model(path), CPU, torch.float32)
    assert pipe.dreamtty.scheduler_config["prediction_type"] == "v_prediction"
    pipe.tokenizer = files["pipes"]["sd2-v"].tokenizer  # the tiny text encoder's own vocabulary, not OpenCLIP's
    common = dict(image=str(write_image(tmp_path / "in.png")), model=path, prompt="a red fox", steps=6, seed=3)
    src = np.asarray(gradient(), dtype=int)

    varied, _ = vary_image(pipe, Img2ImgRequest(**common, strength=0.6).resolved("sd2-v"))
    assert varied.size == (128, 128) and np.abs(np.asarray(varied, dtype=int) - src).mean() > 2
    box = (30, 44, 40, 24)
    mask = str(write_mask(tmp_path / "mask.png", box))
    painted, _ = inpaint_image(pipe, InpaintRequest(**common, mask=mask).resolved("sd2-v"))
    out, inside = np.asarray(painted, dtype=int), box_array(box)
    assert np.array_equal(out[~inside], src[~inside]) and np.abs(out[inside] - src[inside]).mean() > 5
    grown, _ = outpaint_image(pipe, OutpaintRequest(**common, right=24, feather=0).resolved("sd2-v"))
    assert grown.size == (152, 128) and np.array_equal(np.asarray(grown, dtype=int)[:, :128], src)
    big, _ = upscale_image(pipe, UpscaleRequest(**common, scale=1.5, upscaler="lanczos").resolved("sd2-v"))
    assert big.size == (192, 192)


def test_single_file_makes_the_same_pixels_as_the_folder(files, sd_pipe):
    pipe = load_pipeline(resolve_model(str(files["paths"]["sd1"])), CPU, torch.float32)
    request = GenerateRequest(prompt="a red fox", model="demo", steps=4, width=64, height=64, seed=3).resolved("demo")
    a, _ = generate_image(sd_pipe, request)
    b, _ = generate_image(pipe, request)
    assert a.tobytes() == b.tobytes()


def test_checkpoint_found_by_name_in_configured_folder(files, monkeypatch):
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(files["root"] / "ckpt"))
    ref = resolve_model("tiny-sdxl")
    assert (ref.kind, ref.family, ref.location) == ("file", "sdxl", str(files["paths"]["sdxl"]))


def test_truncated_file_is_a_clear_error(files, tmp_path):
    data = files["paths"]["sd1"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"^model: {cut} is truncated"):
        resolve_model(str(cut))
    with pytest.raises(ModelError, match="truncated"):  # the worker's path: a ModelError, not a crash
        load_pipeline(ModelRef("cut", "file", str(cut), "sd1"), CPU, torch.float32)


def test_pickles_refused_unless_allowed(files, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(files["pipes"]["sd1"], "sd1")}, ckpt)
    with pytest.raises(ModelError, match=r"pickle \(\.ckpt\).*--allow-pickle"):
        resolve_model(str(ckpt))
    with pytest.raises(ModelError, match="refused without --allow-pickle"):
        load_pipeline(ModelRef("tiny", "file", str(ckpt), "sd1"), CPU, torch.float32)
    monkeypatch.setenv("DREAMTTY_ALLOW_PICKLE", "1")
    ref = resolve_model(str(ckpt))
    assert ref.family == "sd1"
    _same_weights(files["pipes"]["sd1"], load_pipeline(ref, CPU, torch.float32))


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_allowed_pickle_still_runs_no_code(files, tmp_path, monkeypatch):
    """A pickle holding an object weights_only refuses failed with torch's "Unable to load weights from
    checkpoint file": it says why, at resolve time and (an object of torch's own, which the library's scan
    lets by) at load time, and runs nothing."""
    monkeypatch.setenv("DREAMTTY_ALLOW_PICKLE", "1")
    target = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    state = pipeline_to_ldm(files["pipes"]["sd1"], "sd1")
    torch.save({"state_dict": state, "payload": _Evil(str(target))}, ckpt, pickle_module=pickle)
    why = rf"^model: {ckpt} holds objects other than tensors \('{os.mkdir.__module__}.mkdir'\), which are never "
    with pytest.raises(ModelError, match=why):  # inspection does not run it either
        resolve_model(str(ckpt))
    with pytest.raises(ModelError, match=why):  # the worker's path
        load_pipeline(ModelRef("evil", "file", str(ckpt), "sd1"), CPU, torch.float32)
    assert not target.exists()
    module = tmp_path / "module.ckpt"
    torch.save({"state_dict": state, "head": torch.nn.Linear(2, 2)}, module)
    ref = resolve_model(str(module))
    linear = rf"^model: {module} holds objects other than tensors \('torch.nn.modules.linear.Linear'\)"
    with pytest.raises(ModelError, match=linear):
        load_pipeline(ref, CPU, torch.float32)


def test_shipped_configs_describe_the_real_models(monkeypatch):
    """Parameter counts of the shipped configs match the published models (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    monkeypatch.delenv("DREAMTTY_MODEL_CONFIGS")
    expected = {
        ("sd1", "unet"): 859_520_964, ("sd2-v", "unet"): 865_910_724, ("sdxl", "unet"): 2_567_463_684,
        ("sd1", "vae"): 83_653_863, ("sdxl", "vae"): 83_653_863,
        ("sd1", "text_encoder"): 123_060_480, ("sd2", "text_encoder"): 340_387_840,
        ("sdxl", "text_encoder_2"): 694_659_840,
    }
    for (family, part), count in expected.items():
        folder = family_config(family) / part
        with init_empty_weights():
            if part == "unet":
                model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
            elif part == "vae":
                model = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
            else:
                cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
                model = cls(CLIPTextConfig.from_pretrained(folder))
        assert sum(p.numel() for p in model.parameters()) == count, (family, part)
    predictions = {f: json.loads((family_config(f) / "scheduler" / "scheduler_config.json").read_text()).get(
        "prediction_type", "epsilon") for f in ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner")}
    assert predictions == {"sd1": "epsilon", "sd2": "epsilon", "sd2-v": "v_prediction", "sdxl": "epsilon",
                           "sdxl-refiner": "epsilon"}
