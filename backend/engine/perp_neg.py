"""PerpNeg (Armandpour et al. 2023, arXiv 2304.04968): negative prompts without the Janus problem.

Three predictions: empty prompt e0, positive e+, negative e-.
pos = e+ - e0, neg = e- - e0, perp = neg - (<neg, pos> / ||pos||²)·pos,
e = e0 + cfg·(pos - S·perp): only the part of the negative direction that is
perpendicular to the positive one is pushed away from.
"""

from __future__ import annotations

import torch


def perp_neg(e_empty: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor, cfg: float, scale: float) -> torch.Tensor:
    """The PerpNeg-guided prediction (per sample; inner products over C, H, W)."""
    pos = e_pos - e_empty
    neg = e_neg - e_empty
    dims = tuple(range(1, pos.ndim))
    p32, n32 = pos.float(), neg.float()
    norm2 = (p32 * p32).sum(dims, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    perp = (n32 - (n32 * p32).sum(dims, keepdim=True) / norm2 * p32).to(pos.dtype)
    return e_empty + cfg * (pos - scale * perp)
