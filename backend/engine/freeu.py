"""FreeU (Si et al. 2023, arXiv 2309.11497) through diffusers' ``unet.enable_freeu``.

Pipelines stay cached between jobs, so every job sets FreeU explicitly:
on with its values, or off (``disable_freeu``, which restores the plain UNet exactly).
"""

from __future__ import annotations

from backend.engine.pipeline import is_xl
from backend.guidance_settings import freeu_defaults


def pipeline_family(pipe) -> str:
    """Our family name for a loaded pipeline (set by the loader; guessed for bare pipelines)."""
    state = getattr(pipe, "dreamtty", None)
    return state.family if state is not None else "sdxl" if is_xl(pipe) else "sd1"


def set_freeu(pipe, freeu: tuple[float, ...] | None) -> None:
    """None = off; () = the family's documented defaults; else (s1, s2, b1, b2)."""
    if freeu is None:
        pipe.unet.disable_freeu()
        return
    pipe.unet.enable_freeu(*(freeu or freeu_defaults(pipeline_family(pipe))))
