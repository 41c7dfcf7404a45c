"""Perturbed-Attention Guidance (Ahn et al. 2024, arXiv 2403.17377) with diffusers' PAG processors.

The perturbed branch runs with identity self-attention in the mid block (the
layers diffusers' PAG pipelines use with ``pag_applied_layers="mid"``):
diffusers' ``PAGCFGIdentitySelfAttnProcessor2_0`` takes a [uncond, cond, perturbed]
batch, ``PAGIdentitySelfAttnProcessor2_0`` a [cond, perturbed] one. The processors
are swapped in only for the UNet call and restored after it, so a cached pipeline
never keeps them. Guidance (diffusers' PAGMixin formula): e += S·(e_cond - e_perturbed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffusers.models.attention_processor import (
    Attention,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)


def mid_self_attention(unet) -> list[Attention]:
    """The self-attention layers of the UNet's mid block."""
    return [m for m in unet.mid_block.modules() if isinstance(m, Attention) and not m.is_cross_attention]


@contextmanager
def perturbed_mid_attention(unet, with_cfg: bool) -> Iterator[None]:
    """Run the enclosed UNet call with PAG's identity self-attention on the last batch chunk."""
    layers = mid_self_attention(unet)
    originals = [layer.processor for layer in layers]
    processor = PAGCFGIdentitySelfAttnProcessor2_0() if with_cfg else PAGIdentitySelfAttnProcessor2_0()
    try:
        for layer in layers:
            layer.set_processor(processor)
        yield
    finally:
        for layer, original in zip(layers, originals):
            layer.set_processor(original)
