"""Every shipped preset runs, by the names it uses: its models and LoRAs stand in by tiny demo-family
weights in a local Hugging Face cache, and what is missing is named with the command that gets it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from backend import metadata, request_builder
from backend.errors import DreamttyError
from backend.prompting.presets import list_presets
from backend.service import Service
from job_helpers import worker_images

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
# The family of each model a shipped preset names: a preset naming another model must be added here.
STAND_INS = {
    "stabilityai/stable-diffusion-xl-base-1.0": "demo-xl",
    "cagliostrolab/animagine-xl-3.1": "demo-xl",
    "SG161222/RealVisXL_V4.0": "demo-xl",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "demo",
}


def _preset(name: str) -> dict:
    return yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())


def _cache_repo(hub: Path, repo: str, folder: Path) -> None:
    """``repo`` in the HF cache layout, its snapshot being ``folder``."""
    cached = hub / f"models--{repo.replace('/', '--')}"
    (cached / "snapshots").mkdir(parents=True)
    (cached / "snapshots" / "c0ffee").symlink_to(folder, target_is_directory=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("c0ffee")


def _lora(folder: Path, demo: Path, xl: bool) -> Path:
    """A random LoRA for the demo UNet, saved as a LoRA repo holds it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(demo / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name="pytorch_lora_weights.safetensors")
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.fixture
def cached_presets(hub, demo_dirs, tmp_path):
    """Every model and hub LoRA the shipped presets name, in the cache."""
    for name in SHIPPED:
        preset = _preset(name)
        family = STAND_INS[preset["model"]]
        if not (hub / f"models--{preset['model'].replace('/', '--')}").exists():
            _cache_repo(hub, preset["model"], demo_dirs[family])
        for lora, _ in preset.get("loras") or []:
            _cache_repo(hub, lora, _lora(tmp_path / "loras" / lora, demo_dirs[family], family == "demo-xl"))
    return hub


def test_every_shipped_preset_is_covered():
    assert {p.name for p in list_presets() if p.name in SHIPPED} == set(SHIPPED)
    assert {_preset(name)["model"] for name in SHIPPED} <= set(STAND_INS)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_runs(name, cached_presets, tmp_path):
    from backend.engine.loader import PipelineCache

    preset = _preset(name)
    # Small and short on the CPU; everything else (model, LoRAs, sampler, schedule, CFG, styles...) is the preset's.
    request = request_builder.build({"prompt": "a red fox", "size": "64x64", "steps": 2, "seed": 5}, preset=name)
    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    prepared = service.prepare(request, tmp_path / "out")  # the service's checks, as when queueing
    service.store.close()
    [path], _ = worker_images(prepared.payload, PipelineCache(torch.device("cpu")), tmp_path / "queue.sqlite3",
                              prepared.kind)
    saved = metadata.read(path)
    assert saved["request"]["model"] == preset["model"] and saved["request"]["preset"] == name
    assert saved["request"]["sampler"] == preset.get("sampler", "dpmpp_2m")
    assert [lora["name"] for lora in saved["prompt"].get("loras", [])] == [n for n, _ in preset.get("loras") or []]


def test_a_preset_whose_model_or_lora_is_missing_names_the_pull_command(hub, demo_dirs, tmp_path):
    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    request = request_builder.build({"prompt": "x", "size": "64x64"}, preset="fast")
    with pytest.raises(DreamttyError, match="^model: stabilityai/stable-diffusion-xl-base-1.0 is not in the local "
                                            ".*dreamtty models pull stabilityai/stable-diffusion-xl-base-1.0$"):
        service.validate(request)
    _cache_repo(hub, "stabilityai/stable-diffusion-xl-base-1.0", demo_dirs["demo-xl"])
    with pytest.raises(DreamttyError, match="^lora: latent-consistency/lcm-lora-sdxl is not in the local Hugging Face "
                                            "cache; get it with: dreamtty models pull latent-consistency/lcm-lora-sdxl$"):
        service.validate(request)
    service.store.close()
