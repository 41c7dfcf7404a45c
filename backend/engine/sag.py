"""Self-Attention Guidance (Hong et al. 2023, arXiv 2210.00939), for SD and SDXL.

During the normal UNet call we read the self-attention map of the base branch
(uncond; the empty prompt under PerpNeg; cond when cfg <= 1) at one layer: the
first self-attention of the mid block, ``mid_block.attentions[0].transformer_blocks[0].attn1``.
That is the layer the paper and diffusers' SD pipeline use for SD1/SD2; for SDXL
we take the same place: its mid block is its coarsest, most semantic stage
(1/4 of the latent side, 32×32 at 1024²) and the first of its ten transformer
blocks still sees the ResNet features unmixed, so its map stays spatially sharp.

Mask: positions whose column of the head-averaged attention map sums to more
than 1 (attended to more than average). In the mask the predicted x0 is blurred
(Gaussian, 9×9, sigma 1) and re-noised to x_t with the branch's own eps; one
more UNet call on that gives e_degraded, and e += S·(eps_base - eps_degraded).
The difference is taken in eps space (each eps at its own sample), so
v-prediction models get the same guidance; for eps models this is exactly the
paper's formula.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backend.engine.filters import gaussian_blur
from backend.engine.prediction import NoiseLevel

BLUR_SIZE = 9
BLUR_SIGMA = 1.0


def sag_layer(unet):
    """(the Transformer2D block, its self-attention) whose map SAG reads."""
    block = unet.mid_block.attentions[0]
    return block, block.transformer_blocks[0].attn1


@dataclass
class AttentionMap:
    """What the capture saw: per key position, the attention it got (summed over queries, mean over heads)."""

    attended: torch.Tensor | None = None  # (1, tokens)
    size: tuple[int, int] | None = None  # (h, w) of the layer's feature map

    def mask(self, latent_hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """(1, 1, H, W) in {0, 1}: where to blur."""
        h, w = self.size
        mask = (self.attended > 1.0).view(1, 1, h, w).to(dtype)
        return F.interpolate(mask, latent_hw)


@dataclass
class _Capture:
    row: int
    seen: AttentionMap = field(default_factory=AttentionMap)

    def block_input(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.seen.size = tuple(hidden.shape[-2:])

    def attention_input(self, attn, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        row = hidden[self.row : self.row + 1]
        query = attn.head_to_batch_dim(attn.to_q(row))
        key = attn.head_to_batch_dim(attn.to_k(row))
        probs = attn.get_attention_scores(query, key, None)  # (heads, tokens, tokens)
        self.seen.attended = probs.mean(0).sum(0, keepdim=True)


@contextmanager
def capture_attention(unet, row: int) -> Iterator[AttentionMap]:
    """Record the SAG layer's self-attention map of batch row ``row`` during the enclosed UNet call.

    Only forward pre-hooks are added (removed on exit): the UNet's output is unchanged.
    """
    block, attn = sag_layer(unet)
    capture = _Capture(row)
    with block.register_forward_pre_hook(capture.block_input, with_kwargs=True), \
            attn.register_forward_pre_hook(capture.attention_input, with_kwargs=True):
        yield capture.seen


def degraded_sample(x0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """x0 blurred inside the mask, noised back to the current level with ``eps``."""
    blurred = gaussian_blur(x0, BLUR_SIZE, BLUR_SIGMA)
    return level.noised(blurred * mask + x0 * (1 - mask), eps)
