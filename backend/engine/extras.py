"""Per-request extras on a loaded pipeline: LoRAs, textual-inversion embeddings, a VAE override, a refiner,
image prompts.

``apply_extras`` runs in the worker after the pipeline cache hands out the
base pipeline. It changes only what the request asks for, so the base model
is never reloaded:

- LoRAs (up to 5, ``--lora NAME[:W]`` or ``<lora:NAME:W>`` in the prompt) load
  once per file through diffusers' PEFT integration; their weights switch with
  ``set_adapters``; adapters the request does not name are deleted.
- Embeddings load when their name appears in the prompt or negative prompt
  (A1111 and diffusers formats; SDXL files carry ``clip_l`` and ``clip_g`` for
  the two encoders) and stay loaded.
- ``--vae`` swaps the VAE; a later request without it gets the model's own back.
- ``--refiner`` loads the refiner through the same cache (see ``refiner.py``).
- ``--image-prompt`` references load their IP-Adapters and ControlNets (see ``image_prompt.py``).

What was applied, with short file hashes, is left in ``pipe.dreamtty.extras``
and saved in each image's metadata; an image records the loaded embeddings its
own prompts name (``embedding_records``), so the images of one batch, whose
prompts differ, each record theirs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from backend import config as config_mod
from backend import library
from backend.errors import ModelError, RequestError
from backend.extras_check import check_refiner, effective_request, find_extra, same_family
from backend.models import refiner_error
from backend.request import GenerateRequest
from backend.safetext import first_line


def load_weights(entry: library.Entry) -> dict:
    """A library file's tensors (a pickle through ``torch.load(weights_only=True)``: allowed by the caller)."""
    if entry.format == "pickle":
        return torch.load(entry.path, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    return load_file(entry.path)


# -- LoRAs --------------------------------------------------------------------------
def _apply_loras(pipe, loras: list[tuple[str, float]], cfg) -> list[dict]:
    loaded: dict[str, str] = pipe.dreamtty.loras  # adapter -> path
    wanted: list[tuple[str, float]] = []
    records = []
    for name, weight in loras:
        entry = find_extra("lora", name, cfg)
        same_family("lora", name, entry.family, pipe.dreamtty.family)
        digest = library.short_hash(entry.path)
        adapter = f"{re.sub(r'[^0-9A-Za-z_]', '_', entry.name)}_{digest}"
        if adapter not in loaded:
            path = Path(entry.path)
            try:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
            except Exception as exc:
                raise ModelError(f"lora: cannot load {name}: {_load_fault(exc)}") from None
            if not any(adapter in names for names in pipe.get_list_adapters().values()):  # diffusers only warns
                raise ModelError(f"lora: cannot load {name}: none of its weights names a layer of this model (keys "
                                 "of another tool's format, or a LoRA for another kind of model)")
            loaded[adapter] = entry.path
        wanted.append((adapter, weight))
        records.append({"name": entry.name, "weight": weight, "hash": digest, "a1111_hash": library.lora_hash(entry.path)})
    if not wanted:
        if loaded:
            pipe.unload_lora_weights()
            loaded.clear()
        return []
    stale = [a for a in loaded if a not in dict(wanted)]
    if stale:
        pipe.delete_adapters(stale)
        for a in stale:
            del loaded[a]
    pipe.set_adapters([a for a, _ in wanted], [w for _, w in wanted])
    return records


# -- textual-inversion embeddings -------------------------------------------------------
def _mentioned(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def embedding_records(pipe, text: str) -> list[dict]:
    """The embeddings loaded on ``pipe`` that ``text`` names, with their short hashes (an image's metadata)."""
    return [{"name": name, "hash": digest} for name, digest in sorted(pipe.dreamtty.embeddings.items())
            if _mentioned(name, text)]


def _load_embeddings(pipe, request: GenerateRequest, cfg) -> None:
    text = f"{request.prompt}\n{request.negative_prompt}"
    loaded: dict[str, str] = pipe.dreamtty.embeddings  # token -> hash
    lib = library.discover(cfg, kinds=("embedding",), hub=False)
    for entry in lib.of_kind("embedding"):
        if not _mentioned(entry.name, text):
            continue
        if entry.format == "pickle" and not cfg.allow_pickle:
            raise RequestError("embedding", f"{entry.name} is a pickle; refused without --allow-pickle")
        same_family("embedding", entry.name, entry.family, pipe.dreamtty.family)
        digest = library.short_hash(entry.path)
        if loaded.get(entry.name) != digest:
            if entry.name in loaded:
                pipe.unload_textual_inversion(entry.name)
            _load_embedding(pipe, entry)
            loaded[entry.name] = digest


def _load_embedding(pipe, entry: library.Entry) -> None:
    state = load_weights(entry)
    try:
        if "clip_l" in state and "clip_g" in state:
            if getattr(pipe, "text_encoder_2", None) is None:
                raise ValueError("an SDXL embedding needs an SDXL model")
            pipe.load_textual_inversion(state["clip_l"], token=entry.name, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=entry.name, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            _check_width(state, pipe.text_encoder)
            pipe.load_textual_inversion(state, token=entry.name)
    except Exception as exc:
        raise ModelError(f"embedding: cannot load {entry.name}: {_load_fault(exc)}") from None


def _check_width(state: dict, text_encoder) -> None:
    """ValueError unless the vectors in ``state`` are as wide as ``text_encoder``'s token embeddings (diffusers'
    own message for this shows its unfilled ``{...}`` placeholders)."""
    width = text_encoder.get_input_embeddings().weight.shape[-1]
    widths = {int(t.shape[-1]) for t in state.values() if isinstance(t, torch.Tensor) and t.ndim}
    if widths and width not in widths:
        raise ValueError(f"its vectors are {', '.join(map(str, sorted(widths)))} wide, and this model's text encoder "
                         f"takes {width} (an embedding for another model family)")


def _load_fault(exc: BaseException) -> str:
    """Why a LoRA or embedding file did not load, in a line: a KeyError is a tensor the loader looked for."""
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    if isinstance(key, str) and key.endswith((".weight", ".bias", ".alpha")):  # a tensor's name, not a config key
        return f"it has no tensor {key} (a damaged file, or one made for another tool)"
    if "size mismatch for " in str(exc):  # torch's load_state_dict: its first line says only that it failed
        return "its weights' sizes do not fit this model's layers (a LoRA made for another model or family)"
    if isinstance(exc, IndexError) or "not found in the base model" in str(exc):  # peft's, listing every layer
        return "it names layers this model does not have (a LoRA made for a larger model or another family)"
    return first_line(exc)


# -- VAE override -------------------------------------------------------------------------
def _apply_vae(pipe, name: str | None, cfg) -> dict | None:
    if pipe.dreamtty.model_vae is None:
        pipe.dreamtty.model_vae = pipe.vae
    original = pipe.dreamtty.model_vae
    if not name:
        if pipe.vae is not original:
            pipe.vae = original
            pipe.dreamtty.vae_key = None
        return None
    entry = find_extra("vae", name, cfg)
    digest = library.folder_hash(entry.path) if entry.format == "diffusers" else library.short_hash(entry.path)
    if pipe.dreamtty.vae_key != (entry.path, digest):
        vae = _load_vae(entry, original)
        pipe.vae = vae.to(device=original.device, dtype=original.dtype)
        pipe.dreamtty.vae_key = (entry.path, digest)
    return {"name": entry.name, "hash": digest}


def _load_vae(entry: library.Entry, original):
    """A VAE from a diffusers folder, or from a file in either layout using the model's VAE config.

    SDXL's VAE overflows in fp16, so its config asks for an fp32 decode
    (``force_upcast``); a file named like the community "fp16-fix" VAE is
    trusted to decode in fp16.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        if entry.format == "diffusers":
            return AutoencoderKL.from_pretrained(entry.path, local_files_only=True)
        state = load_weights(entry)
        state = {k.removeprefix("vae."): v for k, v in state.items()}
        if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
            state = convert_ldm_vae_checkpoint(state, dict(original.config))
        fixed = re.search(r"fp16.?fix", entry.name, re.I) is not None
        vae = AutoencoderKL.from_config(original.config, force_upcast=bool(original.config.force_upcast) and not fixed)
        vae.load_state_dict(state, strict=True)
        return vae
    except Exception as exc:
        raise ModelError(f"vae: cannot load {entry.name}: {first_line(exc)}") from None


# -- refiner -----------------------------------------------------------------------------
def _model_hash(ref) -> str | None:
    if ref.kind == "file":
        return library.short_hash(ref.location)
    if ref.kind == "folder":
        return library.folder_hash(ref.location)
    return None


def _load_refiner(pipe, request: GenerateRequest, cache) -> dict | None:
    pipe.dreamtty.refiner = None
    if not request.refiner:
        return None
    from backend.models import resolve_model

    ref = resolve_model(request.refiner, "refiner")
    if cache is None:
        raise ModelError("refiner: no pipeline cache to load it with")
    check_refiner(request.refiner, ref.family, pipe.dreamtty.family)
    pipe.dreamtty.refiner = cache.get(ref, pipe.unet.dtype)
    return {"name": request.refiner, "switch": request.refiner_switch, "hash": _model_hash(ref)}


def apply_extras(pipe, request: GenerateRequest, cache=None, on_preview=None, note=None) -> GenerateRequest:
    """Apply the request's LoRAs, embeddings, VAE, refiner and image prompts to ``pipe``; returns the effective
    request. ``on_preview(label, image)`` gets each image prompt's preprocessed map, ``note`` a line for people."""
    from backend.engine.image_prompt import apply_image_prompts

    if pipe.dreamtty.family == "sdxl-refiner":
        raise refiner_error(request.model)
    cfg = config_mod.load()
    request = effective_request(request)
    _load_embeddings(pipe, request, cfg)
    extras = {
        "loras": _apply_loras(pipe, request.loras, cfg),
        "vae": _apply_vae(pipe, request.vae, cfg),
        "refiner": _load_refiner(pipe, request, cache),
        "image_prompts": apply_image_prompts(pipe, request, on_preview, note),
    }
    pipe.dreamtty.extras = {k: v for k, v in extras.items() if v}
    return request
