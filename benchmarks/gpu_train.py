"""DreamBooth training step on a real-size SD1.5 UNet (random weights, no downloads), 512², batch 2
(one instance + one class image), against a plain diffusers-style training step, in one run.

    PYTHONPATH=. python benchmarks/gpu_train.py [--steps 10] [--warmup 3] [--variants full+8bit,...]
    PYTHONPATH=. python benchmarks/gpu_train.py --tiny        # CPU dry run on the demo model

Plain step: fp32 UNet, fp16 autocast, GradScaler, torch AdamW, grad clipping, precomputed latents
and text embeddings (what diffusers' train_dreambooth.py does per step with --mixed_precision fp16,
less the VAE encode). dreamtty's steps run the real trainer (``DreamBoothTrainer.train_step``) with
cached latents and frozen text encoder, mixed precision fp16, in variants: full fine-tune (fp32
master weights + AdamW), + gradient checkpointing, + 8-bit Adam (when bitsandbytes imports), LoRA;
the trainer steps its parameters as a few flat buckets (backend/training/flat.py);
the "/one-flat" and "/separate" variants step them as one flat tensor or as ~700 tensors instead.
Each variant runs in its own process, so peak memory and accelerate's state start clean.

Without a GPU, peak memory is estimated on the CPU (fp32, no autocast): the bytes of what would
live on the GPU when the timed steps start (trained weights, buffers, optimizer state) plus the
growth of the process's resident memory over those steps (large allocations are mmapped, so
freeing returns them).
Targets: full <= 12 GiB at <= 1.3x the plain step time; LoRA <= 8 GiB. Results: docs/training.md
("Memory and speed").
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "plain": None,
    "full": {"method": "full"},
    "full+ckpt": {"method": "full", "gradient_checkpointing": True},
    "full+8bit": {"method": "full", "use_8bit_adam": True},
    "full+8bit/one-flat": {"method": "full", "use_8bit_adam": True, "layout": "one-flat"},
    "full+8bit/separate": {"method": "full", "use_8bit_adam": True, "layout": "separate"},
    "full+8bit+ckpt": {"method": "full", "use_8bit_adam": True, "gradient_checkpointing": True},
    "lora": {"method": "lora", "rank": 4},
    "lora+ckpt": {"method": "lora", "rank": 4, "gradient_checkpointing": True},
}
CLASS_PROMPT = "a photo of dog"
FULL_TARGET_GIB, LORA_TARGET_GIB, TIME_TARGET = 12.0, 8.0, 1.3


def _parts(tiny: bool, device):
    import torch

    from backend.training.modelparts import load_parts, parts_from_pipeline

    if tiny:
        return load_parts("demo")
    from benchmarks.realsize import build_pipeline

    return parts_from_pipeline(build_pipeline(False, device=str(device), dtype=torch.float32))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _proc_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def _resident_bytes(modules, optimizer) -> int:
    """Bytes of the distinct storages behind ``modules``' weights and buffers and ``optimizer``'s state."""
    import torch

    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())] + state
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _timed(step, device, warmup: int, steps: int, resident) -> tuple[float, float]:
    """Seconds per step after ``warmup`` steps, and peak memory (GiB) over them: GPU memory, or on
    the CPU ``resident()`` bytes (what would be on the GPU) plus the growth of resident memory."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        step(i)
    _sync(device)
    gc.collect()
    if device.type != "cuda":
        Path("/proc/self/clear_refs").write_text("5")  # resets the resident high-water mark
        start_kib = _proc_kib("VmRSS")
    began = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync(device)
    seconds = (time.perf_counter() - began) / steps
    if device.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated() / 2**30
    return seconds, (resident() + (_proc_kib("VmHWM") - start_kib) * 1024) / 2**30


def plain(args) -> tuple[float, float]:
    """A plain diffusers-style step: fp32 weights, fp16 autocast, GradScaler, AdamW."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = _parts(args.tiny, device)
    unet, sched = parts.unet.to(device).train().requires_grad_(True), parts.noise_scheduler
    for module in parts.text_encoders + [parts.vae]:
        module.to("cpu")
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    side = args.resolution // 8
    latents = torch.randn(2, 4, side, side, device=device)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, device=device)

    def step(_: int) -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            pred = unet(sched.add_noise(latents, noise, t), t, embeds).sample
        loss = F.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return _timed(step, device, args.warmup, args.steps, lambda: _resident_bytes([unet], optimizer))


def ours(args, settings: dict) -> tuple[float, float]:
    """dreamtty's trainer step, set up as a real run (instance + class image, cached latents)."""
    import numpy as np
    import torch
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="dreamtty-train-bench-"))
    os.environ["DREAMTTY_HOME"] = str(work / "home")
    from backend.models import resolve_model
    from backend.training.class_images import class_dir
    from backend.training.config import TrainRequest
    from backend.training.runs import EventWriter
    from backend.training.trainer import DreamBoothTrainer

    rng = np.random.default_rng(0)

    def noise_image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (args.resolution, args.resolution, 3), dtype=np.uint8)).save(path)

    noise_image(work / "inst" / "img-0.png")
    # The injected real-size parts stand in for "demo"; its name only keys the class-image cache.
    noise_image(class_dir(resolve_model("demo"), CLASS_PROMPT) / "class-00000.png")
    from backend.training import trainer as trainer_module
    from backend.training.flat import FlatParameters

    settings = dict(settings)  # VARIANTS stays as it is
    layout = settings.pop("layout", None)
    if layout:
        trainer_module.FlatParameters = {"one-flat": functools.partial(FlatParameters, bucket_numel=2**62),
                                         "separate": functools.partial(FlatParameters, bucket_numel=1)}[layout]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    request = TrainRequest(
        model="demo", instance_dir=str(work / "inst"), instance_prompt="a photo of sks dog",
        class_prompt=CLASS_PROMPT, num_class_images=1, resolution=args.resolution, batch_size=1, seed=0,
        mixed_precision="fp16" if device.type == "cuda" else "no", cache_latents=True,
        max_steps=args.warmup + args.steps, **settings,
    ).resolved("sd1")
    (work / "run").mkdir()
    trainer = DreamBoothTrainer(request, work / "run", EventWriter(work / "run", enabled=False),
                                parts=_parts(args.tiny, device))
    trainer.setup()
    resident = lambda: _resident_bytes(trainer.trainables.values(), trainer.optimizer)  # noqa: E731
    return _timed(trainer.train_step, device, args.warmup, args.steps, resident)


def run_variant(args) -> None:
    import torch

    settings = VARIANTS[args.variant]
    seconds, peak = plain(args) if settings is None else ours(args, settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("RESULT " + json.dumps({"variant": args.variant, "step_s": seconds, "peak_gib": peak, "device": device}),
          flush=True)


def _available(name: str) -> str | None:
    """Why a variant cannot run here, or None."""
    if "8bit" in name and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not installed"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="the demo model at 64 px on the CPU (a dry run)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny and args.resolution == 512:
        args.resolution, args.steps, args.warmup = 64, 2, 1
    if args.variant:
        run_variant(args)
        return
    from benchmarks.options import child_env

    root = str(Path(__file__).resolve().parents[1])
    env = child_env(root, MALLOC_MMAP_THRESHOLD_="65536")  # CPU estimate: freed tensors leave the resident set
    results = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        if _available(name):
            results[name] = {"skipped": _available(name)}
            continue
        command = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--resolution", str(args.resolution), *(["--tiny"] if args.tiny else [])]
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            error = (out.stderr.strip().splitlines() or ["no output"])[-1]
            results[name] = {"skipped": f"failed: {error[:150]}"}
            continue
        results[name] = json.loads(lines[-1][len("RESULT "):])
        print(f"{name}: done", file=sys.stderr, flush=True)
    _table(results, args)


def _table(results: dict, args) -> None:
    base = results.get("plain", {}).get("step_s")
    cpu = any(r.get("device") == "cpu" for r in results.values())
    model = "demo model" if args.tiny else "SD1.5 UNet (random weights)"
    print(f"\n{model}, {args.resolution}², batch 2 (instance + class), {args.steps} timed steps"
          + (" — on the CPU: fp32, peak memory estimated (see the docstring), no time target" if cpu else ""))
    print(f"{'variant':<20}{'step s':>9}{'x plain':>9}{'peak GiB':>10}  target")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<20}{'-':>9}{'-':>9}{'-':>10}  skipped: {r['skipped']}")
            continue
        ratio = r["step_s"] / base if base else None
        peak, full = r["peak_gib"], name.startswith("full")
        target = ""
        if name.startswith(("full", "lora")):
            limit = FULL_TARGET_GIB if full else LORA_TARGET_GIB
            timed = full and not cpu
            ok = peak <= limit and (not timed or (ratio or 0) <= TIME_TARGET)
            target = f"{'met' if ok else 'missed'} (<= {limit:g} GiB" + (f", <= {TIME_TARGET}x)" if timed else ")")
        print(f"{name:<20}{r['step_s']:>9.3f}{(f'{ratio:.2f}' if ratio else '-'):>9}{peak:>10.2f}  {target}")


if __name__ == "__main__":
    main()
