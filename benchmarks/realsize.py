"""Real-size SD1.5 and SDXL architectures with random weights (no downloads), for GPU benchmarks.

Speed and memory do not depend on the weights, so these stand in for real checkpoints.
Configs are the published SD1.5 / SDXL-base component configs.
"""

from __future__ import annotations

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu")


def _text(cls, **cfg):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                              eos_token_id=49407, pad_token_id=49407, **cfg))


def build_pipeline(xl: bool, device: str = "cuda", dtype=torch.float16):
    """A stock StableDiffusion(XL)Pipeline of real size with random weights, on ``device``."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from backend.engine.demo_models import tiny_tokenizer

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET))
        vae = AutoencoderKL(**VAE, sample_size=1024 if xl else 512, scaling_factor=0.13025 if xl else 0.18215, force_upcast=xl)
        te = _text(CLIPTextModel, **CLIP_L)
        if xl:
            te2 = _text(CLIPTextModelWithProjection, **CLIP_BIGG)
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tiny_tokenizer(),
                                             tokenizer_2=tiny_tokenizer(pad_token="!"), unet=unet, scheduler=sched)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tiny_tokenizer(), unet=unet,
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    from backend.engine.pipeline import attach

    attach(pipe, "sdxl" if xl else "sd1")
    return pipe
