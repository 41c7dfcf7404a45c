"""Workers on Ray against the local worker, on the demo model: throughput and per-job overhead, in one run.

    python benchmarks/cluster_scale.py [--jobs 8] [--steps 10] [--size 64] [--cluster ADDRESS]

For each pool (the local worker process; 1 Ray actor; 2 Ray actors) it times a batch of one-image
jobs queued at once (throughput, images/min) and jobs run one after another (seconds per job).
The Ray path's overhead per job is its serial time minus the local worker's (target < 0.2 s).
Without ``--cluster`` a local Ray runtime with CPU actors is started here (one core each, so the
2-actor figure shows scaling only on a machine with two idle cores); with a cluster address the
actors take one GPU each and ``--device cuda`` is used for the local worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from backend.events import Done, FINAL_EVENTS, WorkerReady
from backend.pool import ProcessPool
from backend.ray_pool import RayPool
from backend.request import GenerateRequest
from backend.service import Service


def _request(args, seed: int) -> GenerateRequest:
    return GenerateRequest(prompt="a red fox in the snow", model=args.model, sampler="euler", steps=args.steps,
                           width=args.size, height=args.size, seed=seed)


async def _ready(events: asyncio.Queue, count: int) -> None:
    ready: set[int] = set()
    while len(ready) < count:
        event = await events.get()
        if isinstance(event, WorkerReady):
            ready.add(event.worker)


async def _finish(events: asyncio.Queue, jobs: list[int]) -> None:
    left = set(jobs)
    while left:
        event = await events.get()
        if isinstance(event, FINAL_EVENTS) and event.job in left:
            if not isinstance(event, Done):
                raise SystemExit(f"job {event.job} {event.type}: {getattr(event, 'error', '')}")
            left.discard(event.job)


async def measure(pool, workers: int, args, out: Path) -> tuple[float, float]:
    """(images per minute for a batch queued at once, median seconds per job run one at a time)."""
    service = Service(db_path=out / "queue.sqlite3", pool=pool)
    events = service.subscribe()
    await service.start()
    try:
        await _ready(events, workers)
        warm = [service.submit(_request(args, seed), out) for seed in range(workers)]  # each worker loads the model
        await _finish(events, warm)
        start = time.perf_counter()
        await _finish(events, [service.submit(_request(args, seed), out) for seed in range(args.jobs)])
        rate = args.jobs / (time.perf_counter() - start) * 60
        serial = []
        for seed in range(args.jobs):
            start = time.perf_counter()
            await _finish(events, [service.submit(_request(args, seed), out)])
            serial.append(time.perf_counter() - start)
    finally:
        await service.close()
    return rate, statistics.median(serial)


async def run(args, out: Path) -> list[tuple[str, float, float]]:
    gpu = args.cluster is not None
    rows = [("local worker", *await measure(ProcessPool("cuda" if gpu else "cpu", out / "queue.sqlite3"), 1, args, out))]
    if not gpu:  # after the local run: Ray's idle workers starting up would slow it down
        import ray

        # "local": a runtime of its own, not a Ray head already running here (it refuses num_cpus)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    for actors in (1, 2):
        pool = RayPool(args.cluster or "auto", out / "queue.sqlite3", gpu=gpu, actors=actors)
        rows.append((f"ray, {actors} actor{'s' * (actors > 1)}", *await measure(pool, actors, args, out)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cluster", help="a Ray cluster address (default: a local Ray runtime with CPU actors)")
    args = parser.parse_args()
    if args.cluster is not None:
        import torch

        if not torch.cuda.is_available():
            parser.error("--cluster measures GPU workers beside a local one on cuda; this machine has no CUDA GPU")
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per worker, inherited by the actors
        if args.model in ("demo", "demo-xl"):
            from backend.engine.demo_models import ensure_demo

            ensure_demo(args.model)  # before the actors start: they would all build it at once
    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    print(f"model={args.model} size={args.size} steps={args.steps} jobs={args.jobs} "
          f"cluster={args.cluster or 'local Ray runtime, CPU actors'}")
    print(f"{'workers':<18}{'images/min':>12}{'s/job serial':>14}")
    for name, rate, serial in rows:
        print(f"{name:<18}{rate:>12.1f}{serial:>14.3f}")
    overhead = rows[1][2] - rows[0][2]
    print(f"Ray overhead per job: {overhead:+.3f} s (target < 0.2 s); "
          f"2 actors / 1 actor throughput: {rows[2][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
