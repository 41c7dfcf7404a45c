"""IP-Adapters on a loaded pipeline, through diffusers' ``load_ip_adapter`` / ``set_ip_adapter_scale``.

Each ``image`` or ``face`` reference gets its own adapter slot (the same file may fill several), so each
has its own weight and stop. The slots stay loaded while the next job asks for the same ones and are
unloaded (``unload_ip_adapter``) when it asks for others or none. diffusers' IP-Adapter attention skips
a slot whose scale is 0, so a reference past its stop costs nothing and changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from backend.engine.pipeline import execution_device
from backend.errors import ModelError
from backend.safetext import first_line

AdapterFiles = tuple[tuple[str, str], ...]  # per slot: (adapter file, image encoder folder)


def nested(flat: dict[str, torch.Tensor]) -> dict:
    """IP-Adapter weights as ``load_ip_adapter`` takes them: {"image_proj": {...}, "ip_adapter": {...}}."""
    return {part: {k.removeprefix(f"{part}."): v for k, v in flat.items() if k.startswith(f"{part}.")}
            for part in ("image_proj", "ip_adapter")}


def _state_dict(path: str) -> dict:
    if Path(path).suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return nested(load_file(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # a .bin (nested already): --allow-pickle only


def load_adapters(pipe, slots: AdapterFiles) -> None:
    """Make ``pipe``'s adapter slots exactly ``slots`` (none: unloaded). ModelError when they cannot load."""
    if pipe.dreamtty.ip_slots == slots:
        return
    if pipe.dreamtty.ip_slots:
        pipe.unload_ip_adapter()
    pipe.dreamtty.ip_slots = ()
    if not slots:
        return
    encoders = sorted({encoder for _, encoder in slots})
    if len(encoders) > 1:
        raise ModelError(f"image_prompt: these IP-Adapters need different image encoders ({', '.join(encoders)}); "
                         "use references whose adapters share one")
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(encoders[0], local_files_only=True,
                                                                dtype=pipe.unet.dtype).to(execution_device(pipe))
        size = encoder.config.image_size
        pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
        n = len(slots)
        pipe.load_ip_adapter([_state_dict(adapter) for adapter, _ in slots], subfolder=[""] * n, weight_name=[""] * n,
                             image_encoder_folder=None)
    except Exception as exc:
        try:  # a load that failed half way leaves adapter attention in the UNet: take it out
            pipe.unload_ip_adapter()
        except Exception:  # nothing was installed
            pass
        raise ModelError(f"image_prompt: cannot load the IP-Adapter {Path(slots[0][0]).name}: {first_line(exc)}") \
            from None
    pipe.dreamtty.ip_slots = slots


def image_embeds(pipe, images: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(positive, negative) image embeddings per slot, one reference image each, as diffusers makes them (the
    negative: a "plus" adapter's encoding of a black image, a plain adapter's zeros)."""
    both = pipe.prepare_ip_adapter_image_embeds(images, None, execution_device(pipe), 1, True)
    negative, positive = zip(*(embeds.chunk(2) for embeds in both))
    return list(positive), list(negative)


def set_scales(pipe, scales: list[float]) -> None:
    """Each slot's scale for the next UNet calls (0 = off)."""
    pipe.set_ip_adapter_scale(list(scales))
