"""``TrainRequest``: one DreamBooth run's settings, validated at the boundary (no torch).

The same keys serve the CLI flags, ``train.yaml``, the TUI form and ``run.json``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from backend.config import TOP_KEYS
from backend.errors import RequestError
from backend.families import FAMILIES
from backend.request import MAX_SEED, check_prompt_length
from backend.values import check_text, kind_of, to_bool, to_float, to_int

METHODS = ("full", "lora")
PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard")
# diffusers.optimization.get_scheduler's names (piecewise_constant left out: it needs rules).
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# diffusers' DreamBooth example defaults: 5e-6 for a full fine-tune, 1e-4 for LoRA.
DEFAULT_LR = {"full": 5e-6, "lora": 1e-4}
PROMPTS = ("instance_prompt", "class_prompt", "validation_prompt")  # free text: NUL allowed, unlike names and paths
REQUIRED = ("model", "instance_dir", "instance_prompt")  # the settings a run cannot do without


@dataclass
class TrainRequest:
    model: str = ""
    instance_dir: str = ""
    instance_prompt: str = ""
    class_prompt: str | None = None
    method: str = "lora"
    rank: int = 4
    max_steps: int = 400
    lr: float | None = None  # None = DEFAULT_LR[method]
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int = 0  # 0 = the model family's default size
    num_class_images: int = 100
    prior_preservation: bool | None = None  # None = on when class_prompt is given
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    mixed_precision: str | None = None  # None = accelerate's config ("no" without one)
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    cache_latents: bool = False
    snr_gamma: float | None = None
    offset_noise: float = 0.0
    center_crop: bool = False
    random_flip: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validation_prompt: str | None = None
    validation_every: int = 100
    seed: int = -1  # -1 = random, fixed when the run is prepared
    report_to: str = "none"
    output: str | None = None  # the run directory; None = a new folder in the runs folder
    resume: str | None = None  # "latest", a checkpoint folder, or None

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainRequest":
        """Build from a dict (YAML, JSON, form); keys may use ``-`` or ``_``. Values are coerced; text must be
        UTF-8 and only the prompts may hold a NUL."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                # an app config given to train --config (rather than before ``train``) holds paths, keymap...
                hint = "; the app's settings go in `dreamtty --config FILE train ...`" if name in TOP_KEYS else ""
                raise RequestError(name, f"unknown setting; allowed: {', '.join(sorted(known))}{hint}")
            check_text(name, value, nul=name in PROMPTS)
            values[name] = parse_field(name, value)
        return cls(**values)

    # -- validation ----------------------------------------------------
    @property
    def prior(self) -> bool:
        """Whether class-prior preservation is on."""
        return bool(self.class_prompt) if self.prior_preservation is None else self.prior_preservation

    def validate(self) -> "TrainRequest":
        """Check every field; raise a one-line RequestError naming the first bad one."""
        for f in fields(self):
            check_field(f.name, getattr(self, f.name))
        for name in REQUIRED:
            if not (getattr(self, name) or "").strip():
                raise RequestError(name, "is required")
        for name in PROMPTS:  # as a generation's prompts
            check_prompt_length(name, getattr(self, name) or "")
        if self.lr_warmup_steps and self.lr_warmup_steps >= self.max_steps:
            raise RequestError("lr_warmup_steps", f"{self.lr_warmup_steps} must be below max_steps ({self.max_steps})")
        if self.prior and not (self.class_prompt or "").strip():
            raise RequestError("class_prompt", "is required for prior preservation (or turn it off: "
                                               "--no-prior-preservation, or prior_preservation: false)")
        if self.prior and self.num_class_images < 1:
            raise RequestError("num_class_images", "must be at least 1 with prior preservation")
        return self

    def unused(self) -> list[str]:
        """A warning for each setting given that this run does not use (a LoRA rank on a full fine-tune,
        prior-preservation settings with it off)."""
        defaults = TrainRequest()
        unused = [name for name in ("rank",) if self.method != "lora" and self.rank != defaults.rank]
        if not self.prior:
            unused += [name for name in ("class_prompt", "num_class_images", "prior_loss_weight")
                       if getattr(self, name) not in (getattr(defaults, name), "")]
        why = {"rank": "the LoRA rank, unused by a full fine-tune (--method full)"}
        off = "unused with prior preservation off (turn it on: --prior-preservation, or prior_preservation: true)"
        return [f"{name}: {why.get(name, off)}; ignored"
                for name in unused]

    def resolved(self, family: str) -> "TrainRequest":
        """Validate and fill the defaults that depend on the model family (size, lr, seed, prior)."""
        self.validate()
        fam = FAMILIES.get(family)
        resolution = self.resolution or (fam.default_size if fam else 512)
        if fam and resolution > fam.max_side:
            raise RequestError("resolution", f"{resolution} is too large for {fam.label}; allowed up to {fam.max_side}")
        seed = random.randint(0, MAX_SEED) if self.seed == -1 else self.seed
        lr = DEFAULT_LR[self.method] if self.lr is None else self.lr
        schedule = self.lr_scheduler
        if schedule == "constant" and self.lr_warmup_steps:  # a warmup asked for is a warmup done
            schedule = "constant_with_warmup"
        return replace(self, resolution=resolution, seed=seed, lr=lr, lr_scheduler=schedule,
                       prior_preservation=self.prior)


# Numeric limits (inclusive). Generous: they catch typos, not taste.
_RANGES = {
    "rank": (1, 1024),
    "max_steps": (1, 10_000_000),
    "lr": (1e-10, 1.0),
    "lr_warmup_steps": (0, 10_000_000),
    "batch_size": (1, 1024),
    "grad_accum": (1, 1024),
    "resolution": (0, 4096),
    "num_class_images": (0, 100_000),
    "prior_loss_weight": (0.0, 100.0),
    "snr_gamma": (0.01, 100.0),
    "offset_noise": (0.0, 1.0),
    "checkpoint_every": (1, 10_000_000),
    "keep_checkpoints": (1, 1000),
    "validation_every": (1, 10_000_000),
}

_ZERO_MEANS = {"resolution": " (0: the model's size)"}
_KINDS = {f.name: f.type for f in fields(TrainRequest)}


def parse_field(name: str, value: object) -> object:
    """Coerce ``value`` (typed, or text from a form or YAML) to the field's type, or raise RequestError."""
    kind = _KINDS.get(name)
    if kind is None:
        raise RequestError(name, "unknown setting")
    optional = "None" in kind
    base = kind.split("|")[0].strip()
    if isinstance(value, str) and base != "str":
        value = value.strip()
        if value == "" or value.lower() == "none":
            value = None
    if value is None:
        if optional:
            return None
        if base == "str":
            return ""
        raise RequestError(name, f"is required ({_WORDS[base]})")
    if base == "str":
        if optional and isinstance(value, str) and not value.strip():
            return None
        if name == "mixed_precision" and value is False:  # YAML 1.1 reads `no` and `off` as false
            return "no"
        if not isinstance(value, (str, Path)):
            raise RequestError(name, f"must be text, got {kind_of(value)}")
        return str(value)
    if base == "bool":
        return to_bool(name, value)
    if isinstance(value, bool):
        raise RequestError(name, f"must be {_WORDS[base]}, got {kind_of(value)}")
    return to_int(name, value) if base == "int" else to_float(name, value)


_CHOICES = {"method": METHODS, "report_to": REPORT_TO, "lr_scheduler": LR_SCHEDULES, "mixed_precision": PRECISIONS}


def check_field(name: str, value: object) -> object:
    """``parse_field`` plus the checks of that field alone (range, choice, multiple of 8); the
    parsed value. Empty text is fine here: the default applies, or ``validate`` asks for it."""
    value = parse_field(name, value)
    if value is None:
        return value
    if name in _CHOICES:
        _choice(name, value, _CHOICES[name])
    limits = _RANGES.get(name)
    if limits and not limits[0] <= value <= limits[1]:
        meaning = _ZERO_MEANS.get(name, "")
        raise RequestError(name, f"{value} is out of range; allowed {limits[0]}..{limits[1]}{meaning}")
    if name == "resolution" and value % 8:
        raise RequestError(name, f"{value} is not a multiple of 8; try {value // 8 * 8 or 8}")
    if name == "seed" and value != -1 and not 0 <= value <= MAX_SEED:
        raise RequestError(name, f"{value} is out of range; allowed -1 (random) or 0..{MAX_SEED}")
    if name == "resume" and not value.strip():
        raise RequestError(name, "is empty; use latest or a checkpoint folder")
    return value


def check_precision(method: str, precision: str | None, on_cpu: bool) -> None:
    """Refuse fp16 for a full fine-tune on the CPU: accelerate autocasts fp16 on a GPU only, and the fp32 UNet
    would meet fp16 inputs there (LoRA's fp16 UNet and bf16 autocast are fine)."""
    if on_cpu and method == "full" and precision == "fp16":
        raise RequestError("mixed_precision", "fp16 needs a CUDA GPU for a full fine-tune; use bf16 or no on the CPU")


_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RequestError(name, f"unknown {value!r}; allowed: {', '.join(allowed)}")


def load_yaml(path: str | Path) -> dict:
    """Read a ``train.yaml`` (same keys as the flags); one-line errors."""
    import yaml

    from backend import user_files, yaml_text

    try:
        data = yaml_text.load(user_files.read_text(path))
    except OSError as exc:
        raise RequestError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise RequestError("config", f"{path} is not UTF-8 text (a train.yaml is expected)") from None
    except yaml.YAMLError as exc:
        raise RequestError("config", f"{path} is not valid YAML{yaml_text.fault(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RequestError("config", f"{path} must hold a mapping of settings (key: value)")
    out: dict = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in out:
            raise RequestError(name, f"is given twice in {path} (as {spelled[name]} and {key})")
        out[name], spelled[name] = value, str(key)
    return out
