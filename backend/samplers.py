"""Sampler and schedule names users know, mapped onto diffusers schedulers.

Pure data (no torch): the TUI and the request validator read it; the worker
builds the scheduler with :func:`backend.engine.scheduling.make_scheduler`.
Mapping follows diffusers' scheduler overview table (A1111/k-diffusion names).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    name: str
    cls: str
    label: str
    flags: dict = field(default_factory=dict)
    schedules: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform")
    min_steps: int = 1

    @property
    def default_schedule(self) -> str:
        """The schedule used when none is given: Karras where the sampler takes it."""
        return "karras" if "karras" in self.schedules else self.schedules[0]


_TIMESTEP_ONLY = ("normal", "sgm_uniform")

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("euler", "EulerDiscreteScheduler", "Euler"),
        Sampler("euler_a", "EulerAncestralDiscreteScheduler", "Euler a", schedules=_TIMESTEP_ONLY),
        Sampler("heun", "HeunDiscreteScheduler", "Heun"),
        Sampler("dpm2", "KDPM2DiscreteScheduler", "DPM2"),
        Sampler("dpm2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
        Sampler("lms", "LMSDiscreteScheduler", "LMS"),
        Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M", {"algorithm_type": "dpmsolver++"}),
        Sampler(
            "dpmpp_2m_sde",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M SDE",
            {"algorithm_type": "sde-dpmsolver++"},
        ),
        Sampler("dpmpp_sde", "DPMSolverSDEScheduler", "DPM++ SDE"),
        Sampler("ddim", "DDIMScheduler", "DDIM", schedules=_TIMESTEP_ONLY),
        Sampler("uni_pc", "UniPCMultistepScheduler", "UniPC"),
        Sampler("deis", "DEISMultistepScheduler", "DEIS"),
        Sampler("lcm", "LCMScheduler", "LCM", schedules=_TIMESTEP_ONLY),
        Sampler("tcd", "TCDScheduler", "TCD", schedules=_TIMESTEP_ONLY),
        # PNDM's Runge-Kutta warm-up uses its last 4 (pndm_order) timesteps; fewer fail inside diffusers.
        Sampler("pndm", "PNDMScheduler", "PLMS (PNDM)", schedules=_TIMESTEP_ONLY, min_steps=4),
        Sampler("ddpm", "DDPMScheduler", "DDPM", schedules=_TIMESTEP_ONLY),
    )
}

# Schedule name -> scheduler constructor flags (diffusers' documented equivalents).
SCHEDULES: dict[str, dict] = {
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}


def scheduler_spec(sampler: str, schedule: str) -> tuple[str, dict]:
    """Return (diffusers class name, flags) for a validated sampler/schedule pair."""
    entry = SAMPLERS[sampler]
    return entry.cls, {**entry.flags, **SCHEDULES[schedule]}
