"""Real-size single-file round trip, bit for bit, for each family dreamtty loads from one file.

Random weights in each family's published architecture (the shipped configs in
``backend/model_configs``) are written as one original-layout ``.safetensors`` file (LDM/SGM key
names, as A1111 and Civitai files have them), then loaded back through dreamtty's own path
(``resolve_model`` detects the family, ``load_pipeline`` runs diffusers' ``from_single_file`` with
the shipped configs, offline), and every tensor of the UNet, VAE and text encoders is compared
with the original, bit for bit.

    PYTHONPATH=. python benchmarks/single_file_roundtrip.py                        # sd1 sd2-v sdxl sdxl-refiner
    PYTHONPATH=. python benchmarks/single_file_roundtrip.py --families sd1,sd2-v   # what a small machine holds

No GPU is needed, only memory: in fp16 (the default) the process peaks at about 14 GiB for SDXL,
6 GiB for SD 2.1 and 5 GiB for SD 1.5. Results: docs/models.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from backend.engine.loader import DTYPES, SHIPPED_CONFIGS, load_pipeline
from backend.models import resolve_model
from tests.ckpt_helpers import LAYOUT_OF, pipeline_to_ldm

FAMILIES = ("sd1", "sd2-v", "sdxl", "sdxl-refiner")
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def random_parts(family: str, dtype: torch.dtype) -> SimpleNamespace:
    """The family's UNet, VAE and text encoders with random weights, allocated once in ``dtype``
    (built on the meta device, so SDXL never needs its fp32 size)."""
    import diffusers
    import transformers

    folder = SHIPPED_CONFIGS / family
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    generator = torch.Generator().manual_seed(0)
    for name in PARTS:
        library, cls_name = (index.get(name) or [None, None])[:2]
        if cls_name is None:
            continue
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        with torch.device("meta"):
            if library == "diffusers":
                model = cls.from_config(cls.load_config(folder / name))
            else:
                model = cls(transformers.CLIPTextConfig.from_json_file(folder / name / "config.json"))
        model = model.to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
        if hasattr(model, "text_model"):  # CLIP's position_ids buffer: arange, as its __init__ makes it
            model.text_model.embeddings.position_ids.copy_(torch.arange(model.config.max_position_embeddings)[None])
        parts[name] = model
    return SimpleNamespace(**parts)


def digests(parts) -> dict[str, str]:
    """part.tensor name -> a hash of the tensor's bytes (the originals can be freed before loading)."""
    out = {}
    for name in PARTS:
        model = getattr(parts, name, None)
        if model is None:
            continue
        for key, tensor in model.state_dict().items():
            if "position_ids" in key:
                continue  # not stored in single files; transformers rebuilds it
            data = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
            out[f"{name}.{key}"] = f"{tensor.dtype}:{tuple(tensor.shape)}:{hashlib.blake2b(data).hexdigest()}"
    return out


def round_trip(family: str, dtype: torch.dtype, folder: Path) -> tuple[int, list[str], float]:
    """(tensors compared, names of those that differ or are missing, seconds) for one family."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    parts = random_parts(family, dtype)
    expected = digests(parts)
    path = folder / f"roundtrip-{family}.safetensors"
    save_file(pipeline_to_ldm(parts, LAYOUT_OF[family]), str(path))
    del parts
    gc.collect()
    ref = resolve_model(str(path))
    if ref.family != family:
        return len(expected), [f"detected as {ref.family}"], time.perf_counter() - start
    loaded = digests(load_pipeline(ref, torch.device("cpu"), dtype))
    path.unlink()
    differ = sorted(k for k in expected.keys() | loaded.keys() if expected.get(k) != loaded.get(k))
    return len(expected), differ, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    args = parser.parse_args()
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # fp16 on the CPU is only stored and compared here
    transformers.logging.set_verbosity_error()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; allowed {', '.join(FAMILIES)}")
    print(f"torch {torch.__version__}, {args.dtype}, configs {SHIPPED_CONFIGS}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="roundtrip-") as tmp:
        for family in families:
            count, differ, seconds = round_trip(family, DTYPES[args.dtype], Path(tmp))
            verdict = "bit-exact" if not differ else f"{len(differ)} differ, e.g. {', '.join(differ[:3])}"
            print(f"{family:<14}{count:>6} tensors  {verdict}  ({seconds:.0f} s)", flush=True)
            failed |= bool(differ)
            gc.collect()
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
