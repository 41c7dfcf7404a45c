"""Queued jobs run as one group (their images share batches) against the same jobs one at a time, in one run.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/job_groups.py [--jobs 4] [--steps 20] [--size 128]

A CPU service on the demo model gets ``--jobs`` one-image jobs (each its own prompt and seed) queued before
its worker is ready, twice: with ``max_batch`` 4, so they run as one group (backend/job_groups.py), and with
``max_batch`` 1, so each runs alone. Prints the wall time from the first sampling step (the model is loaded)
to the last job's end of each, median of ``--runs``, and the ratio. Runs in a temporary DREAMTTY_HOME. Results: docs/speed.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path


async def _wall(jobs: int, steps: int, size: int, max_batch: int, folder: Path) -> float:
    from backend import events as ev
    from backend.request import GenerateRequest
    from backend.service import Service

    service = Service(devices="cpu", db_path=folder / "queue.sqlite3")
    events = service.subscribe()
    ids = [service.submit(GenerateRequest(prompt=f"a red fox, picture {k}", seed=k, steps=steps, width=size,
                                          height=size, sampler="euler", scheduler="normal", max_batch=max_batch),
                          folder / "out") for k in range(jobs)]
    await service.start()
    try:
        began, done = None, set()
        while len(done) < len(ids):
            event = await events.get()
            if isinstance(event, ev.Step) and began is None:
                began = time.perf_counter()
            elif isinstance(event, ev.Failed):
                raise SystemExit(f"job {event.job} failed: {event.error}")
            elif isinstance(event, ev.Done):
                done.add(event.job)
        return time.perf_counter() - began
    finally:
        await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["DREAMTTY_HOME"] = home
        times: dict[str, list[float]] = {"one group": [], "one at a time": []}
        for run in range(args.runs):  # the two interleaved, so drift hits both alike
            for label, max_batch in (("one group", args.jobs), ("one at a time", 1)):
                folder = Path(home) / f"{label.replace(' ', '-')}-{run}"
                folder.mkdir()
                times[label].append(asyncio.run(_wall(args.jobs, args.steps, args.size, max_batch, folder)))
    grouped, alone = (statistics.median(times[k]) for k in ("one group", "one at a time"))
    print(f"CPU, demo model, {args.size}², {args.steps} Euler steps, {args.jobs} one-image jobs queued at once, "
          f"median of {args.runs}")
    print(f"{'jobs run':<16}{'wall s':>9}{'images/s':>10}")
    for label, seconds in (("one group", grouped), ("one at a time", alone)):
        print(f"{label:<16}{seconds:>9.2f}{args.jobs / seconds:>10.2f}")
    print(f"one group / one at a time: {grouped / alone:.2f}x the time")


if __name__ == "__main__":
    main()
