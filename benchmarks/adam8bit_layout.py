"""bitsandbytes' 8-bit AdamW step on many separate tensors against the same values as one flat tensor.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/adam8bit_layout.py                # CPU (bitsandbytes >= 0.45)
    PYTHONPATH=. python benchmarks/adam8bit_layout.py --device cuda --tensors 686 --values 589824

bitsandbytes runs Python and launches its kernels once per tensor, so the optimizer step of a
model's ~700 parameter tensors costs far more than that of one tensor holding the same values;
this is why the trainer steps its parameters as a few flat buckets (backend/training/flat.py).
Defaults: 686 tensors (an SD1.5 UNet's count) of 8192 values each (above bitsandbytes'
min_8bit_size of 4096, so every one keeps 8-bit state). Each layout runs ``--steps`` timed steps
after ``--warmup``, the two layouts alternating step by step; the median step is printed. On CPU
the time is the process's CPU time, on CUDA wall-clock time. Results: docs/training.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tensors", type=int, default=686)
    parser.add_argument("--values", type=int, default=8192, help="values per tensor")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    import bitsandbytes as bnb

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(args.tensors, args.values, generator=generator)
    grads = torch.randn(args.tensors, args.values, generator=generator) * 1e-3
    separate = [torch.nn.Parameter(row.clone().to(device)) for row in values]
    flat = [torch.nn.Parameter(values.flatten().to(device))]
    for params, grad in ((separate, list(grads.to(device))), (flat, [grads.flatten().to(device)])):
        for param, g in zip(params, grad):
            param.grad = g
    layouts = {f"{args.tensors} tensors": separate, "one flat tensor": flat}
    optimizers = {name: bnb.optim.AdamW8bit(params, lr=1e-4) for name, params in layouts.items()}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for step in range(args.warmup + args.steps):
        for name, optimizer in optimizers.items():
            _sync(device)
            start = clock()
            optimizer.step()
            _sync(device)
            if step >= args.warmup:
                times[name].append(clock() - start)
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, {device.type}"
          f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{args.tensors} x {args.values} values, median of {args.steps} steps")
    for name, took in times.items():
        print(f"{name:<20}{statistics.median(took) * 1000:>9.1f} ms a step")


if __name__ == "__main__":
    main()
