"""The models image prompts and ``describe`` need, found in the library, and where to get them (no torch).

Each type of reference needs models of the model library (backend.library): ``image`` and ``face`` an
IP-Adapter of the model's family plus the CLIP image encoder it was trained with; ``canny``, ``depth``
and ``structure`` a ControlNet of the model's family (its type told by its name); ``depth`` also a
depth model; ``describe`` a captioner (``photo``: BLIP; ``anime``: an image-classifier tagger). The
demo models use their built-in tiny companions. A missing model is refused with the exact pull
command; :data:`USUAL` lists the repositories that command downloads, per type and family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backend import library
from backend.errors import RequestError
from backend.families import family_label
from backend.image_prompts import FIELD, TYPES, ImagePrompt

PULL_FAMILIES = ("sd1", "sdxl")  # the families the usual repositories serve


@dataclass(frozen=True)
class Usual:
    """Files of a Hugging Face repository that ``dreamtty models pull --for`` downloads."""

    kind: str  # the library kind, which also names the folder they go in
    variant: str | None  # image-prompt type, image_encoder, or describe's mode
    families: tuple[str, ...]  # model families it serves (sd1, sdxl) or ("any",)
    repo: str
    files: tuple[str, ...]  # paths in the repository, or fnmatch patterns
    size: str  # approximate download

    def folder(self, cfg) -> Path:
        """Where it goes: ``<first folder of its kind>/<owner>--<name>`` (the repository's layout inside)."""
        return cfg.folders(library.FOLDER_OF_KIND[self.kind])[0] / self.repo.replace("/", "--")


_CONTROLNET = ("config.json", "diffusion_pytorch_model.safetensors")
USUAL = (
    Usual("ip_adapter", "image", ("sd1",), "h94/IP-Adapter", ("models/ip-adapter-plus_sd15.safetensors",), "98 MB"),
    Usual("ip_adapter", "face", ("sd1",), "h94/IP-Adapter", ("models/ip-adapter-plus-face_sd15.safetensors",), "98 MB"),
    Usual("ip_adapter", "image", ("sdxl",), "h94/IP-Adapter", ("sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",),
          "848 MB"),
    Usual("ip_adapter", "face", ("sdxl",), "h94/IP-Adapter",
          ("sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",), "848 MB"),
    # The "plus" adapters of both families take the hidden states of this OpenCLIP ViT-H/14 encoder.
    Usual("ip_adapter", "image_encoder", ("sd1", "sdxl"), "h94/IP-Adapter",
          ("models/image_encoder/config.json", "models/image_encoder/model.safetensors"), "2.5 GB"),
    Usual("controlnet", "canny", ("sd1",), "lllyasviel/control_v11p_sd15_canny", _CONTROLNET, "1.4 GB"),
    Usual("controlnet", "depth", ("sd1",), "lllyasviel/control_v11f1p_sd15_depth", _CONTROLNET, "1.4 GB"),
    Usual("controlnet", "canny", ("sdxl",), "diffusers/controlnet-canny-sdxl-1.0", _CONTROLNET, "5.0 GB"),
    Usual("controlnet", "depth", ("sdxl",), "diffusers/controlnet-depth-sdxl-1.0", _CONTROLNET, "5.0 GB"),
    Usual("depth_model", None, ("any",), "depth-anything/Depth-Anything-V2-Small-hf",
          ("config.json", "model.safetensors", "preprocessor_config.json"), "99 MB"),
    Usual("captioner", "photo", ("any",), "Salesforce/blip-image-captioning-base",
          ("*.json", "vocab.txt", "model.safetensors"), "990 MB"),
    Usual("captioner", "anime", ("any",), "p1atdev/wd-swinv2-tagger-v3-hf", ("config.json", "model.safetensors"),
          "390 MB"),
)
PULL_TARGETS = ("image-prompt", *TYPES, "describe")  # what ``models pull --for`` takes


def usual_for(target: str, family: str) -> list[Usual]:
    """The downloads ``models pull --for target --family family`` makes: a type, ``image-prompt`` (every
    type) or ``describe`` (the captioners)."""
    if target == "describe":
        return [u for u in USUAL if u.kind == "captioner"]
    types = list(TYPES) if target == "image-prompt" else [target]
    wanted = [u for u in USUAL if family in u.families and u.variant in types]
    if any(TYPES[t].model == "ip_adapter" for t in types):
        wanted += [u for u in USUAL if u.variant == "image_encoder" and family in u.families]
    if "depth" in types:
        wanted += [u for u in USUAL if u.kind == "depth_model"]
    return wanted


def pull_command(target: str, family: str | None = None) -> str:
    return f"dreamtty models pull --for {target}" + (f" --family {family}" if family else "")


def _family(model_family: str) -> str:
    """The family whose companions a model of ``model_family`` uses (SD 2.x v-prediction is SD 2.x)."""
    return {"sd2-v": "sd2"}.get(model_family, model_family)


def _what(kind: str, variant: str | None) -> str:
    return {"ip_adapter": "IP-Adapter", "controlnet": f"{variant} ControlNet", "depth_model": "depth model",
            "captioner": f"{variant} captioner"}[kind] if variant != "image_encoder" else "IP-Adapter image encoder"


def find_model(kind: str, variant: str | None, model_family: str, target: str, cfg=None,
               field: str = FIELD, name: str | None = None) -> library.Entry:
    """The library's model of ``kind`` (and ``variant``) for a ``model_family`` model: the built-in one for a
    demo model, else the one called ``name`` when there is one, else the first by name made for that family.
    RequestError(``field``) naming what is missing and the pull command for ``target`` otherwise."""
    from backend import config as config_mod

    cfg = cfg or config_mod.load()
    family = _family(model_family)
    entries = [e for e in library.discover(cfg, kinds=(kind,), hub=False).of_kind(kind) if e.variant == variant]
    built_in = family in library.DEMO_MODELS
    mine = [e for e in entries if (e.source == "built-in") == built_in and e.family in (family, "any")]
    if mine:
        return next((e for e in mine if e.name == name), None) or sorted(mine, key=lambda e: e.name)[0]
    what = _what(kind, variant)
    usual = [u for u in USUAL if u.kind == kind and u.variant == variant]
    any_family = any("any" in u.families for u in usual)
    pull_family = family if family in PULL_FAMILIES and not any_family else None
    if any_family or any(family in u.families for u in usual):
        get = f"get it with: {pull_command(target, pull_family)}"
    else:
        get = (f"none is known to download for {family_label(family)}; put one made for it in the "
               f"{library.FOLDER_OF_KIND[kind]} folder")
    other = [e for e in entries if e.source != "built-in" and e.family not in (family, "any")]
    if other:
        raise RequestError(field, f"{what} {other[0].name} is for {family_label(other[0].family)}, the model is "
                                  f"{family_label(family)}; {get}")
    folders = ", ".join(str(p) for p in cfg.folders(library.FOLDER_OF_KIND[kind])) or "none"
    scope = "" if any_family else f" for {family_label(family)}"
    raise RequestError(field, f"no {what}{scope} in {folders}; {get}")


@dataclass(frozen=True)
class Needs:
    """The models one reference uses."""

    index: int  # its position in the request's references
    prompt: ImagePrompt
    model: library.Entry  # its IP-Adapter or ControlNet
    encoder: library.Entry | None = None  # an IP-Adapter's image encoder
    depth: library.Entry | None = None  # the depth model of a depth reference

    @property
    def stand_in(self) -> str | None:
        """What to tell when the reference named a model this library lacks (another took its place)."""
        if self.prompt.model is None or self.prompt.model == self.model.name:
            return None
        what = _what(self.model.kind, self.prompt.type)
        return f"no {what} named {self.prompt.model} here; {self.model.name} stands in for it"


def encoder_width(adapter: library.Entry) -> tuple[str, int] | None:
    """(config key, width) the image encoder of an IP-Adapter file must have: a "plus" adapter takes the
    encoder's hidden states (``hidden_size``), a plain one its projected embedding (``projection_dim``)."""
    if not adapter.path:
        return None
    shapes, _ = library.read_shapes(Path(adapter.path))
    if "image_proj.proj_in.weight" in shapes:
        return "hidden_size", shapes["image_proj.proj_in.weight"][1]
    if "image_proj.proj.weight" in shapes:
        return "projection_dim", shapes["image_proj.proj.weight"][1]
    return None


def _encoder(adapter: library.Entry, model_family: str, cfg) -> library.Entry:
    """The image encoder an IP-Adapter was trained with (the width its projection takes)."""
    want = encoder_width(adapter)
    if want is None:
        return find_model("ip_adapter", "image_encoder", model_family, "image", cfg)
    entries = library.discover(cfg, kinds=("ip_adapter",), hub=False).of_kind("ip_adapter")
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.variant == "image_encoder" and entry.path:
            if library.read_json(Path(entry.path) / "config.json").get(want[0]) == want[1]:
                return entry
    family = _family(model_family)
    raise RequestError(FIELD, f"no image encoder with {want[0]} {want[1]} (the one {adapter.name} takes) in "
                              f"{', '.join(str(p) for p in cfg.folders('ip_adapters'))}; get it with: "
                              f"{pull_command('image', family if family in PULL_FAMILIES else None)}")


def plan(prompts: list[ImagePrompt], model_family: str, cfg=None) -> list[Needs]:
    """The models of every reference that changes anything (weight and stop above 0); RequestError naming
    the first one missing, or made for another family, with the pull command."""
    from backend import config as config_mod

    cfg = cfg or config_mod.load()
    out = []
    for index, prompt in enumerate(prompts):
        if not prompt.active:
            continue
        kind = TYPES[prompt.type].model
        model = find_model(kind, prompt.type, model_family, prompt.type, cfg, name=prompt.model)
        encoder = _encoder(model, model_family, cfg) if kind == "ip_adapter" else None
        depth = find_model("depth_model", None, model_family, "depth", cfg) if prompt.type == "depth" else None
        out.append(Needs(index, prompt, model, encoder, depth))
    return out
