"""ADM scaling for SDXL (as Fooocus describes it): during the first END fraction of sampling
the positive branch is told its original image size was POS times larger and the negative
branch NEG times, which sharpens the positive and softens the negative.

SDXL's added time ids are (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
or (orig_h, orig_w, crop_top, crop_left, aesthetic_score) for the refiner: only the
original size is scaled.
"""

from __future__ import annotations

import torch


def scaled_time_ids(time_ids: torch.Tensor, scale: float) -> torch.Tensor:
    out = time_ids.clone()
    out[:, :2] *= scale
    return out
