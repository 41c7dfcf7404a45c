"""Overlapping tiles: for denoising images larger than a model likes, and for running upscalers.

Denoising in tiles follows MultiDiffusion (Bar-Tal et al. 2023, arXiv 2302.08113, eq. 5): every step,
the noise prediction of each overlapping tile is computed on its own and the predictions are averaged
where tiles overlap, so the scheduler steps once on the whole latents and seams do not show. Here the
average is weighted by a ramp that falls towards each tile's edges.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length``, evenly spread, overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / max(tile - overlap, 1)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def ramp(height: int, width: int, overlap: int, device=None) -> torch.Tensor:
    """Weights (1, 1, height, width): 1 inside, falling linearly over ``overlap`` towards each edge (never 0)."""

    def axis(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32, device=device)
        return torch.minimum(torch.minimum(i + 1, n - i), torch.tensor(float(overlap + 1), device=device)) / (overlap + 1)

    return (axis(height)[:, None] * axis(width)[None, :])[None, None]


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              scale: int = 1) -> torch.Tensor:
    """``fn`` (which maps a (1, C, h, w) tensor to (1, C', h*scale, w*scale)) applied to ``x`` tile by tile."""
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    out = weight = None
    th, tw = min(tile, height), min(tile, width)
    for top in starts(height, th, overlap):
        for left in starts(width, tw, overlap):
            piece = fn(x[..., top:top + th, left:left + tw])
            if out is None:
                out = torch.zeros((*piece.shape[:2], height * scale, width * scale), dtype=torch.float32, device=piece.device)
                weight = torch.zeros((1, 1, height * scale, width * scale), dtype=torch.float32, device=piece.device)
            w = ramp(th * scale, tw * scale, overlap * scale, piece.device)
            rows, cols = slice(top * scale, (top + th) * scale), slice(left * scale, (left + tw) * scale)
            out[..., rows, cols] += piece.float() * w
            weight[..., rows, cols] += w
    return (out / weight).to(x.dtype)


class TiledGuider:
    """A guider over overlapping latent tiles: each tile has its own guider (their state, e.g. APG's
    momentum, stays per tile); the predictions are blended by :func:`ramp` weights."""

    def __init__(self, make: Callable[[], object], size: tuple[int, int], tile: tuple[int, int]) -> None:
        self.make = make
        self.tile = tile
        self.overlap = min(tile) // 4
        self.places = [(top, left) for top in starts(size[0], tile[0], self.overlap)
                       for left in starts(size[1], tile[1], self.overlap)]
        self.guiders: dict[tuple[int, int], object] = {}

    def predict(self, scheduler, latents: torch.Tensor, t, step: int) -> torch.Tensor:
        out = torch.zeros_like(latents, dtype=torch.float32)
        weight = torch.zeros((1, 1, *latents.shape[-2:]), dtype=torch.float32, device=latents.device)
        w = ramp(*self.tile, self.overlap, latents.device)
        th, tw = self.tile
        for top, left in self.places:
            guider = self.guiders.get((top, left)) or self.guiders.setdefault((top, left), self.make())
            piece = guider.predict(scheduler, latents[..., top:top + th, left:left + tw], t, step)
            out[..., top:top + th, left:left + tw] += piece.float() * w
            weight[..., top:top + th, left:left + tw] += w
        return (out / weight).to(latents.dtype)
