"""SDXL refiner hand-over: the base UNet denoises the first part of the steps, the refiner the rest.

Both models share the noise schedule and latent space, so one sampling loop
runs with one scheduler and the UNet (with its own conditioning and time ids)
is switched where diffusers' ``denoising_end`` cuts the schedule (the base runs
the timesteps at or above ``T * (1 - refiner_switch)``): the base hands its
partly denoised latents over, as in the SDXL report's ensemble-of-experts
mode (Podell et al. 2023, arXiv 2307.01952 §2.5), and the result equals
diffusers' base + refiner pipelines with ``denoising_end`` / ``denoising_start``
(second-order samplers aside: see ``handover_index``). The refiner's time ids carry the
aesthetic score (6.0, negative 2.5: diffusers' defaults). With prompt editing
the refiner encodes each step's texts with its own encoders, so a switch after
the hand-over changes the refiner's conditioning at that step.
"""

from __future__ import annotations

from backend.engine.conditioning import BatchConditioning, Conditioning, StepConditioning, encode_schedule, stack
from backend.engine.pipeline import execution_device, sdxl_time_ids
from backend.engine.guider import Guider, UNetInputs
from backend.errors import ModelError
from backend.families import FAMILIES
from backend.prompting.editing import PromptSchedule


def handover_index(scheduler, switch: float) -> int:
    """The schedule index at which the refiner takes over, where diffusers' ``denoising_end`` cuts: the base
    runs the timesteps at or above ``T * (1 - switch)``. A second-order scheduler hands over at the start
    of its next whole step (diffusers' refiner instead repeats the base's last, duplicated timestep)."""
    cutoff = int(round(scheduler.config.num_train_timesteps * (1 - switch)))
    index = int((scheduler.timesteps >= cutoff).sum())
    return index + index % 2 if scheduler.order == 2 else index


class Handover:
    """Predicts with the base guider before the switch and with the refiner's from then on.

    At the switch the scheduler starts afresh at that index, as the stock refiner pipeline's does
    (``denoising_start``): a multistep solver's history begins again with the refiner."""

    def __init__(self, base: Guider, refine: Guider, switch: float, steps: int) -> None:
        self.base, self.refine, self.switch, self.steps = base, refine, switch, steps
        self.switch_at: int | None = None

    def predict(self, scheduler, latents, t, step: int):
        if self.switch_at is None:
            self.switch_at = handover_index(scheduler, self.switch)
        if step == self.switch_at and scheduler.order == 1 and hasattr(scheduler, "set_begin_index"):
            scheduler.set_timesteps(self.steps, device=scheduler.timesteps.device)
            scheduler.set_begin_index(step)
        guider = self.base if step < self.switch_at else self.refine
        return guider.predict(scheduler, latents, t, step)


def refiner_inputs(refiner, cond: Conditioning | StepConditioning | BatchConditioning, width: int,
                   height: int) -> UNetInputs:
    """UNet inputs for the refiner: its conditioning and, for SDXL, its time ids."""
    if not FAMILIES[refiner.dreamtty.family].xl:
        return UNetInputs(refiner, cond, None, None, None)
    first = cond.at(0, 1)
    ids, neg = sdxl_time_ids(refiner, width, height, first.cond.dtype, int(first.pooled.shape[-1]))
    device, images = execution_device(refiner), first.cond.shape[0]  # a row per image of a batch
    return UNetInputs(refiner, cond, ids.to(device).repeat(images, 1), neg.to(device).repeat(images, 1), None)


def refiner_handover(pipe, request, schedules: list[PromptSchedule]) -> dict:
    """``denoise`` keyword arguments for the request: {} without a refiner, else a hand-over guider.
    ``schedules``: the prompts of each image denoised together (one, unless a batch)."""
    if not request.refiner:
        return {}
    refiner = pipe.dreamtty.refiner
    if refiner is None:
        raise ModelError(f"refiner: {request.refiner} is not loaded (apply_extras loads it)")
    cond = stack([encode_schedule(refiner, s, request.cfg > 1.0, request.guidance.clip_skip) for s in schedules])

    def make_guider(inputs: UNetInputs, cfg: float, settings, total: int) -> Handover:
        refine = Guider(refiner_inputs(refiner, cond, request.width, request.height), cfg, settings, total)
        return Handover(Guider(inputs, cfg, settings, total), refine, request.refiner_switch, request.steps)

    return {"make_guider": make_guider}
