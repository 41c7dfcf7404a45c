"""Guidance: turns UNet predictions into the noise prediction the scheduler steps with.

Plain classifier-free guidance runs cond and uncond in one batched UNet call
and is skipped at cfg <= 1, exactly as the stock diffusers pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from backend.engine.conditioning import Conditioning
from backend.guidance import GuidanceSettings


@dataclass
class UNetInputs:
    """Everything the UNet needs besides latents and timestep, per branch."""

    pipe: object
    cond: Conditioning
    add_time_ids: torch.Tensor | None  # SDXL only
    neg_add_time_ids: torch.Tensor | None
    timestep_cond: torch.Tensor | None

    def call(self, latents: torch.Tensor, t, embeds: torch.Tensor, text_embeds=None, time_ids=None) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.pipe.unet(
            latents, t, encoder_hidden_states=embeds, timestep_cond=self.timestep_cond,
            cross_attention_kwargs=None, added_cond_kwargs=added, return_dict=False,
        )[0]


class Guider:
    """Computes the guided noise prediction for each step."""

    def __init__(self, inputs: UNetInputs, cfg: float, settings: GuidanceSettings, total_steps: int) -> None:
        self.inputs = inputs
        self.cfg = cfg
        self.settings = settings
        self.total = total_steps
        self.do_cfg = cfg > 1.0
        c = inputs.cond
        if self.do_cfg:
            self.embeds = torch.cat([c.uncond, c.cond])
            self.text_embeds = None if c.pooled is None else torch.cat([c.uncond_pooled, c.pooled])
            self.time_ids = (
                None if inputs.add_time_ids is None else torch.cat([inputs.neg_add_time_ids, inputs.add_time_ids])
            )
        else:
            self.embeds, self.text_embeds, self.time_ids = c.cond, c.pooled, inputs.add_time_ids

    def predict(self, scheduler, latents: torch.Tensor, t, step: int) -> torch.Tensor:
        model_in = torch.cat([latents] * 2) if self.do_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = self.inputs.call(model_in, t, self.embeds, self.text_embeds, self.time_ids)
        if not self.do_cfg:
            return pred
        uncond, cond = pred.chunk(2)
        guided = uncond + self.cfg * (cond - uncond)
        if self.settings.cfg_rescale > 0.0:
            # Lin et al. 2023 (arXiv 2305.08891) §3.4, diffusers' implementation.
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=self.settings.cfg_rescale)
        return guided
