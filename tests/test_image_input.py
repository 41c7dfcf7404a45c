"""Image input in the engine: image to image equals stock diffusers, strength 0 is the input, inpaint and
outpaint leave every pixel outside the mask as it was, inpainting models, guidance and prompt editing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image
from scipy import ndimage

from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, decode, denoise
from backend.engine.img2img import ImageStart, vary_image
from backend.engine.inpaint import crop_box, feathered, inpaint_image, outpaint_image, prefill
from backend.engine.scheduling import make_scheduler
from backend.guidance_settings import GuidanceSettings
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.jobkinds.outpaint import OutpaintRequest
from image_helpers import box_array, gradient, inpaint_model, write_image, write_mask

CASES = [("euler", "normal", 0.5), ("dpmpp_2m", "karras", 0.85), ("euler_a", "normal", 1.0), ("heun", "karras", 0.6)]


def _ours(pipe, sampler, schedule, strength, seed=42):
    g = torch.Generator("cpu").manual_seed(seed)
    cond = encode(pipe, "a red fox", "blurry", True)
    sched = make_scheduler(pipe.dreamtty.scheduler_config, sampler, schedule, seed=seed)
    with torch.inference_mode():
        start = ImageStart(gradient(), strength).latents(pipe, g, cond.cond.dtype)
        latents = denoise(pipe, sched, DenoiseSpec(cond, 128, 128, 8, 7.0, g, start=start))
        return np.asarray(decode(pipe, latents, g), dtype=np.float32) / 255


def _stock(pipe, sampler, schedule, strength, seed=42):
    xl = hasattr(pipe, "text_encoder_2")
    parts = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    if xl:
        stock = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=False)
    else:
        stock = StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = make_scheduler(pipe.dreamtty.scheduler_config, sampler, schedule, seed=seed)
    g = torch.Generator("cpu").manual_seed(seed)
    out = stock("a red fox", image=gradient(), strength=strength, negative_prompt="blurry", num_inference_steps=8,
                guidance_scale=7.0, generator=g, output_type="np").images[0]
    return np.round(out * 255) / 255


@pytest.mark.parametrize("family", ["sd", "xl"])
@pytest.mark.parametrize("sampler,schedule,strength", CASES)
def test_img2img_matches_stock_pipeline(family, sampler, schedule, strength, sd_pipe, xl_pipe):
    pipe = sd_pipe if family == "sd" else xl_pipe
    ours = _ours(pipe, sampler, schedule, strength)
    assert ours.std() > 0.01
    assert np.abs(ours - _stock(pipe, sampler, schedule, strength)).max() <= 1e-4


def _request(cls, tmp_path, **fields):
    image = write_image(tmp_path / "in.png")
    return cls(image=str(image), **{"prompt": "a red fox", "steps": 8, "seed": 7, **fields}).resolved("demo")


def test_strength_zero_gives_the_input_back_exactly_and_loads_no_model(tmp_path):
    request = _request(Img2ImgRequest, tmp_path, strength=0)
    assert not request.uses_model and _request(Img2ImgRequest, tmp_path, strength=0.2).uses_model
    image, record = vary_image(None, request)  # the worker passes no pipeline to a job that uses no model
    assert np.array_equal(np.asarray(image), np.asarray(gradient()))
    assert record["input"]["image"]["hash"] == request.image_hash


def test_strength_runs_that_share_of_the_whole_schedule(sd_pipe, tmp_path):
    """--steps is the schedule's length: strength s runs int(steps * s) steps, and the rest is skipped."""
    totals = []
    for strength in (0.25, 0.5, 1.0):
        request = _request(Img2ImgRequest, tmp_path, strength=strength)
        vary_image(sd_pipe, request, on_step=lambda step, total, latents: totals.append(total))
    assert sorted(set(totals)) == [2, 4, 8]


def test_guidance_and_prompt_editing_work_from_an_image(sd_pipe, tmp_path):
    plain = np.asarray(vary_image(sd_pipe, _request(Img2ImgRequest, tmp_path, strength=0.75))[0], dtype=int)
    sag = _request(Img2ImgRequest, tmp_path, strength=0.75, guidance=GuidanceSettings(sag=1.0, freeu=()))
    edited = _request(Img2ImgRequest, tmp_path, strength=0.75, prompt="a [red:blue:0.9] fox")
    for request in (sag, edited):
        image, record = vary_image(sd_pipe, request)
        assert np.abs(np.asarray(image, dtype=int) - plain).max() > 0
    assert record["schedule"]  # the editing schedule over the whole 8 steps is recorded


@pytest.mark.parametrize("mode", ["fill", "detail", "modify"])
@pytest.mark.parametrize("family", ["demo", "demo-xl"])
def test_inpaint_changes_only_the_masked_pixels(mode, family, sd_pipe, xl_pipe, tmp_path):
    pipe = sd_pipe if family == "demo" else xl_pipe
    box = (30, 44, 40, 24)
    mask = write_mask(tmp_path / "mask.png", box)
    request = replace(_request(InpaintRequest, tmp_path, mask=str(mask), mode=mode), model=family)
    image, record = inpaint_image(pipe, request)
    out, src, inside = np.asarray(image).astype(int), np.asarray(gradient()).astype(int), box_array(box)
    assert image.size == (128, 128)
    assert np.array_equal(out[~inside], src[~inside])
    assert np.abs(out[inside] - src[inside]).mean() > 5
    assert record["input"]["mask"]["hash"] == request.mask_hash


def test_inpaint_with_a_box_and_a_soft_edge(sd_pipe, tmp_path):
    request = _request(InpaintRequest, tmp_path, box=(10, 10, 50, 50), feather=12)
    out = np.asarray(inpaint_image(sd_pipe, request)[0]).astype(int)
    src, inside = np.asarray(gradient()).astype(int), box_array((10, 10, 50, 50))
    assert np.array_equal(out[~inside], src[~inside])
    assert np.abs(out[35, 35] - src[35, 35]).max() > 0  # deep inside: repainted


def test_inpainting_model_gets_the_mask_as_input(tmp_path, dreamtty_home):
    from backend.engine.loader import load_pipeline
    from backend.models import resolve_model

    folder = inpaint_model(tmp_path / "inpaint-model")
    ref = resolve_model(str(folder), variants=("inpaint",))
    assert ref.variant == "inpaint"
    pipe = load_pipeline(ref, torch.device("cpu"), torch.float32)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9
    box = (40, 40, 48, 40)
    request = replace(_request(InpaintRequest, tmp_path, box=box), model=str(folder))
    out = np.asarray(inpaint_image(pipe, request)[0]).astype(int)
    src, inside = np.asarray(gradient()).astype(int), box_array(box)
    assert np.array_equal(out[~inside], src[~inside])
    assert np.abs(out[inside] - src[inside]).mean() > 5


def test_inpainting_models_are_refused_for_other_kinds(tmp_path):
    from backend.errors import ModelError
    from backend.models import resolve_model

    folder = inpaint_model(tmp_path / "inpaint-model")
    with pytest.raises(ModelError, match="is an inpaint checkpoint, for inpaint and outpaint; use a regular one"):
        resolve_model(str(folder))


@pytest.mark.parametrize("family", ["demo", "demo-xl"])
def test_outpaint_grows_the_canvas_and_keeps_the_original(family, sd_pipe, xl_pipe, tmp_path):
    pipe = sd_pipe if family == "demo" else xl_pipe
    request = replace(_request(OutpaintRequest, tmp_path, left=30, bottom=12, feather=16), model=family)
    assert (request.left, request.right, request.top, request.bottom) == (32, 0, 0, 16)  # rounded up to 8
    image, _ = outpaint_image(pipe, request)
    assert image.size == (128 + 32, 128 + 16) == (request.width, request.height)
    out, src = np.asarray(image).astype(int), np.asarray(gradient()).astype(int)
    original = out[:128, 32:]
    # Beyond the 16-pixel seam the original is exact; the seam and the new area are painted.
    assert np.array_equal(original[:128 - 16, 16:], src[:128 - 16, 16:])
    assert np.abs(original[:, :4] - src[:, :4]).max() > 0
    assert out[:, :32].std() > 1


def test_crop_box_holds_the_mask_with_context():
    mask = box_array((100, 5, 20, 10))
    assert crop_box(mask, 0.0) == (64, 0, 128, 64)  # at least 64 pixels, moved inside the image
    left, top, right, bottom = crop_box(mask, 0.618)
    assert right - left == bottom - top == 80 and left <= 100 and right >= 120 and top <= 5
    assert crop_box(mask, 1.0) == (0, 0, 128, 128)


def test_feathered_alpha_is_zero_outside_the_mask():
    mask = box_array((20, 20, 40, 40))
    alpha = feathered(mask, 8)
    assert (alpha[~mask] == 0).all() and alpha[40, 40] == 1.0
    assert 0 < alpha[20, 40] < alpha[23, 40] < 1  # rises from the mask's edge inwards


def test_prefill_takes_the_colours_around_the_hole():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32] = (200, 0, 0)
    image[:, 32:] = (0, 0, 200)
    hole = box_array((24, 24, 16, 16), (64, 64))
    filled = np.asarray(prefill(Image.fromarray(image), hole)).astype(int)
    assert np.array_equal(filled[~hole], image[~hole])
    assert filled[32, 25, 0] > filled[32, 25, 2] and filled[32, 38, 2] > filled[32, 38, 0]


@pytest.mark.parametrize("holes", [[(5, 900, 40, 30)], [(5, 900, 40, 30), (1150, 3, 30, 40)], []])
def test_prefill_of_a_small_hole_in_a_large_image_is_the_whole_images_fill(holes, monkeypatch):
    """It blurs a window around the hole, not the whole image, with the same pixels as a fill of it all."""
    from backend.engine import inpaint

    monkeypatch.setattr(inpaint, "FILL_RADII", (128, 16, 3))
    image = np.random.default_rng(3).integers(0, 256, (960, 1200, 3), dtype=np.uint8)
    hole = np.zeros(image.shape[:2], dtype=bool)
    for box in holes:
        hole |= box_array(box, (1200, 960))
    whole = image.astype(np.float32)  # the fill computed on every pixel
    whole[hole] = whole[~hole].mean(axis=0)
    for radius in inpaint.FILL_RADII:
        blurred = ndimage.uniform_filter(whole, size=(2 * radius + 1, 2 * radius + 1, 1), mode="nearest")
        whole[hole] = blurred[hole]
    expected = np.round(whole).clip(0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(prefill(Image.fromarray(image), hole)), expected)


def test_single_file_inpainting_checkpoint_loads_its_nine_channel_unet(tmp_path, monkeypatch):
    from ckpt_helpers import save_single_file, write_family_config
    from diffusers import StableDiffusionInpaintPipeline

    from backend.engine.demo_models import build_sd
    from backend.engine.loader import load_pipeline
    from backend.models import resolve_model

    write_family_config(build_sd(xl=False), tmp_path / "configs" / "sd1")
    monkeypatch.setenv("DREAMTTY_MODEL_CONFIGS", str(tmp_path / "configs"))
    model = StableDiffusionInpaintPipeline.from_pretrained(inpaint_model(tmp_path / "folder"))
    path = save_single_file(model, "sd1", tmp_path / "tiny-inpainting.safetensors")
    ref = resolve_model(str(path), variants=("inpaint",))
    assert (ref.family, ref.variant) == ("sd1", "inpaint")
    pipe = load_pipeline(ref, torch.device("cpu"), torch.float32)
    assert isinstance(pipe, StableDiffusionInpaintPipeline) and pipe.unet.config.in_channels == 9
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), model.unet.state_dict().values()))


def test_each_kind_says_what_its_strength_takes():
    """The form's strength placeholder comes from the kind (the named strengths, the modes' own, a default)."""
    from backend import jobkinds
    from backend.jobkinds.image_input import ImageInputRequest

    hints = {kind.name: kind.request_type.strength_hint() for kind in jobkinds.KINDS.values()
             if issubclass(kind.request_type, ImageInputRequest)}
    assert hints["img2img"] == "subtle 0.5, strong 0.85 or 0..1"
    assert hints["inpaint"] == "the mode's: fill 1, detail 0.5, modify 1"
    assert hints["upscale"] == "0.382; 0..1" and hints["outpaint"] == "1; 0..1"
