"""``speed: fast`` and ``fastest``: the compile cache's key and files, the fast pipeline's setup, the fallbacks, and
inductor's compiled demo UNet against eager (the GPU figures: benchmarks/gpu_fast.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from backend import events as ev
from backend.engine import fast
from backend.engine.conditioning import encode
from backend.engine.denoise import Cancelled, DenoiseSpec, denoise
from backend.engine.loader import PipelineCache, load_pipeline
from backend.engine.scheduling import make_scheduler
from backend.models import resolve_model
from backend.request import GenerateRequest
from job_helpers import worker_images
from PIL import Image

CPU = torch.device("cpu")


def test_the_compile_key_changes_with_model_shape_dtype_and_versions(tmp_path, monkeypatch):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    key = fast.compile_key(str(model), 512, 512, torch.float16, CPU)
    assert key == fast.compile_key(str(model), 512, 512, torch.float16, CPU)  # stable
    others = [fast.compile_key(str(tmp_path / "other"), 512, 512, torch.float16, CPU),
              fast.compile_key(str(model), 512, 768, torch.float16, CPU),
              fast.compile_key(str(model), 512, 512, torch.bfloat16, CPU),
              fast.compile_key(str(model), 512, 512, torch.float16, CPU, images=8),  # a batch of 8
              fast.compile_key(str(model), 512, 512, torch.float16, CPU, speed="fastest")]
    monkeypatch.setattr(fast, "_version", lambda package: "9.9" if package == "triton" else "1.0")
    others.append(fast.compile_key(str(model), 512, 512, torch.float16, CPU))
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "99.0")
    others.append(fast.compile_key(str(model), 512, 512, torch.float16, CPU))
    monkeypatch.undo()
    version = fast._version
    monkeypatch.setattr(fast, "_version", lambda package: "9.9" if package == "torchao" else version(package))
    others.append(fast.compile_key(str(model), 512, 512, torch.float16, CPU, speed="fastest"))
    assert fast.compile_key(str(model), 512, 512, torch.float16, CPU) == key  # torchao counts for fastest only
    monkeypatch.undo()
    model.write_bytes(b"new weights, same name")
    import os
    os.utime(model, ns=(1, 1))
    others.append(fast.compile_key(str(model), 512, 512, torch.float16, CPU))
    assert len({key, *others}) == len(others) + 1


class FakeCompiler:
    """Stands in for torch.compile and torch's cache artifacts: records what was asked."""

    def __init__(self) -> None:
        self.compiled: list[tuple[str, str]] = []
        self.loaded: list[bytes] = []
        self.artifacts = b""

    def compile(self, module, mode=None, **kwargs):
        self.compiled.append((type(module).__name__, mode))
        self.artifacts += type(module).__name__.encode()  # what "compiling" leaves behind
        return module

    def cache(self, root):
        return fast.CompileCache(root, load=self.loaded.append, save=lambda: (self.artifacts, {}))


def test_a_fast_pipeline_compiles_once_per_size_and_the_next_launch_loads_the_cache(demo_dirs, tmp_path):
    pipe = load_pipeline(resolve_model("demo"), CPU, torch.float32)
    compiler = FakeCompiler()
    fast.make_fast(pipe, compile=compiler.compile)
    assert compiler.compiled == [("UNet2DConditionModel", "reduce-overhead"), ("Decoder", "reduce-overhead")]
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


    assert any(hasattr(m, "to_qkv") for m in pipe.unet.modules())  # diffusers' fused projections

    notes: list[str] = []
    cache = compiler.cache(tmp_path / "compile")
    for shapes in ([(1, 64, 64)], [(1, 64, 64), (1, 96, 64)], [(4, 64, 64)], [(4, 64, 64)]):
        with fast.compiled_run(pipe, "demo", cache, notes.append):
            for shape in shapes:  # what the denoise loop tells (images, width, height)
                pipe.dreamtty.on_denoise(*shape)
    assert pipe.dreamtty.on_denoise is None  # only while the batch runs
    assert [n.split(" (")[0] for n in notes] == ["speed fast: compiling the UNet for 64x64",
                                                 "speed fast: compiling the UNet for 96x64",
                                                 "speed fast: compiling the UNet for 64x64, 4 images at once"]
    assert len(list((tmp_path / "compile").glob("*.bin"))) == 3 and not list((tmp_path / "compile").glob("*.part"))

    # A new process: the same model and size load what was kept; another size compiles.
    relaunched = load_pipeline(resolve_model("demo"), CPU, torch.float32)
    fast.make_fast(relaunched, compile=FakeCompiler().compile)
    fresh = FakeCompiler()
    notes.clear()
    with fast.compiled_run(relaunched, "demo", fresh.cache(tmp_path / "compile"), notes.append):
        relaunched.dreamtty.on_denoise(1, 64, 64)
    assert notes == ["speed fast: loading the compiled UNet for 64x64 from the cache"]
    assert fresh.loaded == [compiler.artifacts[:len(b"UNet2DConditionModelDecoder")]]
    with fast.compiled_run(relaunched, "demo", fresh.cache(tmp_path / "compile"), notes.append):
        relaunched.dreamtty.on_denoise(1, 128, 64)
    assert notes[-1].startswith("speed fast: compiling the UNet for 128x64") and len(fresh.loaded) == 1


def test_fastest_quantizes_the_unet_before_compiling_it_and_keys_its_cache_apart(demo_dirs, tmp_path):
    pipe = load_pipeline(resolve_model("demo"), CPU, torch.float32)
    compiler, quantized = FakeCompiler(), []
    fast.make_fast(pipe, "fastest", compile=compiler.compile,
                   quantize=lambda unet: quantized.append((type(unet).__name__, len(compiler.compiled))))
    assert quantized == [("UNet2DConditionModel", 0)]  # the eager UNet, before anything compiled
    notes: list[str] = []
    with fast.compiled_run(pipe, "demo", compiler.cache(tmp_path), notes.append):
        pipe.dreamtty.on_denoise(1, 64, 64)
    assert notes[0].startswith("speed fastest: compiling the UNet for 64x64")
    [saved] = (tmp_path).glob("*.bin")
    assert saved.stem == fast.compile_key("demo", 64, 64, torch.float32, CPU, speed="fastest")


@pytest.mark.parametrize("device, capability, torchao, expected", [
    ("cpu", None, True, ("default", "speed fastest: the CPU has no compiled fast path; running the default path")),
    ("cuda", (8, 0), True, ("fast", "speed fastest: float8 needs a GPU of compute capability 8.9 or newer, this one "
                                    "has 8.0; running fast")),
    ("cuda", (9, 0), False, ("fast", "speed fastest: float8 needs torchao (pip install torchao); running fast")),
    ("cuda", (8, 9), True, ("fastest", None)),
])
def test_fastest_runs_where_float8_can_and_says_what_it_ran_instead(monkeypatch, device, capability, torchao, expected):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if torchao else None) if name == "torchao" else find_spec(name, *a))
    assert fast.effective_speed("fastest", torch.device(device)) == expected
    assert fast.effective_speed("fast", torch.device(device))[0] == ("default" if device == "cpu" else "fast")


def test_the_compile_cache_follows_the_shape_the_unet_denoises_not_the_image_size(demo_dirs, tmp_path):
    """An upscale denoised in tiles compiles (and caches) the UNet for the tile; a batch that fails keeps
    nothing and counts its shape as not compiled."""
    pipe = load_pipeline(resolve_model("demo"), CPU, torch.float32)
    compiler = FakeCompiler()
    fast.make_fast(pipe, compile=compiler.compile)
    notes: list[str] = []

    def tiled_denoise(should_cancel=None) -> None:
        with torch.inference_mode():
            spec = DenoiseSpec(encode(pipe, "a fox", "", True), 128, 96, 2, 7.0, torch.Generator().manual_seed(0),
                               tile=64, should_cancel=should_cancel)
            denoise(pipe, make_scheduler(pipe.dreamtty.scheduler_config, "euler", "normal"), spec)

    with pytest.raises(Cancelled), fast.compiled_run(pipe, "demo", compiler.cache(tmp_path), notes.append):
        tiled_denoise(should_cancel=lambda: True)
    assert not list(tmp_path.glob("*.bin")) and pipe.dreamtty.compiled_sizes == set()
    with fast.compiled_run(pipe, "demo", compiler.cache(tmp_path), notes.append):
        tiled_denoise()
    assert [n.split(" (")[0] for n in notes] == ["speed fast: compiling the UNet for 64x64"] * 2
    assert pipe.dreamtty.compiled_sizes == {(64, 64, 1)} and len(list(tmp_path.glob("*.bin"))) == 1


def _worker_job(request: GenerateRequest, tmp_path, cache: PipelineCache) -> tuple[np.ndarray, list]:
    payload = {"request": request.to_dict(), "out": str(tmp_path / "out")}
    [path], sent = worker_images(payload, cache, tmp_path / "queue.sqlite3")
    return np.asarray(Image.open(path)), sent


def test_fast_on_the_cpu_is_the_default_path_and_says_so(demo_dirs, tmp_path):
    cache = PipelineCache(CPU)
    request = GenerateRequest(prompt="a fox", steps=3, seed=4, width=64, height=64)
    default, sent = _worker_job(request.resolved("demo"), tmp_path, cache)
    assert not any(isinstance(e, ev.Note) for e in sent)
    for speed in ("fast", "fastest"):
        quick, sent = _worker_job(GenerateRequest(**{**request.__dict__, "speed": speed}).resolved("demo"), tmp_path,
                                  cache)
        assert np.array_equal(default, quick)
        assert [e.message for e in sent if isinstance(e, ev.Note)] == [
            f"speed {speed}: the CPU has no compiled fast path; running the default path"]


def test_a_bad_speed_is_a_one_line_error():
    from backend.errors import RequestError

    with pytest.raises(RequestError, match="^speed: unknown 'ludicrous'; allowed: default, fast, fastest$"):
        GenerateRequest(speed="ludicrous").resolved("demo")


@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")), reason="inductor's CPU backend needs a C compiler")
def test_inductor_compiled_demo_unet_equals_eager(demo_dirs):
    pipe = load_pipeline(resolve_model("demo"), CPU, torch.float32)
    torch.manual_seed(0)
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor(500), torch.randn(1, 77, 32)
    with torch.no_grad():
        eager = pipe.unet(x, t, text).sample
        compiled = torch.compile(pipe.unet, backend="inductor")(x, t, text).sample
    assert (compiled - eager).abs().max().item() <= 1e-3
