"""The model library: find checkpoints, LoRAs, VAEs, embeddings, upscalers and the image prompts' models
(IP-Adapters, ControlNets, depth models, captioners) on disk, without torch.

Files are inspected by their tensor names and shapes only:

- ``.safetensors``: the header is read by hand (8 bytes little-endian length,
  then JSON), and the data offsets are checked against the file size, so a
  truncated download is caught before anything loads it.
- Pickled files (``.ckpt .pt .pth .bin``) are never executed: a restricted
  unpickler reads the tensor names and shapes of torch's zip format and turns
  every other object into an inert stub. One that names an object
  ``torch.load(weights_only=True)`` refuses is skipped: it could never load. Loading
  them for real still needs ``--allow-pickle`` (see :mod:`backend.engine.loader`).

Diffusers folders are told apart by their JSON configs (:func:`family_from_folder`).
Checkpoint families are told apart by their text encoders (CLIP-L alone: SD1;
OpenCLIP alone: SD2; both under ``conditioner.embedders``: SDXL; OpenCLIP
bigG alone: SDXL refiner) and the UNet's first conv (9 input channels:
inpainting). Whether an SD2 checkpoint predicts v cannot be read from the
weights; :func:`sd2_prediction` documents the rule used.

Every file is opened through :mod:`backend.user_files`: a FIFO or a device named like a model file is
refused unread (a read of it would hang the thread that checks a request).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from backend import locations, user_files, yaml_text
from backend.errors import ModelError
from backend.values import kind_of, shown

DEMO_MODELS = ("demo", "demo-xl")  # built offline by backend.engine.demo_models
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PICKLE_REFUSED = "pickle: refused unless --allow-pickle"  # a listed pickle's note while the config refuses them
NO_INDEX = "has no model_index.json; it is not a diffusers folder"  # a checkpoint folder that is none
MAX_HEADER = 100 * 1024 * 1024
MAX_PICKLE = 64 * 1024 * 1024
UNET = "model.diffusion_model."
# Cross-attention context width -> family, for files without text encoder keys (LoRAs, bare UNets).
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
HIDDEN_FAMILY = {768: "sd1", 1024: "sd2"}  # text-encoder width of SD1 / SD2 embeddings and LoRAs
# Image prompts' models (backend.companions): IP-Adapters and their image encoders, ControlNets, depth
# models and describe's captioners.
COMPANION_KINDS = ("ip_adapter", "controlnet", "depth_model", "captioner")
KINDS = ("checkpoint", "lora", "vae", "embedding", "upscaler", *COMPANION_KINDS)
FOLDER_OF_KIND = {"checkpoint": "checkpoints", "lora": "loras", "vae": "vae", "embedding": "embeddings",
                  "upscaler": "upscalers", "ip_adapter": "ip_adapters", "controlnet": "controlnets",
                  "depth_model": "depth_models", "captioner": "captioners"}

Shapes = dict[str, tuple[int, ...]]


class CorruptFile(ModelError):
    """A model file that cannot be parsed (truncated download, not a model, ...)."""


def relabel(error: ModelError, field: str) -> ModelError:
    """``error`` with its leading ``model:`` replaced by ``field:`` (model files named by another field)."""
    if field == "model":
        return error
    return type(error)(f"{field}: {str(error).removeprefix('model: ')}")


def non_tensor_error(path: Path, name: str) -> CorruptFile:
    """The error for a pickle that names the class or function ``name``: ``torch.load(weights_only=True)``, the
    only way a pickle is loaded here, refuses it."""
    return CorruptFile(f"model: {path} holds objects other than tensors ({shown(name)}), which are never loaded "
                       "(weights_only); convert it to .safetensors")


def _unreadable(path: Path, exc: OSError) -> CorruptFile:
    """The one-line error for a model file that cannot be opened or read (e.g. ``is not a regular file``)."""
    return CorruptFile(str(user_files.read_error("model", path, exc)))


# -- reading tensor names and shapes ------------------------------------------
def read_safetensors_header(path: Path) -> tuple[Shapes, dict[str, str]]:
    """Tensor shapes and ``__metadata__`` of a .safetensors file; CorruptFile when it is damaged. Read here, not
    with ``safetensors.safe_open``: its errors ("incomplete metadata, file not fully covered") do not say how much
    of an interrupted download is missing."""
    try:
        with user_files.open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptFile(f"model: {path} is empty or truncated ({size} byte{'' if size == 1 else 's'})")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                raise CorruptFile(f"model: {path} is not a safetensors file or is truncated (bad header length)")
            raw = fh.read(length)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        meta = {str(k): str(v) for k, v in meta.items()}
        if not all(map(_consistent, header.values())):
            raise ValueError("a tensor's offsets do not hold its shape")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError):
        raise CorruptFile(f"model: {path} has a corrupt safetensors header") from None
    if 8 + length + end > size:
        raise CorruptFile(
            f"model: {path} is truncated: {size} bytes on disk, {8 + length + end} expected (download it again)"
        )
    return shapes, meta


# Bytes per element of the safetensors dtypes whose size is whole (newer packed ones are not checked).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _consistent(tensor: dict) -> bool:
    """Whether a header entry's offsets span exactly its shape (safetensors refuses the file otherwise)."""
    start, end = (int(x) for x in tensor["data_offsets"])
    shape = [int(d) for d in tensor["shape"]]
    if not 0 <= start <= end or any(d < 0 for d in shape):
        return False
    size = _DTYPE_BYTES.get(tensor.get("dtype"))
    return size is None or end - start == math.prod(shape) * size


class _Stub:
    """Stands in for every object a pickle names that is not a tensor or a container."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, *rest) -> _TensorInfo:
    return _TensorInfo(tuple(int(d) for d in size))


# What torch.load(weights_only=True) allows outside torch (its default allowlist, with Python 2's name for builtins).
# Every torch name passes here; the loader checks those exactly.
WEIGHTS_ONLY_GLOBALS = {("collections", "OrderedDict"), ("collections", "Counter"), ("_codecs", "encode"),
                        *((b, n) for b in ("builtins", "__builtin__") for n in ("bytearray", "set", "complex"))}


class _ShapeUnpickler(pickle.Unpickler):
    """Resolves only tensor rebuilders and plain containers; nothing else is imported or run. ``refused`` gets
    the names weights_only would refuse."""

    SAFE = {("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, file) -> None:
        super().__init__(file)
        self.refused: list[str] = []

    def find_class(self, module: str, name: str):
        if module.split(".")[0] != "torch" and (module, name) not in WEIGHTS_ONLY_GLOBALS:
            self.refused.append(f"{module}.{name}")
        if name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *rest: data
        return self.SAFE.get((module, name), _Stub)

    def persistent_load(self, pid) -> None:
        return None


def _flatten(obj: object, prefix: str = "") -> Shapes:
    out: Shapes = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(obj, _TensorInfo):
        out[prefix[:-1]] = obj.shape
    return out


def read_pickle_shapes(path: Path) -> Shapes:
    """Tensor names and shapes of a torch zip-format pickle, without running it."""
    try:
        with user_files.open_regular(path) as fh, zipfile.ZipFile(fh) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if not names:
                raise CorruptFile(f"model: {path} is not a torch checkpoint (no data.pkl)")
            if zf.getinfo(names[0]).file_size > MAX_PICKLE:
                raise CorruptFile(f"model: {path} has an unusually large pickle; not inspected")
            raw = zf.read(names[0])
    except zipfile.BadZipFile:
        raise CorruptFile(f"model: {path} is truncated or in the legacy torch format (not a zip)") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    unpickler = _ShapeUnpickler(io.BytesIO(raw))
    try:
        obj = unpickler.load()
    except Exception:  # any malformed pickle: report, never crash the listing
        raise CorruptFile(f"model: {path} has a corrupt pickle") from None
    if unpickler.refused:
        raise non_tensor_error(path, unpickler.refused[0])
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return _flatten(obj)


def read_shapes(path: Path) -> tuple[Shapes, dict[str, str]]:
    """Shapes (and safetensors metadata) of any supported model file."""
    if path.suffix.lower() in SAFE_SUFFIXES:
        return read_safetensors_header(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return read_pickle_shapes(path), {}
    raise CorruptFile(f"model: {path}: unsupported file type; use .safetensors")


# -- what a file is -------------------------------------------------------------
def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def sd2_prediction(path: Path, meta: dict[str, str], shapes: Shapes) -> str:
    """``"v"`` or ``"epsilon"`` for an SD2 checkpoint; the weights alone cannot tell.

    In order: a ``v_pred`` tensor (the marker ComfyUI and trainers write);
    safetensors metadata ``modelspec.prediction_type`` or kohya's
    ``ss_v_parameterization``; an A1111-style ``<name>.yaml`` beside the file
    (``parameterization: "v"`` means v, a yaml without it means epsilon); the
    file name (``768-v``, ``v-pred``, ``vpred`` mean v; ``base`` or ``512``
    mean epsilon); else v, like the official SD 2.x 768 checkpoints and
    diffusers' own single-file default.
    """
    if "v_pred" in shapes:
        return "v"
    spec = meta.get("modelspec.prediction_type", "").lower()
    if spec:
        return "v" if spec.startswith("v") else "epsilon"
    if meta.get("ss_v_parameterization", "").lower() == "true":
        return "v"
    sidecar = path.with_suffix(".yaml")
    if os.path.lexists(sidecar):  # a folder, a FIFO or a dangling link there is said, not passed over
        return _sidecar_prediction(sidecar)
    name = path.stem.lower()
    if re.search(r"768-v|v-?pred", name):
        return "v"
    if "base" in name or "512" in name:
        return "epsilon"
    return "v"


def _sidecar_prediction(sidecar: Path) -> str:
    """``"v"`` when an A1111 config says ``model.params.parameterization: v`` (as YAML reads it: quoted or not,
    with a comment, in flow style), else ``"epsilon"``. CorruptFile when it cannot be read: the model's
    prediction would be a guess, and a wrong one makes every image noise."""
    try:
        data = yaml_text.load(user_files.read_bytes(sidecar, user_files.MAX_TEXT_BYTES).decode("utf-8", "replace"))
    except user_files.RefusedFile as exc:  # a folder, a FIFO, too large
        why = str(exc)
    except OSError as exc:
        why = f"cannot read {sidecar}: {exc.strerror or exc}"
    except yaml.YAMLError as exc:
        why = f"{sidecar} is not valid YAML{yaml_text.fault(exc)}"
    else:
        for key in ("model", "params"):
            data = data.get(key) if isinstance(data, dict) else None
        setting = isinstance(data, dict) and str(data.get("parameterization")).strip().lower()
        return "v" if setting == "v" else "epsilon"
    raise CorruptFile(f"model: {why}; fix it or move it away (it says whether the model predicts v or epsilon)")


def checkpoint_family(path: Path, shapes: Shapes, meta: dict[str, str]) -> tuple[str, str | None] | None:
    """(family, variant) of a full checkpoint in the original (LDM/SGM) layout, or None.

    variant is ``"inpaint"`` (9 UNet input channels), ``"pix2pix"`` (8) or None.
    """
    if not _has_prefix(shapes, UNET):
        return None
    if _has_prefix(shapes, "conditioner.embedders.1.model."):
        family = "sdxl"
    elif _has_prefix(shapes, "conditioner.embedders.0.model."):
        family = "sdxl-refiner"
    elif _has_prefix(shapes, "cond_stage_model.model."):
        family = "sd2"
    elif _has_prefix(shapes, "cond_stage_model.transformer."):
        family = "sd1"
    else:
        family = _family_by_context(shapes, UNET) or "unknown"
    if family == "sd2" and sd2_prediction(path, meta, shapes) == "v":
        family = "sd2-v"
    first = shapes.get(UNET + "input_blocks.0.0.weight", (0, 4, 3, 3))  # the UNet's input convolution
    if len(first) != 4:
        raise CorruptFile(f"model: {path} has a UNet input convolution of shape {list(first)}; a checkpoint's has 4 "
                          "dimensions (damaged, or not a Stable Diffusion checkpoint)")
    return family, {9: "inpaint", 8: "pix2pix"}.get(first[1])


def _family_by_context(shapes: Shapes, prefix: str = "") -> str | None:
    """Family from the width of a cross-attention key projection (attn2.to_k)."""
    for key, shape in shapes.items():
        if key.startswith(prefix) and "attn2" in key and "to_k" in key and len(shape) == 2:
            if any(s in key for s in ("lora_down", "lora_A", "lora.down")) or key.endswith("to_k.weight"):
                return CONTEXT_FAMILY.get(shape[1])
    return None


_LORA_MARKERS = (".lora_down.", ".lora_A.", ".lora_up.", ".lora_B.", ".hada_w1", ".lokr_w1", ".lora.down.")
# LyCORIS (KohakuBlueleaf/LyCORIS) algorithms beside plain LoRA: Hadamard- and Kronecker-product updates.
LYCORIS_MARKERS = {".hada_w1": "LoHa", ".lokr_w1": "LoKr"}


def lycoris_algorithm(shapes: Shapes) -> str | None:
    """"LoHa" or "LoKr" for a LyCORIS file (diffusers loads neither into SD/SDXL pipelines), None for a LoRA."""
    return next((name for marker, name in LYCORIS_MARKERS.items() if any(marker in k for k in shapes)), None)


def lora_family(shapes: Shapes) -> str | None:
    """The family a LoRA was trained for ("unknown" when it cannot tell), or None when it is no LoRA."""
    if not any(m in k for k in shapes for m in _LORA_MARKERS):
        return None
    if any(k.startswith(("lora_te2_", "text_encoder_2.", "lora_te2.")) for k in shapes):
        return "sdxl"
    by_unet = _family_by_context(shapes)
    if by_unet:
        return by_unet
    for key, shape in shapes.items():
        if key.startswith(("lora_te_", "text_encoder.")) and ("lora_down" in key or "lora_A" in key) and len(shape) == 2:
            return HIDDEN_FAMILY.get(shape[1], "unknown")
    return "unknown"


def embedding_family(shapes: Shapes) -> str | None:
    """Family of a textual-inversion embedding (A1111, SDXL or diffusers format), or None."""
    if "clip_l" in shapes and "clip_g" in shapes:  # as many vectors for each encoder: one per token
        small, big = shapes["clip_l"], shapes["clip_g"]  # (vectors, 768) and (vectors, 1280)
        return "sdxl" if len(small) == len(big) == 2 and small[0] == big[0] > 0 else None
    vectors = [s for k, s in shapes.items() if k in ("emb_params", "string_to_param.*") or len(shapes) == 1]
    if len(vectors) != 1 or len(vectors[0]) not in (1, 2) or 0 in vectors[0]:  # (0, 768): no vector at all
        return None
    return HIDDEN_FAMILY.get(vectors[0][-1], "unknown")


def is_vae(shapes: Shapes) -> bool:
    keys = {k.removeprefix("first_stage_model.").removeprefix("vae.") for k in shapes}
    return {"encoder.conv_in.weight", "decoder.conv_out.weight"} <= keys and not _has_prefix(shapes, UNET)


SD_LATENT_CHANNELS = 4  # SD 1.x, 2.x and SDXL; SD3's and Flux's VAEs have 16


def wrong_latent_space(channels: object) -> str | None:
    """Why a VAE of ``channels`` latent channels cannot serve Stable Diffusion (None: it can, or it cannot tell)."""
    if not isinstance(channels, int) or channels == SD_LATENT_CHANNELS:
        return None
    return (f"is a VAE of {channels} latent channels (SD3 or Flux have 16); Stable Diffusion's have "
            f"{SD_LATENT_CHANNELS}")


def vae_latent_channels(shapes: Shapes) -> int | None:
    """The latent channels a VAE file decodes, from its decoder's input convolution."""
    shape = next((s for k, s in shapes.items() if k.endswith("decoder.conv_in.weight")), ())
    return shape[1] if len(shape) == 4 else None


def is_image_model(shapes: Shapes) -> bool:
    """Has 2-D convolution weights and no Stable Diffusion UNet (what every upscaler has)."""
    return any(len(s) == 4 for s in shapes.values()) and not _has_prefix(shapes, UNET)


# -- discovery --------------------------------------------------------------------
@dataclass
class Entry:
    """One usable item of the library."""

    kind: str  # checkpoint | lora | vae | embedding
    name: str  # what to type: the file stem, folder name or hub id
    path: str  # file or folder ("" for built-in demo models)
    family: str
    size: int  # bytes on disk
    source: str  # the config folder it was found in, "built-in" or "hf-cache"
    format: str  # safetensors | pickle | diffusers
    variant: str | None = None  # checkpoints: inpaint, pix2pix; LoRAs: LoHa, LoKr (LyCORIS)
    note: str = ""  # e.g. why it cannot be used as is

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Library:
    entries: list[Entry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per skipped file
    skipped: dict[str, str] = field(default_factory=dict)  # the names a skipped file would have -> its problem

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    def skip(self, path: Path, error: ModelError, kind: str) -> None:
        """Say why the file or folder at ``path``, found as a ``kind``, is not listed (the line names that kind as a
        request's field does: ``lora: ...``); naming it (by stem, file name or path) raises ``error``."""
        self.problems.append(str(relabel(error, "model" if kind == "checkpoint" else kind)))
        for name in (path.stem, path.name, str(path)):
            self.skipped.setdefault(name, str(error))


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ip_adapter_family(shapes: Shapes) -> str | None:
    """The family of an IP-Adapter file (its ``image_proj`` and ``ip_adapter`` weights), by the width of the
    text context its extra key projections take; None when it is no IP-Adapter."""
    if not (_has_prefix(shapes, "image_proj.") and _has_prefix(shapes, "ip_adapter.")):
        return None
    widths = {s[1] for k, s in shapes.items()
              if k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight") and len(s) == 2}
    return CONTEXT_FAMILY.get(min(widths), "unknown") if widths else "unknown"


def controlnet_type(name: str) -> str | None:
    """The image-prompt type a ControlNet serves, told by its name (the weights cannot tell)."""
    lowered = name.lower()
    return next((t for t, words in (("canny", ("canny",)), ("depth", ("depth",)), ("structure", ("cpds", "structure")))
                 if any(w in lowered for w in words)), None)


_DETECTORS = {  # kind -> (shapes -> family or None, why a file is not of that kind)
    "lora": (lora_family, "is not a LoRA (no lora_down / lora_A weights)"),
    "embedding": (embedding_family, "is not a textual-inversion embedding (one tensor of vectors; an SDXL one holds "
                                    "clip_l and clip_g, as many vectors in each)"),
    "vae": (lambda shapes: "any" if is_vae(shapes) else None, "is not a VAE (no encoder/decoder weights)"),
    # Upscalers (ESRGAN, SwinIR, ...): their architecture is told by spandrel, in the worker.
    "upscaler": (lambda shapes: "any" if is_image_model(shapes) else None, "is not an image model (no convolutions)"),
    "ip_adapter": (ip_adapter_family, "is not an IP-Adapter (no image_proj / ip_adapter weights)"),
    "controlnet": (lambda shapes: None, "is a single file; ControlNets load from a diffusers folder "
                                        "(config.json + diffusion_pytorch_model.safetensors)"),
    "depth_model": (lambda shapes: None, "is a single file; depth models load from a transformers folder"),
    "captioner": (lambda shapes: None, "is a single file; captioners load from a transformers folder"),
}


def _inspect_file(kind: str, path: Path, source: str) -> Entry:
    shapes, meta = read_shapes(path)
    fmt = "pickle" if path.suffix.lower() in PICKLE_SUFFIXES else "safetensors"
    entry = Entry(kind, path.stem, str(path), "unknown", path.stat().st_size, source, fmt)
    if kind == "checkpoint":
        found = checkpoint_family(path, shapes, meta)
        if found is None:
            raise CorruptFile(f"model: {path} is not a Stable Diffusion checkpoint (no UNet weights)")
        entry.family, entry.variant = found
        entry.note = _checkpoint_note(entry.family, entry.variant)
    else:
        detect, problem = _DETECTORS[kind]
        family = detect(shapes)
        if family is None:
            raise CorruptFile(f"model: {path} {problem}")
        entry.family = family
        if kind == "vae" and (problem := wrong_latent_space(vae_latent_channels(shapes))):
            raise CorruptFile(f"model: {path} {problem}")
        if kind == "ip_adapter":
            entry.variant = "face" if "face" in path.stem.lower() else "image"
        if kind == "lora" and (algorithm := lycoris_algorithm(shapes)):
            entry.variant, entry.note = algorithm, f"LyCORIS {algorithm}: not supported; only LoRA files load"
    return entry


class JsonConfig(dict):
    """A model folder's JSON file as read: a mapping that knows its file, to name it in an error."""

    def __init__(self, path: Path, data: dict) -> None:
        super().__init__(data)
        self.path = path

    def value(self, key: str, kind: type | tuple[type, ...], default: object = None):
        """``self[key]`` when it is a ``kind``; ``default`` when absent or null; ModelError naming the file
        and the key when it is something else (a damaged or hand-made config)."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, kind):  # JSON's true is no number here
            kinds = kind if isinstance(kind, tuple) else (kind,)
            wanted = " or ".join(kind_of(k()) for k in kinds)  # what an empty one of each is called
            raise ModelError(f"model: {self.path}: {key} is {kind_of(value)}, not {wanted}")
        return value


def read_json(path: Path) -> JsonConfig:
    """A model folder's JSON file (config.json, model_index.json) as a mapping; ModelError otherwise."""
    try:
        data = json.loads(user_files.read_text(path))
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"model: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"model: {path} is not a JSON object")
    return JsonConfig(path, data)


_WEIGHTED_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_PARTS = (*_WEIGHTED_PARTS, "tokenizer", "tokenizer_2", "scheduler")


def _check_parts(folder: Path, index: "JsonConfig") -> None:
    """ModelError naming what a diffusers folder lacks of the parts its model_index.json lists (a download that
    stopped short, a part removed), said when it is listed rather than when a job loads it; or that it is the
    folder of another kind of pipeline (SD3, Flux: no UNet)."""
    if "transformer" in index and "unet" not in index:
        raise ModelError(f"model: {folder} holds a {shown(index.get('_class_name'))} (a transformer, no UNet); "
                         "dreamtty runs Stable Diffusion 1.x, 2.x and SDXL")
    for part in _PARTS:
        listed = index.get(part)
        if not isinstance(listed, list) or not listed or listed[0] is None:  # [null, null]: the pipeline has none
            continue
        if not (folder / part).is_dir():
            raise ModelError(f"model: {folder} lacks {part}/, which its model_index.json lists")
        if part in _WEIGHTED_PARTS and not any(p.suffix in (".safetensors", ".bin") for p in (folder / part).iterdir()):
            raise ModelError(f"model: {folder / part} holds no weights (.safetensors or .bin)")


def family_from_folder(folder: Path) -> str:
    """Detect SD1 / SD2 / SD2-v / SDXL / SDXL-refiner from a diffusers folder (ModelError for one that lacks a
    part)."""
    index = read_json(folder / "model_index.json")
    _check_parts(folder, index)
    if (folder / "dreamtty_demo.json").exists():
        demo = read_json(folder / "dreamtty_demo.json")
        if (family := demo.value("family", str)) is None:
            raise ModelError(f"model: {demo.path} names no family")
        return family
    if "XL" in index.value("_class_name", str, ""):
        text_encoder = index.value("text_encoder", list, [])  # [library, class], or [null, null]: none
        return "sdxl-refiner" if not text_encoder or text_encoder[0] is None else "sdxl"
    unet = read_json(folder / "unet" / "config.json")
    if unet.get("cross_attention_dim") == 1024:
        sched = folder / "scheduler" / "scheduler_config.json"
        pred = read_json(sched).get("prediction_type") if sched.exists() else None
        return "sd2-v" if pred == "v_prediction" else "sd2"
    return "sd1"


def folder_variant(folder: Path) -> str | None:
    """``"inpaint"`` when a diffusers folder's UNet takes 9 input channels (latents, mask, masked image), as
    :func:`checkpoint_family` tells for single files."""
    unet = folder / "unet" / "config.json"
    if not unet.is_file():
        return None
    return {9: "inpaint", 8: "pix2pix"}.get(read_json(unet).value("in_channels", int))


def _companion_folder(kind: str, config: JsonConfig) -> tuple[str, str | None] | None:
    """(family, variant) of an image-prompt model folder of ``kind`` by its config.json, or None."""
    architectures = " ".join(map(str, config.value("architectures", list, [])))
    if kind == "controlnet" and config.get("_class_name") == "ControlNetModel":
        return CONTEXT_FAMILY.get(config.value("cross_attention_dim", int), "unknown"), None
    if kind == "ip_adapter" and config.get("model_type") == "clip_vision_model":
        return "any", "image_encoder"
    if kind == "depth_model" and "ForDepthEstimation" in architectures:
        return "any", None
    if kind == "captioner" and config.get("model_type") == "blip":
        return "any", "photo"
    if kind == "captioner" and "ForImageClassification" in architectures:
        return "any", "anime"
    return None


def _checkpoint_note(family: str, variant: str | None) -> str:
    """What a checkpoint of ``family`` and ``variant`` (inpaint, pix2pix, None) is for, when not for everything."""
    if family == "sdxl-refiner":
        return "refiner: use it with --refiner on an SDXL model"
    if not variant:
        return ""
    return f"{variant} model: " + ("for inpaint and outpaint only" if variant == "inpaint" else
                                   "not usable for text-to-image")


def _folder_checkpoint(name: str, folder: Path, size: int, source: str) -> Entry:
    """A diffusers folder as a checkpoint, flagged by its UNet (inpaint, pix2pix); ModelError when its family is
    not known."""
    family, variant = family_from_folder(folder), folder_variant(folder)
    return Entry("checkpoint", name, str(folder), family, size, source, "diffusers", variant,
                 _checkpoint_note(family, variant))


def _holds(folder: Path, name: str) -> bool:
    """Whether ``folder`` has an entry ``name``, of any type: a model folder whose model_index.json or config.json
    is a FIFO, a folder or a dangling link is a damaged model folder (skipped, saying why), not a plain folder."""
    return os.path.lexists(folder / name)


def _inspect_folder(kind: str, folder: Path, source: str) -> Entry | None:
    if kind in COMPANION_KINDS and _holds(folder, "config.json"):
        found = _companion_folder(kind, read_json(folder / "config.json"))
        if found is None:
            return None
        fmt = "diffusers" if kind == "controlnet" else "transformers"
        entry = Entry(kind, folder.name, str(folder), found[0], _folder_size(folder), source, fmt, found[1])
        if kind == "controlnet":
            entry.variant = controlnet_type(folder.name)
            entry.note = "" if entry.variant else "type unknown: name it with canny, depth or structure (cpds)"
        return entry
    if kind == "checkpoint" and _holds(folder, "model_index.json"):
        return _folder_checkpoint(folder.name, folder, _folder_size(folder), source)
    if kind == "vae" and _holds(folder, "config.json"):
        vae = read_json(folder / "config.json")
        if vae.get("_class_name") == "AutoencoderKL":
            if problem := wrong_latent_space(vae.get("latent_channels")):
                raise CorruptFile(f"model: {folder} {problem}")
            return Entry(kind, folder.name, str(folder), "any", _folder_size(folder), source, "diffusers")
    return None


def scan_folder(kind: str, root: Path, lib: Library, searched: set) -> None:
    """Add every item of ``kind`` under ``root`` to ``lib``; damaged files go to ``lib.problems``. ``searched``:
    the folders searched for this kind already (by identity), passed over: a folder configured twice, or one
    inside another configured folder, lists its files once."""
    if not root.is_dir() or not _first_visit(root, searched):
        return
    source = str(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        for d in sorted(dirnames):
            try:
                entry = _inspect_folder(kind, here / d, source)
            except ModelError as exc:  # a model folder, damaged: its files are its parts, not searched
                lib.skip(here / d, exc, kind)
                dirnames.remove(d)
                continue
            if entry is not None:
                lib.entries.append(entry)
                dirnames.remove(d)  # a model folder is not searched further
            elif _named_as_model_file(d):  # x.safetensors/: not passed over in silence (it is still searched)
                why = NO_INDEX if kind == "checkpoint" else "is a folder, not a model file"
                lib.skip(here / d, CorruptFile(f"model: {here / d} {why}"), kind)
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and _first_visit(here / d, searched)]
        for name in sorted(filenames):
            if not _named_as_model_file(name):
                continue
            try:
                lib.entries.append(_inspect_file(kind, here / name, source))
            except ModelError as exc:
                lib.skip(here / name, exc, kind)


def _named_as_model_file(name: str) -> bool:
    """Whether a name found in a model folder is a model file's (hidden ones are not searched)."""
    return name.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES) and not name.startswith(".")


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _first_visit(folder: Path, searched: set) -> bool:
    """Whether ``folder`` (through links) is not searched yet; it counts as searched from now on.
    A link back up the tree (``ln -s . all``) would otherwise be searched again and again."""
    identity = _identity(folder)
    if identity in searched:
        return False
    searched.add(identity)
    return True


def _hub_snapshots() -> list[tuple[str, Path, int]]:
    """(repo id, newest snapshot folder, size on disk) of the model repos in the local HF cache."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError, ValueError):  # no cache dir yet, an unreadable one, a ref not UTF-8
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        if repo.repo_type == "model" and revisions:
            out.append((repo.repo_id, Path(revisions[0].snapshot_path), repo.size_on_disk))
    return out


def _hub_entries(folders: bool, problems: list[str]) -> list[Entry]:
    """Cached diffusers repos (``folders``; one that cannot be read is added to ``problems``) or the single-file
    checkpoints at the root of cached repos."""
    out = []
    for repo_id, snapshot, size in _hub_snapshots():
        if folders and (snapshot / "model_index.json").is_file():
            try:
                out.append(_folder_checkpoint(repo_id, snapshot, size, "hf-cache"))
            except ModelError as exc:
                problems.append(f"{exc} (the Hugging Face cache's {repo_id})")
        elif not folders:
            for file in sorted(snapshot.glob("*.safetensors")):
                try:
                    out.append(_inspect_file("checkpoint", file, f"hf-cache:{repo_id}"))
                except ModelError:
                    continue  # a LoRA or VAE repo, or an unfinished download
    return out


def built_in_companions() -> list[Entry]:
    """The demo models' tiny companions (built offline by backend.engine.demo_companions on first use)."""

    def entry(kind: str, name: str, family: str, fmt: str, variant: str | None) -> Entry:
        return Entry(kind, name, "", family, 0, "built-in", fmt, variant)

    out = [entry("ip_adapter", "demo-image-encoder", "any", "transformers", "image_encoder"),
           entry("depth_model", "demo-depth-model", "any", "transformers", None),
           entry("captioner", "demo-captioner", "any", "transformers", "photo"),
           entry("captioner", "demo-tagger", "any", "transformers", "anime")]
    for family in DEMO_MODELS:
        out += [entry("ip_adapter", f"{family}-{t}", family, "safetensors", t) for t in ("image", "face")]
        out += [entry("controlnet", f"{family}-{t}", family, "diffusers", t) for t in ("canny", "depth", "structure")]
    return out


def discover(config=None, kinds: tuple[str, ...] = KINDS, hub: bool = True) -> Library:
    """Everything usable in the configured folders, plus the demo models and the HF cache's
    single-file checkpoints (and, with ``hub``, its diffusers repos)."""
    from backend import config as config_mod

    cfg = config or config_mod.load()
    lib = Library()
    if "checkpoint" in kinds:
        lib.entries += [Entry("checkpoint", n, "", n, 0, "built-in", "diffusers") for n in DEMO_MODELS]
    lib.entries += [e for e in built_in_companions() if e.kind in kinds]
    for kind in kinds:
        searched: set = set()
        for root in cfg.folders(FOLDER_OF_KIND[kind]):
            scan_folder(kind, root, lib, searched)
    if "checkpoint" in kinds:
        lib.entries += _hub_entries(False, lib.problems)
        if hub:
            lib.entries += _hub_entries(True, lib.problems)
    _qualify_names(lib.entries)
    for entry in lib.entries if not cfg.allow_pickle else ():
        entry.note = entry.note or (PICKLE_REFUSED if entry.format == "pickle" else "")  # a variant's note first
    return lib


def _qualify_names(entries: list[Entry]) -> None:
    """Make names unique per kind: a file of the Hugging Face cache that shares a name with one of the user's
    folders is named by its repo (``owner/repo/name``: a download must not take the name a config or a script
    uses); of two other files that share a name, the one named more briefly is named more fully (stem, then
    file name: ``loraevil.pt`` and ``loraevil.ckpt``, then its path)."""
    shared: dict[tuple[str, str], list[Entry]] = collections.defaultdict(list)
    for entry in entries:
        shared[entry.kind, entry.name].append(entry)
    for group in shared.values():
        if len(group) > 1 and not all(_repo_name(e) for e in group):
            for entry in (e for e in group if _repo_name(e)):
                entry.name = _repo_name(entry)
    levels = (lambda e: Path(e.path).stem, lambda e: Path(e.path).name, lambda e: e.path)
    level = {id(e): 0 for e in entries}
    while True:
        groups: dict[tuple[str, str], list[Entry]] = collections.defaultdict(list)
        for entry in entries:
            groups[entry.kind, entry.name].append(entry)
        clashes = [[e for e in group if e.path and level[id(e)] < len(levels) - 1]
                   for group in groups.values() if len(group) > 1]
        clashes = [group for group in clashes if group]
        if not clashes:
            return
        for group in clashes:
            lowest = min(level[id(e)] for e in group)
            for entry in (e for e in group if level[id(e)] == lowest):
                level[id(entry)] += 1
                entry.name = levels[level[id(entry)]](entry)


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` is an ``owner/name`` id the Hugging Face Hub allows (its own check, no network)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_cache_folder(repo_id: str) -> Path | None:
    """The newest cached snapshot of a hub repo, or None (no network used)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), unreadable; not a repo id (HFValidationError)
        return None


# A LoRA, VAE or embedding repo: the file (or folder) in its snapshot that holds the weights.
_HUB_WEIGHTS = ("pytorch_lora_weights.safetensors", "diffusion_pytorch_model.safetensors")


def _hub_entry(kind: str, repo_id: str) -> Entry | None:
    """A LoRA, VAE or embedding given by Hugging Face id, from the local cache (never downloaded here)."""
    folder = hub_cache_folder(repo_id)
    if folder is None:
        return None
    source = f"hf-cache:{repo_id}"
    if kind == "vae" and (entry := _inspect_folder(kind, folder, source)) is not None:
        entry.name = repo_id
        return entry
    named = [folder / name for name in _HUB_WEIGHTS if (folder / name).is_file()]
    weights = named or sorted(folder.glob("*.safetensors"))
    if len(weights) != 1:
        return None
    entry = _inspect_file(kind, weights[0], source)
    entry.name = repo_id
    return entry


def find(kind: str, name: str, config=None) -> Entry | None:
    """The item of ``kind`` called ``name`` (file stem, folder name, path or cached Hugging Face id), or None."""
    path = Path(os.path.expanduser(name))
    if os.path.isdir(path):  # os.path's tests read an unusable path (too long a name) as missing
        from backend.training.runs import run_output

        trained = run_output(path)  # a DreamBooth run dir: its LoRA file (--lora RUN_DIR)
        if trained is not None and trained[0] == kind:
            return _inspect_file(kind, trained[1], "path")
        return _inspect_folder(kind, path, "path")
    if os.path.isfile(path):
        return _inspect_file(kind, path, "path")
    lib = discover(config, kinds=(kind,), hub=False)
    matches = [e for e in lib.of_kind(kind) if e.name == name] or [
        e for e in lib.of_kind(kind) if e.name.lower() == name.lower()
    ] or [e for e in lib.of_kind(kind) if e.path and Path(e.path).name == name] or [  # "x.safetensors" for "x"
        e for e in lib.of_kind(kind) if _repo_name(e) == name]  # the name a clash gave it, kept once there is none
    same_stem = [e.name for e in lib.of_kind(kind) if e.path and Path(e.path).stem == name]
    if not matches and len(same_stem) > 1:
        raise ModelError(f"model: {name} is ambiguous: {', '.join(same_stem)}; give one of these names")
    if not matches:
        bad = lib.skipped.get(name)
        if bad:
            raise CorruptFile(bad)
        return _hub_entry(kind, name) if kind != "checkpoint" and looks_like_hub_id(name) else None
    return matches[0]


def _repo_name(entry: Entry) -> str | None:
    """``owner/repo/stem`` of a single file of the Hugging Face cache (the name :func:`_qualify_names` gives it in a
    clash), else None."""
    repo = entry.source.removeprefix("hf-cache:")
    return f"{repo}/{Path(entry.path).stem}" if repo != entry.source and entry.path else None


def names(kind: str, config=None) -> list[str]:
    return [e.name for e in discover(config, kinds=(kind,), hub=False).of_kind(kind)]


# -- short file hashes ------------------------------------------------------------
def _hash_cache_file() -> Path:
    return locations.cache_dir() / "file-hashes.json"


def short_hash(path: str | Path) -> str:
    """First 10 hex digits of the file's SHA-256 (A1111's and Civitai's "AutoV2")."""
    return _cached_hash(path, "", lambda p: user_files.file_sha256(p)[:10])


def lora_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA (its ``Lora hashes`` field; Civitai's "AutoV3"): 12 hex digits of the
    SHA-256 that kohya-ss's trainer stores as ``sshs_model_hash``, else of a .safetensors file's bytes after
    its header (kohya-ss's "addnet" hash, so edited metadata does not change it), else of the whole file."""

    def compute(p: Path) -> str:
        if p.suffix.lower() != ".safetensors":
            return user_files.file_sha256(p)[:12]
        stored = read_safetensors_header(p)[1].get("sshs_model_hash", "").lower()
        if re.fullmatch(r"[0-9a-f]{12,64}", stored):
            return stored[:12]
        with user_files.open_regular(p) as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
        return user_files.file_sha256(p, start=8 + length)[:12]

    return _cached_hash(path, "lora:", compute)


def _cached_hash(path: str | Path, prefix: str, compute) -> str:
    """``compute(path)``, cached by (path, size, mtime) in the user cache dir, so a large file is read once. A
    cache that does not read as that (damaged, or written by hand) is read past: the hash is computed again."""
    path = Path(path).resolve()
    st = path.stat()
    key = prefix + str(path)
    stamp = [st.st_size, st.st_mtime_ns]
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError, RecursionError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    hit = cache.get(key)
    if isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp and _is_hex(hit[2]):
        return hit[2]
    value = compute(path)
    cache[key] = [*stamp, value]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with user_files.replacing(cache_file) as tmp:
            tmp.write_text(json.dumps(cache))
    except OSError:
        pass  # the hash is still right; only the cache is lost
    return value


def _is_hex(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{10,12}", value) is not None


def folder_hash(folder: str | Path) -> str:
    """Short hash of a diffusers folder: over its weight files' short hashes."""
    files = sorted(Path(folder).rglob("*.safetensors"))
    joined = "".join(f"{p.relative_to(folder).as_posix()}:{short_hash(p)};" for p in files)
    return hashlib.sha256(joined.encode()).hexdigest()[:10]
