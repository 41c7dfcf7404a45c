"""Trainable parameters in a few flat buffers, so that the optimizer updates them in a few tensors.

Optimizers step each parameter tensor on its own. bitsandbytes' 8-bit AdamW
runs Python and launches kernels per tensor, which for the ~700 tensors of an
SD1.5 UNet costs more than the update itself. Here the parameters, in module
order, are packed into buckets of about :data:`BUCKET_NUMEL` values; every
parameter becomes a view into its bucket, and the optimizer is given one
tensor per bucket (about 30 for SD1.5).

A bucket's gradient buffer is allocated when the first gradient of one of its
parameters arrives in backward (a hook that runs before autograd accumulates
it), and every parameter's gradient becomes a view into it. Autograd then adds
into those gradients in place, through backward and accumulation. So gradient
memory grows through backward as activations are freed, as with separate
parameters, instead of all existing at backward's start; the buffers are
released after the optimizer step, as ``zero_grad(set_to_none=True)`` would.
"""

from __future__ import annotations

import torch

BUCKET_NUMEL = 2**25  # 128 MiB of fp32 per bucket


def _pack(params: list[torch.nn.Parameter], bucket_numel: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of ``params`` of at most ``bucket_numel`` values (a larger one alone)."""
    groups: list[list[torch.nn.Parameter]] = []
    filled = 0
    for p in params:
        if not groups or filled + p.numel() > bucket_numel:
            groups.append([])
            filled = 0
        groups[-1].append(p)
        filled += p.numel()
    return groups


class _Bucket:
    """Parameters moved into one buffer; :attr:`flat` is the tensor the optimizer steps."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        for p, view in zip(params, self._views(buffer)):
            view.copy_(p.detach())
            p.data = view  # the module's parameter now lives in the buffer
            p.register_hook(self._attach_grads)
        self.flat = torch.nn.Parameter(buffer)

    def _views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for p in self.params]
        return [chunk.view_as(p) for p, chunk in zip(self.params, buffer.split(sizes))]

    def _attach_grads(self, grad: torch.Tensor) -> None:
        """Before a parameter's gradient is accumulated: zeroed bucket gradients, if none exist yet."""
        if self.flat.grad is None:
            self.flat.grad = torch.zeros_like(self.flat)
            for p, view in zip(self.params, self._views(self.flat.grad)):
                p.grad = view

    def release_grads(self) -> None:
        self.flat.grad = None
        for p in self.params:
            p.grad = None


class FlatParameters:
    """``params`` packed into buckets; :attr:`tensors` are the parameters to give the optimizer.

    Parameters under ``small_numel`` values get buckets of their own, :attr:`small`, so that an
    optimizer can treat them apart as it would have (bitsandbytes keeps their state in 32 bits).
    """

    def __init__(self, params: list[torch.nn.Parameter], bucket_numel: int = BUCKET_NUMEL, small_numel: int = 0) -> None:
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ValueError(f"flat parameters need one dtype and device, got {sorted(map(str, kinds))}")
        small = [_Bucket(g) for g in _pack([p for p in params if p.numel() < small_numel], bucket_numel)]
        large = [_Bucket(g) for g in _pack([p for p in params if p.numel() >= small_numel], bucket_numel)]
        self.buckets = large + small
        self.tensors = [bucket.flat for bucket in self.buckets]
        self.small = [bucket.flat for bucket in small]

    def release_grads(self) -> None:
        """After the optimizer step: every gradient freed."""
        for bucket in self.buckets:
            bucket.release_grads()
