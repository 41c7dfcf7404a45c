"""Adaptive Projected Guidance (Sadat et al. 2024, arXiv 2410.02416) with diffusers' implementation.

``diffusers.guiders.adaptive_projected_guidance.normalized_guidance``: the CFG update
(cond - uncond), accumulated with momentum, clipped to the norm threshold r
(our ``apg`` value), split into parts parallel and orthogonal to the conditional
prediction; the parallel part (the one that oversaturates) is weighted by eta.
We drop the parallel part (eta = 0) and use a negative momentum (-0.5), as the
paper advises. One instance per image: the momentum buffer carries across steps.
"""

from __future__ import annotations

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

ETA = 0.0
MOMENTUM = -0.5


class ProjectedGuidance:
    def __init__(self, norm_threshold: float) -> None:
        self.norm_threshold = norm_threshold
        self.buffer = MomentumBuffer(MOMENTUM)

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, cfg: float) -> torch.Tensor:
        return normalized_guidance(cond, uncond, cfg, self.buffer, ETA, self.norm_threshold)
