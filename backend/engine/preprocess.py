"""Preprocessors of the structure references: the map a ControlNet is conditioned on.

- ``canny``: OpenCV's Canny edges of the reference (hysteresis thresholds 64 and 128, Fooocus's values);
- ``structure`` (Fooocus's CPDS): the reference turned grey by OpenCV's contrast-preserving decolorization
  (``cv2.decolor``: Lu, Xu and Jia 2012, "Contrast Preserving Decolorization"), after a light Gaussian
  blur (sigma 0.8), then stretched to the full 0..255 range: the layout and tonal structure without
  colour, where colours of equal luminance stay apart (decolor saturates on flat synthetic pictures
  without any noise: those get their luminance);
- ``depth``: a depth model from transformers (Depth Anything, DPT, ...), its relative depth scaled to
  0..255 (near = bright).

Each map is computed on the reference fitted to the image's size (scaled to cover it, then
centre-cropped: A1111's "Crop and Resize") and has three channels, as ControlNets take them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

CANNY_THRESHOLDS = (64, 128)
CPDS_BLUR = 0.8
LANCZOS = Image.Resampling.LANCZOS


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled to cover ``width`` x ``height``, centre-cropped to it."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    scaled = image.resize(size, LANCZOS) if size != image.size else image
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def _rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2))


def canny(image: Image.Image) -> Image.Image:
    """White edges on black."""
    import cv2

    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return _rgb(cv2.Canny(grey, *CANNY_THRESHOLDS))


def structure(image: Image.Image) -> Image.Image:
    """Contrast-preserving decolorised structure (CPDS), stretched to 0..255."""
    import cv2

    bgr = cv2.GaussianBlur(np.asarray(image.convert("RGB"))[..., ::-1].copy(), (0, 0), CPDS_BLUR)
    grey, _ = cv2.decolor(bgr)
    if grey.min() == grey.max():  # decolor saturates on flat, noiseless pictures: then plain luminance
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    return _rgb(_stretch(grey.astype(np.float32)))


def _stretch(values: np.ndarray) -> np.ndarray:
    """``values`` mapped linearly onto 0..255 (a constant map stays black)."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        return np.zeros_like(values)
    return np.round((values - low) / (high - low) * 255)


@lru_cache(maxsize=1)
def _depth_model(folder: str, device: str):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True).to(device).eval()
    return processor, model


def depth(image: Image.Image, folder: str, device: torch.device) -> Image.Image:
    """The depth model's relative depth of ``image`` at its size, near = bright."""
    processor, model = _depth_model(folder, str(device))
    inputs = processor(images=image.convert("RGB"), return_tensors="pt").to(device)
    with torch.inference_mode():
        predicted = model(**inputs).predicted_depth
    resized = torch.nn.functional.interpolate(predicted[:, None].float(), size=(image.height, image.width),
                                              mode="bicubic", align_corners=False)[0, 0]
    return _rgb(_stretch(resized.cpu().numpy()))
