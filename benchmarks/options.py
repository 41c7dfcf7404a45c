"""What the benchmarks that run on the CPU or, with ``--gpu``, on CUDA share: their options and the device wait."""

from __future__ import annotations

import argparse

import torch


def parse(doc: str, gpu_help: str, gpu: tuple[int, int], cpu: tuple[int, int]) -> argparse.Namespace:
    """``--gpu``, ``--steps`` and ``--runs``; the defaults ``(steps, runs)`` of the chosen device filled in.
    ``--gpu`` without CUDA is a usage error."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    parser.add_argument("--steps", type=int, help=f"steps per run (default {gpu[0]} on GPU, {cpu[0]} on CPU)")
    parser.add_argument("--runs", type=int, help=f"timed rounds (default {gpu[1]} on GPU, {cpu[1]} on CPU); the best is kept")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    steps, runs = gpu if args.gpu else cpu
    args.steps, args.runs = args.steps or steps, args.runs or runs
    return args


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
