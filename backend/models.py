"""Resolve a ``--model`` value to something a worker can load, without torch.

Accepted: ``demo``, ``demo-xl``, a diffusers folder, a single-file checkpoint
(``.safetensors``; pickles only with ``--allow-pickle``) given by path or by
its name in the configured checkpoint folders, or a Hugging Face model id
(used from the local cache; downloaded when the network allows).
The family is read from the folder's JSON configs or the file's tensor names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from backend.errors import ModelError
from backend.families import MODEL_NAMES
from backend.library import (DEMO_MODELS, NO_INDEX, PICKLE_SUFFIXES, SAFE_SUFFIXES, checkpoint_family,
                             family_from_folder, find, folder_variant, hub_cache_folder, looks_like_hub_id, read_json,
                             read_shapes, relabel)
from backend.values import absolute


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the user typed
    kind: str  # "demo" | "folder" | "file" | "hub"
    location: str  # demo name, folder or file path, or hub id
    family: str
    variant: str | None = None  # "inpaint" for a dedicated inpainting model (9 UNet input channels)


def pickle_allowed() -> bool:
    from backend.config import load

    return load().allow_pickle


def _check_variant(ref: ModelRef, variants: tuple[str, ...]) -> ModelRef:
    if ref.variant and ref.variant not in variants:
        what = "inpaint and outpaint" if ref.variant == "inpaint" else "nothing in dreamtty"
        article = "an" if ref.variant[0] in "aeiou" else "a"
        raise ModelError(f"model: {Path(ref.location).name} is {article} {ref.variant} checkpoint, for {what}; "
                         "use a regular one for this job")
    return ref


def _file_ref(name: str, path: Path) -> ModelRef:
    """A single-file checkpoint: inspected (never executed) to find its family."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not pickle_allowed():
        raise ModelError(
            f"model: {path.name} is a pickle ({suffix}), which can run arbitrary code when loaded; "
            "use a .safetensors file, or pass --allow-pickle if you trust it (loaded with torch.load(weights_only=True))"
        )
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelError(f"model: {name} is a file but not a checkpoint; use .safetensors or a diffusers folder")
    shapes, meta = read_shapes(path)
    found = checkpoint_family(path, shapes, meta)
    if found is None:
        raise ModelError(f"model: {path.name} is not a Stable Diffusion checkpoint (it may be a LoRA, VAE or embedding)")
    family, variant = found
    if family == "unknown":
        raise ModelError(f"model: {path.name}: cannot tell the model family (SD1, SD2, SDXL) from its tensors")
    return ModelRef(name, "file", str(path.resolve()), family, variant)


def _library_ref(name: str) -> ModelRef | None:
    """A checkpoint found by name in the configured checkpoint folders."""
    entry = find("checkpoint", name)
    if entry is None:
        return None
    if entry.name in DEMO_MODELS and entry.source == "built-in":  # "DEMO": names match case-insensitively
        return _resolve(entry.name)
    if entry.format == "diffusers":
        return ModelRef(name, "folder", entry.path, entry.family, entry.variant)
    return _file_ref(name, Path(entry.path))


def trained_model(run_dir: Path) -> Path | None:
    """The diffusers folder a full DreamBooth run wrote (``--model RUN_DIR``), if ``run_dir`` is one."""
    from backend.training.runs import run_output

    out = run_output(run_dir)
    return out[1] if out is not None and out[0] == "model" else None


def run_folder_hint(name: str) -> str | None:
    """What a DreamBooth run's folder, or a checkpoint of one, holds and which flag takes its result, for a
    folder that a ``--model`` or ``--lora`` lookup did not take; None for any other folder."""
    from backend.training import runs

    path = Path(os.path.expanduser(name))
    if os.path.isfile(path / runs.STATE_FILE):
        run_dir = runs.run_holding(path)
        if run_dir is None:
            return f"{name} is a training checkpoint, not a result"
        what = f"a training checkpoint, not a result (of the run {run_dir})"
    elif runs.is_run_dir(path):
        run_dir, what = path, "a training run"
    else:
        return None
    result = runs.run_output(run_dir)
    if result is not None:
        kind = "a full fine-tune" if result[0] == "model" else "a LoRA"
        return f"{name} is {what}; its result is {kind}: use --{result[0]} {run_dir}"
    data = runs.read_run_json(run_dir)
    state, _ = runs.effective_state(run_dir, data)
    at = f" at step {data['step']}" if "step" in data else ""
    todo = ("wait for it to finish" if state in (*runs.LIVE_STATES, runs.WAITING)
            else f"finish it with: dreamtty train --output {run_dir} --resume latest")
    return f"{name} is {what} with no result yet ({state}{at}); {todo}"


def absolute_model(name: str) -> str:
    """``name`` made absolute where it is a path here (``resolve_model`` reads it as one first), else as it is (a
    demo, library or Hub name): for a process that runs in another folder, as a training run's trainer does."""
    if name in DEMO_MODELS or not os.path.exists(os.path.expanduser(name)):
        return name
    return absolute(name)


def resolve_model(name: str, field: str = "model", variants: tuple[str, ...] = ()) -> ModelRef:
    """Map a model name to a :class:`ModelRef`, or raise a one-line ModelError starting with ``field``
    (the request field that named it, e.g. ``refiner``). A checkpoint variant (an inpainting model)
    is refused unless ``variants`` names it."""
    try:
        return _check_variant(_resolve(name), variants)
    except ModelError as exc:
        raise relabel(exc, field) from None


def text_encoder_depth(ref: ModelRef) -> int | None:
    """Layers of the model's shallowest text encoder, read from its configs without loading it
    (diffusers folders and built demo models); None when that cannot be told here, ModelError when a
    config cannot be read (a FIFO is refused unread)."""
    from backend import locations

    folder = {"folder": Path(ref.location), "demo": locations.demo_models_dir() / ref.location}.get(ref.kind)
    if folder is None:
        return None
    depths = []
    for config in sorted(folder.glob("text_encoder*/config.json")):
        try:
            depths.append(int(read_json(config)["num_hidden_layers"]))
        except (ValueError, KeyError, TypeError):
            return None
    return min(depths) if depths else None


def refiner_error(name: str) -> ModelError:
    """The error for an SDXL refiner named as the model: it only refines an SDXL base model's image."""
    return ModelError(f"model: {name} is an SDXL refiner; use it with --refiner on an SDXL base model")


def _resolve(name: str) -> ModelRef:
    name = (name or "").strip()
    if not name:
        raise ModelError(f"model: empty; use {MODEL_NAMES}")
    if name in DEMO_MODELS:
        return ModelRef(name, "demo", name, name)
    path = Path(os.path.expanduser(name))
    if os.path.exists(path):  # os.path's tests read an unusable path (too long a name) as missing
        if not os.path.isdir(path):
            return _file_ref(name, path)
        trained = trained_model(path)
        if trained is not None:
            path = trained
        elif not (path / "model_index.json").exists():
            hint = run_folder_hint(name) or f"{name} {NO_INDEX}"
            raise ModelError(f"model: {hint}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelError(f"model: {name} is not readable")
        return ModelRef(name, "folder", str(path.resolve()), family_from_folder(path), folder_variant(path))
    found = _library_ref(name)
    if found is not None:
        return found
    if looks_like_hub_id(name):
        cached = hub_cache_folder(name)
        if cached is not None:
            files = sorted(p.stem for p in cached.glob("*.safetensors"))
            if files and not (cached / "model_index.json").exists():  # pulled with --file: no diffusers folder
                raise ModelError(f"model: {name} is cached as single files, not a diffusers folder; use one by its "
                                 f"name: {', '.join(f'{name}/{stem}' for stem in files[:5])}")  # never another's
            return ModelRef(name, "hub", name, family_from_folder(cached), folder_variant(cached))
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise ModelError(
                f"model: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"get it where the network allows with: dreamtty models pull {name}"
            )
        return ModelRef(name, "hub", name, "unknown")
    raise ModelError(f"model: {name} does not exist; use {MODEL_NAMES}")
