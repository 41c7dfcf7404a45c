"""Guidance: turns UNet predictions into the noise prediction the scheduler steps with.

One batched UNet call per step runs every branch the request needs:
[uncond, cond] for CFG ([cond] alone at cfg <= 1: half the work, as the stock
pipelines do), [empty, cond, uncond] for PerpNeg, plus a perturbed copy of cond
for PAG. With several images denoised together (a BatchConditioning) each branch
has one row per image, branch after branch, as the stock pipelines lay out
``num_images_per_prompt``. SAG adds one more call, on its degraded sample. Within a step:
adaptive CFG picks the scale, sharpness filters the positive prediction,
CFG / PerpNeg / APG combine the branches, PAG and SAG add their terms, and CFG
rescale (Lin et al. 2023, arXiv 2305.08891 §3.4, diffusers' implementation)
comes last. ADM scaling picks SDXL's time ids per branch; FreeU is set on the
UNet for each job. With every control neutral this is plain CFG, bit for bit.
With prompt editing the conditioning changes between steps; the batched rows
are built once per distinct conditioning. Image prompts (backend.engine.image_prompt) add their
IP-Adapter embeddings and ControlNet residuals to every UNet call, each row getting its own.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from backend.engine.adaptive_cfg import effective_cfg
from backend.engine.adm_scale import scaled_time_ids
from backend.engine.apg import ProjectedGuidance
from backend.engine.conditioning import Conditioning, StepConditioning, encode
from backend.engine.freeu import set_freeu
from backend.engine.pag import perturbed_mid_attention
from backend.engine.perp_neg import perp_neg
from backend.engine.prediction import NoiseLevel, noise_level, progress
from backend.engine.sag import AttentionMap, capture_attention, degraded_sample
from backend.engine.sharpness import sharpened
from backend.guidance_settings import GuidanceSettings

if TYPE_CHECKING:
    from backend.engine.image_prompt import Steering


@dataclass
class UNetInputs:
    """Everything the UNet needs besides latents and timestep, per branch."""

    pipe: object
    cond: Conditioning | StepConditioning  # ``cond.at(iteration, iterations)``: that iteration's conditioning
    add_time_ids: torch.Tensor | None  # SDXL only
    neg_add_time_ids: torch.Tensor | None
    timestep_cond: torch.Tensor | None
    extra: torch.Tensor | None = None  # an inpainting UNet's extra input channels, after the latents
    steering: Steering | None = None  # image prompts: IP-Adapter embeddings and ControlNet residuals

    def call(self, latents: torch.Tensor, t, embeds: torch.Tensor, text_embeds=None, time_ids=None,
             rows: tuple[str, ...] = ("cond",)) -> torch.Tensor:
        """The UNet's prediction for the batch of ``rows`` (the guider's row names, one per latents row)."""
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        residuals = {}
        if self.steering is not None:
            added, residuals = self.steering.unet_kwargs(latents, t, embeds, added, rows)
        if self.extra is not None:
            latents = torch.cat([latents, self.extra.to(latents.dtype).expand(latents.shape[0], -1, -1, -1)], dim=1)
        return self.pipe.unet(
            latents, t, encoder_hidden_states=embeds, timestep_cond=self.timestep_cond,
            cross_attention_kwargs=None, added_cond_kwargs=added, return_dict=False, **residuals,
        )[0]


@dataclass(frozen=True)
class Branch:
    """One row of the batched UNet call: its text embeddings and SDXL time ids."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    time_ids: torch.Tensor | None
    adm_time_ids: torch.Tensor | None  # time ids while ADM scaling is active

    def ids(self, adm: bool) -> torch.Tensor | None:
        return self.adm_time_ids if adm else self.time_ids


@dataclass(frozen=True)
class Batch:
    """The rows of one conditioning, concatenated for the batched UNet call."""

    branches: dict[str, Branch]
    embeds: torch.Tensor
    text_embeds: torch.Tensor | None
    time_ids: torch.Tensor | None
    adm_time_ids: torch.Tensor | None


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    if tensors[0] is None:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class Guider:
    """Computes the guided noise prediction for each step of one image."""

    def __init__(self, inputs: UNetInputs, cfg: float, settings: GuidanceSettings, total_steps: int) -> None:
        settings.validate(xl=inputs.add_time_ids is not None, cfg=cfg)
        self.inputs = inputs
        self.cfg = cfg
        self.settings = settings
        self.total = total_steps
        self.do_cfg = cfg > 1.0
        s = settings
        set_freeu(inputs.pipe, s.freeu)
        if s.perp_neg:
            self.rows: tuple[str, ...] = ("empty", "cond", "uncond")
        else:
            self.rows = ("uncond", "cond") if self.do_cfg else ("cond",)
        if s.pag:
            self.rows += ("perturbed",)
        self.base = self.rows[0]  # SAG's branch: uncond, PerpNeg's empty, or cond at cfg <= 1
        self.empty = encode(inputs.pipe, "", "", False, s.clip_skip) if s.perp_neg else None
        self.timed = bool(s.adaptive_cfg or s.sharpness or s.adm_scale)
        self.apg = ProjectedGuidance(s.apg) if s.apg else None
        self.batches: dict[Conditioning, Batch] = {}

    def batch(self, cond: Conditioning) -> Batch:
        """The batched rows for ``cond``, built on first use."""
        if cond not in self.batches:
            branches = self._branches(cond)
            rows = [branches[r] for r in self.rows]
            self.batches[cond] = Batch(
                branches,
                _cat([b.embeds for b in rows]),
                _cat([b.pooled for b in rows]),
                _cat([b.time_ids for b in rows]),
                _cat([b.adm_time_ids for b in rows]) if self.settings.adm_scale else None,
            )
        return self.batches[cond]

    def _branches(self, c: Conditioning) -> dict[str, Branch]:
        s, inputs = self.settings, self.inputs
        pos, neg = s.adm_scale[:2] if s.adm_scale else (None, None)

        def branch(embeds, pooled, time_ids, scale) -> Branch:
            adm = None if scale is None else scaled_time_ids(time_ids, scale)
            return Branch(embeds, pooled, time_ids, adm)

        out = {"cond": branch(c.cond, c.pooled, inputs.add_time_ids, pos)}
        if self.do_cfg:
            out["uncond"] = branch(c.uncond, c.uncond_pooled, inputs.neg_add_time_ids, neg)
        if self.empty is not None:
            # Long prompts are encoded as several 77-token windows; an empty prompt's windows are all alike.
            # One row per image of a batch.
            images = c.cond.shape[0]
            embeds = self.empty.cond.repeat(images, c.cond.shape[1] // self.empty.cond.shape[1], 1)
            pooled = None if self.empty.pooled is None else self.empty.pooled.repeat(images, 1)
            out["empty"] = branch(embeds, pooled, inputs.neg_add_time_ids, neg)
        if s.pag:
            out["perturbed"] = out["cond"]
        return out

    def predict(self, scheduler, latents: torch.Tensor, t, step: int) -> torch.Tensor:
        s = self.settings
        n = len(self.rows)
        model_in = torch.cat([latents] * n) if n > 1 else latents
        model_in = scheduler.scale_model_input(model_in, t)
        p = progress(scheduler, t) if self.timed else 0.0
        batch = self.batch(self.inputs.cond.at(step, self.total))
        adm = batch.adm_time_ids is not None and p < s.adm_scale[2]
        if self.inputs.steering is not None:
            self.inputs.steering.begin(step)
        with self._attention_hooks() as attention:
            pred = self.inputs.call(
                model_in, t, batch.embeds, batch.text_embeds, batch.adm_time_ids if adm else batch.time_ids, self.rows
            )
        out = dict(zip(self.rows, pred.chunk(n)))
        x = model_in[:latents.shape[0]]
        level = noise_level(scheduler, t) if s.sag or s.sharpness else None
        guided = self._combine(out, x, level, p)
        if s.sag:
            guided = guided + self._sag_term(out[self.base], x, t, level, attention, batch.branches[self.base], adm)
        if s.cfg_rescale > 0.0:
            guided = rescale_noise_cfg(guided, out["cond"], guidance_rescale=s.cfg_rescale)
        return guided

    def _attention_hooks(self):
        unet = self.inputs.pipe.unet
        if self.settings.pag:
            return perturbed_mid_attention(unet, with_cfg=self.do_cfg)
        if self.settings.sag:
            return capture_attention(unet, row=0)
        return nullcontext()

    def _combine(self, out: dict[str, torch.Tensor], x: torch.Tensor, level: NoiseLevel | None, p: float):
        s = self.settings
        cfg = effective_cfg(self.cfg, s.adaptive_cfg, p)
        cond = out["cond"]
        if s.sharpness:
            eps = sharpened(level.eps(cond, x), level.x0(cond, x), s.sharpness, p)
            cond = level.from_eps(eps, x)
        if s.perp_neg:
            guided = perp_neg(out["empty"], cond, out["uncond"], cfg, s.perp_neg)
        elif self.apg is not None:
            guided = self.apg(cond, out["uncond"], cfg)
        elif self.do_cfg:
            guided = out["uncond"] + cfg * (cond - out["uncond"])
        else:
            guided = cond
        if s.pag:
            guided = guided + s.pag * (out["cond"] - out["perturbed"])
        return guided

    def _sag_term(self, pred, x, t, level: NoiseLevel, attention: AttentionMap, b: Branch, adm: bool) -> torch.Tensor:
        eps = level.eps(pred, x)
        mask = attention.mask(tuple(x.shape[-2:]), x.dtype)
        degraded = degraded_sample(level.x0(pred, x), eps, mask, level)
        degraded_pred = self.inputs.call(degraded, t, b.embeds, b.pooled, b.ids(adm), (self.base,))
        return level.eps_step(self.settings.sag * (eps - level.eps(degraded_pred, degraded)))
