"""Build diffusers schedulers from our sampler/schedule names."""

from __future__ import annotations

import inspect

import diffusers

from backend.samplers import scheduler_spec


def make_scheduler(base_config, sampler: str, schedule: str, seed: int | list[int] | None = None):
    """A fresh scheduler of the sampler's class, keeping the model's noise schedule
    (betas, prediction_type, ...) from ``base_config``.

    Schedulers with their own noise sampler (DPM++ SDE) get ``seed`` so the
    image is reproducible; a list of seeds (a batch) gives each image its own
    Brownian tree, as diffusers' ``BatchedBrownianTree`` does.
    """
    cls_name, flags = scheduler_spec(sampler, schedule)
    cls = getattr(diffusers, cls_name)
    if seed is not None and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        flags["noise_sampler_seed"] = seed
    return cls.from_config(base_config, **flags)
