"""Tiny random-weight SD1-style and SDXL-style pipelines, built offline.

They let the app, the tests and a new user run every feature on a CPU with no
downloads. Weights are seeded, so every build is identical. Their pictures are
noise, which is fine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from backend import locations
from backend.errors import ModelError

# Byte-level CLIP vocabulary: 256 byte characters, the same with "</w>", then the
# two special tokens. No merges, so every character is one token.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_chars() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_tokenizer(pad_token: str = EOS):
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars), BOS, EOS])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)


def _text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=514,
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4,
        max_position_embeddings=77, projection_dim=32, **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # The SD1.x/SDXL training noise schedule.
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )


def build_sd(xl: bool):
    """Return a tiny StableDiffusion(XL)Pipeline with seeded random weights."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet_kwargs = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8,
    )
    if xl:
        unet = UNet2DConditionModel(
            cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32, **unet_kwargs,
        )
        torch.manual_seed(1)
        te1 = CLIPTextModel(_text_config())
        torch.manual_seed(2)
        te2 = CLIPTextModelWithProjection(_text_config())
        torch.manual_seed(3)
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(pad_token="!"), unet=unet, scheduler=_scheduler(),
        )
    unet = UNet2DConditionModel(cross_attention_dim=32, **unet_kwargs)
    torch.manual_seed(1)
    te = CLIPTextModel(_text_config())
    torch.manual_seed(3)
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=te, tokenizer=tiny_tokenizer(), unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def ensure_demo(name: str) -> Path:
    """Build demo model ``name`` ("demo" or "demo-xl") once; return its folder."""
    root = locations.demo_models_dir()
    target = root / name
    marker = target / "dreamtty_demo.json"
    if marker.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_sd(xl=name == "demo-xl").save_pretrained(tmp, safe_serialization=True)
        if not all(any(folder.iterdir()) for folder in tmp.glob("text_encoder*")):
            # transformers saves on rank 0 only: another rank of a distributed run wrote empty folders.
            raise ModelError(f'model: {name} must first be built by one process; run once: dreamtty --model {name} generate "a cat"')
        (tmp / "dreamtty_demo.json").write_text(json.dumps({"family": name}))
        try:
            tmp.rename(target)  # atomic; fails when another process (a second trainer, a worker) got there first
        except OSError:
            if marker.exists():
                return target
            shutil.rmtree(target, ignore_errors=True)  # left incomplete by a crash
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
