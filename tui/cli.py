"""The ``dreamtty`` command: the TUI when run without a subcommand, else a headless CLI.

Exit codes: 0 success, 1 a job failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from backend.errors import DreamttyError, RequestError
from backend.guidance_settings import GuidanceSettings
from backend.request import GenerateRequest, parse_size
from backend.samplers import SAMPLERS, SCHEDULES


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (exit 2), never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# Options taken before the subcommand or after it: (flags, add_argument keywords).
_GLOBAL_OPTIONS = (
    (("--demo",), {"action": "store_true", "default": False, "help": "use the built-in demo model (offline, tiny)"}),
    (("--model",), {"help": "demo, demo-xl, a diffusers folder or a Hugging Face id"}),
    (("--out",), {"help": "outputs directory"}),
    (("--device",), {"default": "auto", "help": "auto, cpu, cuda or cuda:N[,cuda:M...]"}),
    (("--color",), {"choices": ["auto", "truecolor", "256"], "default": "auto", "help": "TUI colour depth"}),
    (("--config",), {"type": Path, "help": "config file (default: see `dreamtty config path`)"}),
    (("--allow-pickle",), {"action": "store_true", "default": False,
                           "help": "allow pickled .ckpt/.pt/.bin weights (weights only)"}),
)


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Add the global options; with ``suppress`` an option left out sets nothing (no default)."""
    group = parser.add_argument_group("global options")
    for flags, spec in _GLOBAL_OPTIONS:
        group.add_argument(*flags, **({**spec, "default": argparse.SUPPRESS} if suppress else spec))


class _SubcommandParser(_Parser):
    """A subcommand's parser, which takes the global options too.

    Left out, they set nothing, so a value given before the subcommand stays. A subcommand's
    own option of the same name (``train --model``) replaces the global one ("resolve").
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(*args, **kwargs)
        _add_global_options(self, suppress=True)


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


_GUIDANCE_FLAGS = ("perp_neg", "sag", "sharpness", "cfg_rescale", "adaptive_cfg", "adm_scale", "clip_skip", "pag", "apg")


def _parse_lora(text: str) -> tuple[str, float]:
    name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return name, float(weight)
    except ValueError:
        raise RequestError("lora", f"{text!r}: weight must be a number (NAME[:WEIGHT])") from None


def request_from_args(args: argparse.Namespace, model: str | None) -> GenerateRequest:
    """Build the request: dataclass defaults < preset < explicit flags."""
    given: dict = {"prompt": args.prompt}
    if model:
        given["model"] = model
    for name in ("negative_prompt", "sampler", "scheduler", "steps", "cfg", "seed", "count", "styles",
                 "expand", "vae", "refiner", "refiner_switch", "dtype"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    if args.size is not None:
        given["width"], given["height"] = parse_size(args.size)
    if args.loras:
        given["loras"] = [_parse_lora(x) for x in args.loras]
        if len(given["loras"]) > 5:
            raise RequestError("lora", f"{len(given['loras'])} given; at most 5 LoRA slots")
    guidance = {n: getattr(args, n) for n in _GUIDANCE_FLAGS if getattr(args, n) is not None}
    if args.freeu is not None:
        guidance["freeu"] = args.freeu
    if guidance:
        given["guidance"] = guidance
    data = _apply_preset(args.preset, given)
    return GenerateRequest.from_dict(data)


def _apply_preset(preset: str | None, given: dict) -> dict:
    """Merge explicit values over the preset's (explicit wins)."""
    if not preset:
        return given
    from backend.prompting.presets import apply_preset

    return apply_preset(preset, given)


# -- commands ------------------------------------------------------------------
async def _run_jobs(args, requests: list[GenerateRequest], out: Path | None) -> tuple[int, list[str]]:
    """Queue ``requests``, follow them to the end; an interrupt (Ctrl-C) cancels them in the queue."""
    from backend.service import Service

    service = Service(devices=args.device)
    print_warnings(service.store.warnings)
    events = service.subscribe()
    paths: list[str] = []
    failed = 0
    progress = _Progress(enabled=sys.stderr.isatty() and not args.json)
    finished = False  # until every job has ended: else (Ctrl-C, an error) they are cancelled
    try:
        job_ids = [service.submit(r, out) for r in requests]  # validates before any worker starts
        await service.start()
        for job_id in job_ids:
            async for event in service.wait(job_id, events):
                if args.json:
                    print(json.dumps({k: v for k, v in event.items() if k != "rgb"}), flush=True)
                progress.update(event)
                if event["type"] == "image":
                    paths.append(event["path"])
                    if not args.json:
                        progress.clear()
                        print(event["path"], flush=True)
                elif event["type"] in ("failed", "cancelled"):
                    failed += 1
                    progress.clear()
                    print(f"dreamtty: job {job_id} {event['type']}: {event.get('error', '')}".rstrip(": "),
                          file=sys.stderr)
        finished = True
    finally:
        progress.clear()
        await service.close(cancel_jobs=not finished)
    return (1 if failed else 0), paths


def print_warnings(warnings: list[str]) -> None:
    """Each warning as a ``dreamtty: warning:`` line on stderr."""
    for warning in warnings:
        print(f"dreamtty: warning: {warning}", file=sys.stderr)


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def update(self, event: dict) -> None:
        if not self.enabled or event["type"] != "step":
            return
        width = 24
        filled = int(width * event["step"] / event["total"])
        sys.stderr.write(
            f"\r[{'#' * filled}{'-' * (width - filled)}] image {event['image'] + 1}/{event['count']} "
            f"step {event['step']}/{event['total']} {event['its']:.1f} it/s ETA {event['eta']:.0f}s  "
        )
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _fetch_if_missing(model: str) -> None:
    """A Hugging Face id that is not cached yet is downloaded here, with a progress bar on stderr."""
    from backend.models import resolve_model

    ref = resolve_model(model)
    if ref.kind == "hub" and ref.family == "unknown":
        from backend.downloads import pull

        print(f"dreamtty: downloading {model} into the Hugging Face cache", file=sys.stderr)
        pull(model)


def cmd_generate(args) -> int:
    request = request_from_args(args, args.model)
    _fetch_if_missing(request.model)
    code, _ = asyncio.run(_run_jobs(args, [request], args.out))
    return code


def cmd_reproduce(args) -> int:
    import numpy as np
    from PIL import Image

    from backend.metadata import request_from_image

    request = request_from_image(args.image)
    if args.model:
        request.model = args.model
    code, paths = asyncio.run(_run_jobs(args, [request], args.out))
    if code == 0 and paths:
        with Image.open(args.image) as a, Image.open(paths[0]) as b:
            diff = np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int)).max()
        print("pixels: identical" if diff == 0 else f"pixels: differ (max difference {diff}/255)", file=sys.stderr)
    return code


def cmd_samplers(args) -> int:
    if args.json:
        print(json.dumps({"samplers": {n: {"label": s.label, "class": s.cls, "schedules": list(s.schedules)}
                                       for n, s in SAMPLERS.items()}, "schedules": list(SCHEDULES)}))
        return 0
    print(f"{'sampler':<14}{'label':<14}{'diffusers class':<34}schedules")
    for name, s in SAMPLERS.items():
        print(f"{name:<14}{s.label:<14}{s.cls:<34}{', '.join(s.schedules)}")
    print(f"\nschedules: {', '.join(SCHEDULES)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreamtty", description="Stable Diffusion generation and DreamBooth training in the terminal")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", parser_class=_SubcommandParser)

    gen = sub.add_parser("generate", help="generate images headlessly")
    gen.add_argument("prompt", nargs="?", default="", help="prompt (empty = unconditional)")
    _add_generate_options(gen)
    gen.set_defaults(func=cmd_generate)

    rep = sub.add_parser("reproduce", help="regenerate an image from its metadata")
    rep.add_argument("image", type=Path)
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_reproduce)

    sam = sub.add_parser("samplers", help="list samplers and schedules")
    sam.add_argument("--json", action="store_true")
    sam.set_defaults(func=cmd_samplers)

    # Subcommand groups that live in their own modules.
    from tui import cli_models, cli_styles, cli_train

    for module in (cli_styles, cli_train, cli_models):
        module.register(sub)
    return parser


def _check_global_options(args: argparse.Namespace) -> None:
    """Validate the global options in place: ``--out`` becomes a Path, ``--demo`` sets the model."""
    from backend.service import check_devices

    _check_home()
    if args.model is not None and not args.model.strip():
        raise RequestError("model", "is empty; use demo, demo-xl, a diffusers folder or a Hugging Face id")
    if args.demo and args.model is not None:
        raise RequestError("model", f"--demo and --model {args.model} conflict; give one of them")
    if args.demo:
        args.model = "demo"
    if args.out is not None:
        if not args.out.strip():
            raise RequestError("out", "is empty; give a folder")
        args.out = Path(args.out)
    check_devices(args.device)


def _check_home() -> None:
    """``DREAMTTY_HOME``, when set, must be a folder (created when missing)."""
    from backend.locations import make_folder

    home = os.environ.get("DREAMTTY_HOME")
    if home:
        make_folder(Path(home), "DREAMTTY_HOME")


def main(argv: list[str] | None = None) -> int:
    from tui.cli_models import apply_global_options

    args = build_parser().parse_args(argv)
    try:
        _check_global_options(args)
        apply_global_options(args)
        if args.command is None:
            from tui.app import run_app

            return run_app(args, print_warnings)
        return int(args.func(args) or 0)
    except DreamttyError as exc:
        print(f"dreamtty: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreamtty: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dreamtty samplers | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
