"""Describe: an image turned into a prompt by a captioner from transformers.

- ``photo``: a BLIP captioning model (``BlipForConditionalGeneration``), greedy decoding of at most
  75 new tokens (or the model's own ``max_new_tokens``), as Fooocus uses BLIP (at its processor's own
  size: 384 px for the usual model);
- ``anime``: an image-classifier tagger (WD-style, e.g. a SwinV2 tagger converted to transformers):
  the picture padded to a white square, resized to the model's input size, scaled to -1..1; each tag
  whose sigmoid score reaches 0.35 (Fooocus's threshold for general tags), best first, without the
  rating labels, underscores written as spaces.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from backend import companions, library
from backend.jobkinds.describe import DescribeRequest

MAX_CAPTION_TOKENS = 75
TAG_THRESHOLD = 0.35
RATINGS = {"general", "sensitive", "questionable", "explicit"}


@lru_cache(maxsize=2)
def _load(kind: str, folder: str, device: str):
    from transformers import AutoModelForImageClassification, BlipForConditionalGeneration, BlipProcessor

    if kind == "photo":
        processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
        return processor, BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).to(device).eval()
    return None, AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).to(device).eval()


def caption(image: Image.Image, folder: str, device: torch.device) -> str:
    """A BLIP caption of ``image``."""
    processor, model = _load("photo", folder, str(device))
    inputs = processor(images=image, return_tensors="pt").to(device)
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=model.generation_config.max_new_tokens or MAX_CAPTION_TOKENS,
                             do_sample=False, num_beams=1)
    return processor.decode(ids[0], skip_special_tokens=True).strip()


def _square(image: Image.Image, size: int) -> torch.Tensor:
    """``image`` padded to a white square, resized to ``size``, as (1, 3, size, size) in -1..1."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixels = np.asarray(canvas.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def tags(image: Image.Image, folder: str, device: torch.device) -> str:
    """The tagger's tags of ``image``, best first, comma-separated."""
    _, model = _load("anime", folder, str(device))
    size = model.config.image_size
    with torch.inference_mode():
        scores = torch.sigmoid(model(pixel_values=_square(image, size).to(device)).logits[0]).float().cpu()
    labels = model.config.id2label
    found = [(float(s), labels[i]) for i, s in enumerate(scores) if s >= TAG_THRESHOLD and labels[i] not in RATINGS]
    return ", ".join(tag.replace("_", " ") if len(tag) > 3 else tag for _, tag in sorted(found, reverse=True))


def describe_image(pipe, request: DescribeRequest, on_step=None, should_cancel=None, device=None):
    """(the prompt for ``request.image``, a record naming the captioner); the job kind's function."""
    from backend.engine.image_prompt import model_path
    from backend.models import resolve_model

    device = device or torch.device("cpu")
    source = request.read_input()
    family = resolve_model(request.model).family
    entry = companions.find_model("captioner", request.mode, family, "describe", field="describe")
    folder = model_path(entry)
    text = caption(source.image, folder, device) if request.mode == "photo" else tags(source.image, folder, device)
    return text, {"captioner": {"name": entry.name, "hash": library.folder_hash(folder)}, "warnings": source.warnings}
