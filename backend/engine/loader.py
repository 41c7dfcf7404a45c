"""Load pipelines for a :class:`~backend.models.ModelRef` and keep them resident (LRU)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from backend.errors import ModelError
from backend.families import FAMILIES
from backend.models import ModelRef, family_from_folder

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 on CPU unless asked otherwise."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if FAMILIES[family].xl else StableDiffusionPipeline


def _folder_for(ref: ModelRef) -> Path:
    if ref.kind == "demo":
        from backend.engine.demo_models import ensure_demo

        return ensure_demo(ref.location)
    if ref.kind == "folder":
        return Path(ref.location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref.location, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated...
        raise ModelError(f"model: cannot fetch {ref.location} from Hugging Face: {type(exc).__name__}: {exc}") from None


def load_pipeline(ref: ModelRef, device: torch.device, dtype: torch.dtype):
    """Load a diffusers pipeline from local files only; errors become ModelError."""
    folder = _folder_for(ref)
    family = family_from_folder(folder)
    cls = _pipeline_class(family)
    extra = {} if FAMILIES[family].xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"model: cannot load {ref.name}: {msg[:300]}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.dreamtty_family = family
    pipe.dreamtty_scheduler_config = dict(pipe.scheduler.config)
    return pipe


class PipelineCache:
    """Keeps up to ``capacity`` pipelines loaded, evicting the least recently used."""

    def __init__(self, device: torch.device, capacity: int = 2) -> None:
        self.device = device
        self.capacity = capacity
        self._pipes: OrderedDict[tuple, object] = OrderedDict()

    def get(self, ref: ModelRef, dtype: torch.dtype):
        key = (ref.kind, ref.location, dtype)
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        while len(self._pipes) >= self.capacity:
            self.evict_oldest()
        pipe = load_pipeline(ref, self.device, dtype)
        self._pipes[key] = pipe
        return pipe

    def evict_oldest(self) -> bool:
        if not self._pipes:
            return False
        self._pipes.popitem(last=False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True
