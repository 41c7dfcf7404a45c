"""Torch-free handling of a request's extras: prompt LoRA tags, and lookups the service can check early.

``check_extras`` lets the service refuse a request with an unknown LoRA or VAE,
a refused pickle or an unknown refiner before anything is queued; the worker
does the loading (``backend.engine.extras``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from backend import config as config_mod
from backend import library
from backend.errors import ModelError, RequestError
from backend.families import FAMILIES
from backend.request import GenerateRequest, check_loras

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::\s*([-+]?(?:\d+\.?\d*|\.\d+)))?\s*>")
_ANY_LORA_TAG = re.compile(r"<lora:[^>]*>")  # what a user meant as a tag, written right or not


# A tag with the spaces before it, or at the start of a line with the spaces after it.
_TAG_AND_SPACES = re.compile(rf"(?m)^[ \t]*(?:{LORA_TAG.pattern}[ \t]*)+|[ \t]*{LORA_TAG.pattern}")
_SPACES_AND_TAG = re.compile(rf"[ \t]*{LORA_TAG.pattern}")


def without_tags(text: str, drop: Callable[[str], bool] = lambda name: True) -> str:
    """``text`` without the LoRA tags whose name ``drop`` picks (every tag by default) and the spaces that
    separated them; the rest stays as typed (newlines, repeated spaces)."""

    def cut(match: re.Match) -> str:
        text = match.group()
        if all(drop(tag.group(1).strip()) for tag in LORA_TAG.finditer(text)):
            return ""  # with the spaces around them
        kept = _SPACES_AND_TAG.sub(lambda tag: "" if drop(tag.group(1).strip()) else tag.group(), text)
        indent = text[:len(text) - len(text.lstrip(" \t"))]
        return indent + kept.lstrip(" \t")  # the line's indent, not also the space before a tag cut

    return _TAG_AND_SPACES.sub(cut, text)


def prompt_loras(text: str) -> tuple[str, list[tuple[str, float]]]:
    """Strip ``<lora:name:weight>`` tags from a prompt; returns the prompt and the LoRAs.

    Only the tags and the spaces that separated them go: the rest stays as typed (newlines, repeated spaces).
    """
    for tag in _ANY_LORA_TAG.findall(text):
        if not LORA_TAG.fullmatch(tag):
            raise RequestError("prompt", f"{tag} is not a LoRA tag; write <lora:NAME> or <lora:NAME:WEIGHT>, "
                                         "WEIGHT a number in -2..2")
    found = [(m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0) for m in LORA_TAG.finditer(text)]
    return (without_tags(text), found) if found else (text, found)


def effective_request(request: GenerateRequest) -> GenerateRequest:
    """The request with prompt LoRA tags moved into ``loras`` (a tag wins over a flag of the same name)."""
    prompt, tagged = prompt_loras(request.prompt)
    if not tagged:
        loras = list(request.loras)
    else:
        names = {n for n, _ in tagged}
        loras = [x for x in request.loras if x[0] not in names] + tagged
    check_loras(loras)
    return replace(request, prompt=prompt, loras=loras)


def find_extra(kind: str, name: str, cfg) -> library.Entry:
    from backend.models import relabel, run_folder_hint

    try:
        entry = library.find(kind, name, cfg)
    except ModelError as exc:  # a damaged file: the library's message names "model"
        raise relabel(exc, kind) from None
    if entry is None and library.looks_like_hub_id(name):
        raise RequestError(kind, f"{name} is not in the local Hugging Face cache; get it with: dreamtty models pull {name}")
    if entry is None and (hint := run_folder_hint(name)):
        raise RequestError(kind, hint)
    if entry is None and _special_file(name):  # a FIFO or a device is no file of the library: "not found" misled
        raise RequestError(kind, f"{name} is not a regular file; give a .safetensors file")
    if entry is None:
        known = library.names(kind, cfg)
        folders = ", ".join(str(p) for p in cfg.folders(library.FOLDER_OF_KIND[kind])) or "none"
        listed = f"known: {', '.join(known[:10])}" if known else f"none found in {folders}"
        raise RequestError(kind, f"{name} not found; {listed}")
    if entry.format == "pickle" and not cfg.allow_pickle:
        raise RequestError(kind, f"{name} is a pickle ({Path(entry.path).suffix}); refused without --allow-pickle")
    if kind == "lora" and entry.variant:  # LyCORIS: diffusers' SD/SDXL LoRA loader refuses LoHa and LoKr files
        raise RequestError("lora", f"{name} is a LyCORIS {entry.variant} file; only LoRA files load "
                                   "(lora_down/lora_up or lora_A/lora_B weights)")
    return entry


def _special_file(name: str) -> bool:
    """Whether ``name`` is a path to something that is neither a file nor a folder (read without opening it)."""
    try:
        mode = os.stat(os.path.expanduser(name)).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_extras(request: GenerateRequest, model_family: str, cfg=None) -> GenerateRequest:
    """Check that the request's LoRAs, VAE and refiner exist and may be loaded with a ``model_family``
    model; returns the effective request."""
    from backend.models import resolve_model

    cfg = cfg or config_mod.load()
    request = effective_request(request)
    for name, _ in request.loras:
        entry = find_extra("lora", name, cfg)
        if model_family in FAMILIES:  # refused here, not by its worker after queueing
            same_family("lora", name, entry.family, model_family)
    if request.vae:
        find_extra("vae", request.vae, cfg)
    if request.refiner:
        check_refiner(request.refiner, resolve_model(request.refiner, "refiner").family, model_family)
    return request


def same_family(kind: str, name: str, item: str, model: str) -> None:
    """Refuse a LoRA or embedding made for another family (unknown ones and demo models are let through)."""
    if item in ("unknown", "any") or model.startswith("demo"):
        return
    norm = {"sd2-v": "sd2"}
    if norm.get(item, item) != norm.get(model, model):
        raise RequestError(kind, f"{name} is for {FAMILIES[item].label}; the model is {FAMILIES[model].label}")


def check_refiner(name: str, family: str, model_family: str) -> None:
    """A refiner must share the model's latent space (SD1/SD2 latents vs SDXL latents)."""
    fam, model = FAMILIES.get(family), FAMILIES.get(model_family)
    if model is not None and (fam is None or fam.xl != model.xl):
        raise RequestError("refiner", f"{name} ({family}) does not share the latent space of the model ({model_family})")
