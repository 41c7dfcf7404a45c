"""Training batches: a seeded sample order and image tensors (torch, PIL).

Everything random about micro-batch ``m`` (which images, crops, flips, noise, timesteps)
comes from ``batch_generator(seed, m, ...)`` and ``SampleOrder`` — pure functions of the
seed and ``m`` — so a resumed run sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.errors import DreamttyError
from backend.training.images import open_rgb


def batch_generator(seed: int, micro: int, process_index: int = 0, num_processes: int = 1) -> torch.Generator:
    """The CPU generator for one micro-batch of one process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro * num_processes + process_index) % 2**63)


class SampleOrder:
    """An endless stream of seeded permutations of ``range(n)`` (one per epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
        return self._perms[epoch]

    def take(self, start: int, count: int) -> list[int]:
        """Items ``start .. start+count-1`` of the stream."""
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + count)]

    def epoch(self, position: int) -> int:
        return position // self.n


@dataclass
class Sample:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) before resizing (SDXL micro-conditioning)
    crop_top_left: tuple[int, int]


def _randint(high: int, gen: torch.Generator | None) -> int:
    if high <= 0:
        return 0
    return int(torch.randint(0, high + 1, (1,), generator=gen).item())


def load_sample(path: Path, resolution: int, center_crop: bool, flip: bool, gen: torch.Generator | None) -> Sample:
    """Resize the short side to ``resolution`` (LANCZOS), crop a square, maybe flip."""
    try:
        img = open_rgb(path)
    except (OSError, ValueError) as exc:  # changed since it was checked
        raise DreamttyError(f"cannot read training image {path}: {exc}") from None
    original = (img.height, img.width)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (img.height - resolution) // 2, (img.width - resolution) // 2
    else:
        top, left = _randint(img.height - resolution, gen), _randint(img.width - resolution, gen)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = size[0] - left - resolution  # where the crop sits in the flipped image
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return Sample(pixels, original, (top, left))


class ImageSet:
    """One set of training images (instance or class) with its own seeded order."""

    def __init__(self, files: list[Path], resolution: int, center_crop: bool, random_flip: bool, seed: int) -> None:
        self.files, self.resolution = list(files), resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.order = SampleOrder(len(self.files), seed)
        self.seed = seed

    def fixed_crop_generator(self, index: int) -> torch.Generator:
        """With cached latents each image keeps one crop, drawn from the seed."""
        return torch.Generator().manual_seed(self.seed * 31 + index)

    def flip(self, gen: torch.Generator) -> bool:
        return self.random_flip and bool(torch.rand((), generator=gen).item() < 0.5)

    def load(self, index: int, flipped: bool, gen: torch.Generator | None) -> Sample:
        return load_sample(self.files[index], self.resolution, self.center_crop, flipped, gen)
