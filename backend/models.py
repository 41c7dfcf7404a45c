"""Resolve a ``--model`` value to something a worker can load, without torch.

Accepted: ``demo``, ``demo-xl``, a diffusers folder, or a Hugging Face model
id (used from the local cache; downloaded when the network allows).
The family is read from the folder's JSON configs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from backend.errors import ModelError

DEMO_MODELS = ("demo", "demo-xl")


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the user typed
    kind: str  # "demo" | "folder" | "hub"
    location: str  # demo name, folder path or hub id
    family: str


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model: cannot read {path}: {exc}") from None


def family_from_folder(folder: Path) -> str:
    """Detect SD1 / SD2 / SD2-v / SDXL / SDXL-refiner from a diffusers folder."""
    index = _read_json(folder / "model_index.json")
    if (folder / "dreamtty_demo.json").exists():
        return _read_json(folder / "dreamtty_demo.json")["family"]
    cls = index.get("_class_name", "")
    if "XL" in cls:
        return "sdxl-refiner" if index.get("text_encoder", [None])[0] is None else "sdxl"
    unet = _read_json(folder / "unet" / "config.json")
    if unet.get("cross_attention_dim") == 1024:
        sched = folder / "scheduler" / "scheduler_config.json"
        pred = _read_json(sched).get("prediction_type") if sched.exists() else None
        return "sd2-v" if pred == "v_prediction" else "sd2"
    return "sd1"


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _hub_cache_folder(repo_id: str) -> Path | None:
    """The newest cached snapshot of a hub repo, or None (no network used)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def resolve_model(name: str) -> ModelRef:
    """Map a model name to a :class:`ModelRef`, or raise a one-line ModelError."""
    name = (name or "").strip()
    if not name:
        raise ModelError("model: empty; use demo, demo-xl, a diffusers folder or a Hugging Face id")
    if name in DEMO_MODELS:
        return ModelRef(name, "demo", name, name)
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model: {name} is a file; use a diffusers folder (with model_index.json)")
        if not (path / "model_index.json").exists():
            raise ModelError(f"model: {name} has no model_index.json; it is not a diffusers folder")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelError(f"model: {name} is not readable")
        return ModelRef(name, "folder", str(path.resolve()), family_from_folder(path))
    if _looks_like_hub_id(name):
        cached = _hub_cache_folder(name)
        if cached is not None:
            return ModelRef(name, "hub", name, family_from_folder(cached))
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise ModelError(
                f"model: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it where the network allows (dreamtty models pull)"
            )
        return ModelRef(name, "hub", name, "unknown")
    raise ModelError(f"model: {name} does not exist; use demo, demo-xl, a diffusers folder or a Hugging Face id")
