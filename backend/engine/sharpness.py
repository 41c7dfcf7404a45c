"""Sharpness: the positive prediction blended with an edge-preserving filtered copy of itself.

As Fooocus describes its "sharpness" (a tuned variant of self-attention
guidance): eps_pos' = (1 - α)·eps_pos + α·JBF(eps_pos; guide = x0_pos), where
JBF is a 13×13 joint bilateral filter (spatial and range sigma 3, L1 range
distance) steered by the positive x0 prediction standardised to zero mean and
unit variance, and α = 0.001 · sharpness · progress grows as sampling proceeds.
"""

from __future__ import annotations

import torch

from backend.engine.filters import joint_bilateral

KERNEL = 13
SIGMA = 3.0


def sharpened(eps: torch.Tensor, x0: torch.Tensor, sharpness: float, progress: float) -> torch.Tensor:
    """The blended positive eps prediction (see module docstring)."""
    alpha = 0.001 * sharpness * progress
    std, mean = torch.std_mean(x0, dim=(1, 2, 3), keepdim=True)
    guide = (x0 - mean) / (std + 1e-5)
    filtered = joint_bilateral(eps, guide, KERNEL, SIGMA, SIGMA)
    return (1.0 - alpha) * eps + alpha * filtered
