"""Class images for prior preservation: generated with the base model when missing, then reused.

They live in a cache folder keyed by model + class prompt + resolution, so the next run of
the same class at that size reuses them, and a run at another size never replaces the images
a resumed run trains on. A cached image is generated again when it cannot be decoded (with a
warning naming it). With several processes (``accelerate launch``) each generates a share.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

from backend import locations, user_files
from backend.errors import DreamttyError
from backend.families import FAMILIES
from backend.models import ModelRef
from backend.training import runs
from backend.training.images import ImageProblem, check_image

SAMPLE_BATCH = 4


def class_dir(ref: ModelRef, class_prompt: str, resolution: int) -> Path:
    key = hashlib.sha1(f"{ref.kind}\n{ref.location}\n{class_prompt}\n{resolution}".encode()).hexdigest()[:16]
    return locations.cache_dir() / "class_images" / key


def _reusable(path: Path, warn: Callable[[str], None]) -> bool:
    """Whether the cached class image ``path`` is there and decodes."""
    if not os.path.lexists(path):
        return False
    try:
        check_image(path)
    except ImageProblem as exc:
        warn(f"class_prompt: generating the cached class image {path} again: {exc}")
        return False
    return True


def ensure_class_images(
    ref: ModelRef, class_prompt: str, count: int, resolution: int, seed: int, device: torch.device,
    process_index: int, num_processes: int, report: Callable[[int, int], None], barrier: Callable[[], None],
    warn: Callable[[str], None],
) -> list[Path]:
    """Return ``count`` class images, generating the missing or unusable ones (image i uses seed + i)."""
    folder = class_dir(ref, class_prompt, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    if process_index == 0:  # one writer: the others read the folder
        (folder / "prompt.txt").write_text(f"{ref.name}\n{class_prompt}\n{resolution}\n")
    files = [folder / f"class-{i:05d}.png" for i in range(count)]
    missing = [i for i, path in enumerate(files) if not _reusable(path, warn)]
    barrier()  # every process has checked the cache before any writes to it: all agree on what is missing
    mine = missing[process_index::num_processes]
    said = None

    def say(done: int) -> None:  # once per count: the last chunk and the barrier both say "all of them"
        nonlocal said
        if min(done, count) != said:
            said = min(done, count)
            report(said, count)

    if missing:
        say(count - len(missing))
    if mine:  # the others make about as many meanwhile
        _generate(ref, class_prompt, mine, resolution, seed, device, folder,
                  lambda n: say(count - len(missing) + n * num_processes))
    barrier()
    if missing:
        say(count)
    return [f for f in files if f.exists()]


def _generate(ref: ModelRef, prompt: str, indices: list[int], resolution: int, seed: int, device: torch.device,
              folder: Path, progress: Callable[[int], None]) -> None:
    from backend.engine.loader import load_pipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(ref, device, dtype)
    steps = FAMILIES[pipe.dreamtty.family].default_steps
    try:
        for start in range(0, len(indices), SAMPLE_BATCH):
            chunk = indices[start:start + SAMPLE_BATCH]
            gens = [torch.Generator().manual_seed(seed + i) for i in chunk]
            images = pipe(prompt=[prompt] * len(chunk), num_inference_steps=steps, height=resolution,
                          width=resolution, generator=gens).images
            for i, image in zip(chunk, images):
                _save(image, folder, i)
            progress(start + len(chunk))
    finally:
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _save(image, folder: Path, index: int) -> None:
    """Write class image ``index`` through a temp file (never a half-written one); a one-line DreamttyError, and no
    temp file left, when it cannot be written (a full disk, a folder in its place)."""
    target = folder / f"class-{index:05d}.png"
    try:
        with user_files.replacing(target, keep_suffix=True) as tmp:
            image.save(tmp)
    except OSError as exc:
        raise DreamttyError(f"class_prompt: cannot save the class image {target}: {exc.strerror or exc}; "
                            f"{runs.RESUME_HINT} once it can be written") from None
