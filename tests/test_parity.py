"""Our denoise loop equals stock diffusers pipelines for the same seed (fp32, CPU)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from backend.engine.conditioning import encode
from backend.engine.denoise import Cancelled, DenoiseSpec, decode, denoise
from backend.engine.scheduling import make_scheduler

CASES = [("euler", "normal"), ("dpmpp_2m", "karras"), ("euler_a", "normal"), ("heun", "karras"),
         ("dpmpp_sde", "karras"), ("ddim", "sgm_uniform"), ("dpmpp_2m_sde", "exponential")]


def _ours(pipe, sampler, schedule, cfg, seed=42):
    g = torch.Generator("cpu").manual_seed(seed)
    cond = encode(pipe, "a red fox", "blurry", cfg > 1)
    sched = make_scheduler(pipe.dreamtty.scheduler_config, sampler, schedule, seed=seed)
    latents = denoise(pipe, sched, DenoiseSpec(cond, 128, 128, 6, cfg, g))
    return np.asarray(decode(pipe, latents, g), dtype=np.float32) / 255


def _stock(pipe, sampler, schedule, cfg, seed=42):
    pipe.scheduler = make_scheduler(pipe.dreamtty.scheduler_config, sampler, schedule, seed=seed)
    g = torch.Generator("cpu").manual_seed(seed)
    out = pipe("a red fox", negative_prompt="blurry", num_inference_steps=6, guidance_scale=cfg,
               width=128, height=128, generator=g, output_type="np").images[0]
    return np.round(out * 255) / 255


@pytest.mark.parametrize("family", ["sd", "xl"])
@pytest.mark.parametrize("sampler,schedule", CASES)
@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_matches_stock_pipeline(family, sampler, schedule, cfg, sd_pipe, xl_pipe):
    pipe = sd_pipe if family == "sd" else xl_pipe
    ours = _ours(pipe, sampler, schedule, cfg)
    stock = _stock(pipe, sampler, schedule, cfg)
    assert ours.std() > 0.01  # a real picture, not a constant
    assert np.abs(ours - stock).max() <= 1e-4


def test_different_seed_changes_image(sd_pipe):
    a = _ours(sd_pipe, "euler", "normal", 7.0, seed=1)
    b = _ours(sd_pipe, "euler", "normal", 7.0, seed=2)
    assert np.abs(a - b).max() > 0.05


def test_cancel_stops_between_steps(sd_pipe):
    seen: list[int] = []
    g = torch.Generator("cpu").manual_seed(0)
    cond = encode(sd_pipe, "x", "", True)
    spec = DenoiseSpec(cond, 64, 64, 10, 7.0, g, on_step=lambda i, n, lat: seen.append(i),
                       should_cancel=lambda: len(seen) >= 3)
    with pytest.raises(Cancelled):
        denoise(sd_pipe, make_scheduler(sd_pipe.dreamtty.scheduler_config, "euler", "normal"), spec)
    assert seen == [1, 2, 3]


def test_clip_skip_deeper_than_the_encoder_is_a_clear_error(sd_pipe, xl_pipe):
    from backend.errors import RequestError

    for pipe in (sd_pipe, xl_pipe):
        with pytest.raises(RequestError, match=r"clip_skip: 5 is deeper than this model's text encoder; allowed 1..4"):
            encode(pipe, "a", "b", True, 5)
        assert encode(pipe, "a", "b", True, 4).cond.isfinite().all()


# -- refiner hand-over vs diffusers' denoising_end / denoising_start ------------------------------------------------

@pytest.fixture(scope="module")
def refiner_cache(tmp_path_factory, demo_dirs):
    """A pipeline cache holding demo-xl and a tiny SDXL refiner that shares demo-xl's VAE (as SDXL's refiner does
    SDXL's: our loop decodes with the base's VAE, the stock refiner pipeline with its own)."""
    from backend.engine.loader import PipelineCache
    from backend.models import resolve_model
    from ckpt_helpers import tiny_refiner

    cache = PipelineCache(torch.device("cpu"))
    base = cache.get(resolve_model("demo-xl"), torch.float32)
    refiner = tiny_refiner()
    refiner.register_modules(vae=base.vae)
    folder = tmp_path_factory.mktemp("refiner") / "refiner"
    refiner.save_pretrained(folder)
    return cache, base, str(folder)


KNOWN_HANDOVER_GAPS = {
    ("heun", "normal"): "second-order: diffusers' refiner repeats the base's last, duplicated timestep; "
                        "ours hands over at the start of the next whole step",
}


@pytest.mark.parametrize("sampler,schedule,steps,switch", [
    ("euler", "normal", 10, 0.8), ("euler", "normal", 7, 0.6), ("euler_a", "normal", 10, 0.8),
    ("ddim", "normal", 10, 0.6), ("euler", "karras", 10, 0.8), ("euler", "sgm_uniform", 10, 0.7),
    ("dpmpp_2m", "normal", 10, 0.8), ("dpmpp_2m", "karras", 12, 0.75), ("lms", "normal", 10, 0.8),
    *(pytest.param(s, sch, 10 if s != "heun" else 6, 0.8 if s != "heun" else 0.5,
                   marks=pytest.mark.xfail(strict=True, reason=why))
      for (s, sch), why in KNOWN_HANDOVER_GAPS.items()),
])
def test_refiner_handover_matches_stock_denoising_end_start(refiner_cache, sampler, schedule, steps, switch):
    from backend.engine.extras import apply_extras
    from backend.engine.generate import generate_image
    from backend.request import GenerateRequest

    cache, base, folder = refiner_cache
    request = GenerateRequest(prompt="a castle", negative_prompt="blurry", model="demo-xl", steps=steps, width=64,
                              height=64, seed=5, cfg=7.0, sampler=sampler, scheduler=schedule, refiner=folder,
                              refiner_switch=switch)
    image, _ = generate_image(base, apply_extras(base, request.resolved("demo-xl"), cache))
    ours = np.asarray(image, dtype=np.float32) / 255

    refiner = base.dreamtty.refiner
    for pipe in (base, refiner):
        pipe.scheduler = make_scheduler(base.dreamtty.scheduler_config, sampler, schedule, seed=5)
    g = torch.Generator("cpu").manual_seed(5)
    handed = base("a castle", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.0, width=64,
                  height=64, generator=g, denoising_end=switch, output_type="latent").images
    stock = refiner("a castle", negative_prompt="blurry", image=handed, num_inference_steps=steps, guidance_scale=7.0,
                    generator=g, denoising_start=switch, output_type="np").images[0]
    base_only, _ = generate_image(base, apply_extras(base, replace(request, refiner=None).resolved("demo-xl"), cache))
    assert np.abs(ours - np.asarray(base_only, dtype=np.float32) / 255).max() > 0.01  # the refiner did something
    assert np.abs(ours - np.round(stock * 255) / 255).max() <= 1e-4


def test_a_batch_with_a_refiner_hands_each_image_over_with_its_own_prompt(refiner_cache):
    from backend.engine.extras import apply_extras
    from backend.engine.generate import generate_batch, generate_image
    from backend.request import GenerateRequest

    cache, base, folder = refiner_cache
    request = GenerateRequest(prompt="a [[castle, lake]]", model="demo-xl", steps=8, width=64, height=64, seed=5,
                              count=2, refiner=folder, refiner_switch=0.6).resolved("demo-xl")
    request = apply_extras(base, request, cache)
    mates = [request.per_image(k) for k in range(2)]
    batched = [np.asarray(image, dtype=int) for image, _, _ in generate_batch(base, mates)]
    for k, mate in enumerate(mates):  # alone it differs in the last bits only (oneDNN: batch-sized kernels)
        assert np.abs(np.asarray(generate_image(base, mate)[0], dtype=int) - batched[k]).max() <= 2
    assert np.abs(batched[0] - batched[1]).max() > 30
