"""The UNet's prediction in the forms guidance terms need: epsilon, x0, and back.

Everything is in the UNet's input space (after ``scheduler.scale_model_input``),
where every diffusers scheduler hands the UNet a variance-preserving sample
``x_t = a·x0 + s·eps`` with ``a = sqrt(ᾱ_t)``, ``s = sqrt(1 - ᾱ_t)``. ᾱ_t is read
off the training schedule at the timestep the UNet was given; fractional
timesteps (Karras and other sigma schedules) are interpolated in log-sigma,
the inverse of the schedulers' own sigma -> timestep map, so the noise level
matches the sample's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.errors import RequestError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseLevel:
    """Converts between a model output and eps / x0 at one noise level."""

    a: float  # sqrt(alpha_bar)
    s: float  # sqrt(1 - alpha_bar)
    kind: str  # scheduler.config.prediction_type

    def eps(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pred if self.kind == "epsilon" else self.a * pred + self.s * x

    def x0(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "epsilon":
            return (x - self.s * pred) / self.a
        return self.a * x - self.s * pred

    def from_eps(self, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model output that means ``eps`` for sample ``x``."""
        return eps if self.kind == "epsilon" else (eps - self.s * x) / self.a

    def eps_step(self, delta: torch.Tensor) -> torch.Tensor:
        """A change of eps, expressed as a change of the model output at a fixed sample."""
        return delta if self.kind == "epsilon" else delta / self.a

    def noised(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.a * x0 + self.s * eps


def noise_level(scheduler, t) -> NoiseLevel:
    """The noise level of timestep ``t`` under the scheduler's training schedule."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise RequestError("guidance", f"models predicting {kind!r} are not supported; allowed: {', '.join(PREDICTION_TYPES)}")
    alphas = scheduler.alphas_cumprod.double().cpu().numpy()
    log_sigmas = 0.5 * np.log((1.0 - alphas) / alphas)
    sigma = float(np.exp(np.interp(float(t), np.arange(len(alphas)), log_sigmas)))
    alpha_bar = 1.0 / (1.0 + sigma * sigma)
    return NoiseLevel(alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5, kind)


def progress(scheduler, t) -> float:
    """How far sampling has come at timestep ``t``: 0 at pure noise, 1 at the clean image.

    Timestep-based, as Fooocus measures it (1 - t/999 for a 1000-step model).
    """
    last = scheduler.config.num_train_timesteps - 1
    return min(1.0, max(0.0, 1.0 - float(t) / last))
