"""Every sampler name maps onto a real diffusers scheduler class with flags it accepts."""

from __future__ import annotations

import inspect

import diffusers
import pytest

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
        sched = make_scheduler(sd_pipe.dreamtty_scheduler_config, name, schedule, seed=1)
        cls_name, flags = scheduler_spec(name, schedule)
        assert type(sched).__name__ == cls_name
        for key, value in flags.items():
            assert sched.config[key] == value
        # the model's noise schedule is kept
        assert sched.config["beta_end"] == sd_pipe.dreamtty_scheduler_config["beta_end"]
