"""The model being trained: load, choose what trains (full or LoRA), encode prompts, export.

Follows diffusers' ``examples/dreambooth`` scripts: frozen VAE, UNet trained, text encoder(s)
optionally; LoRA through peft on the attention projections, saved so that diffusers'
``load_lora_weights`` reads it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.families import FAMILIES
from backend.models import resolve_model
from backend.training import runs
from backend.training.checkpoints import follow_umask

LORA_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ModelParts:
    pipe: object  # the StableDiffusion(XL)Pipeline holding every module (used for validation and export)
    family: str
    xl: bool
    noise_scheduler: object  # DDPMScheduler with the model's training noise schedule

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoders(self) -> list:
        return [self.pipe.text_encoder, *([self.pipe.text_encoder_2] if self.xl else [])]

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer, *([self.pipe.tokenizer_2] if self.xl else [])]


def load_parts(model: str) -> ModelParts:
    """Load the base model on the CPU in fp32 (the trainer moves and casts each part)."""
    from backend.engine.loader import load_pipeline

    return parts_from_pipeline(load_pipeline(resolve_model(model), torch.device("cpu"), torch.float32))


def parts_from_pipeline(pipe) -> ModelParts:
    """Wrap a loaded SD/SDXL pipeline (its family in ``pipe.dreamtty``): every module frozen."""
    from diffusers import DDPMScheduler

    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    family = pipe.dreamtty.family
    return ModelParts(pipe, family, FAMILIES[family].xl, DDPMScheduler.from_config(pipe.scheduler.config))


def add_lora(module: torch.nn.Module, rank: int, targets: list[str]) -> None:
    """Inject trainable LoRA layers (peft), configured as diffusers' LoRA scripts do."""
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    if isinstance(module, ModelMixin):
        module.add_adapter(config)
    else:  # transformers' own add_adapter wants a newer peft; peft's injector works on any module
        inject_adapter_in_model(config, module)
        module.peft_config = {"default": config}


def tokenize(parts: ModelParts, prompt: str) -> list[torch.Tensor]:
    """Token ids (1, max_length) per tokenizer."""
    return [
        tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tok in parts.tokenizers
    ]


def encode(text_encoders: list, xl: bool, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled) as the SD / SDXL pipelines compute them (SDXL: penultimate layers + pooled).

    ``text_encoders`` are the modules to call (the accelerate-prepared ones while training);
    ``ids`` must be on their device.
    """
    if not xl:
        return text_encoders[0](ids[0])[0], None
    hidden, pooled = [], None
    for te, tok_ids in zip(text_encoders, ids):
        out = te(tok_ids, output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def export(parts: ModelParts, method: str, run_dir: Path, modules: dict[str, torch.nn.Module]) -> tuple[str, Path]:
    """Write the result: a diffusers folder (full) or a LoRA .safetensors. Temp dir + rename."""
    run_dir = Path(run_dir)
    name = runs.MODEL_DIR if method == "full" else Path(runs.LORA_FILE).parent.name
    final, tmp = run_dir / name, run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if method == "full":
        parts.pipe.register_modules(**modules)
        parts.pipe.save_pretrained(tmp, safe_serialization=True)
        if parts.family.startswith("demo"):  # keep the demo family (small default sizes)
            (tmp / "dreamtty_demo.json").write_text(json.dumps({"family": parts.family}))
    else:
        _save_lora(parts, modules, tmp)
    follow_umask(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return ("model", final) if method == "full" else ("lora", run_dir / runs.LORA_FILE)


def _save_lora(parts: ModelParts, modules: dict[str, torch.nn.Module], folder: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {f"{key}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
              for key, module in modules.items()}
    type(parts.pipe).save_lora_weights(folder, **layers, safe_serialization=True)
