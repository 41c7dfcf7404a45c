"""Load pipelines for a :class:`~backend.models.ModelRef` and keep them resident (LRU).

Single-file checkpoints load fully offline: diffusers' ``from_single_file``
gets a local config folder (``backend/model_configs/<family>``: model_index,
scheduler, unet, vae and text-encoder configs written from the public SD 1.5,
SD 2.1(-base), SDXL base and refiner configs) plus CLIP tokenizers built from
the shipped BPE vocabulary, so it never looks for anything on the Hub.
``DREAMTTY_MODEL_CONFIGS`` points at another root with ``<family>/`` folders
(a folder may hold its own ``tokenizer``/``tokenizer_2``); the tests use it for
tiny models. Pickled checkpoints load only with ``--allow-pickle``, and then
through diffusers' ``torch.load(weights_only=True)``; one holding an object that
refuses is said to, before the load.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from backend.engine.pipeline import attach
from backend.errors import ModelError
from backend.families import FAMILIES
from backend.library import PICKLE_SUFFIXES, non_tensor_error, read_safetensors_header
from backend.models import ModelRef, family_from_folder, pickle_allowed
from backend.safetext import first_line

CONFIGS_ENV = "DREAMTTY_MODEL_CONFIGS"
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 on CPU unless asked otherwise."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _pipeline_class(family: str, variant: str | None = None):
    import diffusers

    if family == "sdxl-refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline
    xl = FAMILIES[family].xl
    if variant == "inpaint":  # a dedicated inpainting model: its UNet also takes the mask and the masked image
        return diffusers.StableDiffusionXLInpaintPipeline if xl else diffusers.StableDiffusionInpaintPipeline
    return diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline


def family_config(family: str) -> Path:
    """The diffusers-layout config folder used to load a single-file checkpoint of ``family``."""
    root = Path(os.environ.get(CONFIGS_ENV) or SHIPPED_CONFIGS)
    folder = root / family
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"model: no config for the {family} family in {root}")
    return folder


def _tokenizers(folder: Path, family: str) -> dict:
    """CLIP tokenizers for the components the config folder lists but does not hold."""
    from backend.engine.clip_tokenizer import clip_tokenizer
    from backend.engine.demo_models import EOS

    index = _read_index(folder)
    # SD1 and SDXL's first tokenizer pad with the end token; SD2 and SDXL's second with "!" (OpenCLIP).
    pads = {"tokenizer": "!" if family.startswith("sd2") else EOS, "tokenizer_2": "!"}
    return {
        name: clip_tokenizer(pad)
        for name, pad in pads.items()
        if (index.get(name) or [None])[0] is not None and not (folder / name).is_dir()
    }


def _read_index(folder: Path) -> dict:
    import json

    return json.loads((folder / "model_index.json").read_text())


def _check_file(ref: ModelRef) -> Path:
    path = Path(ref.location)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not pickle_allowed():
            raise ModelError(f"model: {path.name} is a pickle; refused without --allow-pickle")
        unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
        refused = unsafe(path) if unsafe else []  # read, never run (older torch: the load itself refuses)
        if refused:
            raise non_tensor_error(path, refused[0])
    else:
        read_safetensors_header(path)  # raises a one-line error for a truncated or corrupt file
    return path


def _from_single_file(ref: ModelRef, dtype: torch.dtype, extra: dict):
    path = _check_file(ref)
    folder = family_config(ref.family)
    cls = _pipeline_class(ref.family, ref.variant)
    if ref.variant == "inpaint":  # the family's config describes a 4-channel UNet
        from diffusers import UNet2DConditionModel

        extra = {**extra, "unet": UNet2DConditionModel.from_single_file(
            str(path), config=str(folder), subfolder="unet", local_files_only=True, dtype=dtype, in_channels=9)}
    return cls.from_single_file(
        str(path), config=str(folder), local_files_only=True, dtype=dtype, **_tokenizers(folder, ref.family), **extra
    )


def local_folder(ref: ModelRef) -> Path | None:
    """The model's diffusers folder on this machine (a demo built, a hub repo fetched); None for a single file."""
    if ref.kind == "file":
        return None
    if ref.kind == "demo":
        from backend.engine.demo_models import ensure_demo

        return ensure_demo(ref.location)
    if ref.kind == "folder":
        return Path(ref.location)
    from huggingface_hub import snapshot_download

    from backend.downloads import DIFFUSERS_PATTERNS, EXCLUDED_FOLDERS, hub_error

    try:  # only the files a diffusers folder needs, never the repo's single-file or variant weights
        return Path(snapshot_download(
            ref.location, allow_patterns=list(DIFFUSERS_PATTERNS), ignore_patterns=[f"{d}*" for d in EXCLUDED_FOLDERS]
        ))
    except Exception as exc:  # offline, unknown repo, gated...
        raise hub_error(ref.location, exc, "model") from None


def load_pipeline(ref: ModelRef, device: torch.device, dtype: torch.dtype):
    """Load a diffusers pipeline from local files only; errors become ModelError."""
    folder = local_folder(ref)
    family = ref.family if folder is None else family_from_folder(folder)
    extra = {} if FAMILIES[family].xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        if folder is None:
            pipe = _from_single_file(ref, dtype, extra)
        else:
            pipe = _pipeline_class(family, ref.variant).from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model: cannot load {ref.name}: {first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    attach(pipe, family)
    return pipe


class PipelineCache:
    """Keeps up to ``capacity`` pipelines loaded, evicting the least recently used."""

    def __init__(self, device: torch.device, capacity: int = 2) -> None:
        from backend.engine.fast import CompileCache

        self.device = device
        self.capacity = capacity
        self.loads = 0  # pipelines loaded since this cache was made
        self._pipes: OrderedDict[tuple, object] = OrderedDict()
        self._names: dict[tuple, str] = {}
        self.compiled = CompileCache()  # compiled artifacts of fast pipelines, on disk

    def get(self, ref: ModelRef, dtype: torch.dtype, speed: str = "default"):
        """The pipeline of ``ref`` in ``dtype``; ``speed`` "fast" or "fastest" (CUDA) is a compiled one, kept
        apart."""
        key = (ref.kind, ref.location, dtype, speed)
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        while len(self._pipes) >= self.capacity:
            self.evict_oldest()
        pipe = load_pipeline(ref, self.device, dtype)
        if speed != "default":
            from backend.engine.fast import make_fast

            make_fast(pipe, speed)
        self._pipes[key] = pipe
        self._names[key] = ref.name
        self.loads += 1
        return pipe

    def loaded(self) -> list[dict]:
        """The pipelines held, oldest first: model name, dtype and the bytes of their weights."""
        return [{"model": self._names[key], "dtype": str(key[2]).removeprefix("torch."), "bytes": _weight_bytes(pipe)}
                for key, pipe in self._pipes.items()]

    def evict_oldest(self) -> bool:
        if not self._pipes:
            return False
        key, _ = self._pipes.popitem(last=False)
        del self._names[key]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True


def _weight_bytes(pipe) -> int:
    """Bytes of the parameters and buffers of the pipeline's torch modules."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
