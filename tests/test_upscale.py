"""Upscale: our use of an upscaler (tiles, scale, channels, errors) with a fake spandrel-like loader, the
Lanczos fallback, the repainting pass in tiles, and a real spandrel run when spandrel imports."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from backend.engine import upscale as engine
from backend.engine.tiles import TiledGuider, ramp, run_tiled, starts
from backend.errors import ModelError, RequestError
from backend.jobkinds.upscale import UpscaleRequest
from image_helpers import gradient, write_image


class FakeModel:
    """Stands for a spandrel ImageModelDescriptor: nearest-neighbour enlarging (so tiles must not show)."""

    def __init__(self, scale=4, channels=3, purpose="SR"):
        self.scale, self.input_channels, self.output_channels, self.purpose = scale, channels, channels, purpose
        self.architecture = SimpleNamespace(name="FakeESRGAN")
        self.supports_half, self.tiling = True, SimpleNamespace(name="SUPPORTED")
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls: list[tuple[int, ...]] = []

    def to(self, *args):
        return self

    def eval(self):
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


@pytest.fixture
def fake_spandrel(monkeypatch):
    """A spandrel-like module in sys.modules; the state dict's "kind" tensor picks the model it loads."""
    made: list[FakeModel] = []
    module = types.ModuleType("spandrel")
    module.__spec__ = importlib.machinery.ModuleSpec("spandrel", None)

    class UnsupportedModelError(Exception):
        pass

    class ModelLoader:
        def load_from_state_dict(self, state):
            kind = int(state["kind"][0])
            if kind == 0:
                raise UnsupportedModelError("no architecture matched")
            model = {1: FakeModel(), 2: FakeModel(scale=2, channels=1), 3: FakeModel(channels=4)}[kind]
            made.append(model)
            return model

    module.UnsupportedModelError = UnsupportedModelError
    module.ModelLoader = ModelLoader
    module.ImageModelDescriptor = FakeModel
    module.canonicalize_state_dict = lambda state: state
    monkeypatch.setitem(sys.modules, "spandrel", module)
    engine._load.cache_clear()
    yield made
    engine._load.cache_clear()


@pytest.fixture
def upscalers(tmp_path, monkeypatch):
    """An upscalers folder; ``upscalers(name, kind)`` writes a model file the fake loader turns into ``kind``."""
    folder = tmp_path / "upscalers"
    folder.mkdir()
    monkeypatch.setenv("DREAMTTY_UPSCALERS", str(folder))

    def write(name: str, kind: int = 1) -> str:
        save_file({"conv_first.weight": torch.zeros(4, 3, 3, 3), "kind": torch.tensor([kind])}, folder / f"{name}.safetensors")
        return name

    return write


def _request(tmp_path, **fields) -> UpscaleRequest:
    image = write_image(tmp_path / "in.png")
    return UpscaleRequest(image=str(image), **{"prompt": "a red fox", "steps": 8, "seed": 3, **fields}).resolved("demo")


def test_upscaler_model_then_exact_size(fake_spandrel, upscalers, tmp_path):
    upscalers("fake-4x")
    request = _request(tmp_path, fast=True, scale=2)  # the first model found is the default
    assert request.upscaler == "fake-4x" and not request.uses_model
    image, record = engine.upscale_image(None, request)
    model = fake_spandrel[0]
    assert model.calls == [(1, 3, 128, 128)] and image.size == (256, 256)
    expected = Image.fromarray(np.asarray(gradient()).repeat(4, 0).repeat(4, 1)).resize((256, 256), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(image), np.asarray(expected))  # the model's 4x, resized to 2x
    assert record["upscaler"]["architecture"] == "FakeESRGAN" and record["upscaler"]["scale"] == 4


def test_upscaler_tiles_do_not_show(fake_spandrel):
    model = FakeModel()
    image = gradient(300, 170)
    whole = engine.model_upscale(model, image, tile=10_000)
    tiled = engine.model_upscale(model, image, tile=96)
    assert len(model.calls) > 1 + 6 and max(max(c[-2:]) for c in model.calls[1:]) <= 96
    assert np.array_equal(np.asarray(whole), np.asarray(tiled))
    assert whole.size == (1200, 680)


def test_grey_upscaler_gets_grey_and_gives_rgb(fake_spandrel, upscalers, tmp_path):
    upscalers("grey-2x", kind=2)
    image, _ = engine.upscale_image(None, _request(tmp_path, fast=True, upscaler="grey-2x"))
    assert fake_spandrel[0].calls == [(1, 1, 128, 128)]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and np.array_equal(pixels[..., 0], pixels[..., 2])


@pytest.mark.parametrize("kind,message", [(0, "spandrel does not know its architecture"),
                                          (3, "works on 4-channel images; dreamtty feeds RGB")])
def test_unusable_upscaler_fails_in_one_line(kind, message, fake_spandrel, upscalers, tmp_path):
    upscalers("odd", kind=kind)
    with pytest.raises(ModelError, match=message) as info:
        engine.upscale_image(None, _request(tmp_path, fast=True, upscaler="odd"))
    assert str(info.value).startswith("upscaler: ") and "\n" not in str(info.value)


def test_without_spandrel_a_named_upscaler_is_refused(upscalers, tmp_path, monkeypatch):
    monkeypatch.setattr("backend.jobkinds.upscale.spandrel_installed", lambda: False)
    upscalers("fake-4x")
    with pytest.raises(RequestError, match=r"upscaler: fake-4x needs spandrel to load it: pip install 'dreamtty\[upscale\]'"):
        _request(tmp_path, upscaler="fake-4x")
    assert _request(tmp_path).upscaler == "lanczos"  # by default: Lanczos, and the job says why


def test_lanczos_fallback_says_so(tmp_path):
    request = _request(tmp_path, fast=True, scale=1.5)
    image, record = engine.upscale_image(None, request)
    assert request.upscaler == "lanczos" and image.size == (192, 192)
    assert np.array_equal(np.asarray(image), np.asarray(gradient().resize((192, 192), Image.Resampling.LANCZOS)))
    assert record["upscaler"] == {"name": "lanczos"}
    assert "upscaled with a Lanczos resize: no upscaler model in" in record["warnings"][0]


def test_lanczos_asked_for_beside_a_model_is_no_warning(fake_spandrel, upscalers, tmp_path):
    upscalers("fake-4x")
    image, record = engine.upscale_image(None, _request(tmp_path, fast=True, upscaler="Lanczos"))
    assert image.size == (256, 256) and record["upscaler"] == {"name": "lanczos"} and record["warnings"] == []


def test_pickled_upscaler_needs_allow_pickle(tmp_path, monkeypatch):
    folder = tmp_path / "upscalers"
    folder.mkdir()
    torch.save({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, folder / "old.pth")
    monkeypatch.setenv("DREAMTTY_UPSCALERS", str(folder))
    with pytest.raises(RequestError, match=r"upscaler: old is a pickle \(\.pth\); refused without --allow-pickle"):
        _request(tmp_path, upscaler="old")
    monkeypatch.setenv("DREAMTTY_ALLOW_PICKLE", "1")
    monkeypatch.setattr("backend.jobkinds.upscale.spandrel_installed", lambda: True)
    assert _request(tmp_path, upscaler="old").upscaler == "old"


def test_repainting_pass_runs_in_tiles(sd_pipe, tmp_path, monkeypatch):
    request = _request(tmp_path, scale=2)
    shapes: list[tuple[int, ...]] = []
    forward = sd_pipe.unet.forward
    monkeypatch.setattr(sd_pipe.unet, "forward", lambda x, *a, **k: shapes.append(tuple(x.shape)) or forward(x, *a, **k))
    totals: list[int] = []
    image, record = engine.upscale_image(sd_pipe, request, on_step=lambda step, total, latents: totals.append(total))
    assert image.size == (256, 256) and set(totals) == {3}  # int(8 * 0.382) steps
    # 256² is 32² latents: 3 x 3 tiles of 16² (the demo's 128 pixels) per step, [uncond, cond] batched.
    assert shapes == [(2, 4, 16, 16)] * 9 * 3
    lanczos = gradient().resize((256, 256), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(lanczos, dtype=int)).max() > 0
    assert not sd_pipe.vae.use_tiling  # VAE tiling was on for this job only


def test_tiled_guider_blends_tiles_into_one_prediction():
    class Double:
        def predict(self, scheduler, latents, t, step):
            return latents * 2

    latents = torch.randn(1, 4, 40, 56)
    guider = TiledGuider(Double, (40, 56), (16, 16))
    assert len(guider.places) == len(starts(40, 16, 4)) * len(starts(56, 16, 4)) > 1
    assert torch.allclose(guider.predict(None, latents, 0, 0), latents * 2, atol=1e-6)
    assert starts(40, 16, 4)[-1] == 24 and ramp(4, 4, 2).min() > 0
    assert torch.allclose(run_tiled(lambda x: x + 1, latents, 16, 4), latents + 1, atol=1e-6)


def _tiny_esrgan(path) -> None:
    """A random-weight RRDBNet in Real-ESRGAN's key layout: 8 features, 1 block, 4x (growth channels: 32, fixed)."""
    nf, gc = 8, 32
    state = {"conv_first.weight": torch.randn(nf, 3, 3, 3), "conv_first.bias": torch.zeros(nf)}
    for r in (1, 2, 3):
        for c in range(1, 6):
            cin, cout = nf + (c - 1) * gc, (nf if c == 5 else gc)
            state[f"body.0.rdb{r}.conv{c}.weight"] = torch.randn(cout, cin, 3, 3) * 0.1
            state[f"body.0.rdb{r}.conv{c}.bias"] = torch.zeros(cout)
    for name, cout in (("conv_body", nf), ("conv_up1", nf), ("conv_up2", nf), ("conv_hr", nf), ("conv_last", 3)):
        state[f"{name}.weight"] = torch.randn(cout, nf, 3, 3) * 0.1
        state[f"{name}.bias"] = torch.zeros(cout)
    save_file(state, path)


@pytest.mark.skipif(importlib.util.find_spec("spandrel") is None,
                    reason="spandrel is not installed (the 'upscale' extra; it needs torchvision)")
def test_real_spandrel_detects_a_tiny_esrgan(tmp_path, monkeypatch):
    folder = tmp_path / "upscalers"
    folder.mkdir()
    _tiny_esrgan(folder / "tiny-esrgan.safetensors")
    monkeypatch.setenv("DREAMTTY_UPSCALERS", str(folder))
    engine._load.cache_clear()
    image, record = engine.upscale_image(None, _request(tmp_path, fast=True, scale=4, upscaler="tiny-esrgan"))
    assert image.size == (512, 512) and record["upscaler"]["scale"] == 4
    assert record["upscaler"]["architecture"] == "ESRGAN"


def test_a_fast_upscale_records_no_strength_and_an_older_record_is_queued_again(tmp_path):
    request = _request(tmp_path, fast=True)
    assert request.strength is None and request.to_dict()["strength"] is None
    older = {**request.to_dict(), "strength": 0.382}  # an image of an older version recorded the default
    again = UpscaleRequest.from_dict(older)
    UpscaleRequest.check_given(again.to_dict())  # reproduce posts it: not refused as a strength given with fast
    assert again.resolved("demo") == request
