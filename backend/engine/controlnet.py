"""ControlNets in our own loop: the residuals they add to each UNet call, as diffusers' ControlNet pipelines make them.

Per UNet call, the ControlNets whose reference still applies (``control_guidance_end`` rule) run on the same
batch as the UNet (every guidance row: CFG's, PerpNeg's, PAG's, SAG's extra call), with the same text
embeddings (and SDXL's text embeds and time ids) and their map, scaled by the reference's weight; diffusers'
``MultiControlNetModel`` sums their residuals. A call with none applying gets none, which equals adding the
zero residuals the stock pipeline adds. Loaded ControlNets stay on the pipeline while jobs use them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from backend.engine.pipeline import execution_device
from backend.errors import ModelError
from backend.safetext import first_line


def load_controlnets(pipe, folders: list[str]) -> list:
    """The ControlNets in ``folders`` (diffusers folders), loaded in the pipeline's dtype on its device; those
    no longer asked for are dropped."""
    from diffusers import ControlNetModel

    loaded: dict[str, object] = pipe.dreamtty.controlnets
    for stale in set(loaded) - set(folders):
        del loaded[stale]
    for folder in folders:
        if folder not in loaded:
            try:
                net = ControlNetModel.from_pretrained(folder, local_files_only=True, dtype=pipe.unet.dtype)
            except Exception as exc:
                raise ModelError(f"image_prompt: cannot load the ControlNet {Path(folder).name}: "
                                 f"{first_line(exc)}") from None
            loaded[folder] = net.to(execution_device(pipe))
    return [loaded[folder] for folder in folders]


def control_tensor(pipe, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A map as the stock ControlNet pipelines feed it: resized to the image's size, RGB in 0..1, (1, 3, h, w)."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    pixels = processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    # contiguous, as the stock pipelines' batching leaves it: a convolution on the processor's channels-last view
    # takes another kernel, which rounds differently
    return pixels.to(execution_device(pipe), pipe.unet.dtype).contiguous()


class Residuals:
    """The summed residuals of the ControlNets that apply, for one UNet call."""

    def __init__(self) -> None:
        self._multi: dict[tuple[int, ...], object] = {}

    def __call__(self, nets: list, maps: list[torch.Tensor], scales: list[float], latents: torch.Tensor, t,
                 embeds: torch.Tensor, added: dict | None) -> dict:
        """The residuals as UNet keyword arguments (``down_block_additional_residuals``,
        ``mid_block_additional_residual``); ``added``: SDXL's text embeds and time ids, or None."""
        if not nets:
            return {}
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        key = tuple(id(net) for net in nets)
        multi = self._multi.get(key) or self._multi.setdefault(key, MultiControlNetModel(nets))
        batch = latents.shape[0]
        down, mid = multi(latents, t, encoder_hidden_states=embeds,
                          controlnet_cond=[m.expand(batch, -1, -1, -1) for m in maps], conditioning_scale=scales,
                          added_cond_kwargs=added, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
