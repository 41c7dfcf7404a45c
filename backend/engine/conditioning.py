"""Text conditioning: prompt -> embeddings for SD and SDXL pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Embeddings for one image: positive, and negative when CFG needs it."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # SDXL pooled text embeds
    uncond_pooled: torch.Tensor | None = None


def diffusers_clip_skip(clip_skip: int) -> int | None:
    """Our clip_skip counts from the last layer (1 = last); diffusers counts skipped layers."""
    return None if clip_skip <= 1 else clip_skip - 1


def encode(pipe, prompt: str, negative: str, with_uncond: bool, clip_skip: int = 1) -> Conditioning:
    """Encode with the pipeline's own ``encode_prompt`` (identical to the stock pipeline)."""
    device = pipe._execution_device
    skip = diffusers_clip_skip(clip_skip)
    if getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "tokenizer_2"):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=with_uncond,
            negative_prompt=negative, clip_skip=skip,
        )
        return Conditioning(cond, uncond if with_uncond else None, pooled, uncond_pooled if with_uncond else None)
    cond, uncond = pipe.encode_prompt(prompt, device, 1, with_uncond, negative, clip_skip=skip)
    return Conditioning(cond, uncond if with_uncond else None)
