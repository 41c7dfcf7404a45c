"""Image prompts on the tiny demo models and their companions: each type steers the image, weight 0 and stop 0
change nothing, stop counts loop iterations, references compose, one ControlNet in our loop equals diffusers'
StableDiffusionControlNetPipeline, and the preprocessors on known pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.engine.extras import apply_extras
from backend.engine.generate import generate_image
from backend.request import GenerateRequest

TYPES = ("image", "face", "canny", "depth", "structure")


def _load(name: str):
    """A pipeline of its own: image prompts load adapters into it (the session's sd_pipe must stay as it is)."""
    from backend.engine.loader import load_pipeline
    from backend.models import resolve_model

    return load_pipeline(resolve_model(name), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def pipes(demo_dirs):
    return {"demo": _load("demo"), "demo-xl": _load("demo-xl")}


def shapes_picture() -> Image.Image:
    """A known picture: a bright square and a dark disc on a mid-grey ground."""
    image = Image.new("RGB", (96, 80), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 40, 40), fill=(250, 240, 20))
    draw.ellipse((50, 30, 85, 65), fill=(20, 30, 120))
    return image


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "reference.png"
    shapes_picture().save(path)
    return path


def make(pipe, family: str, prompts: list[str], steps: int = 6, **fields) -> np.ndarray:
    request = GenerateRequest.from_dict({"prompt": "a fox", "negative_prompt": "blurry", "model": family,
                                         "steps": steps, "seed": 3, "image_prompts": prompts, **fields})
    request = apply_extras(pipe, request.resolved(family))
    image, _ = generate_image(pipe, request.per_image(0))
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("family", ["demo", "demo-xl"])
@pytest.mark.parametrize("kind", TYPES)
def test_each_type_changes_the_image_and_weight_or_stop_zero_changes_nothing(pipes, family, kind, reference):
    pipe = pipes[family]
    plain = make(pipe, family, [])
    steered = make(pipe, family, [f"{reference}:{kind}"])
    assert np.abs(steered - plain).max() > 10
    assert np.array_equal(make(pipe, family, [f"{reference}:{kind}:0"]), plain)
    assert np.array_equal(make(pipe, family, [f"{reference}:{kind}:1:0"]), plain)
    assert np.array_equal(make(pipe, family, []), plain)  # the adapters are unloaded again


def _count_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda *args: calls.append(1))


def test_stop_at_half_applies_each_reference_in_the_first_half_of_the_steps(pipes, reference):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = pipes["demo"]
    request = GenerateRequest.from_dict({"prompt": "a fox", "model": "demo", "steps": 8, "seed": 3, "image_prompts": [
        f"{reference}:image:1:0.5", f"{reference}:canny:1:0.5"]}).resolved("demo")
    request = apply_extras(pipe, request)
    adapter = next(p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0))
    ip_calls, control_calls, unet_calls = [], [], []
    net = pipe.dreamtty.image_prompts.controls[0].net
    hooks = [_count_calls(adapter.to_k_ip[0], ip_calls), _count_calls(net, control_calls),
             _count_calls(pipe.unet, unet_calls)]
    try:
        generate_image(pipe, request.per_image(0))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(unet_calls) == 8  # one batched call per step (CFG rows together)
    assert len(ip_calls) == 4  # the first 4 of 8 steps (a slot at scale 0 is skipped)
    assert len(control_calls) == 4


def test_two_references_compose(pipes, reference, tmp_path):
    pipe = pipes["demo"]
    other = tmp_path / "other.png"
    shapes_picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    face, canny = f"{other}:face", f"{reference}:canny"
    both = make(pipe, "demo", [face, canny])
    for alone in (make(pipe, "demo", [face]), make(pipe, "demo", [canny]), make(pipe, "demo", [])):
        assert np.abs(both - alone).max() > 10


@pytest.mark.parametrize("family,sampler,schedule,cfg,stop", [
    ("demo", "euler", "normal", 7.0, 0.5), ("demo", "dpmpp_2m", "karras", 7.0, 1.0),
    ("demo", "euler_a", "normal", 1.0, 0.7), ("demo-xl", "euler", "normal", 7.0, 0.5),
    ("demo-xl", "dpmpp_2m", "karras", 1.0, 1.0)])
def test_our_loop_with_one_controlnet_equals_the_stock_controlnet_pipeline(pipes, family, sampler, schedule, cfg, stop):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from backend.engine.conditioning import encode
    from backend.engine.controlnet import load_controlnets
    from backend.engine.demo_companions import ensure_companion
    from backend.engine.denoise import DenoiseSpec, decode, denoise
    from backend.engine.image_prompt import Control, References
    from backend.engine.ip_adapter import load_adapters
    from backend.engine.preprocess import canny, fit
    from backend.engine.scheduling import make_scheduler
    from backend.image_prompts import ImagePrompt

    pipe = pipes[family]
    load_adapters(pipe, ())  # none left by an earlier test: the stock pipeline gets no image embeddings
    [net] = load_controlnets(pipe, [str(ensure_companion(f"{family}-canny"))])
    edges = canny(fit(shapes_picture(), 128, 128))
    refs = References([], [], [], [Control(ImagePrompt("x", "canny", 0.8, stop), net, edges)])
    g = torch.Generator("cpu").manual_seed(42)
    cond = encode(pipe, "a red fox", "blurry", cfg > 1)
    scheduler = make_scheduler(pipe.dreamtty.scheduler_config, sampler, schedule, seed=42)
    latents = denoise(pipe, scheduler, DenoiseSpec(cond, 128, 128, 8, cfg, g, references=refs))
    ours = np.asarray(decode(pipe, latents, g), dtype=np.float32) / 255

    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=net,
                 scheduler=make_scheduler(pipe.dreamtty.scheduler_config, sampler, schedule, seed=42))
    if family == "demo-xl":
        stock_pipe = StableDiffusionXLControlNetPipeline(**parts, text_encoder_2=pipe.text_encoder_2,
                                                         tokenizer_2=pipe.tokenizer_2)
    else:
        stock_pipe = StableDiffusionControlNetPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    stock_pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(42)
    stock = stock_pipe("a red fox", image=edges, negative_prompt="blurry", num_inference_steps=8, guidance_scale=cfg,
                       width=128, height=128, generator=g, controlnet_conditioning_scale=0.8,
                       control_guidance_end=stop, output_type="np").images[0]
    plain_g = torch.Generator("cpu").manual_seed(42)
    plain_scheduler = make_scheduler(pipe.dreamtty.scheduler_config, sampler, schedule, seed=42)
    plain = denoise(pipe, plain_scheduler, DenoiseSpec(cond, 128, 128, 8, cfg, plain_g))
    assert np.abs(ours - np.asarray(decode(pipe, plain, plain_g), dtype=np.float32) / 255).max() > 0.02
    assert np.abs(ours - np.round(stock * 255) / 255).max() <= 1e-4


# -- preprocessors ---------------------------------------------------------------------------------------------
def test_canny_finds_the_edges_of_a_square():
    from backend.engine.preprocess import canny

    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill="white")
    edges = np.asarray(canny(image))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all()
    on = np.argwhere(edges[..., 0] == 255)
    assert on.min() >= 14 and on.max() <= 49  # only around the square's border
    assert edges[20:44, 20:44].max() == 0 and edges[:12].max() == 0  # not inside it, not far outside


def test_structure_is_grey_full_range_and_keeps_colours_of_equal_luminance_apart():
    from backend.engine.preprocess import structure

    noise = np.random.RandomState(1).randn(64, 64, 3) * 3  # a photo's grain: decolor needs some texture
    pixels = np.full((64, 64, 3), 128.0)
    pixels[8:28, 8:28] = (200, 30, 30)  # red and green of the same luminance (81 and 83)
    pixels[36:56, 8:28] = (30, 120, 30)
    image = Image.fromarray((pixels + noise).clip(0, 255).astype(np.uint8))
    luminance = np.asarray(image.convert("L")).astype(int)
    assert abs(luminance[12:24, 12:24].mean() - luminance[40:52, 12:24].mean()) < 5
    grey = np.asarray(structure(image)).astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert grey.min() == 0 and grey.max() == 255
    assert abs(grey[12:24, 12:24, 0].mean() - grey[40:52, 12:24, 0].mean()) > 40
    flat = Image.new("RGB", (32, 32), (90, 90, 90))
    ImageDraw.Draw(flat).rectangle((0, 0, 15, 31), fill=(10, 10, 10))
    assert set(np.unique(np.asarray(structure(flat)))) >= {0, 255}  # decolor gives up on it: its luminance


def test_fit_covers_then_centre_crops():
    from backend.engine.preprocess import fit

    image = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(image).rectangle((0, 0, 49, 99), fill="black")  # the left quarter
    fitted = np.asarray(fit(image, 64, 64))
    assert fitted.shape == (64, 64, 3)
    assert fitted[:, :4].max() > 200  # the left quarter is cropped away: 100x100 from the middle


# -- in the worker ---------------------------------------------------------------------------------------------
def test_a_reference_changed_after_the_job_was_queued_is_named_by_its_number(pipes, reference, tmp_path):
    """The worker's check of the recorded hash names the reference as the submission's did (it named the file
    alone)."""
    from backend.engine.image_prompt import apply_image_prompts
    from backend.errors import RequestError

    request = GenerateRequest.from_dict({"prompt": "a fox", "model": "demo", "image_prompts": [
        f"{reference}:image:0", f"{reference}:depth"]}).resolved("demo")  # the first is off: the second is 2 still
    shapes_picture().transpose(Image.Transpose.ROTATE_180).save(reference)
    with pytest.raises(RequestError, match=rf"^image_prompt: 2 \(depth\): {reference} changed since the job was made"):
        apply_image_prompts(pipes["demo"], request)


def test_preview_labels_number_the_references_not_the_controlnets(pipes, reference):
    """The third reference's map is ``structure-3``, as its notes and errors call it "image prompt 3" (it was
    ``structure-2``, the second ControlNet)."""
    labels: list[str] = []
    request = GenerateRequest.from_dict({"prompt": "a fox", "model": "demo", "image_prompts": [
        f"{reference}:canny", f"{reference}:image", f"{reference}:structure"]}).resolved("demo")
    apply_extras(pipes["demo"], request, on_preview=lambda label, image: labels.append(label))
    assert labels == ["canny-1", "structure-3"]


def test_a_reference_named_a_model_this_library_lacks_uses_its_first_and_says_so(pipes, reference):
    """A reproduce names the model each reference used; on a machine without it, the type's first model of the
    family stands in, noted (the metadata records the one used)."""
    from backend.engine.image_prompt import apply_image_prompts

    notes: list[str] = []
    request = GenerateRequest.from_dict({"prompt": "a fox", "model": "demo", "image_prompts": [
        {"path": str(reference), "type": "canny", "model": "gone-canny"},
        {"path": str(reference), "type": "face", "model": "demo-face"}]}).resolved("demo")
    records = apply_image_prompts(pipes["demo"], request, note=notes.append)
    assert notes == ["image prompt 1: no canny ControlNet named gone-canny here; demo-canny stands in for it"]
    assert [r["model"] for r in records] == ["demo-canny", "demo-face"]
