"""``speed: fast`` and ``fastest``: a compiled UNet and VAE decoder, warm from a compile cache on disk.

On CUDA a fast pipeline gets channels_last weights, diffusers' fused QKV projections and
``torch.compile`` of its UNet and VAE decoder in mode ``reduce-overhead`` (CUDA graphs for the static
shapes of a job). Compiling costs about a minute per model and size on first use; the compiled
artifacts (``torch.compiler.save_cache_artifacts``, valid only for the same torch, Triton and GPU) are
kept on disk under a key of model, size, dtype, those versions and the GPU, so the next launch of the
same model and size loads them instead of compiling again. On the CPU a fast job runs the default path
(inductor rarely pays for the few images of a CPU session) and says so.

``fastest`` is ``fast`` with the UNet's linear layers (attention projections, feed-forwards) quantised
by torchao to float8 weights and activations, each scaled per tensor at run time, so that their matmuls
run on the float8 tensor cores of GPUs of compute capability 8.9 and newer (Ada, Hopper). Elsewhere,
or without torchao, it runs ``fast`` and says why.

Fast pipelines are cached apart from default ones (``PipelineCache``), so ``speed: default`` stays
bit-identical to stock diffusers whatever ran before.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from backend import locations, user_files

COMPILE_MODE = "reduce-overhead"
FLOAT8_CAPABILITY = (8, 9)  # float8 matmuls (torch._scaled_mm) need Ada or Hopper tensor cores


def effective_speed(speed: str, device: torch.device) -> tuple[str, str | None]:
    """The speed a job really runs at on ``device``, and a note when it is not ``speed``."""
    if speed == "default":
        return speed, None
    if device.type != "cuda":
        return "default", f"speed {speed}: the CPU has no compiled fast path; running the default path"
    if speed == "fastest" and (missing := _float8_missing(device)):
        return "fast", f"speed fastest: {missing}; running fast"
    return speed, None


def _float8_missing(device: torch.device) -> str | None:
    """Why float8 cannot run on ``device`` (None: it can)."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FLOAT8_CAPABILITY:
        return f"float8 needs a GPU of compute capability 8.9 or newer, this one has {major}.{minor}"
    if importlib.util.find_spec("torchao") is None:
        return "float8 needs torchao (pip install torchao)"
    return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def compile_key(model: str, width: int, height: int, dtype: torch.dtype, device: torch.device, images: int = 1,
                speed: str = "fast") -> str:
    """The compile cache's key: artifacts are reused only for the same model, size, images per batch, dtype,
    speed, torch, Triton, diffusers, torchao and GPU (model: its location and the weights' modification time,
    so a replaced file misses)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        stamp = Path(model).stat().st_mtime_ns
    except OSError:
        stamp = 0
    parts = {"model": model, "stamp": stamp, "size": [width, height], "images": images, "dtype": str(dtype), "gpu": gpu,
             "torch": torch.__version__, "triton": _version("triton"), "diffusers": _version("diffusers"),
             "mode": COMPILE_MODE, "speed": speed}
    if speed == "fastest":
        parts["torchao"] = _version("torchao")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class CompileCache:
    """Compiled artifacts by key, one file each under ``<cache dir>/compile``."""

    def __init__(self, root: Path | None = None, load=None, save=None) -> None:
        self.root = root or locations.cache_dir() / "compile"
        self._load = load or torch.compiler.load_cache_artifacts
        self._save = save or (lambda: torch.compiler.save_cache_artifacts())
        self.loaded: set[str] = set()

    def warm(self, key: str) -> bool:
        """Load the artifacts saved under ``key`` (once per process); False when there are none."""
        if key in self.loaded:
            return True
        try:
            data = (self.root / f"{key}.bin").read_bytes()
        except OSError:
            return False
        self._load(data)
        self.loaded.add(key)
        return True

    def keep(self, key: str) -> None:
        """Save what this process compiled so far under ``key`` (atomically: a killed write leaves no file)."""
        saved = self._save()
        if not saved:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with user_files.replacing(self.root / f"{key}.bin") as tmp:
            tmp.write_bytes(saved[0])
        self.loaded.add(key)


def quantize_float8(unet) -> None:
    """torchao's dynamic float8 quantisation of ``unet``'s linear layers, in place (layers whose sizes the
    float8 matmul cannot take stay as they are)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    quantize_(unet, Float8DynamicActivationFloat8WeightConfig())


def make_fast(pipe, speed: str = "fast", compile: Callable = torch.compile,
              quantize: Callable = quantize_float8) -> None:
    """Turn a loaded CUDA pipeline into a ``fast`` or ``fastest`` one (in place); compilation itself happens
    at its first call."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    if speed == "fastest":
        quantize(pipe.unet)
    pipe.unet = compile(pipe.unet, mode=COMPILE_MODE, fullgraph=True)
    pipe.vae.decoder = compile(pipe.vae.decoder, mode=COMPILE_MODE)
    pipe.dreamtty.speed = speed
    pipe.dreamtty.compiled_sizes = set()  # sizes run since: later jobs at those sizes need no compile


@contextmanager
def compiled_run(pipe, model: str, cache: CompileCache, note: Callable[[str], None]):
    """Around a fast pipeline's batch: each new shape its denoise loop runs the UNet at (the loop says which,
    through ``PipelineState.on_denoise``: the whole image, or a tile of an upscale) loads the compile cache
    for it, or is said to compile for the first time; what compiled is kept once the batch ran. A default
    pipeline: nothing."""
    state = pipe.dreamtty
    if state.compiled_sizes is None:
        yield
        return
    new: dict[tuple[int, int, int], str | None] = {}  # shape -> its key, where it compiles (kept after)

    def denoising(images: int, width: int, height: int) -> None:
        shape = (width, height, images)
        if shape in state.compiled_sizes or shape in new:
            return
        key = compile_key(model, width, height, pipe.unet.dtype, pipe.unet.device, images, state.speed)
        what = f"{width}x{height}" + (f", {images} images at once" if images > 1 else "")
        if cache.warm(key):
            note(f"speed {state.speed}: loading the compiled UNet for {what} from the cache")
            new[shape] = None
        else:
            note(f"speed {state.speed}: compiling the UNet for {what} (first time for this model and shape: "
                 "about a minute; later launches load it from the cache)")
            new[shape] = key

    state.on_denoise = denoising
    try:
        yield
    finally:
        state.on_denoise = None
    for shape, key in new.items():
        state.compiled_sizes.add(shape)
        if key is not None:
            cache.keep(key)
