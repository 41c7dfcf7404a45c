"""Small image filters on latents (B, C, H, W): Gaussian blur and a joint bilateral filter."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, device=device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype)


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mirror the borders (replicate when the image is too small to mirror)."""
    mode = "reflect" if r < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (r, r, r, r), mode=mode)


def gaussian_blur(x: torch.Tensor, size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Per-channel Gaussian blur with a ``size``×``size`` kernel."""
    k = gaussian_kernel1d(size, sigma, x.device, x.dtype)
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, size, size)
    return F.conv2d(_pad(x, size // 2), kernel, groups=x.shape[1])


def joint_bilateral(
    x: torch.Tensor, guide: torch.Tensor, size: int = 13, sigma_space: float = 3.0, sigma_color: float = 3.0
) -> torch.Tensor:
    """Edge-preserving smoothing of ``x`` steered by ``guide`` (Tomasi & Manduchi 1998; joint form,
    Petschnigg et al. 2004).

    Each output pixel is a weighted mean of its ``size``×``size`` window in ``x``; a neighbour's
    weight is a spatial Gaussian times ``exp(-d²/(2·sigma_color²))``, where ``d`` is the L1
    distance (over channels) between the guide's values at the pixel and at the neighbour.
    Computed in float32.
    """
    b, c, h, w = x.shape
    r = size // 2
    xf, gf = x.float(), guide.float()
    windows = F.unfold(_pad(xf, r), size).view(b, c, size * size, h * w)
    g_windows = F.unfold(_pad(gf, r), size).view(b, gf.shape[1], size * size, h * w)
    dist = (g_windows - gf.view(b, gf.shape[1], 1, h * w)).abs().sum(1)
    k = gaussian_kernel1d(size, sigma_space, x.device, torch.float32)
    spatial = (k[:, None] * k[None, :]).reshape(1, size * size, 1)
    weights = spatial * torch.exp(-0.5 * (dist / sigma_color) ** 2)
    out = (windows * weights[:, None]).sum(2) / weights.sum(1)[:, None]
    return out.view(b, c, h, w).to(x.dtype)
