"""Tiny random-weight companions of the demo models, built offline like the demo models themselves.

For ``demo`` and ``demo-xl``: an IP-Adapter "plus" (image) and a face adapter in the original file layout
(``image_proj.*`` Resampler weights, ``ip_adapter.N.to_k_ip/to_v_ip``) and canny, depth and structure
ControlNets made from the demo UNet (``ControlNetModel.from_unet``). Shared by both: a tiny CLIP vision
encoder, a Depth Anything depth model, a BLIP captioner and an image-classifier tagger. Weights are seeded,
so every build is the same; the zero-initialised outputs of a fresh ControlNet get small random weights
too, or its residuals would change nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from backend import locations
from backend.library import DEMO_MODELS

ENCODER_WIDTH = 32
CAPTION_WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "house", "tree", "sky", "on", "in", "with",
                 "person", "car", "grass", "small", "old", "painting")
TAGS = ("general", "sensitive", "questionable", "explicit", "1girl", "solo", "smile", "long_hair", "blue_eyes",
        "outdoors", "sky", "school_uniform", "short_hair", "flower", "looking_at_viewer", "^_^")


def companions_dir() -> Path:
    return locations.demo_models_dir() / "companions"


def _built(name: str, build: Callable[[Path], None]) -> Path:
    """Build companion ``name`` once (atomically, like the demo models); its folder."""
    target = companions_dir() / name
    marker = target / "dreamtty_demo.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "dreamtty_demo.json").write_text(json.dumps({"companion": name}))
        try:
            tmp.rename(target)
        except OSError:  # another process built it first, or a crash left it incomplete
            if not marker.exists():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_companion(name: str) -> Path:
    """The folder of built-in companion ``name`` (backend.library.built_in_companions), built on first use."""
    if name == "demo-image-encoder":
        return _built(name, _image_encoder)
    if name == "demo-depth-model":
        return _built(name, _depth_model)
    if name == "demo-captioner":
        return _built(name, _captioner)
    if name == "demo-tagger":
        return _built(name, _tagger)
    family, _, kind = name.rpartition("-")
    if family in DEMO_MODELS and kind in ("image", "face"):
        return _built(name, lambda folder: _ip_adapter(folder, family, seed=10 if kind == "image" else 11))
    if family in DEMO_MODELS and kind in ("canny", "depth", "structure"):
        return _built(name, lambda folder: _controlnet(folder, family, seed={"canny": 20, "depth": 21}.get(kind, 22)))
    raise ValueError(f"no built-in companion {name}")


ADAPTER_FILE = "ip-adapter.safetensors"


# -- IP-Adapter ----------------------------------------------------------------------------
def _image_encoder(folder: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(30)
    config = CLIPVisionConfig(hidden_size=ENCODER_WIDTH, intermediate_size=64, num_attention_heads=4,
                              num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=ENCODER_WIDTH)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)


def _original_resampler_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' IPAdapterPlusImageProjection weights under the original IP-Adapter "plus" names (the
    names diffusers' loader converts from)."""
    out = {}
    for key, value in state.items():
        layer = key.split(".")[1] if key.startswith("layers.") else None
        name = key
        for ours, original in (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"),
                               ("attn.to_out.0", "0.to_out"), ("ff.0", "1.0"), ("ff.1.net.0.proj", "1.1"),
                               ("ff.1.net.2", "1.3")):
            name = name.replace(f"layers.{layer}.{ours}.", f"layers.{layer}.{original}.")
        if key.endswith("attn.to_k.weight"):
            name = f"layers.{layer}.0.to_kv.weight"
            value = torch.cat([value, state[key.replace("to_k", "to_v")]])
        elif key.endswith("attn.to_v.weight"):
            continue
        out[f"image_proj.{name}"] = value.contiguous()
    return out


def ip_adapter_weights(unet_config: dict, encoder_width: int, hidden_dims: int = 64, heads: int = 1,
                       queries: int = 4) -> dict[str, torch.Tensor]:
    """Random IP-Adapter "plus" weights in the original file layout for a UNet of ``unet_config`` and an image
    encoder of ``encoder_width`` (its hidden size): the Resampler, and per cross-attention layer (numbered
    1, 3, 5, ... in ``attn_processors`` order, as diffusers' loader reads them) ``to_k_ip``/``to_v_ip``."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    cross, blocks = unet_config["cross_attention_dim"], unet_config["block_out_channels"]
    projection = IPAdapterPlusImageProjection(embed_dims=encoder_width, output_dims=cross, hidden_dims=hidden_dims,
                                              heads=heads, num_queries=queries)
    state = _original_resampler_keys(projection.state_dict())
    with torch.device("meta"):
        names = list(UNet2DConditionModel.from_config(unet_config).attn_processors)
    key_id = 1
    for name in names:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        hidden = blocks[-1] if block is None else (blocks[block] if name.startswith("down") else blocks[::-1][block])
        for proj in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{proj}.weight"] = torch.nn.Linear(cross, hidden, bias=False).weight.detach()
        key_id += 2
    return state


def _ip_adapter(folder: Path, family: str, seed: int) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from backend.engine.demo_models import ensure_demo

    torch.manual_seed(seed)
    save_file(ip_adapter_weights(UNet2DConditionModel.load_config(ensure_demo(family) / "unet"), ENCODER_WIDTH),
              folder / ADAPTER_FILE)


# -- ControlNets -----------------------------------------------------------------------------
def _controlnet(folder: Path, family: str, seed: int) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from backend.engine.demo_models import ensure_demo

    unet = UNet2DConditionModel.from_pretrained(ensure_demo(family) / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    torch.manual_seed(seed)
    zero = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block]
    for conv in zero:  # ControlNet's zero convolutions: random here, so the demo control shows
        torch.nn.init.normal_(conv.weight, std=0.05)
    controlnet.save_pretrained(folder)


# -- depth model, captioner, tagger ----------------------------------------------------------------
def _depth_model(folder: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(31)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=56,
                            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)


def _captioner(folder: Path) -> None:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*special, *CAPTION_WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    torch.manual_seed(32)
    text = dict(vocab_size=len(special) + len(CAPTION_WORDS), hidden_size=32, intermediate_size=64,
                num_attention_heads=4, num_hidden_layers=2, encoder_hidden_size=32, max_position_embeddings=128,
                bos_token_id=5, sep_token_id=3, pad_token_id=0, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # random weights would end at once with [SEP]: words only, eight of them
        model.text_decoder.cls.predictions.bias[:len(special)] = -30.0
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)


def _tagger(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(33)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                       patch_size=8, num_labels=len(TAGS), id2label=dict(enumerate(TAGS)),
                       label2id={t: i for i, t in enumerate(TAGS)}, problem_type="multi_label_classification")
    ViTForImageClassification(config).save_pretrained(folder)
