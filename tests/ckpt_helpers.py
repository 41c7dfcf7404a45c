"""Test helpers: tiny pipelines saved as single-file checkpoints in the original (LDM/SGM) key layout.

diffusers ships only the original -> diffusers direction (``loaders.single_file_utils``),
so this is the inverse, following the well-known layout of the LDM UNet
(input_blocks / middle_block / output_blocks), the LDM VAE (down / mid / up,
1x1-conv attention) and the OpenCLIP text tower (resblocks with fused in_proj).
It is generic in the number of levels and layers per block so tiny models work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _unet_prefixes(config: dict) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) pairs for a UNet2DConditionModel config."""
    per = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    out = []
    for i in range(levels):
        for j in range(per):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (per + 1) + j}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (per + 1) + j}.1.", False))
        if i < levels - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.", False))
        has_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(per + 1):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (per + 1) + j}.0.", True))
            out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (per + 1) + j}.1.", False))
        if i < levels - 1:
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}.", False))
    out.append(("mid_block.attentions.0.", "middle_block.1.", False))
    out += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    return out


def unet_to_ldm(sd: dict, config: dict) -> dict:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in sd.items():
        new = None
        for src, dst in _UNET_TOP.items():
            if key.startswith(src + "."):
                new = dst + key[len(src):]
        for src, dst, resnet in prefixes:
            if key.startswith(src):
                rest = key[len(src):]
                if resnet:
                    head, _, tail = rest.partition(".")
                    rest = f"{_RESNET[head]}.{tail}"
                new = dst + rest
                break
        assert new is not None, key
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict, config: dict) -> dict:
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for i in range(levels):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(per)]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        up = levels - 1 - i
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.") for j in range(per + 1)]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        new = key
        for src, dst in pairs:
            if key.startswith(src):
                new = dst + key[len(src):]
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            head, _, tail = new.partition(".mid.attn_1.")
            name, _, param = tail.rpartition(".")
            new = f"{head}.mid.attn_1.{attn[name]}.{param}"
            if param == "weight" and name != "group_norm":
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """HF CLIP text model -> the LDM CLIP-L layout (``<prefix>text_model.*``)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}


def clip_to_openclip(sd: dict, prefix: str) -> dict:
    """HF CLIP text model (with or without projection) -> the OpenCLIP layout (fused in_proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if "position_ids" not in k}
    out = {
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = sd.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = sd.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = sd.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = sd.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = sd.pop(src + f"mlp.fc2.{kind}")
    assert not sd, sorted(sd)
    return out


# Where each family keeps its text encoders in a single file: (pipeline attribute, prefix, layout).
TEXT_LAYOUT = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "clip")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")],
    "sdxl-refiner": [("text_encoder_2", "conditioner.embedders.0.model.", "openclip")],
}


LAYOUT_OF = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner"}  # family -> layout


def pipeline_to_ldm(pipe, layout: str) -> dict:
    """The whole pipeline as one original-layout state dict (``layout`` is a TEXT_LAYOUT key)."""
    sd = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    for attr, prefix, kind in TEXT_LAYOUT[layout]:
        te = getattr(pipe, attr).state_dict()
        sd.update(clip_to_ldm(te, prefix) if kind == "clip" else clip_to_openclip(te, prefix))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_single_file(pipe, layout: str, path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_ldm(pipe, layout), str(path), metadata=metadata)
    return path


def write_family_config(pipe, folder: Path) -> Path:
    """A config folder (configs + tokenizers, no weights) describing ``pipe``, for DREAMTTY_MODEL_CONFIGS."""
    tmp = folder.parent / f".{folder.name}-full"
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in tmp.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors" and path.name != "dreamtty_demo.json":
            target = folder / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    shutil.rmtree(tmp)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"].startswith("StableDiffusion")
    return folder


def _tiny_unet(cross_attention_dim: int, time_ids: int, pooled: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * time_ids + pooled,
    )


def tiny_xl():
    """A tiny SDXL-style pipeline whose two encoders differ in width (48 vs 32), as SDXL's do.

    (diffusers tells the two encoders of a single file apart by width; the demo model's are equal.)
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from backend.engine import demo_models

    torch.manual_seed(8)
    unet = _tiny_unet(32 + 48, 6, 48)
    te1 = CLIPTextModel(demo_models._text_config())
    te2 = CLIPTextModelWithProjection(
        demo_models._text_config().__class__(**{**demo_models._text_config().to_dict(), "hidden_size": 48, "projection_dim": 48})
    )
    return StableDiffusionXLPipeline(
        vae=demo_models._vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=demo_models.tiny_tokenizer(),
        tokenizer_2=demo_models.tiny_tokenizer(pad_token="!"), unet=unet, scheduler=demo_models._scheduler(),
    )


def tiny_refiner():
    """A tiny SDXL-refiner-style pipeline (OpenCLIP-bigG-like encoder only, aesthetic-score time ids)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection

    from backend.engine import demo_models

    torch.manual_seed(5)
    unet = _tiny_unet(32, 5, 32)
    te2 = CLIPTextModelWithProjection(demo_models._text_config())
    torch.manual_seed(7)
    return StableDiffusionXLImg2ImgPipeline(
        vae=demo_models._vae(), text_encoder=None, text_encoder_2=te2, tokenizer=None,
        tokenizer_2=demo_models.tiny_tokenizer(pad_token="!"), unet=unet, scheduler=demo_models._scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
