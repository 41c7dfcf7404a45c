"""Guidance controls on the tiny SD and SDXL pipelines.

For every control: the neutral value gives the plain-CFG latents bit for bit, a
non-neutral value changes the image the same way on every run, and the guided
prediction equals a reference computed from the UNet's own predictions (or the
stock diffusers pipeline, where diffusers implements the method).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    CrossAttnStoreProcessor,
    StableDiffusionSAGPipeline,
)

from backend.engine.conditioning import encode
from backend.engine.denoise import DenoiseSpec, decode, denoise
from backend.engine.filters import joint_bilateral
from backend.engine.guider import Guider
from backend.engine.loader import load_pipeline
from backend.engine.prediction import noise_level
from backend.engine.scheduling import make_scheduler
from backend.errors import RequestError
from backend.guidance_settings import GuidanceSettings
from backend.models import resolve_model

PROMPT, NEGATIVE, SEED, SIZE, STEPS = "a red fox", "blurry", 7, 64, 3
FAMILIES = ["sd", "xl"]
# Documented FreeU defaults (diffusers, using-diffusers/image_quality.md).
FREEU = {"sd": (0.9, 0.2, 1.5, 1.6), "xl": (0.9, 0.2, 1.3, 1.4)}


@pytest.fixture(scope="module")
def pipes(demo_dirs):
    """Our own pipelines: these tests set FreeU, swap attention processors and add hooks."""
    load = lambda name: load_pipeline(resolve_model(name), torch.device("cpu"), torch.float32)  # noqa: E731
    return {"sd": load("demo"), "xl": load("demo-xl")}


def _latents(pipe, settings=None, cfg=7.0, sampler="euler", schedule="karras", make_guider=Guider, config=None,
             prompt=PROMPT):
    settings = settings or GuidanceSettings()
    with torch.inference_mode():
        g = torch.Generator("cpu").manual_seed(SEED)
        cond = encode(pipe, prompt, NEGATIVE, cfg > 1.0, settings.clip_skip)
        sched = make_scheduler(config or pipe.dreamtty.scheduler_config, sampler, schedule, seed=SEED)
        spec = DenoiseSpec(cond, SIZE, SIZE, STEPS, cfg, g, guidance=settings)
        return denoise(pipe, sched, spec, make_guider=make_guider)


def _pixels(pipe, latents) -> np.ndarray:
    with torch.inference_mode():
        return np.asarray(decode(pipe, latents), dtype=np.float32) / 255


class PlainCFG:
    """Textbook batched CFG, as the stock pipelines do it: the baseline."""

    def __init__(self, inputs, cfg, settings, total_steps):
        self.inputs, self.cfg = inputs, cfg

    def predict(self, scheduler, latents, t, step):
        i, c = self.inputs, self.inputs.cond
        if self.cfg <= 1.0:
            return i.call(scheduler.scale_model_input(latents, t), t, c.cond, c.pooled, i.add_time_ids)
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        pooled = None if c.pooled is None else torch.cat([c.uncond_pooled, c.pooled])
        ids = None if i.add_time_ids is None else torch.cat([i.neg_add_time_ids, i.add_time_ids])
        uncond, cond = i.call(x, t, torch.cat([c.uncond, c.cond]), pooled, ids).chunk(2)
        return uncond + self.cfg * (cond - uncond)


def _recorded(pipe, settings, cfg=7.0, sampler="euler", schedule="karras", config=None):
    """Run and return the Guider, with (model input, t, guided prediction) of every step in ``.seen``."""
    made = []

    class Recording(Guider):
        def predict(self, scheduler, latents, t, step):
            x = scheduler.scale_model_input(latents, t)  # idempotent for these samplers
            out = super().predict(scheduler, latents, t, step)
            self.seen.append((x.clone(), t, out.clone()))
            return out

    def make(*args):
        made.append(Recording(*args))
        made[-1].seen = []
        return made[-1]

    _latents(pipe, settings, cfg, sampler, schedule, make, config)
    return made[0]


def _unet(pipe, x, t, embeds, pooled=None, time_ids=None):
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
    with torch.inference_mode():
        return pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample


def _branches(guider, x, t):
    """(uncond, cond) predictions, each from its own UNet call."""
    i, c = guider.inputs, guider.inputs.cond
    return (_unet(guider.inputs.pipe, x, t, c.uncond, c.uncond_pooled, i.neg_add_time_ids),
            _unet(guider.inputs.pipe, x, t, c.cond, c.pooled, i.add_time_ids))


def _close(ours, ref):
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-4, atol=1e-4)


# -- neutral values --------------------------------------------------------------------
NEUTRAL = GuidanceSettings(perp_neg=0.0, sag=0.0, sharpness=0.0, cfg_rescale=0.0, adaptive_cfg=0.0,
                           adm_scale=None, freeu=None, clip_skip=1, pag=0.0, apg=0.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_neutral_equals_plain_cfg_bit_for_bit(pipes, family, cfg):
    pipe = pipes[family]
    plain = _latents(pipe, cfg=cfg, make_guider=PlainCFG)
    assert torch.equal(_latents(pipe, NEUTRAL, cfg), plain)
    # adaptive CFG at or above the real scale does nothing
    assert torch.equal(_latents(pipe, GuidanceSettings(adaptive_cfg=max(cfg, 1.0)), cfg), plain)
    if family == "xl":
        assert torch.equal(_latents(pipe, GuidanceSettings(adm_scale=(1.0, 1.0, 0.5)), cfg), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_controls_leave_no_trace_on_the_cached_pipeline(pipes, family):
    pipe = pipes[family]
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    for settings in (GuidanceSettings(freeu=()), GuidanceSettings(pag=2.0), GuidanceSettings(sag=1.0)):
        _latents(pipe, settings)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors
    assert not any(m._forward_pre_hooks for m in pipe.unet.modules())
    assert torch.equal(_latents(pipe, NEUTRAL), _latents(pipe, make_guider=PlainCFG))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "settings,cfg,calls",
    [
        (NEUTRAL, 7.0, [2]),
        (NEUTRAL, 1.0, [1]),
        (GuidanceSettings(perp_neg=1.0), 7.0, [3]),
        (GuidanceSettings(sag=1.0), 7.0, [2, 1]),
        (GuidanceSettings(pag=3.0), 7.0, [3]),
        (GuidanceSettings(pag=3.0), 1.0, [2]),
        (GuidanceSettings(sharpness=10.0, cfg_rescale=0.5, adaptive_cfg=3.0, apg=5.0, freeu=()), 7.0, [2]),
    ],
)
def test_branches_share_one_batched_unet_call(pipes, family, settings, cfg, calls):
    pipe = pipes[family]
    seen: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        _latents(pipe, settings, cfg)
    finally:
        handle.remove()
    assert seen == calls * STEPS


# -- non-neutral values: change the image, deterministically ------------------------------
CONTROLS = {
    "perp_neg": (GuidanceSettings(perp_neg=1.0), 7.0),
    "sag": (GuidanceSettings(sag=1.0), 7.0),
    "sag_cfg1": (GuidanceSettings(sag=1.0), 1.0),
    "sharpness": (GuidanceSettings(sharpness=30.0), 7.0),
    "cfg_rescale": (GuidanceSettings(cfg_rescale=0.7), 7.0),
    "adaptive_cfg": (GuidanceSettings(adaptive_cfg=2.0), 7.0),
    "freeu": (GuidanceSettings(freeu=()), 7.0),
    "clip_skip": (GuidanceSettings(clip_skip=2), 7.0),
    "pag": (GuidanceSettings(pag=3.0), 7.0),
    "pag_cfg1": (GuidanceSettings(pag=3.0), 1.0),
    "apg": (GuidanceSettings(apg=5.0), 7.0),
    "adm_scale": (GuidanceSettings(adm_scale=(1.5, 0.8, 0.6)), 7.0),
    "combined": (GuidanceSettings(perp_neg=1.0, sag=0.5, sharpness=10.0, cfg_rescale=0.5, adaptive_cfg=4.0,
                                  freeu=(), clip_skip=2), 9.0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_control_changes_image_deterministically(pipes, family, control):
    settings, cfg = CONTROLS[control]
    if control == "adm_scale" and family == "sd":
        pytest.skip("SDXL only (validated in test_guidance_settings)")
    pipe = pipes[family]
    first, second = _latents(pipe, settings, cfg), _latents(pipe, settings, cfg)
    assert torch.equal(first, second)
    baseline = _pixels(pipe, _latents(pipe, cfg=cfg))
    assert np.abs(_pixels(pipe, first) - baseline).max() >= 2 / 255


def test_guider_rejects_bad_settings(pipes):
    with pytest.raises(RequestError, match=r"^perp_neg: needs cfg > 1"):
        _latents(pipes["sd"], GuidanceSettings(perp_neg=1.0), cfg=1.0)
    with pytest.raises(RequestError, match=r"^adm_scale: only for SDXL"):
        _latents(pipes["sd"], GuidanceSettings(adm_scale=(1.5, 0.8, 0.3)))
    with pytest.raises(RequestError, match=r"^sharpness: 31"):
        _latents(pipes["xl"], GuidanceSettings(sharpness=31))


# -- the arithmetic, against references computed from the UNet's predictions --------------
@pytest.mark.parametrize("family,clip_skip", [("sd", 1), ("sd", 2), ("xl", 1)])
def test_perp_neg_matches_three_predictions(pipes, family, clip_skip):
    pipe, scale, cfg = pipes[family], 1.5, 6.0
    guider = _recorded(pipe, GuidanceSettings(perp_neg=scale, clip_skip=clip_skip), cfg)
    with torch.inference_mode():
        empty = encode(pipe, "", "", False, clip_skip)
    for x, t, ours in guider.seen:
        uncond, cond = _branches(guider, x, t)
        e0 = _unet(pipe, x, t, empty.cond, empty.pooled, guider.inputs.neg_add_time_ids)
        pos, neg = (cond - e0).double(), (uncond - e0).double()
        perp = neg - (neg * pos).sum() / (pos * pos).sum() * pos
        _close(ours, e0 + cfg * (pos - scale * perp))


def _sag_attention_map(pipe, x, t, row):
    """Captured as diffusers' SAG pipeline does: its store processor on the mid block's first self-attention."""
    block = pipe.unet.mid_block.attentions[0]
    attn = block.transformer_blocks[0].attn1
    store, original, size = CrossAttnStoreProcessor(), attn.processor, []
    attn.processor = store
    hook = block.register_forward_hook(lambda m, inp, out: size.append(out[0].shape[-2:]))
    try:
        _unet(pipe, x, t, *row)
    finally:
        hook.remove()
        attn.processor = original
    return store.attention_probs, size[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_perp_neg_with_a_prompt_longer_than_one_window(pipes, family):
    """Long prompts are encoded as several 77-token windows; the empty branch gets as many."""
    long_prompt = "a red fox in the snow, " * 5  # > 75 tokens with the byte-level demo tokenizer
    made = []
    make = lambda *args: made.append(Guider(*args)) or made[-1]  # noqa: E731
    first = _latents(pipes[family], GuidanceSettings(perp_neg=1.0), make_guider=make, prompt=long_prompt)
    cond = made[0].inputs.cond
    assert made[0].batch(cond).branches["empty"].embeds.shape == cond.cond.shape
    assert made[0].inputs.cond.cond.shape[1] == 2 * 77
    assert torch.equal(first, _latents(pipes[family], GuidanceSettings(perp_neg=1.0), prompt=long_prompt))


@pytest.mark.parametrize(
    "family,kind,cfg", [("sd", "epsilon", 7.0), ("sd", "v_prediction", 7.0), ("sd", "epsilon", 1.0), ("xl", "epsilon", 5.0)]
)
def test_sag_matches_diffusers_sag_pipeline_math(pipes, family, kind, cfg):
    """Reference: the masking, x0 and eps helpers of diffusers' (deprecated, SD-only) SAG pipeline,
    with the guidance difference taken in eps space (for eps models: the pipeline's own formula)."""
    pipe, scale = pipes[family], 0.8
    config = {**pipe.dreamtty.scheduler_config, "prediction_type": kind}
    guider = _recorded(pipe, GuidanceSettings(sag=scale), cfg, sampler="ddim", schedule="normal", config=config)
    fake = SimpleNamespace(unet=pipe.unet, scheduler=make_scheduler(config, "ddim", "normal"))
    i, c = guider.inputs, guider.inputs.cond
    rows = [(c.uncond, c.uncond_pooled, i.neg_add_time_ids)] if cfg > 1.0 else []
    rows.append((c.cond, c.pooled, i.add_time_ids))  # rows[0] is the base branch
    for x, t, ours in guider.seen:
        eps = lambda sample, pred: StableDiffusionSAGPipeline.pred_epsilon(fake, sample, pred, t)  # noqa: E731
        attention, size = _sag_attention_map(pipe, x, t, rows[0])
        preds = [_unet(pipe, x, t, *row) for row in rows]
        base = preds[0]
        guided = base + cfg * (preds[1] - base) if cfg > 1.0 else base
        x0 = StableDiffusionSAGPipeline.pred_x0(fake, x, base, t)
        degraded = StableDiffusionSAGPipeline.sag_masking(fake, x0, attention, size, t, eps(x, base))
        degraded_pred = _unet(pipe, degraded, t, *rows[0])
        ref = eps(x, guided) + scale * (eps(x, base) - eps(degraded, degraded_pred))
        _close(eps(x, ours), ref)


def _joint_bilateral_reference(x, guide, size=13, sigma=3.0):
    """Per-offset loop over a mirrored window: the textbook joint bilateral filter."""
    h, w = x.shape[-2:]
    r = size // 2
    mirror = lambda idx, n: torch.where(idx < 0, -idx, torch.where(idx >= n, 2 * (n - 1) - idx, idx))  # noqa: E731
    ys, xs = torch.arange(h), torch.arange(w)
    num, den = torch.zeros_like(x), torch.zeros_like(x[:, :1])
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            iy, ix = mirror(ys + dy, h), mirror(xs + dx, w)
            shifted_g = guide[:, :, iy][:, :, :, ix]
            dist = (shifted_g - guide).abs().sum(1, keepdim=True)
            weight = np.exp(-(dy * dy + dx * dx) / (2 * sigma**2)) * torch.exp(-0.5 * (dist / sigma) ** 2)
            num += weight * x[:, :, iy][:, :, :, ix]
            den += weight
    return num / den


def test_joint_bilateral_matches_reference_on_a_non_square_image():
    torch.manual_seed(0)
    x, guide = torch.randn(1, 4, 14, 20), torch.randn(1, 4, 14, 20)
    torch.testing.assert_close(joint_bilateral(x, guide), _joint_bilateral_reference(x, guide))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,schedule", [("euler", "karras"), ("ddim", "normal")])
def test_noise_level_matches_schedulers(pipes, kind, sampler, schedule):
    """x0 as DDIM computes it, and (for Karras sigmas, fractional timesteps) the scheduler's own sigma."""
    config = {**pipes["sd"].dreamtty.scheduler_config, "prediction_type": kind, "clip_sample": False}
    ddim = make_scheduler(config, "ddim", "normal")
    sched = make_scheduler(config, sampler, schedule)
    sched.set_timesteps(10)
    torch.manual_seed(0)
    x, pred = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i, t in enumerate(sched.timesteps[:-1]):
        level = noise_level(sched, t)
        if sampler == "euler":
            assert level.s / level.a == pytest.approx(float(sched.sigmas[i]), rel=1e-5)
        else:
            ddim.set_timesteps(10)
            expected = ddim.step(pred, t, x).pred_original_sample
            torch.testing.assert_close(level.x0(pred, x), expected, rtol=1e-5, atol=1e-5)
        eps = level.eps(pred, x)
        torch.testing.assert_close(level.from_eps(eps, x), pred, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(level.noised(level.x0(pred, x), eps), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharpness_matches_bilateral_blend(pipes, family):
    pipe, sharpness, cfg = pipes[family], 30.0, 7.0
    guider = _recorded(pipe, GuidanceSettings(sharpness=sharpness), cfg, sampler="ddim", schedule="normal")
    alphas = make_scheduler(pipe.dreamtty.scheduler_config, "ddim", "normal").alphas_cumprod.double()
    for x, t, ours in guider.seen:
        uncond, cond = (p.double() for p in _branches(guider, x, t))
        a = alphas[int(t)]
        x0 = (x.double() - (1 - a).sqrt() * cond) / a.sqrt()
        guide = (x0 - x0.mean()) / (x0.std() + 1e-5)
        alpha = 0.001 * sharpness * (1 - float(t) / 999)
        sharp = alpha * _joint_bilateral_reference(cond, guide) + (1 - alpha) * cond
        _close(ours, uncond + cfg * (sharp - uncond))


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_cfg_mixes_real_and_mimicked_predictions(pipes, family):
    pipe, cfg, mimic = pipes[family], 9.0, 3.0
    guider = _recorded(pipe, GuidanceSettings(adaptive_cfg=mimic), cfg)
    for x, t, ours in guider.seen:
        uncond, cond = _branches(guider, x, t)
        p = 1 - float(t) / 999
        real, mimicked = uncond + cfg * (cond - uncond), uncond + mimic * (cond - uncond)
        _close(ours, real * p + mimicked * (1 - p))


def test_adm_scale_scales_original_size_early(pipes):
    pipe, cfg = pipes["xl"], 7.0
    guider = _recorded(pipe, GuidanceSettings(adm_scale=(1.5, 0.8, 0.5)), cfg, schedule="normal")
    c = guider.inputs.cond
    ids = lambda scale: torch.tensor([[SIZE * scale, SIZE * scale, 0.0, 0.0, SIZE, SIZE]])  # noqa: E731
    phases = set()
    for x, t, ours in guider.seen:
        early = 1 - float(t) / 999 < 0.5
        phases.add(early)
        pos, neg = (1.5, 0.8) if early else (1.0, 1.0)
        uncond = _unet(pipe, x, t, c.uncond, c.uncond_pooled, ids(neg))
        cond = _unet(pipe, x, t, c.cond, c.pooled, ids(pos))
        _close(ours, uncond + cfg * (cond - uncond))
    assert phases == {True, False}


@pytest.mark.parametrize("family", FAMILIES)
def test_apg_matches_projected_update_with_momentum(pipes, family):
    pipe, cfg, threshold = pipes[family], 7.0, 1.0
    guider = _recorded(pipe, GuidanceSettings(apg=threshold), cfg)
    average = 0.0
    for x, t, ours in guider.seen:
        uncond, cond = (p.double() for p in _branches(guider, x, t))
        average = (cond - uncond) + -0.5 * average  # Sadat et al. 2024, negative momentum
        update = average * min(1.0, threshold / float(average.norm()))
        unit = cond / cond.norm()
        parallel = (update * unit).sum() * unit
        _close(ours, uncond + cfg * (update - parallel))  # eta = 0: the parallel part is dropped


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_rescale_matches_lin_et_al(pipes, family):
    pipe, cfg, r = pipes[family], 7.0, 0.7
    guider = _recorded(pipe, GuidanceSettings(cfg_rescale=r), cfg)
    for x, t, ours in guider.seen:
        uncond, cond = (p.double() for p in _branches(guider, x, t))
        guided = uncond + cfg * (cond - uncond)
        rescaled = guided * (cond.std() / guided.std())
        _close(ours, r * rescaled + (1 - r) * guided)


# -- where diffusers implements the method: equal to its stock pipelines -------------------
def _stock(pipe, cls, cfg, **extra) -> np.ndarray:
    stock = cls(**pipe.components, **({"pag_applied_layers": "mid"} if "pag_scale" in extra else {}))
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "euler", "karras", seed=SEED)
    g = torch.Generator("cpu").manual_seed(SEED)
    out = stock(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=cfg, width=SIZE,
                height=SIZE, generator=g, output_type="np", **extra).images[0]
    return np.round(out * 255) / 255


STOCK = {"sd": StableDiffusionPipeline, "xl": StableDiffusionXLPipeline}
STOCK_PAG = {"sd": StableDiffusionPAGPipeline, "xl": StableDiffusionXLPAGPipeline}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_pag_equals_diffusers_pag_pipeline(pipes, family, cfg):
    pipe = pipes[family]
    ours = _pixels(pipe, _latents(pipe, GuidanceSettings(pag=2.5), cfg))
    assert np.abs(ours - _stock(pipe, STOCK_PAG[family], cfg, pag_scale=2.5)).max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_freeu_defaults_equal_stock_pipeline_with_enable_freeu(pipes, family):
    pipe = pipes[family]
    ours = _pixels(pipe, _latents(pipe, GuidanceSettings(freeu=())))
    pipe.unet.enable_freeu(*FREEU[family])
    try:
        stock = _stock(pipe, STOCK[family], 7.0)
    finally:
        pipe.unet.disable_freeu()
    assert np.abs(ours - stock).max() <= 1e-4
    assert np.abs(_pixels(pipe, _latents(pipe)) - stock).max() > 2 / 255  # FreeU is off again


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_skip_uses_an_earlier_text_encoder_layer(pipes, family):
    """clip_skip 2 on SD: the second-to-last layer, final-normed (as diffusers does). SDXL already
    uses the penultimate layer un-normed (clip_skip 1), so clip_skip 2 is the third-to-last there."""
    pipe = pipes[family]
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if family == "xl":
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    with torch.inference_mode():
        got = encode(pipe, PROMPT, NEGATIVE, True, clip_skip=2)
        parts = []
        for tok, enc in encoders:
            ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            hidden = enc(ids, output_hidden_states=True).hidden_states
            parts.append(hidden[-3] if family == "xl" else getattr(enc, "text_model", enc).final_layer_norm(hidden[-2]))
    torch.testing.assert_close(got.cond, torch.cat(parts, dim=-1))
