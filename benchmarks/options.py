"""What the benchmarks that run on the CPU or, with ``--gpu``, on CUDA share: their options and the device wait."""

from __future__ import annotations

import argparse
import os

import torch


def parse(doc: str, gpu_help: str, options: dict[str, tuple[str, int, int]]) -> argparse.Namespace:
    """``--gpu`` and whole-number options ``{name: (help, GPU default, CPU default)}``, each filled with the
    chosen device's default when not given; ``--gpu`` without CUDA is a usage error."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    for name, (text, on_gpu, on_cpu) in options.items():
        parser.add_argument(f"--{name}", type=int, help=f"{text} (default {on_gpu} on GPU, {on_cpu} on CPU)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    for name, (_, on_gpu, on_cpu) in options.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if args.gpu else on_cpu)
    return args


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock reads the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def child_env(root: str, **more: str) -> dict[str, str]:
    """This process's environment for a benchmark's child process, with ``root`` first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **more}
