"""Model families: defaults, size limits, aspect-ratio lists, preview maps."""

from __future__ import annotations

from dataclasses import dataclass

# What a model field may name (the --model help and its errors).
MODEL_NAMES = ("demo, demo-xl, a checkpoint name (dreamtty models list), a .safetensors file, a diffusers folder or "
               "a Hugging Face id")


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    xl: bool
    default_size: int
    max_side: int
    default_steps: int
    # Latent (4 channels) -> RGB in [-1, 1]: rgb = latents @ matrix + bias. Cheap preview, no VAE decode.
    preview_matrix: tuple[tuple[float, float, float], ...]
    preview_bias: tuple[float, float, float]

    def tile_side(self, width: int, height: int) -> int | None:
        """Tile side in pixels for denoising a ``width`` x ``height`` image in tiles (backend.engine.tiles), or
        None when the model takes it whole: tiles of the default size once a side exceeds 1.5 times it."""
        return self.default_size if max(width, height) > self.default_size * 3 // 2 else None


# Per-channel latent->RGB factors published for SD1.x/2.x and SDXL latents.
_SD_RGB = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
_XL_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188))
_XL_BIAS = (0.1084, -0.0175, -0.0011)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "SD 1.x", False, 512, 1536, 30, _SD_RGB, (0.0, 0.0, 0.0)),
        Family("sd2", "SD 2.x", False, 512, 1536, 30, _SD_RGB, (0.0, 0.0, 0.0)),
        Family("sd2-v", "SD 2.x (v-prediction)", False, 768, 1536, 30, _SD_RGB, (0.0, 0.0, 0.0)),
        Family("sdxl", "SDXL", True, 1024, 2048, 30, _XL_RGB, _XL_BIAS),
        Family("sdxl-refiner", "SDXL refiner", True, 1024, 2048, 30, _XL_RGB, _XL_BIAS),
        # The demo models: tiny random weights; small defaults keep every feature at CPU speed.
        Family("demo", "demo (SD1-style, tiny)", False, 128, 512, 8, _SD_RGB, (0.0, 0.0, 0.0)),
        Family("demo-xl", "demo (SDXL-style, tiny)", True, 128, 512, 8, _XL_RGB, _XL_BIAS),
    )
}

# Aspect-ratio presets (width, height) per size class, all multiples of 64.
_SIZES_512 = [(512, 512), (576, 448), (448, 576), (640, 384), (384, 640), (768, 512), (512, 768)]
_SIZES_768 = [(768, 768), (896, 640), (640, 896), (1024, 576), (576, 1024)]
_SIZES_1024 = [
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
]
_SIZES_DEMO = [(128, 128), (192, 128), (128, 192), (256, 256)]


def family_label(family: str) -> str:
    """A family's name for people ("SDXL"); an unknown one as it is named."""
    fam = FAMILIES.get(family)
    return fam.label if fam else family


def aspect_sizes(family: str) -> list[tuple[int, int]]:
    """Sizes that suit the family, default first."""
    fam = FAMILIES[family]
    if family.startswith("demo"):
        return list(_SIZES_DEMO)
    if fam.xl:
        return list(_SIZES_1024)
    return list(_SIZES_768 if fam.default_size == 768 else _SIZES_512)
