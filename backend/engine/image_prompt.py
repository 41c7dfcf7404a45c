"""Image prompts in the worker: load the models a job's references need, run the preprocessors, and steer
each UNet call of the denoise loop (backend.engine.guider) with them.

:func:`apply_image_prompts` runs once per job (from ``apply_extras``): it loads the IP-Adapters and
ControlNets onto the cached pipeline, encodes the ``image``/``face`` references with the adapters' image
encoder, makes the ``canny``/``depth``/``structure`` maps at the request's size (each handed to
``on_preview``), and leaves the result in ``pipe.dreamtty.image_prompts``. A denoise run turns that into
a :class:`Steering`, which the guider asks, call by call, for the UNet's extra inputs: the image
embeddings (positive for the cond and PAG rows, negative for uncond and PerpNeg's empty prompt) and the
ControlNet residuals. A reference applies while ``(iteration + 1) / iterations <= stop`` over the whole
schedule, as prompt editing and the refiner count steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from backend import companions, library
from backend.engine import controlnet, ip_adapter, preprocess
from backend.engine.pipeline import execution_device
from backend.image_prompts import ImagePrompt, read_reference

POSITIVE_ROWS = ("cond", "perturbed")  # the guider's rows that get the reference (the others: its negative)
PREPROCESSORS = {"canny": "canny", "depth": "depth", "structure": "cpds"}


@dataclass
class Control:
    prompt: ImagePrompt
    net: object  # a diffusers ControlNetModel
    image: Image.Image  # its map, at the request's size


@dataclass
class References:
    """A job's references, ready for its denoise runs."""

    adapters: list[ImagePrompt]  # per IP-Adapter slot
    positive: list[torch.Tensor]  # per slot: the reference's image embeddings
    negative: list[torch.Tensor]
    controls: list[Control] = field(default_factory=list)

    def steering(self, pipe, width: int, height: int, iterations: int) -> Steering:
        maps = [controlnet.control_tensor(pipe, preprocess.fit(c.image, width, height), width, height)
                for c in self.controls]  # fitted again when the sampled area differs (an inpaint crop)
        return Steering(pipe, self, maps, iterations)


class Steering:
    """The references' extra UNet inputs, iteration by iteration, in one denoise run."""

    def __init__(self, pipe, refs: References, maps: list[torch.Tensor], iterations: int) -> None:
        self.pipe, self.refs, self.maps, self.iterations = pipe, refs, maps, iterations
        self.scales: list[float] | None = None
        self.active: list[int] = []
        self.residuals = controlnet.Residuals()

    def begin(self, iteration: int) -> None:
        """Set the adapters' scales and the ControlNets that apply for loop iteration ``iteration``."""
        scales = [p.weight if p.applies(iteration, self.iterations) else 0.0 for p in self.refs.adapters]
        if scales and scales != self.scales:
            ip_adapter.set_scales(self.pipe, scales)
        self.scales = scales
        self.active = [i for i, c in enumerate(self.refs.controls) if c.prompt.applies(iteration, self.iterations)]

    def unet_kwargs(self, latents: torch.Tensor, t, embeds: torch.Tensor, added: dict | None,
                    rows: tuple[str, ...]) -> tuple[dict | None, dict]:
        """(added_cond_kwargs with the rows' image embeddings, ControlNet residual kwargs) for one UNet call."""
        controls = [self.refs.controls[i] for i in self.active]
        residuals = self.residuals([c.net for c in controls], [self.maps[i] for i in self.active],
                                   [c.prompt.weight for c in controls], latents, t, embeds, added)
        if self.refs.adapters:
            per_slot = [torch.cat([pos if row in POSITIVE_ROWS else neg for row in rows])
                        for pos, neg in zip(self.refs.positive, self.refs.negative)]
            added = {**(added or {}), "image_embeds": per_slot}
        return added, residuals


def model_path(entry: library.Entry) -> str:
    """The file or folder of a library entry; a built-in companion is built on first use."""
    if entry.source != "built-in":
        return entry.path
    from backend.engine.demo_companions import ADAPTER_FILE, ensure_companion

    folder = ensure_companion(entry.name)
    adapter = entry.kind == "ip_adapter" and entry.variant != "image_encoder"
    return str(folder / ADAPTER_FILE) if adapter else str(folder)


def _hash(path: str) -> str:
    return library.folder_hash(path) if Path(path).is_dir() else library.short_hash(path)


def _preprocess(prompt: ImagePrompt, image: Image.Image, depth_model: str | None, device) -> Image.Image:
    if prompt.type == "canny":
        return preprocess.canny(image)
    if prompt.type == "structure":
        return preprocess.structure(image)
    return preprocess.depth(image, depth_model, device)


def _running(request, note: Callable[[str], None] | None) -> list[ImagePrompt]:
    """``request``'s references, with each one that stops before the job's first iteration (a strength that skips
    the start of the schedule) switched off, and a note saying so: it would be loaded to change nothing."""
    first, steps = request.first_iteration(), request.steps
    out = []
    for index, prompt in enumerate(request.image_prompts):
        if prompt.active and first < steps and not prompt.applies(first, steps):
            if note is not None:  # a job that runs from the start: its first step is 1/steps of the schedule
                other = "the strength" if first else "the steps"
                note(f"image prompt {prompt.label(index)}: it stops at {prompt.stop:g} of the schedule, before the "
                     f"first step this job runs ({first + 1} of {steps}); it is left out (raise its stop or "
                     f"{other} to use it)")
            prompt = replace(prompt, weight=0.0)
        out.append(prompt)
    return out


def apply_image_prompts(pipe, request, on_preview: Callable[[str, Image.Image], None] | None = None,
                        note: Callable[[str], None] | None = None) -> list[dict]:
    """Load and prepare ``request``'s references on ``pipe`` (``pipe.dreamtty.image_prompts``; None without
    any); ``note`` gets what reading a reference image changed (transparency, ...) and each model that stood in for
    one a reference named. Returns what the metadata records of each reference that applies: its number, models
    with short hashes and preprocessor."""
    needs = companions.plan(_running(request, note), pipe.dreamtty.family)
    adapters = [n for n in needs if n.encoder is not None]
    ip_adapter.load_adapters(pipe, tuple((model_path(n.model), model_path(n.encoder)) for n in adapters))
    nets = controlnet.load_controlnets(pipe, [model_path(n.model) for n in needs if n.encoder is None])
    pipe.dreamtty.image_prompts = None
    if not needs:
        return []
    records, images = [], {}
    for need in needs:
        source = read_reference(need.prompt, need.index)  # a queued job's file may have changed since
        for warning in filter(None, [need.stand_in, *source.warnings]) if note is not None else ():
            note(f"image prompt {need.index + 1}: {warning}")
        images[id(need)] = source.image
        record = {"index": need.index, "type": need.prompt.type, "model": need.model.name,
                  "hash": _hash(model_path(need.model))}
        if need.encoder is not None:
            record["encoder"] = {"name": need.encoder.name, "hash": _hash(model_path(need.encoder))}
        else:
            record["preprocessor"] = PREPROCESSORS[need.prompt.type]
        if need.depth is not None:
            record["depth_model"] = {"name": need.depth.name, "hash": _hash(model_path(need.depth))}
        if source.warnings:  # what reading it changed, kept as an input image's are
            record["warnings"] = list(source.warnings)
        records.append(record)
    positive, negative = ip_adapter.image_embeds(pipe, [images[id(n)] for n in adapters]) if adapters else ([], [])
    controls = []
    for need, net in zip([n for n in needs if n.encoder is None], nets):
        fitted = preprocess.fit(images[id(need)], request.width, request.height)
        depth = model_path(need.depth) if need.depth is not None else None
        control = Control(need.prompt, net, _preprocess(need.prompt, fitted, depth, execution_device(pipe)))
        controls.append(control)
        if on_preview is not None:
            on_preview(f"{need.prompt.type}-{need.index + 1}", control.image)  # numbered as the references are
    pipe.dreamtty.image_prompts = References([n.prompt for n in adapters], positive, negative, controls)
    return records
