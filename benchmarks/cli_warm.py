"""``dreamtty generate`` called again and again, on the demo model: with a running service against
``--local`` (each call starts its own workers and loads the model), in one run.

    python benchmarks/cli_warm.py [--calls 10] [--steps 20] [--size 128]

Prints the wall time of the calls in each mode and each call's overhead over the pure generation
(prompt encoding, denoising and VAE decode of the same request in this process, median of a few),
and where the service's overhead goes: starting the client (Python and its imports) and the round
trip through the service (submit, worker, PNG, events) seen by a client already running.
Target: with the service, overhead < 0.3 s a call. Runs in a temporary DREAMTTY_HOME.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(home: Path, run: Path) -> dict:
    """The calls' environment. Their bytecode is cached (in a private ``PYTHONPYCACHEPREFIX``, written by the
    first call), as an installed package's is: with ``PYTHONDONTWRITEBYTECODE`` set, every call would
    compile dreamtty's modules again."""
    env = {**os.environ, "DREAMTTY_HOME": str(home), "XDG_RUNTIME_DIR": str(run), "HF_HUB_OFFLINE": "1",
           "PYTHONPYCACHEPREFIX": str(home / "pycache")}
    env.pop("DREAMTTY_LOCAL", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _calls(env: dict, args, extra: list[str]) -> list[float]:
    """Seconds of each of ``args.calls`` consecutive ``dreamtty generate`` calls."""
    command = [sys.executable, "-m", "tui.cli", "generate", "a red fox in the snow", "--demo", "--device", "cpu",
               "--sampler", "euler", "--scheduler", "normal", "--steps", str(args.steps),
               "--size", f"{args.size}x{args.size}", "--seed", "1", *extra]
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def _pure(args, repeats: int = 5) -> float:
    """Median seconds of the same image made in this process, pipeline loaded and warm."""
    import torch

    from backend.engine.generate import generate_image
    from backend.engine.loader import load_pipeline
    from backend.models import resolve_model
    from backend.request import GenerateRequest

    pipe = load_pipeline(resolve_model("demo"), torch.device("cpu"), torch.float32)
    request = GenerateRequest(prompt="a red fox in the snow", model="demo", sampler="euler", scheduler="normal",
                              steps=args.steps, width=args.size, height=args.size, seed=1).resolved("demo")
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        generate_image(pipe, request)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _client_start(env: dict, repeats: int = 5) -> float:
    """Median seconds to start Python and import what ``dreamtty generate`` imports with the service."""
    code = "import tui.cli, backend.remote_client; tui.cli.parse_args(['generate', 'a fox'])"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _round_trips(args, repeats: int = 5) -> float:
    """Median seconds from submit to done for a client in this process (no start-up, no imports)."""
    from backend.client import connect
    from backend.request import GenerateRequest

    request = GenerateRequest(prompt="a red fox in the snow", model="demo", sampler="euler", scheduler="normal",
                              steps=args.steps, width=args.size, height=args.size, seed=1)

    async def once() -> float:
        start = time.perf_counter()
        client = connect("cpu")
        events = client.subscribe()
        job = await client.submit(request)
        async for _ in client.wait(job, events):
            pass
        await client.close()
        return time.perf_counter() - start

    return statistics.median([asyncio.run(once()) for _ in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="dreamtty-bench-"))
    run = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))
    env = _env(home, run)
    os.environ.update(DREAMTTY_HOME=str(home), XDG_RUNTIME_DIR=str(run), HF_HUB_OFFLINE="1")
    os.environ.pop("DREAMTTY_LOCAL", None)
    try:
        from backend.engine.demo_models import ensure_demo

        ensure_demo("demo")
        pure = _pure(args)
        local = _calls(env, args, ["--local"])
        subprocess.run([sys.executable, "-m", "tui.cli", "serve", "--detach", "--device", "cpu"], env=env, cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        first = _calls(env, argparse.Namespace(**{**vars(args), "calls": 1}), [])[0]  # loads the model
        served = _calls(env, args, [])
        trip = _round_trips(args)
        start = _client_start(env)
    finally:
        subprocess.run([sys.executable, "-m", "tui.cli", "serve", "--stop"], env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    print(f"demo model, {args.size}x{args.size}, {args.steps} steps, CPU; pure generation {pure:.3f} s "
          "(in-process, warm)")
    print(f"{'mode':<34}{'calls':>6}{'total s':>10}{'median s/call':>15}{'overhead s/call':>17}")
    for name, times in (("--local (workers + model per call)", local), ("service (warm)", served)):
        median = statistics.median(times)
        print(f"{name:<34}{len(times):>6}{sum(times):>10.2f}{median:>15.3f}{median - pure:>17.3f}")
    print(f"service, first call (model load): {first:.2f} s; target: service overhead < 0.3 s a call")
    print(f"of the service's overhead: client start (Python + imports) {start:.3f} s; round trip through the "
          f"service for a running client {trip - pure:.3f} s over the pure generation")


if __name__ == "__main__":
    main()
