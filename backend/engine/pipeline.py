"""A loaded diffusers pipeline as dreamtty uses it: what it keeps on it, and the diffusers internals it calls.

Everything dreamtty remembers about a pipeline (its family, the scheduler config it was loaded with, the
extras applied to it, the refiner, image-prompt models, compile state) lives in one :class:`PipelineState`
at ``pipe.dreamtty``; the private diffusers call the engine needs (SDXL's ``_get_add_time_ids``) is made
here only. A diffusers upgrade that changes them touches this file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

AESTHETIC_SCORES = (6.0, 2.5)  # diffusers' defaults (positive, negative), for models conditioned on them


@dataclass
class PipelineState:
    family: str
    scheduler_config: dict
    extras: dict = field(default_factory=dict)  # what apply_extras applied, with short hashes (for metadata)
    loras: dict[str, str] = field(default_factory=dict)  # loaded LoRA adapter -> its file
    embeddings: dict[str, str] = field(default_factory=dict)  # loaded textual-inversion token -> hash
    model_vae: object | None = None  # the model's own VAE while an override is in use
    vae_key: tuple | None = None  # (path, hash) of the VAE override in use
    refiner: object | None = None  # the refiner pipeline of the current request
    image_prompts: object | None = None  # the current request's prepared references (engine.image_prompt)
    ip_slots: tuple = ()  # the IP-Adapters loaded, one per reference
    controlnets: dict = field(default_factory=dict)  # ControlNet folder -> loaded model
    speed: str = "default"  # what it was set up for (backend.engine.fast)
    compiled_sizes: set | None = None  # a fast pipeline's (width, height, images) compiled so far (None: not fast)
    on_denoise: Callable[[int, int, int], None] | None = None  # told (images, width, height) a denoise loop runs at


def attach(pipe, family: str) -> PipelineState:
    """Give a freshly loaded ``pipe`` its state."""
    pipe.dreamtty = PipelineState(family, dict(pipe.scheduler.config))
    return pipe.dreamtty


def is_xl(pipe) -> bool:
    """Whether ``pipe`` is an SDXL pipeline (base or refiner): they have a second text encoder slot."""
    return hasattr(pipe, "text_encoder_2")


def execution_device(pipe) -> torch.device:
    """Where the pipeline computes: its UNet's device. dreamtty never offloads a pipeline, so this skips
    diffusers' ``_execution_device``, which looks for offload hooks in every module (12 ms a call on SDXL)."""
    return next(pipe.unet.parameters()).device


def sdxl_time_ids(pipe, width: int, height: int, dtype: torch.dtype, projection: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's size conditioning (and its negative) for a ``width`` x ``height`` image, as the stock pipeline
    of ``pipe``'s class makes it: the image-to-image and inpaint pipelines take aesthetic scores, which
    their model uses when its config asks for them (``requires_aesthetics_score``, the refiner)."""
    size = (height, width)
    if "aesthetic_score" in inspect.signature(pipe._get_add_time_ids).parameters:
        return pipe._get_add_time_ids(size, (0, 0), size, *AESTHETIC_SCORES, size, (0, 0), size, dtype=dtype,
                                      text_encoder_projection_dim=projection)
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection)
    return ids, ids
