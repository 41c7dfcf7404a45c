"""The commands that queue image jobs (``generate``, ``reproduce``) and how they follow them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import fields
from pathlib import Path

from backend.client import Client
from backend.errors import RequestError
from backend.events import Cancelled, Failed, ImageSaved, to_dict
from backend.guidance_settings import GuidanceSettings
from backend.request import GenerateRequest
from backend.safetext import visible
from backend.samplers import SAMPLERS, SCHEDULES
from tui.cli_output import Progress, print_warnings


def _floats(name: str, count: int | None = None):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a comma-separated list of numbers") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{name}: needs {count} comma-separated numbers, got {len(values)}")
        return values

    return parse


def _add_generate_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` (None = not given, so presets and defaults apply)."""
    p.add_argument("--negative", dest="negative_prompt", help="negative prompt")
    p.add_argument("--sampler", help=f"one of: {', '.join(SAMPLERS)}")
    p.add_argument("--scheduler", help=f"noise schedule: {', '.join(SCHEDULES)}")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--size", help="WxH, e.g. 1024x1024 (multiples of 8)")
    p.add_argument("--seed", type=int, help="-1 = random (the chosen seed is recorded)")
    p.add_argument("-n", "--count", type=int, help="number of images")
    p.add_argument("--style", dest="styles", action="append", help="style name (repeatable)")
    p.add_argument("--preset", help="preset name")
    p.add_argument("--expand", action=argparse.BooleanOptionalAction, default=None, help="prompt expansion")
    p.add_argument("--lora", dest="loras", action="append", help="NAME[:WEIGHT] (repeatable, up to 5)")
    p.add_argument("--vae", help="VAE override")
    p.add_argument("--refiner", help="SDXL refiner model")
    p.add_argument("--refiner-switch", type=float, help="fraction of steps before the refiner takes over")
    p.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"])
    g = p.add_argument_group("guidance")
    g.add_argument("--perp-neg", type=float, help="PerpNeg scale")
    g.add_argument("--sag", type=float, help="Self-Attention Guidance scale")
    g.add_argument("--sharpness", type=float, help="0..30")
    g.add_argument("--cfg-rescale", type=float, help="0..1")
    g.add_argument("--adaptive-cfg", type=float, help="mimic CFG at high CFG")
    g.add_argument("--adm-scale", type=_floats("adm-scale", 3), help="SDXL: POS,NEG,END")
    g.add_argument("--freeu", nargs="?", const=(), type=_floats("freeu", 4),
                   help="FreeU [s1,s2,b1,b2] (family defaults if empty)")
    g.add_argument("--clip-skip", type=int, help="use the N-th from last text-encoder layer")
    g.add_argument("--pag", type=float, help="Perturbed-Attention Guidance scale")
    g.add_argument("--apg", type=float, help="Adaptive Projected Guidance scale")
    p.add_argument("--json", action="store_true", help="one JSON object per event on stdout")


_REQUEST_FLAGS = ("model", "negative_prompt", "sampler", "scheduler", "steps", "cfg", "seed", "count", "styles",
                  "expand", "loras", "size", "vae", "refiner", "refiner_switch", "dtype")


def request_from_args(args: argparse.Namespace) -> GenerateRequest:
    """The request the flags describe: defaults < config defaults < ``--preset`` < explicit flags."""
    from backend import request_builder

    values = {"prompt": args.prompt, **{name: getattr(args, name) for name in _REQUEST_FLAGS}}
    guidance = {f.name: getattr(args, f.name) for f in fields(GuidanceSettings) if getattr(args, f.name) is not None}
    if guidance:
        values["guidance"] = guidance
    return request_builder.build(request_builder.from_text(values), args.preset)


# -- commands ------------------------------------------------------------------
async def _run_jobs(args, requests: list[GenerateRequest], out: Path | None) -> tuple[int, list[str]]:
    """Queue ``requests``, follow them to the end; an interrupt (Ctrl-C) cancels them in the queue."""
    client = _client(args)
    print_warnings(client.warnings)
    events = client.subscribe()
    finished = False  # until every job has ended: else (Ctrl-C, an error) they are cancelled
    try:
        job_ids = [await client.submit(r, out) for r in requests]  # validates before any worker starts
        await client.start()
        result = await follow(client, job_ids, events, args.json)
        finished = True
    finally:
        await client.close(cancel_jobs=not finished)
    return result


async def follow(client: Client, job_ids: list[int], events, as_json: bool) -> tuple[int, list[str]]:
    """Print the jobs' saved images (or, ``as_json``, their events) until they end; returns the exit
    code (1 when one failed or was cancelled) and the paths."""
    paths: list[str] = []
    failed = 0
    progress = Progress(enabled=sys.stderr.isatty() and not as_json)
    try:
        for job_id in job_ids:
            async for event in client.wait(job_id, events):
                if as_json:
                    print(json.dumps({k: v for k, v in to_dict(event).items() if k != "rgb"}), flush=True)
                progress.update(event)
                if isinstance(event, ImageSaved):
                    paths.append(event.path)
                    if not as_json:
                        progress.clear()
                        print(visible(event.path), flush=True)
                elif isinstance(event, (Failed, Cancelled)):
                    failed += 1
                    progress.clear()
                    line = f"dreamtty: job {job_id} {event.type}: {getattr(event, 'error', '')}".rstrip(": ")
                    print(visible(line), file=sys.stderr)
    finally:
        progress.clear()
    return (1 if failed else 0), paths


def _client(args) -> Client:
    """The service the commands talk to: the running ``dreamtty serve`` (started when none runs), or
    one in this process with ``--local``."""
    from backend.client import connect

    return connect(args.device, local=args.local)


def _fetch_if_missing(model: str) -> None:
    """A Hugging Face id that is not cached yet is downloaded here, with a progress bar on stderr."""
    from backend.models import resolve_model

    ref = resolve_model(model)
    if ref.kind == "hub" and ref.family == "unknown":
        from backend.downloads import pull

        print(f"dreamtty: downloading {visible(model)} into the Hugging Face cache", file=sys.stderr)
        pull(model)


def cmd_generate(args) -> int:
    request = request_from_args(args)
    _fetch_if_missing(request.model)
    code, _ = asyncio.run(_run_jobs(args, [request], args.out))
    return code


def cmd_reproduce(args) -> int:
    import numpy as np
    from PIL import Image

    from backend import foreign_metadata, metadata

    if (args.image is None) == (args.from_text is None):
        raise RequestError("reproduce", "give an IMAGE or --from-text FILE (one of them)")
    if args.from_text is not None:
        text = foreign_metadata.read_text_file(args.from_text)
        request, warnings = foreign_metadata.from_text(text, f"from-text: {args.from_text}")
    else:
        request, warnings = metadata.image_request(args.image)
    print_warnings(warnings)
    if args.model:
        request.model = args.model
    code, paths = asyncio.run(_run_jobs(args, [request], args.out))
    if code == 0 and paths and args.image is not None:
        with Image.open(args.image) as a, Image.open(paths[0]) as b:
            diff = np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int)).max()
        print("pixels: identical" if diff == 0 else f"pixels: differ (max difference {diff}/255)", file=sys.stderr)
    return code


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate images headlessly")
    gen.add_argument("prompt", nargs="?", default="", help="prompt (empty = unconditional)")
    _add_generate_options(gen)
    gen.set_defaults(func=cmd_generate)

    rep = sub.add_parser("reproduce", help="regenerate an image from its metadata (dreamtty, A1111 or Fooocus)")
    rep.add_argument("image", type=Path, nargs="?")
    rep.add_argument("--from-text", metavar="FILE", help="a pasted A1111 or Fooocus parameters text (- = stdin)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_reproduce)
