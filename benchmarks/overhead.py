"""Service overhead on the demo model: images through dreamtty (worker process, events,
previews, PNG with metadata) against a direct diffusers pipeline call, in one run.

    python benchmarks/overhead.py [--images 6] [--steps 20] [--size 128]

Prints seconds per image for each and the ratio (target at steady state: <= 1.10).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from backend.engine.loader import load_pipeline
from backend.events import Failed
from backend.engine.scheduling import make_scheduler
from backend.models import resolve_model
from backend.request import GenerateRequest
from backend.service import Service


def _request(args, seed: int) -> GenerateRequest:
    return GenerateRequest(prompt="a red fox in the snow", model=args.model, sampler="euler", scheduler="normal",
                           steps=args.steps, width=args.size, height=args.size, seed=seed)


def _direct_image(pipe, args, seed: int) -> float:
    """One stock pipeline call with the same settings; returns seconds."""
    pipe.scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "euler", "normal")
    start = time.perf_counter()
    pipe("a red fox in the snow", num_inference_steps=args.steps, guidance_scale=7.0, width=args.size,
         height=args.size, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return time.perf_counter() - start


async def _service_image(service, events, args, seed: int, out: Path) -> float:
    """One job through the service (worker process, events, previews, PNG); returns seconds."""
    start = time.perf_counter()
    job = service.submit(_request(args, seed), out)
    async for event in service.wait(job, events):
        if isinstance(event, Failed):
            raise SystemExit(event.error)
    return time.perf_counter() - start


async def measure(args, out: Path) -> tuple[list[float], list[float]]:
    """Alternate service and direct images (so both see the same machine load); skip one warm-up each."""
    pipe = load_pipeline(resolve_model(args.model), torch.device("cpu"), torch.float32)
    service = Service(devices="cpu", db_path=out / "queue.sqlite3")
    events = service.subscribe()
    await service.start()
    ours, stock = [], []
    try:
        for seed in range(args.images + 1):
            ours.append(await _service_image(service, events, args, seed, out))
            stock.append(_direct_image(pipe, args, seed))
    finally:
        await service.close()
    return ours[1:], stock[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours, stock = asyncio.run(measure(args, Path(tmp)))
    a, b = statistics.median(ours), statistics.median(stock)
    print(f"model={args.model} size={args.size} steps={args.steps} images={args.images}")
    print(f"{'path':<28}{'s/image (median)':>18}")
    print(f"{'diffusers pipeline call':<28}{b:>18.3f}")
    print(f"{'dreamtty service':<28}{a:>18.3f}")
    print(f"ratio service/stock: {a / b:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
