"""All trainable parameters in one buffer, so that the optimizer updates them in one go.

Optimizers step each parameter tensor on its own. bitsandbytes' 8-bit AdamW
runs Python and launches kernels per tensor, which for the ~700 tensors of an
SD1.5 UNet costs more than the update itself. Here every parameter becomes a
view into one flat buffer and, while a step's gradients exist, every gradient
a view into another; the optimizer is given the single flat parameter.

Autograd adds into a gradient that already exists in place, so gradients stay
views of the flat buffer through backward and accumulation. The gradient
buffer is allocated just before the first backward of a step (the forward's
autocast weight copies are gone by then) and released after the optimizer
step, as ``zero_grad(set_to_none=True)`` would.
"""

from __future__ import annotations

import torch


class FlatParameters:
    """``params`` moved into one buffer; :attr:`flat` is the parameter to give the optimizer."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ValueError(f"flat parameters need one dtype and device, got {sorted(map(str, kinds))}")
        self.params = params
        buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        for p, view in zip(params, self._views(buffer)):
            view.copy_(p.detach())
            p.data = view  # the module's parameter now lives in the buffer
        self.flat = torch.nn.Parameter(buffer)

    def _views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for p in self.params]
        return [chunk.view_as(p) for p, chunk in zip(self.params, buffer.split(sizes))]

    def attach_grads(self) -> None:
        """Zeroed gradients for every parameter, views of the flat gradient (no-op while they exist)."""
        if self.flat.grad is not None:
            return
        self.flat.grad = torch.zeros_like(self.flat)
        for p, view in zip(self.params, self._views(self.flat.grad)):
            p.grad = view

    def release_grads(self) -> None:
        self.flat.grad = None
        for p in self.params:
            p.grad = None
