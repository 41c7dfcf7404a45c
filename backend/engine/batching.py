"""How many of a job's images denoise together (``max_batch``); which jobs run one image at a time is
``backend.job_groups.one_at_a_time``.

A batch shares every UNet call, so it makes images faster than one at a time: on a GPU, and on the CPU too
(about twice as fast per image at batch 4, measured on the demo models and on a real-size SD1.5 UNet). Its
images differ from runs of their own in the last bits (the kernels a library picks depend on the batch
size; on the CPU oneDNN's convolutions do), so an image records the batch it was made in and ``reproduce``
runs that batch again (``GenerateRequest.batch``). The default: as many images as half the free memory
holds by the estimate below, at most :data:`CPU_DEFAULT` on the CPU (a reproduce runs its whole batch) and
:data:`backend.job_groups.GROUP_IMAGES` on CUDA (the images a group of jobs holds).
"""

from __future__ import annotations

import torch

from backend.job_groups import GROUP_IMAGES
from backend.request import GenerateRequest

CPU_DEFAULT = 4
# UNet activations alive at once per latent position per batch row, at 2 bytes a value: an estimate from SD1.5 and
# SDXL (their widest blocks hold 320 channels at full latent size, a few dozen such tensors at a time).
ACTIVATION_BYTES = 48 * 1024
HEADROOM = 0.5  # of the free memory: the rest stays for the decode, the allocator and other jobs' models


def unet_rows(request: GenerateRequest) -> int:
    """Rows of the UNet's batch per image: cond, uncond with CFG, PerpNeg's empty prompt, PAG's perturbed copy."""
    g = request.guidance
    return 1 + (request.cfg > 1.0) + bool(g.perp_neg) + bool(g.pag)


def fitting(free_bytes: int, request: GenerateRequest, element_size: int, most: int) -> int:
    """How many images of ``request`` fit into ``HEADROOM`` of ``free_bytes`` (1..most)."""
    positions = (request.width // 8) * (request.height // 8)
    per_image = positions * unet_rows(request) * ACTIVATION_BYTES * element_size // 2
    return max(1, min(most, int(free_bytes * HEADROOM) // per_image))


def max_batch(request: GenerateRequest, device: torch.device, dtype: torch.dtype) -> int:
    """``request.max_batch``, else the device's default (see the module's docstring)."""
    if request.max_batch is not None:
        return request.max_batch
    if device.type == "cuda":
        free, most = torch.cuda.mem_get_info(device)[0], GROUP_IMAGES
    else:
        import psutil

        free, most = psutil.virtual_memory().available, CPU_DEFAULT
    return fitting(free, request, torch.finfo(dtype).bits // 8, most)
