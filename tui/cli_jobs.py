"""The commands that queue jobs (``generate``, ``vary``, ``upscale``, ``inpaint``, ``outpaint``, ``describe``,
``reproduce``) and how they follow them."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import fields
from pathlib import Path

from backend.client import SERVICE_ENV, Client
from backend.errors import DreamttyError, ModelError, RequestError, noted
from backend.events import Cancelled, Failed, ImageSaved, Log, Moved, Note, Preview, Retrying, TextOutput, to_dict
from backend.guidance_settings import CLIP_SKIP_MAX, RANGES, GuidanceSettings
from backend.image_prompts import MAX_IMAGE_PROMPTS, TYPES
from backend.jobkinds.describe import MODES as DESCRIBE_MODES
from backend.jobkinds.describe import DescribeRequest
from backend.jobkinds.img2img import Img2ImgRequest
from backend.jobkinds.inpaint import MAX_FEATHER, MODES, InpaintRequest
from backend.jobkinds.outpaint import SIDES, OutpaintRequest
from backend.jobkinds.upscale import SCALES, UpscaleRequest
from backend.queue_store import FINAL
from backend.request import DTYPES, MAX_CFG, MAX_COUNT, MAX_SEED, MAX_STEPS, SPEEDS, GenerateRequest
from backend.safetext import one_line, visible
from backend.samplers import SAMPLERS, SCHEDULES
from tui.cli_output import Progress, given, integer, number, print_warnings, say_started


def _ranged(name: str, low: float, high: float, whole: bool = False):
    """argparse's ``type`` for request field ``name``: a number (a whole one); text that is none is refused naming
    the field's range (a number out of it is the service's to refuse)."""

    def parse(text: str) -> int | float:
        try:
            value = integer(text) if whole else number(text)
            if math.isfinite(value):
                return value
            why = f"{value} is not a finite number"  # as the request says it
        except RequestError as exc:  # to_int's own reason: "'1e200' is out of range"
            why = exc.message
        except ValueError:
            why = f"{text!r} is not {'a whole number' if whole else 'a number'}"
        raise argparse.ArgumentTypeError(f"{name}: {why}; allowed {low:.12g}..{high:.12g}")

    return parse


def _control(name: str, whole: bool = False):
    """:func:`_ranged` for guidance control ``name``."""
    return _ranged(name, *RANGES.get(name, (1, CLIP_SKIP_MAX)), whole)


def _floats(name: str, count: int | None = None):
    """argparse's ``type`` for a list of ``count`` numbers, or ``off`` (none: not even a preset's or an image's)."""
    def parse(text: str) -> tuple[float, ...] | str:
        from backend.request_builder import OFF, parse_floats

        if text.strip().lower() == OFF:
            return OFF  # the request builder reads it as the control off
        try:
            values = parse_floats(name, text)
        except RequestError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{name}: needs {count} comma-separated numbers, got {len(values)}")
        return values

    return parse


def _add_generate_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` (None = not given, so presets and defaults apply)."""
    p.add_argument("--negative", dest="negative_prompt", help="negative prompt")
    p.add_argument("--sampler", type=given, help=f"one of: {', '.join(SAMPLERS)}")
    p.add_argument("--scheduler", type=given, help=f"noise schedule: {', '.join(SCHEDULES)}")
    p.add_argument("--steps", type=_ranged("steps", 1, MAX_STEPS, whole=True))
    p.add_argument("--cfg", type=_ranged("cfg", 0, MAX_CFG), help="classifier-free guidance scale (1 = off)")
    p.add_argument("--size", type=given, help="WxH, e.g. 1024x1024 (multiples of 8)")
    p.add_argument("--seed", type=_ranged("seed", -1, MAX_SEED, whole=True),
                   help="-1 = random (the chosen seed is recorded)")
    p.add_argument("-n", "--count", type=_ranged("count", 1, MAX_COUNT, whole=True), help="number of images")
    p.add_argument("--style", dest="styles", action="append", type=given, help="style name (repeatable)")
    p.add_argument("--preset", type=given, help="preset name")
    p.add_argument("--expand", action=argparse.BooleanOptionalAction, default=None, help="prompt expansion")
    p.add_argument("--lora", dest="loras", action="append", type=given,
                   help="NAME[:WEIGHT] (repeatable, up to 5; none: no LoRAs, not even the preset's)")
    p.add_argument("--vae", type=given, help="VAE override")
    p.add_argument("--refiner", type=given, help="SDXL refiner model")
    p.add_argument("--refiner-switch", type=number,
                   help="fraction of the noise schedule before the refiner takes over (diffusers' denoising_end)")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--speed", choices=SPEEDS, help="fast: a compiled UNet on CUDA (first time per model and size: "
                                                   "about a minute; then cached); fastest: also float8 linear layers "
                                                   "(compute capability 8.9+, torchao)")
    p.add_argument("--max-batch", type=integer, metavar="N",
                   help=f"denoise up to N of the images at once (1..{MAX_COUNT}; default: what half the free memory "
                        "holds, at most 4 on the CPU and 8 on CUDA)")
    g = p.add_argument_group("guidance")
    g.add_argument("--perp-neg", type=_control("perp_neg"), help="PerpNeg scale")
    g.add_argument("--sag", type=_control("sag"), help="Self-Attention Guidance scale")
    g.add_argument("--sharpness", type=_control("sharpness"), help="0..30")
    g.add_argument("--cfg-rescale", type=_control("cfg_rescale"), help="0..1")
    g.add_argument("--adaptive-cfg", type=_control("adaptive_cfg"), help="mimic CFG at high CFG")
    g.add_argument("--adm-scale", type=_floats("adm_scale", 3), help="SDXL: POS,NEG,END (off: none)")
    g.add_argument("--freeu", nargs="?", const=(), type=_floats("freeu", 4),
                   help="FreeU s1,s2,b1,b2 (alone: the family's defaults; off: none)")
    g.add_argument("--clip-skip", type=_control("clip_skip", whole=True),
                   help="use the N-th from last text-encoder layer")
    g.add_argument("--pag", type=_control("pag"), help="Perturbed-Attention Guidance scale")
    g.add_argument("--apg", type=_control("apg"), help="Adaptive Projected Guidance norm threshold (smaller: stronger)")
    i = p.add_argument_group("image prompts")
    i.add_argument("--image-prompt", dest="image_prompts", action="append", metavar="IMAGE[:TYPE[:WEIGHT[:STOP]]]",
                   help=f"a reference image (repeatable, up to {MAX_IMAGE_PROMPTS}); types: "
                        + ", ".join(f"{t.name} ({t.weight:g}, stop {t.stop:g})" for t in TYPES.values()))
    i.add_argument("--show-preprocessed", action="store_true",
                   help="save each reference's preprocessed map (canny edges, depth, structure) beside the output")
    p.add_argument("--json", action="store_true", help="one JSON object per event on stdout")


_REQUEST_FLAGS = ("model", "negative_prompt", "sampler", "scheduler", "steps", "cfg", "seed", "count", "styles",
                  "expand", "loras", "size", "vae", "refiner", "refiner_switch", "dtype", "speed", "max_batch",
                  "image_prompts")
# Flags of the image-input verbs, each the request field of the same name (absent on other verbs).
_IMAGE_FLAGS = ("image", "strength", "keep_inputs", "scale", "fast", "upscaler", "mask", "box", "mode", "context",
                "feather", *SIDES)


def request_from_args(args: argparse.Namespace, kind: type[GenerateRequest] = GenerateRequest,
                      source: dict | None = None) -> GenerateRequest:
    """The request the flags describe: defaults < config defaults < ``source`` (an input image's own
    settings) < ``--preset`` < explicit flags."""
    from backend import request_builder

    request = request_builder.build(_flag_values(args), args.preset, kind, source=source)
    print_warnings(_unused(args, request))
    return request


def _flag_values(args: argparse.Namespace) -> dict:
    """The request fields the flags hold, as text (None where a flag is not given)."""
    values = {"prompt": args.prompt, **{name: getattr(args, name) for name in _REQUEST_FLAGS},
              **{name: getattr(args, name) for name in _IMAGE_FLAGS if getattr(args, name, None) is not None}}
    guidance = {f.name: getattr(args, f.name) for f in fields(GuidanceSettings) if getattr(args, f.name) is not None}
    if guidance:
        values["guidance"] = guidance
    return values


def _unused(args: argparse.Namespace, request: GenerateRequest) -> list[str]:
    """A warning for each flag given that ``request`` has no use for."""
    unused = []
    if args.refiner_switch is not None and not request.refiner:
        unused.append("refiner_switch: unused without a refiner (--refiner); ignored")
    if getattr(args, "show_preprocessed", False) and not request.image_prompts:
        unused.append("show_preprocessed: there is no image prompt (--image-prompt) to show; ignored")
    return unused


# -- commands ------------------------------------------------------------------
async def _run_jobs(args, requests: list[GenerateRequest], out: Path | None,
                    adjust: Callable[[Client, GenerateRequest], Awaitable[GenerateRequest]] | None = None
                    ) -> tuple[int, list[str]]:
    """Queue ``requests`` (each as ``adjust`` makes it for the service, first), follow them to the end; an
    interrupt (Ctrl-C) cancels them in the queue."""
    client = _client(args)
    print_warnings(client.warnings)  # the queue read here
    said = len(client.warnings)
    events = client.subscribe()
    finished = False  # until every job has ended: else (Ctrl-C, an error) they are cancelled
    try:
        if adjust is not None:
            requests = [await adjust(client, r) for r in requests]
        job_ids = [await client.submit(r, out) for r in requests]  # validates before any worker starts
        await client.start()
        print_warnings(client.warnings[said:])  # those of a service started for these jobs
        say_started(client)
        result = await follow(client, job_ids, events, args.json, getattr(args, "show_preprocessed", False))
        finished = True
    finally:
        await client.close(cancel_jobs=not finished)
        if client.kept:
            ids = " ".join(map(str, client.kept))
            jobs = f"jobs {ids} stay" if len(client.kept) > 1 else f"job {ids} stays"
            print(f"dreamtty: no service answers: {jobs} queued for the next one (dreamtty cancel {ids} cancels "
                  "them)", file=sys.stderr)
    return result


async def follow(client: Client, job_ids: list[int], events, as_json: bool,
                 show_maps: bool = False) -> tuple[int, list[str]]:
    """Print the jobs' saved images (or, ``as_json``, their events) until they end; returns the exit
    code (1 when one failed or was cancelled, else 3 when one moved to another service: ``dreamtty wait``
    follows it there) and the paths. ``show_maps``: save image prompts' preprocessed maps beside each
    job's first image."""
    paths: list[str] = []
    maps: dict[int, list[Preview]] = {}  # each job's maps, until its first image is saved
    failed = moved = 0
    progress = Progress(enabled=sys.stderr.isatty() and not as_json)
    try:
        for job_id in await _ended_first(client, job_ids):
            async for event in client.wait(job_id, events):
                if as_json:
                    print(json.dumps({k: v for k, v in to_dict(event).items() if k != "rgb"}), flush=True)
                progress.update(event)
                if isinstance(event, Preview) and event.label and show_maps:
                    maps.setdefault(job_id, []).append(event)
                elif isinstance(event, ImageSaved):
                    paths.append(event.path)
                    if not as_json:
                        progress.clear()
                        print(one_line(event.path), flush=True)  # a path a line, whatever it holds
                    for line in _save_maps(event.path, maps.pop(job_id, [])):
                        print(f"dreamtty: job {job_id}: {one_line(line)}", file=sys.stderr)
                elif isinstance(event, TextOutput) and not as_json:
                    progress.clear()
                    print(visible(event.text), flush=True)
                elif isinstance(event, Note):
                    progress.clear()
                    print(f"dreamtty: job {job_id}: {one_line(event.message)}", file=sys.stderr)
                elif isinstance(event, Retrying) and not as_json:
                    progress.clear()
                    print(f"dreamtty: job {job_id}: {one_line(event.error)}; it runs again from image "
                          f"{event.first_image + 1}", file=sys.stderr)
                elif isinstance(event, Log) and not as_json:
                    progress.clear()
                    print(f"dreamtty: service: {one_line(event.message)}", file=sys.stderr)
                elif isinstance(event, (Failed, Cancelled, Moved)):
                    failed += not isinstance(event, Moved)
                    moved += isinstance(event, Moved)
                    progress.clear()
                    why = getattr(event, "error", None) or getattr(event, "message", "")
                    print(one_line(f"dreamtty: job {job_id} {event.type}: {why}".rstrip(": ")), file=sys.stderr)
    finally:
        progress.clear()
    return (1 if failed else 3 if moved else 0), paths


async def _ended_first(client: Client, job_ids: list[int]) -> list[int]:
    """``job_ids``, those that had ended first: their images are printed at once, before another client may
    forget them while this follows the others."""
    if len(job_ids) < 2:
        return job_ids
    ended = {job_id for job_id in job_ids if (job := await client.job(job_id)) is not None and job.state in FINAL}
    return [*(j for j in job_ids if j in ended), *(j for j in job_ids if j not in ended)]


def _save_maps(image_path: str, previews: list[Preview]) -> list[str]:
    """Image prompts' preprocessed maps saved beside ``image_path`` as ``<its name>.<label>.png``; a line
    for each (the file, or why it could not be written: a service on another machine saved the image)."""
    from PIL import Image

    lines = []
    for preview in previews:
        target = Path(image_path).with_suffix(f".{preview.label}.png")
        try:
            Image.frombytes("RGB", (preview.width, preview.height), preview.rgb).save(target)
        except OSError as exc:
            lines.append(f"could not save the preprocessed {preview.label} map as {target}: "
                         f"{exc.strerror or exc}")
        else:
            lines.append(f"preprocessed {target}")
    return lines


def _client(args) -> Client:
    """The service the commands talk to: the running ``dreamtty serve`` (started when none runs), or
    one in this process with ``--local``."""
    from backend.client import connect

    return connect(args.device, local=args.local, cluster=args.cluster)


def _fetch_if_missing(request: GenerateRequest) -> None:
    """The request's model, a Hugging Face id not cached yet, is downloaded here (progress bar on stderr). A
    name this process cannot resolve is left to the service: one started with another config may know it."""
    from backend.models import resolve_model

    try:
        ref = resolve_model(request.model, variants=request.model_variants)
    except ModelError:
        return
    if ref.kind == "hub" and ref.family == "unknown":
        from backend.downloads import pull
        from backend.extras_check import check_extras

        if not os.environ.get(SERVICE_ENV):  # another machine's service has LoRAs of its own
            check_extras(request, ref.family)  # a LoRA, VAE or refiner missing is said before gigabytes download
        print(f"dreamtty: downloading {visible(request.model)} into the Hugging Face cache", file=sys.stderr)
        pull(request.model)


def cmd_generate(args) -> int:
    if args.init_image is None:
        for name in ("strength", "keep_inputs"):
            if getattr(args, name) is not None:
                raise RequestError(name, "needs --init-image (image to image)")
    args.image = args.init_image
    if args.init_image is None:
        request = request_from_args(args)
    else:  # a job on an input image: its size is the image's, not a preset's
        request = request_from_args(args, Img2ImgRequest, source={})
    return _run_one(args, request)


def _run_one(args: argparse.Namespace, request: GenerateRequest, source: dict | None = None) -> int:
    """Fetch the model when missing and run the job; an error about a value the user did not type says where it
    came from (``source``: the input image's settings; else the config's default model)."""
    from backend import config, request_builder

    try:
        if request.uses_model:
            _fetch_if_missing(request)
        code, _ = asyncio.run(_run_jobs(args, [request], args.out))
    except DreamttyError as exc:
        explicit = request_builder.from_text(_flag_values(args))
        explained = request_builder.inherited(exc, request.to_dict(), source or {}, explicit)
        if explained is exc and not args.model and request.model == (cfg := config.load()).default_model:
            explained = cfg.model_error(exc)
        raise explained from None
    return code


def _image_command(kind: type[GenerateRequest]):
    """A verb on an input image: its settings default to the image's own (its metadata), a new seed."""

    def command(args) -> int:
        from backend import request_builder

        source, warnings = request_builder.source_settings(args.image)
        print_warnings([f"settings from {args.image}: {w}" for w in warnings])
        return _run_one(args, request_from_args(args, kind, source), source)

    return command


def cmd_describe(args) -> int:
    """Print a prompt for the image (a job in a worker, like every kind)."""
    from backend import config, request_builder

    values = {"image": args.image, "mode": args.mode, "model": args.model}
    request = request_builder.build({k: v for k, v in values.items() if v is not None}, kind=DescribeRequest,
                                    defaults=request_builder.config_defaults(config.load()))  # takes no preset
    code, _ = asyncio.run(_run_jobs(args, [request], None))
    return code


def cmd_reproduce(args) -> int:
    from backend import foreign_metadata, metadata, request_builder

    if (args.image is None) == (args.from_text is None):
        raise RequestError("reproduce", "give an IMAGE or --from-text FILE (one of them)")
    record: dict = {}  # the prompt record of a dreamtty image
    if args.from_text is not None:
        text = foreign_metadata.read_text_file(args.from_text)
        request, warnings, ours = metadata.text_request(text, f"from-text: {args.from_text}")
    else:
        image = metadata.ImageMetadata(args.image)
        (request, warnings), record, ours = image.request(), image.record(), image.ours
        request, notes = metadata.as_made(request, record).with_kept_inputs(record, Path(args.image))
        warnings += notes
    print_warnings(warnings)
    recorded = request.to_dict()
    if args.model:
        request.model = args.model
    try:
        code, paths = asyncio.run(_run_jobs(args, [request], args.out, None if ours else _without_missing))
    except DreamttyError as exc:  # a recorded value (not --model, --out or the environment): say so
        if not request_builder.kept_from(exc, request.to_dict(), recorded, {"model": args.model} if args.model else {}):
            raise
        where = f"the metadata of {args.image}" if args.image is not None else f"the text of {args.from_text}"
        hint = "; give --model" if str(exc).startswith("model: ") else ""
        raise noted(exc, f" (the value in {where}{hint})") from None
    if code == 0 and paths and args.image is not None:
        print(_pixels_line(args.image, Path(paths[0]), record), file=sys.stderr)
    return code


async def _without_missing(client: Client, request: GenerateRequest) -> GenerateRequest:
    """Another tool's request as the closest the service can run: without the LoRAs and the VAE it does not
    have (those of the machine that made the image), each said."""
    request, left = await client.closest(request)
    print_warnings(left)
    return request


def _pixels_line(image: Path, made: Path, record: dict) -> str:
    """How the image ``made`` by reproducing ``image`` (whose prompt record is ``record``) compares with it. A
    service on another machine saved ``made`` where this one may not read it: not compared, said so."""
    import numpy as np

    from backend import metadata
    from backend.input_images import UNREADABLE, open_quietly
    from backend.safetext import first_line

    try:
        with open_quietly(image) as a, open_quietly(made) as b:
            if a.size != b.size:  # an A1111 hires-fix image, or one resized after it was made
                return f"pixels: differ (size {b.width}x{b.height}, the image's is {a.width}x{a.height})"
            diff = np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int)).max()
    except UNREADABLE as exc:
        return f"pixels: not compared ({one_line(first_line(exc))})"
    if diff == 0:
        return "pixels: identical"
    try:
        change = metadata.prompt_change(record, metadata.ImageMetadata(made).record())
    except DreamttyError:  # made unreadable since: the pixels were compared, the texts are not
        change = None
    return f"pixels: differ (max difference {diff}/255)" + (f": {one_line(change)}" if change else "")


def _image_verb(sub, name: str, help_text: str, kind: type[GenerateRequest]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("image", help="the input image (its prompt, model and settings are the defaults)")
    p.add_argument("--prompt", help="prompt (default: the image's own)")
    _add_generate_options(p)
    p.add_argument("--keep-inputs", action="store_true", default=None,
                   help="copy the input image (and mask) into the output folder, for reproduce")
    p.set_defaults(func=_image_command(kind))
    return p


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate images headlessly")
    gen.add_argument("prompt", nargs="?", default="", help="prompt (empty = unconditional)")
    _add_generate_options(gen)
    gen.add_argument("--init-image", type=given, metavar="IMAGE", help="start from this image (image to image)")
    gen.add_argument("--strength", type=given, help="with --init-image: 0..1 or subtle (0.5) / strong (0.85)")
    gen.add_argument("--keep-inputs", action="store_true", default=None, help="copy the init image into the output folder")
    gen.set_defaults(func=cmd_generate)

    vary = _image_verb(sub, "vary", "repaint an image at a strength (image to image)", Img2ImgRequest)
    vary.add_argument("--strength", type=given, help="subtle (0.5, default), strong (0.85) or 0..1 (0 = the input)")

    up = _image_verb(sub, "upscale", "enlarge an image, then restore detail", UpscaleRequest)
    up.add_argument("--scale", type=number, help=f"{', '.join(f'{s:g}' for s in SCALES)} (default 2)")
    pass_or_not = up.add_mutually_exclusive_group()  # fast repaints nothing: a strength would go unused
    pass_or_not.add_argument("--fast", action="store_true", default=None, help="the upscaler alone, no repainting pass")
    up.add_argument("--upscaler", type=given,
                    help="a model in the upscalers folder, or lanczos (default: the first model found)")
    pass_or_not.add_argument("--strength", type=given, help="of the repainting pass, 0..1 (default 0.382)")

    inp = _image_verb(sub, "inpaint", "repaint the masked part of an image", InpaintRequest)
    where = inp.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", type=given, help="mask image: white = repaint, black = keep")
    where.add_argument("--box", type=given, help="rectangle to repaint: X,Y,W,H in pixels")
    inp.add_argument("--mode", choices=list(MODES), help="fill (default), detail or modify")
    inp.add_argument("--strength", type=given, help="0..1 (default: fill 1, detail 0.5, modify 1)")
    inp.add_argument("--context", type=_ranged("context", 0, 1),
                     help="0..1: how much of the image the repainted crop covers at least")
    inp.add_argument("--feather", type=_ranged("feather", 0, MAX_FEATHER, whole=True),
                     help="pixels over which the repainted area fades in (default 8)")

    out = _image_verb(sub, "outpaint", "extend an image's canvas and paint the new area", OutpaintRequest)
    for side in SIDES:
        out.add_argument(f"--{side}", type=integer, metavar="PX", help=f"pixels to add on the {side} (rounded up to 8)")
    out.add_argument("--feather", type=_ranged("feather", 0, MAX_FEATHER, whole=True),
                     help="pixels of the original blended into the new area (default 16)")
    out.add_argument("--strength", type=given, help="0..1 (default 1)")

    des = sub.add_parser("describe", help="print a prompt for an image (a caption, or anime tags)")
    des.add_argument("image", help="the image to describe")
    des.add_argument("--mode", choices=DESCRIBE_MODES, help="photo (a caption, default) or anime (tags)")
    des.add_argument("--model", default=argparse.SUPPRESS,  # left out: a --model before describe stays
                     help="whose captioner to use: a demo model's built-in one, else the library's (default: the "
                          "configured default model)")
    des.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    des.set_defaults(func=cmd_describe)

    rep = sub.add_parser("reproduce", help="regenerate an image from its metadata (dreamtty, A1111 or Fooocus)")
    rep.add_argument("image", type=lambda text: Path(given(text)), nargs="?")  # "" is no image, not "."
    rep.add_argument("--from-text", metavar="FILE", help="a pasted A1111 or Fooocus parameters text (- = stdin)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=cmd_reproduce)
