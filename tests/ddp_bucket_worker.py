"""Run by torch.distributed.run (2 gloo processes) from test_train_flat: DDP over flat buckets next to DDP over
the same, separate parameters. Each rank saves both nets' weights to OUT/RANK.pt."""

from __future__ import annotations

import copy
import datetime
import sys

import torch
import torch.distributed as dist

from backend.training.flat import FlatParameters


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # env:// from the launcher
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(net)
    flat = FlatParameters(list(net.parameters()), bucket_numel=100)
    models = torch.nn.parallel.DistributedDataParallel(net), torch.nn.parallel.DistributedDataParallel(ref)
    opts = torch.optim.AdamW(flat.tensors, lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    data = torch.Generator().manual_seed(rank)  # each process its own batches
    for _ in range(3):
        first, second = torch.randn(5, 8, generator=data), torch.randn(5, 8, generator=data)
        for model in models:
            with model.no_sync():  # accumulate, then reduce on the second backward
                model(first).pow(2).mean().backward()
            model(second).pow(2).mean().backward()
        for opt in opts:
            opt.step()
        flat.release_grads()
        opts[1].zero_grad(set_to_none=True)
    torch.save({"flat": [p.detach() for p in net.parameters()], "separate": [p.detach() for p in ref.parameters()]},
               f"{out}/{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
