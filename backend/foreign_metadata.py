"""Parameters from other tools' images: A1111 ``parameters`` text and Fooocus metadata -> a GenerateRequest.

The request is as close as our samplers allow. Each reader returns ``(request, warnings)``: the
warnings say that the pixels will differ from the other tool's and list what was not carried over,
for front ends to show. Formats, from their documentation and output (no code of theirs is used):

- A1111 (and Forge, Civitai, ...): the ``parameters`` text chunk, see :mod:`backend.infotext`.
  LoRAs stay in the prompt as ``<lora:name:weight>`` tags, which our requests read too.
- Fooocus: a ``parameters`` chunk holding JSON (``fooocus_scheme`` = ``fooocus``), or A1111-style
  text whose ``Version`` starts with "Fooocus" and that adds ``Scheduler``, ``Sharpness``,
  ``ADM Guidance``, ``Adaptive CFG``, ``FreeU`` and ``Lora weights``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import dataclass, field, replace

from backend import config, infotext, user_files
from backend.errors import DreamttyError, RequestError
from backend.extras_check import LORA_TAG, find_extra, without_tags
from backend.families import FAMILIES
from backend.guidance_settings import GuidanceSettings
from backend.prompting.wildcards import ARRAY, WILDCARD
from backend.request import MAX_CFG, MAX_SEED, MAX_STEPS, GenerateRequest, parse_size
from backend.safetext import cut
from backend.samplers import SAMPLERS
from backend.values import kind_of, to_float, to_int

MAX_TEXT = 1_000_000  # characters; a parameters text is a few hundred

_OUR_SAMPLERS = {label.lower(): ours for ours, label in infotext.A1111_SAMPLERS.items()}
_OUR_SAMPLERS.update({s.label.lower(): s.name for s in SAMPLERS.values() if s.label.lower() not in _OUR_SAMPLERS})
# Fooocus's (ComfyUI's) sampler names; a "_gpu" variant differs only in where its noise is drawn.
_OUR_SAMPLERS.update({
    "euler_ancestral": "euler_a", "dpm_2": "dpm2", "dpm_2_ancestral": "dpm2_a", "dpmpp_2m": "dpmpp_2m",
    "dpmpp_sde": "dpmpp_sde", "dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde", "uni_pc": "uni_pc", "uni_pc_bh2": "uni_pc",
    **{name: name for name in ("euler", "heun", "lms", "ddim", "ddpm", "lcm", "tcd")},
})
# A1111 schedule labels and Fooocus scheduler names -> ours. diffusers runs "simple" like sgm_uniform
# (trailing timesteps); Fooocus runs its "lcm" and "tcd" schedulers as sgm_uniform.
_OUR_SCHEDULES = {
    "uniform": "normal", "normal": "normal", "karras": "karras", "exponential": "exponential",
    "sgm uniform": "sgm_uniform", "sgmuniform": "sgm_uniform", "sgm_uniform": "sgm_uniform",
    "simple": "sgm_uniform", "lcm": "sgm_uniform", "tcd": "sgm_uniform",
}
_AUTOMATIC = {label.lower(): schedule for label, schedule in infotext.AUTOMATIC.items()}
_GUIDANCE = {key.lower(): name for name, key in infotext.GUIDANCE_KEYS.items()}
# Fields that describe the image but set nothing here (hashes, the other tool's bookkeeping).
_INFO_ONLY = {
    "model hash", "vae hash", "lora hashes", "ti hashes", "refiner hash", "version", "raw prompt",
    "raw negative prompt", "performance", "user", "styles", "metadata scheme", "fooocus v2 expansion",
}
_OTHER_TAGS = re.compile(r"\s*<(?:hypernet|lyco):[^>]*>")
# Fooocus JSON key -> the key of its A1111-style text (Fooocus's own pairing), so one reader serves both.
_FOOOCUS_KEYS = {
    "steps": "Steps", "sampler": "Sampler", "scheduler": "Scheduler", "vae": "VAE", "guidance_scale": "CFG scale",
    "seed": "Seed", "sharpness": "Sharpness", "adm_guidance": "ADM Guidance", "adaptive_cfg": "Adaptive CFG",
    "freeu": "FreeU", "base_model": "Model", "refiner_model": "Refiner", "refiner_switch": "Refiner switch at",
    "clip_skip": "Clip skip", "refiner_swap_method": "Refiner Swap Method", "overwrite_switch": "Overwrite Switch",
    "version": "Version", "styles": "Styles", "performance": "Performance", "base_model_hash": "Model hash",
    "refiner_model_hash": "Refiner hash", "prompt_expansion": "Fooocus V2 Expansion", "created_by": "User",
    "metadata_scheme": "Metadata Scheme",
}
_FOOOCUS_USED = {"prompt", "negative_prompt", "full_prompt", "full_negative_prompt", "resolution", "loras"}
_FOOOCUS_ADAPTIVE_CFG = 7.0  # Fooocus records "CFG Mimicking from TSNR" only when it is not this default


def from_png_text(chunks: dict[str, str], source: str) -> tuple[GenerateRequest, list[str]]:
    """The request from an image's text chunks (its ``parameters``, and Fooocus's ``fooocus_scheme``)."""
    if chunks.get("fooocus_scheme") == "fooocus":
        return from_fooocus(_json_object(chunks["parameters"], source), source)
    return from_text(chunks["parameters"], source)


def from_text(text: str, source: str = "text") -> tuple[GenerateRequest, list[str]]:
    """The request from a pasted parameters text: A1111 style, or Fooocus's JSON.

    ``source`` names where the text came from in errors, e.g. ``image: x.png`` or ``from-text: -``.
    """
    if len(text) > MAX_TEXT:
        raise _error(source, f"{len(text)} characters is too long for a parameters text (at most {MAX_TEXT})")
    parsed = infotext.parse(text)
    if text.lstrip().startswith("{") and (parsed is None or _is_json(text)):  # else a prompt like "{a|b} car"
        return from_fooocus(_json_object(text, source), source)
    if parsed is None:
        raise _error(source, "no parameters found; expected A1111's text (its last line like "
                             "'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512') or Fooocus's JSON")
    version = parsed.fields.get("Version", "")
    tool = "Fooocus" if version.startswith("Fooocus") else "dreamtty" if version == "dreamtty" else "A1111"
    prompt, removed = _OTHER_TAGS.sub("", parsed.prompt), _OTHER_TAGS.findall(parsed.prompt)
    reader = _Reader(tool, version, {"prompt": prompt, "negative_prompt": parsed.negative})
    reader.unmapped += [f"{tag.strip()} (not supported)" for tag in removed]
    return reader.read(parsed.fields)


def without_missing_extras(request: GenerateRequest) -> tuple[GenerateRequest, list[str]]:
    """``request`` (read from another tool's image) without the LoRAs and the VAE this machine does not have,
    and what was left out: reproduce runs the closest request without them (one missing refused the whole
    image, and reproduce has no flag that drops it). Called where the job runs (``Client.closest``)."""
    cfg = config.load()

    @functools.cache
    def here(kind: str, name: str) -> bool:
        try:
            find_extra(kind, name, cfg)
        except DreamttyError:
            return False
        return True

    texts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    left = list(dict.fromkeys(f"{tag.group()} (no LoRA {tag.group(1).strip()} here)" for text in texts.values()
                              for tag in LORA_TAG.finditer(text) if not here("lora", tag.group(1).strip())))
    texts = {key: without_tags(text, lambda name: not here("lora", name)) for key, text in texts.items()}
    loras = [(name, weight) for name, weight in request.loras if here("lora", name)]
    left += [f"LoRA {name}: {weight:g} (not here)" for name, weight in request.loras if (name, weight) not in loras]
    vae = request.vae if request.vae is None or here("vae", request.vae) else None
    left += [f"VAE: {_short(request.vae)} (not here; the model's own is used)"] if vae != request.vae else []
    return replace(request, **texts, loras=loras, vae=vae), [f"not carried over: {'; '.join(left)}"] if left else []


def from_fooocus(data: dict, source: str) -> tuple[GenerateRequest, list[str]]:
    """The request from Fooocus's JSON metadata (its ``parameters`` chunk or a copied log entry); ``source``
    as :func:`from_text`'s. A JSON object with none of Fooocus's keys is refused: it holds nothing to reproduce."""
    if not any(key in _FOOOCUS_KEYS or key in _FOOOCUS_USED for key in data):
        raise _error(source, "the JSON holds none of Fooocus's keys (prompt, steps, seed, resolution, ...); give "
                             "Fooocus's metadata, dreamtty's, or A1111's text")
    fields = {_FOOOCUS_KEYS.get(k, k): v for k, v in data.items() if k not in _FOOOCUS_USED
              and not k.startswith("lora_combined_") and v not in ("", "None", None)}
    if "resolution" in data:  # "(1024, 1024)"; one that is not two numbers is said as written
        sides = re.findall(r"\d+", str(data["resolution"]))
        fields["Size"] = "x".join(sides) if len(sides) == 2 else str(data["resolution"])
    loras, unread = _fooocus_loras(data)
    if loras:
        fields["Lora weights"] = ", ".join(s.replace(" : ", ": ") for s in loras)
    prompt, negative = (_texts(data.get(k)) for k in ("full_prompt", "full_negative_prompt"))
    if prompt is None:
        prompt = _texts(data.get("prompt")) or ""
        if data.get("styles") not in (None, "", "[]"):
            fields["Styles (not applied)"] = str(data["styles"])
    if negative is None:
        negative = _texts(data.get("negative_prompt")) or ""
    unread += [f"{key}: {_short(_json(data[key]))} (not a text or a list of texts)" for key in _FOOOCUS_TEXTS
               if data.get(key) is not None and _texts(data[key]) is None]
    fields = {k: str(v) for k, v in fields.items()}
    version = fields.get("Version", "Fooocus")
    reader = _Reader("Fooocus", version, {"prompt": prompt, "negative_prompt": negative}, unmapped=unread)
    return reader.read(fields)


_FOOOCUS_TEXTS = ("prompt", "negative_prompt", "full_prompt", "full_negative_prompt")


def _fooocus_loras(data: dict) -> tuple[list[str], list[str]]:
    """Fooocus's LoRAs as "name : weight" texts (its ``lora_combined_N`` fields, else its ``loras`` list of
    [name, weight] pairs), and a note for what of them is not such a pair (any JSON may be pasted)."""
    combined = [str(v) for k, v in sorted(data.items()) if k.startswith("lora_combined_")]
    listed = data.get("loras")
    if combined or listed in (None, "", "None"):
        return combined, []
    pairs = listed if isinstance(listed, list) else [listed]
    good = [f"{x[0]} : {x[1]}" for x in pairs if isinstance(x, list) and len(x) >= 2]
    return good, [f"loras: {_short(_json(x))} (not a [name, weight] pair)" for x in pairs
                  if not (isinstance(x, list) and len(x) >= 2)]


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass
class _Reader:
    """Turns one tool's fields (A1111 text keys) into request fields, noting what it cannot carry over."""

    tool: str
    version: str
    request: dict
    guidance: dict = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)

    def read(self, fields: dict[str, str]) -> tuple[GenerateRequest, list[str]]:
        for key, value in fields.items():
            if key.lower() not in _INFO_ONLY | {"sampler", "schedule type", "scheduler"}:
                self._field(key, value)
        if self.tool == "Fooocus":
            self.guidance.setdefault("adaptive_cfg", _FOOOCUS_ADAPTIVE_CFG)
        if "model" not in self.request:
            self.unmapped.append("Model: not recorded (the default model is used unless one is given)")
        if "Sampler" in fields:
            self._sampler(fields["Sampler"], fields.get("Scheduler") or fields.get("Schedule type"))
        request = GenerateRequest(**self.request, guidance=GuidanceSettings.from_dict(self._usable_guidance()))
        warnings = []
        if self.tool != "dreamtty":
            maker = self.version if self.version.startswith(self.tool) else f"{self.tool} {self.version}".strip()
            warnings.append(f"made by {maker}: the request is the closest dreamtty has; "
                            "its pixels will differ from the original's (other samplers, noise and encoders)")
        if self.unmapped:
            warnings.append(f"not carried over: {'; '.join(self.unmapped)}")
        return request, [*warnings, *self._own_syntax()]

    def _usable_guidance(self) -> dict:
        """The guidance controls read, each checked alone: one out of range keeps its default and is said, as a
        step count out of range is (``Clip skip: 0`` refused the whole image)."""
        usable = {}
        for name, value in self.guidance.items():
            try:
                GuidanceSettings.from_dict({name: value}).check_values()
            except RequestError as exc:
                self.unmapped.append(f"{infotext.GUIDANCE_KEYS.get(name, name)}: {_short(str(value))} ({exc.message}: "
                                     "the default is used)")
            else:
                usable[name] = value
        return usable

    def _own_syntax(self) -> list[str]:
        """Warnings for dreamtty's own syntax in another tool's final prompts: ``__name__`` picks a wildcard line
        and ``[[a, b]]`` an array element here, where that tool had read them as text and a down-weight."""
        if self.tool == "dreamtty":
            return []
        warnings = []
        for key in ("prompt", "negative_prompt"):
            text = self.request.get(key) or ""
            found = [m.group() for pattern in (WILDCARD, ARRAY) for m in pattern.finditer(text)]
            if found:
                warnings.append(f"{key}: {_short(', '.join(found))} is read as a wildcard or an array here, not as "
                                f"{self.tool} read it: the prompt made differs from the image's")
        return warnings

    def _field(self, key: str, value: str) -> None:
        name = key.lower()
        try:
            if name == "steps":
                self.request["steps"] = _within("steps", to_int("steps", value), 1, MAX_STEPS)
            elif name == "cfg scale":
                self.request["cfg"] = _within("cfg", to_float("cfg", value), 0, MAX_CFG)
            elif name == "seed":
                self._seed(to_int("seed", value))
            elif name == "size":
                self.request["width"], self.request["height"] = _size(value)
            elif name == "model":
                self.request["model"] = value
            elif name == "vae":
                if value not in ("Default (model)", "Automatic", "None"):
                    self.request["vae"] = value
            elif name == "refiner":
                self.request["refiner"] = re.sub(r"\s*\[[0-9a-f]+\]$", "", value)
            elif name == "refiner switch at":
                self.request["refiner_switch"] = to_float("refiner_switch", value)
            elif name == "lora weights":
                self.request["loras"] = [(n.strip(), to_float("lora", w)) for n, _, w in
                                         (x.rpartition(":") for x in value.split(", "))]
            elif name in _GUIDANCE:
                self._guidance(_GUIDANCE[name], value)
            else:
                self.unmapped.append(f"{key}: {_short(value)}")
        except RequestError as exc:
            self.unmapped.append(f"{key}: {_short(value)} ({exc.message})")

    def _guidance(self, name: str, value: str) -> None:
        if name == "clip_skip":
            self.guidance[name] = to_int(name, value)
            return
        numbers = [to_float(name, v) for v in re.findall(r"[-+0-9.eE]+", value)]
        if name == "freeu" and len(numbers) == 4:
            b1, b2, s1, s2 = numbers  # Fooocus's order; ours is (s1, s2, b1, b2)
            self.guidance[name] = (s1, s2, b1, b2)
        elif name in ("freeu", "adm_scale"):
            self.guidance[name] = tuple(numbers)
        else:
            self.guidance[name] = to_float(name, value)

    def _seed(self, seed: int) -> None:
        if seed < 0:  # -1: random, as the tools write it
            self.unmapped.append(f"Seed: {seed} (random: a new seed is drawn)")
            return
        if seed > MAX_SEED:
            self.unmapped.append(f"Seed: {seed} (outside 0..{MAX_SEED}; using {seed % (MAX_SEED + 1)})")
            seed %= MAX_SEED + 1
        self.request["seed"] = seed

    def _sampler(self, text: str, schedule: str | None) -> None:
        """Sampler and schedule; an A1111 name before v1.9 carries its schedule ("DPM++ 2M Karras")."""
        name = text.strip()
        for label in infotext.A1111_SCHEDULES:
            if name.lower().endswith(" " + label.lower()):
                name, schedule = name[: -len(label) - 1], schedule or label
                break
        sampler = _OUR_SAMPLERS.get(name.lower())
        if sampler is None:
            sampler = GenerateRequest.sampler
            self.unmapped.append(f"Sampler: {_short(name)} (none here; using {SAMPLERS[sampler].label})")
        self.request["sampler"] = sampler
        if schedule is None and not self._schedule_split():
            ours = "normal"  # before A1111 v1.9 a name without a schedule ran uniform timesteps
        elif schedule is None or schedule.lower() == "automatic":
            ours = _AUTOMATIC.get(name.lower(), "normal")
        else:
            ours = _OUR_SCHEDULES.get(schedule.lower())
            if ours is None:
                self.unmapped.append(f"Schedule type: {_short(schedule)} (none here)")
        if ours is not None and ours not in SAMPLERS[sampler].schedules:
            self.unmapped.append(f"Schedule type: {ours} (does not work with {SAMPLERS[sampler].label})")
            ours = None
        self.request["scheduler"] = ours

    def _schedule_split(self) -> bool:
        """True for A1111 v1.9 and later, where a missing schedule is the sampler's own default ("Automatic")."""
        found = re.search(r"v(\d+)\.(\d+)", self.version)
        return self.tool == "A1111" and found is not None and (int(found[1]), int(found[2])) >= (1, 9)


def _size(text: str) -> tuple[int, int]:
    """``WxH``, each side a multiple of 8 that some model family makes (the model's own limit is checked when the
    job is queued); RequestError otherwise."""
    width, height = parse_size(text)
    most = max(fam.max_side for fam in FAMILIES.values())
    for name, side in (("width", width), ("height", height)):
        if side % 8 or not 0 < side <= most:
            raise RequestError(name, f"{side} is not allowed; a positive multiple of 8 up to {most}: the model's "
                                     "default size is used")
    return width, height


def _within(name: str, value: float, low: float, high: float) -> float:
    """``value`` when it lies in ``low..high`` (what a request takes); RequestError otherwise (the default is used)."""
    if not low <= value <= high:
        raise RequestError(name, f"out of range; allowed {low:g}..{high:g}: the default is used")
    return value


def _texts(value: object) -> str | None:
    """Fooocus's prompt: a text, or a list of texts (each encoded on its own there; joined here)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(v for v in value if v.strip())
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _json_object(text: str, source: str) -> dict:
    try:
        data = json.loads(text)
    except RecursionError:
        raise _error(source, "Fooocus metadata is nested too deeply") from None
    except ValueError as exc:
        raise _error(source, f"Fooocus metadata is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _error(source, f"Fooocus metadata must be a JSON object, got {kind_of(data)}")
    return data


def _short(value: str) -> str:
    return cut(value, 40)


def _error(source: str, message: str) -> RequestError:
    field_name, _, where = source.partition(": ")
    return RequestError(field_name, f"{where}: {message}" if where else message)


def read_text_file(path: str) -> str:
    """A parameters text from a file, or from stdin for ``-``; a one-line error when it cannot be read."""
    if not path.strip():
        raise RequestError("from-text", "is empty; give a text file (- reads standard input)")
    try:
        if path == "-":
            return sys.stdin.read(MAX_TEXT + 1)
        return user_files.read_text(path, MAX_TEXT * 4, "utf-8-sig")  # UTF-8 takes up to 4 bytes a character
    except OSError as exc:
        raise user_files.read_error("from-text", path, exc, "a text file (- reads standard input)") from None
    except UnicodeDecodeError:
        raise RequestError("from-text", f"{path} is not UTF-8 text") from None
