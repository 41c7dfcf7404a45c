"""Every sampler name maps onto a real diffusers scheduler class with flags it accepts, and each schedule
gives the sigmas its formula gives."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
import numpy as np
import pytest

import backend
from backend.engine.scheduling import make_scheduler
from backend.samplers import SAMPLERS, SCHEDULES, scheduler_spec

REQUIRED = ["euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde",
            "ddim", "uni_pc", "deis", "lcm", "tcd"]


def test_required_names_present():
    assert set(REQUIRED) <= set(SAMPLERS)
    assert set(SCHEDULES) == {"normal", "karras", "exponential", "sgm_uniform"}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_schedule_lists_match_class_signatures(name):
    sampler = SAMPLERS[name]
    params = inspect.signature(getattr(diffusers, sampler.cls).__init__).parameters
    for schedule, flags in SCHEDULES.items():
        supported = all(k in params for k in flags) and all(k in params for k in sampler.flags)
        assert (schedule in sampler.schedules) == supported, (name, schedule)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_make_scheduler_builds_each(name, sd_pipe):
    for schedule in SAMPLERS[name].schedules:
        sched = make_scheduler(sd_pipe.dreamtty.scheduler_config, name, schedule, seed=1)
        cls_name, flags = scheduler_spec(name, schedule)
        assert type(sched).__name__ == cls_name
        for key, value in flags.items():
            assert sched.config[key] == value
        # the model's noise schedule is kept
        assert sched.config["beta_end"] == sd_pipe.dreamtty.scheduler_config["beta_end"]


# -- each schedule gives the sigmas its formula gives, computed here from the model's config ------------------------

SD1_CONFIG = json.loads((Path(backend.__file__).parent / "model_configs/sd1/scheduler/scheduler_config.json").read_text())


def _training_sigmas() -> np.ndarray:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 of SD1's "scaled_linear" betas (DDPM, Ho et al. 2020)."""
    betas = np.linspace(SD1_CONFIG["beta_start"] ** 0.5, SD1_CONFIG["beta_end"] ** 0.5, SD1_CONFIG["num_train_timesteps"]) ** 2
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def _trailing(n: int) -> np.ndarray:
    """"Trailing" timesteps, diffusers' sgm_uniform (Lin et al. 2024, arXiv 2305.08891, Table 2)."""
    T = SD1_CONFIG["num_train_timesteps"]
    return np.round(T - np.arange(n) * T / n) - 1


def _expected_sigmas(sampler: str, schedule: str, n: int) -> np.ndarray:
    train = _training_sigmas()
    T = len(train)
    sigma_max, sigma_min = train[-1], train[0]
    if schedule == "karras":  # Karras et al. 2022 (arXiv 2206.00364) eq. 5 with rho = 7
        inv = 1 / 7
        sigmas = (sigma_max**inv + np.arange(n) / (n - 1) * (sigma_min**inv - sigma_max**inv)) ** 7
    elif schedule == "exponential":  # log-linear from sigma_max down to sigma_min
        sigmas = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))
    elif schedule == "sgm_uniform":
        sigmas = train[_trailing(n).astype(int)]
    elif sampler == "dpmpp_2m":  # "normal": DPM-Solver's default linspace, n+1 rounded timesteps without the last
        sigmas = train[np.round(np.linspace(0, T - 1, n + 1))[::-1][:-1].astype(int)]
    else:  # "normal": the k-diffusion samplers' default linspace, sigma interpolated between timesteps
        sigmas = np.interp(np.linspace(T - 1, 0, n), np.arange(T), train)
    return np.append(sigmas, 0.0)  # the last step denoises to sigma 0


@pytest.mark.parametrize("sampler", ["euler", "lms", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("steps", [5, 13])
def test_each_schedule_gives_its_documented_sigmas(sampler, steps):
    for schedule in SAMPLERS[sampler].schedules:
        sched = make_scheduler(SD1_CONFIG, sampler, schedule)
        sched.set_timesteps(steps)
        np.testing.assert_allclose(sched.sigmas.numpy(), _expected_sigmas(sampler, schedule, steps), rtol=1e-4,
                                   err_msg=f"{sampler} {schedule}")


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_timestep_schedules_give_their_documented_timesteps(sampler):
    """Samplers without sigma schedules: "normal" keeps the class's spacing, "sgm_uniform" is trailing."""
    steps, T = 7, SD1_CONFIG["num_train_timesteps"]
    normal = {  # diffusers' defaults: DDIM "leading" + steps_offset, Euler a "linspace"
        "ddim": np.arange(steps)[::-1] * (T // steps) + SD1_CONFIG["steps_offset"],
        "euler_a": np.linspace(T - 1, 0, steps),
    }[sampler]
    for schedule, expected in (("normal", normal), ("sgm_uniform", _trailing(steps))):
        sched = make_scheduler(SD1_CONFIG, sampler, schedule)
        sched.set_timesteps(steps)
        np.testing.assert_allclose(sched.timesteps.numpy(), expected, rtol=1e-5, err_msg=f"{sampler} {schedule}")
