"""One way from what a front end holds to a request, for the CLI and the TUI form (the API takes a request
whole: its client applied the preset).

Precedence, everywhere: the request type's defaults < the config's defaults (``default_model``,
``speed``, ``max_batch``, then ``default_preset`` when no preset is named) < the source image's
settings (a job on an input image: :func:`source_settings`) < a preset < explicit values (flags, form
fields). A preset for a job on an input image sets everything but the size, which comes
from the image. Text as typed (a size ``WxH``, LoRAs
``name:weight, ...``, guidance values) is parsed here, with one-line errors naming the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

from backend import config, metadata
from backend.errors import DreamttyError, ModelError, RequestError, noted
from backend.guidance_settings import GuidanceSettings, cfg_error, conflict_error
from backend.prompting.presets import for_model, is_preset, known_presets, preset_fields, without_size
from backend.request import GenerateRequest, parse_size
from backend.samplers import SAMPLERS
from backend.values import plain_float


def parse_lora(text: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> (name, weight); a hub id's own ``:`` is not a weight unless a number follows."""
    name, sep, weight = text.strip().rpartition(":")
    if not sep:
        name, number = text.strip(), 1.0
    else:
        try:
            number = plain_float(weight)
        except ValueError:
            raise RequestError("lora", f"{text!r}: weight must be a number (NAME[:WEIGHT])") from None
    if not name.strip():
        raise RequestError("lora", f"{text!r}: the name is empty (NAME[:WEIGHT])")
    if not math.isfinite(number):
        raise RequestError("lora", f"{text!r}: weight must be a finite number, -2..2")
    return name.strip(), number


def parse_loras(texts: str | list) -> list:
    """Repeated ``--lora`` values, one comma-separated text as a form holds it (a comma in a name written
    ``\\,``: :func:`loras_text`), or (name, weight) pairs; ``none`` alone: no LoRAs, not even a preset's."""
    items = [item.replace("\\,", ",") for item in re.split(r"(?<!\\),", texts)] if isinstance(texts, str) else texts
    words = [item.strip().lower() if isinstance(item, str) else item for item in items]
    if words == ["none"]:
        return []
    if "none" in words:
        raise RequestError("lora", "none (no LoRAs at all) cannot go with other LoRAs; give one or the other")
    return [parse_lora(item) if isinstance(item, str) else item for item in items if not isinstance(item, str) or item.strip()]


def loras_text(loras: list) -> str:
    """(name, weight) pairs as a form's one text, which :func:`parse_loras` reads back."""
    escaped = [(name.replace(",", "\\,"), weight) for name, weight in loras]
    return ", ".join(f"{name}:{weight:g}" for name, weight in escaped)


def parse_floats(name: str, text: str) -> tuple[float, ...]:
    """``"0.9, 0.2"`` -> (0.9, 0.2); RequestError naming ``name`` otherwise (``"1,,1"`` too: two numbers were
    read, and the count was said wrong)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(plain_float(v) for v in parts if v)
    except ValueError:
        raise RequestError(name, f"{text!r} is not a comma-separated list of numbers") from None
    if values and not all(parts):
        where = "after its last comma" if all(parts[:-1]) else "between commas"
        raise RequestError(name, f"{text!r} has an empty value {where}")
    return values


OFF = "off"  # typed for a list control (adm_scale, freeu): off, over a preset's or an input image's value


def parse_guidance_value(name: str, text: str) -> object:
    """One guidance control as typed: its default's type decides; empty = its default (off); ``off`` too for a
    list control."""
    default = next(f.default for f in fields(GuidanceSettings) if f.name == name)
    text = text.strip()
    if isinstance(default, (int, float)):
        kind = type(default)
        try:
            return kind(text) if text else default
        except ValueError:
            raise RequestError(name, f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if not text or text.lower() == OFF:
        return None
    if text.lower() == "default":
        return ()
    return parse_floats(name, text)


def from_text(values: dict) -> dict:
    """Request fields from values as front ends hold them: ``size`` as ``WxH``, ``loras`` as text or
    a list of ``NAME[:WEIGHT]``, guidance controls as text. Other fields pass through; ``None`` and
    empty texts are left out (not given)."""
    out: dict = {}
    for name, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip() and name not in ("prompt", "negative_prompt")):
            continue
        if name == "size":
            out["width"], out["height"] = parse_size(value)
        elif name == "loras":
            out["loras"] = parse_loras(value)
        elif name == "guidance":
            out["guidance"] = {k: parse_guidance_value(k, v) if isinstance(v, str) else v for k, v in value.items()}
        else:
            out[name] = value
    return out


# Settings of a source image that a job on it does not take: its own seed and batch, its size and its references.
_NOT_FROM_SOURCE = ("seed", "count", "index", "batch", "width", "height", "image_prompts")


def source_settings(path: str | Path) -> tuple[dict, list[str]]:
    """The settings the image at ``path`` was made with, as a layer for a job on it, and warnings.

    The common request fields of its metadata (dreamtty's, or A1111's or Fooocus's: then only what
    that tool recorded), without its seed, batch and size; {} for an image without metadata (or one the
    job cannot read, which says why). Our metadata with a value that does not read (a hand-edited NaN) gives its
    fields as written, so that the value is refused as the image's own unless one is given; one that lacks the
    fields every version records, is of an unknown version or is not shaped as a request, a warning.
    """
    common = {f.name for f in fields(GenerateRequest)} - set(_NOT_FROM_SOURCE)
    try:
        image = metadata.ImageMetadata(path)
    except DreamttyError:
        return {}, []
    try:
        request, warnings = image.request()
    except DreamttyError as exc:
        if not image.ours:
            return {}, []
        try:
            recorded = metadata.recorded_fields(f"image: {path}", image.meta())
        except DreamttyError:
            recorded = None
        if recorded is None or not _layer_shaped(recorded):
            return {}, [f"{exc}; its settings are not used"]
        return {k: v for k, v in recorded.items() if k in common}, []
    values = {k: v for k, v in request.to_dict().items() if k in common}
    if warnings:  # another tool's image: a field it did not record holds our default, which must not win
        defaults = GenerateRequest().to_dict()
        values = {k: v for k, v in values.items() if v != defaults[k]}
    return values, warnings


def _layer_shaped(values: dict) -> bool:
    """Whether request fields as written can be laid by :func:`layered` (which reads into ``guidance`` and looks
    the sampler and schedule up), their values checked after."""
    names = (values.get("sampler"), values.get("scheduler"))
    return isinstance(values.get("guidance") or {}, dict) and all(n is None or isinstance(n, str) for n in names)


def layered(explicit: dict, preset: str | None = None, defaults: dict | None = None,
            source: dict | None = None) -> dict:
    """Request fields: ``defaults`` < ``source`` < ``preset`` < ``explicit``. ``defaults`` None: the config's
    (``default_model``, ``speed``, ``max_batch``, then its ``default_preset`` when no preset is named).

    ``source`` (the settings of a job's input image, {} when it has none) also means the size comes
    from that image: a preset's size is left out.
    """
    base = defaults
    if base is None:
        cfg = config.load()
        base = config_defaults(cfg)
        default_preset = None if preset else config_preset(cfg)[0]
        if default_preset is not None:
            base = _over(base, _preset_layer(default_preset, explicit, source))
    base = _over(base, source or {})
    if preset:
        base = _over(base, _preset_layer(preset_fields(preset), explicit, source))
    return _over(base, explicit)


def config_defaults(cfg: config.Config) -> dict:
    """The request fields the config sets for every job: ``default_model``, ``speed``, ``max_batch``."""
    return {k: v for k, v in (("model", cfg.default_model), ("speed", cfg.speed), ("max_batch", cfg.max_batch)) if v}


def config_preset(cfg: config.Config) -> tuple[dict | None, str | None]:
    """The fields of the config's ``default_preset`` when it names a usable preset (else None), and the warning
    when it names none or one that does not load (a bad value in the config never stops a job, as its other
    keys)."""
    name = cfg.default_preset
    if not name:
        return None, None
    said = f"config: {cfg.origin('default_preset')}"
    if not is_preset(name):
        return None, f"{said}: unknown {name!r}; {known_presets()}; no preset is applied"
    try:
        return preset_fields(name), None
    except RequestError as exc:
        return None, f"{said}: {exc}; no preset is applied"


def _preset_layer(fields: dict, explicit: dict, source: dict | None) -> dict:
    """A preset's ``fields`` for a job: without its size when ``explicit`` names another model or the job is on
    an input image (``source`` not None)."""
    values = for_model(fields, explicit.get("model"))
    return without_size(values) if source is not None else values


def _over(low: dict, high: dict) -> dict:
    """``high``'s fields over ``low``'s; ``guidance`` control by control. A sampler set without a schedule
    drops ``low``'s schedule when that does not work with it (it was chosen for ``low``'s sampler)."""
    merged = {**low, **high}
    sampler, schedule = high.get("sampler"), low.get("scheduler")
    if "scheduler" not in high and sampler in SAMPLERS and schedule and schedule not in SAMPLERS[sampler].schedules:
        del merged["scheduler"]
    guidance = {**(low.get("guidance") or {}), **(high.get("guidance") or {})}
    if guidance:
        merged["guidance"] = guidance
    return merged


def build(values: dict, preset: str | None = None, kind: type[GenerateRequest] = GenerateRequest,
          defaults: dict | None = None, source: dict | None = None) -> GenerateRequest:
    """The request of type ``kind`` for explicit ``values`` as a front end holds them (see :func:`from_text`)."""
    explicit = from_text(values)
    kind.check_given(explicit)
    merged = layered(explicit, preset, defaults, source)
    try:
        request = kind.from_dict(merged)
    except RequestError as exc:
        raise inherited(exc, merged, source or {}, explicit) from None
    # the service refuses these too, but cannot tell where a control came from
    conflict = request.guidance.conflict()
    origin = _origin(conflict[:2], explicit, preset, defaults, source) if conflict else ""
    if origin:
        raise conflict_error(*conflict, origin)
    needs = request.guidance.cfg_problem(request.cfg)
    origin = _origin(needs[:1], explicit, preset, defaults, source) if needs else ""
    if origin:
        raise cfg_error(*needs, origin)
    return request


def _origin(controls: tuple[str, ...], explicit: dict, preset: str | None, defaults: dict | None,
            source: dict | None) -> str:
    """Where the first of the guidance ``controls`` that the user did not give came from, as `` (NAME comes from
    WHERE)``, looked up as :func:`layered` lays them; "" when the user gave them all."""
    name = next((c for c in controls if c not in (explicit.get("guidance") or {})), None)
    if name is None:
        return ""
    if preset and name in (preset_fields(preset).get("guidance") or {}):
        return f" ({name} comes from preset {preset})"
    if name in ((source or {}).get("guidance") or {}):
        return f" ({name} comes from the input image's settings)"
    default_preset = config_preset(config.load())[0] if defaults is None and not preset else None
    if default_preset and name in (default_preset.get("guidance") or {}):
        return f" ({name} comes from the config's default_preset {default_preset['preset']})"
    return ""


def inherited(exc: DreamttyError, request: dict, source: dict, explicit: dict) -> DreamttyError:
    """``exc``, saying so when the value it refuses is the input image's own setting (see :func:`kept_from`)."""
    if not kept_from(exc, request, source, explicit):
        return exc
    return noted(exc, f" (the setting of the input image {request.get('image')}; give another value to override it)")


def kept_from(exc: DreamttyError, request: dict, source: dict, explicit: dict) -> bool:
    """Whether ``exc`` (a RequestError, or a ModelError: its text starts with the field) refuses a value of
    ``source`` (an image's recorded settings) that ``request`` (the job's fields) kept and the user did not give
    (``explicit``): they never typed it, and a value they give overrides it."""
    if not isinstance(exc, (RequestError, ModelError)):
        return False
    key = exc.json_key if isinstance(exc, RequestError) else str(exc).partition(":")[0]
    if key in source:
        return key not in explicit and _same(request.get(key), source[key])
    own, used = source.get("guidance") or {}, request.get("guidance") or {}
    return key in own and key not in (explicit.get("guidance") or {}) and _same(used.get(key), own[key])


def _same(value: object, recorded: object) -> bool:
    """Whether ``value`` is the ``recorded`` one: the very object (a NaN is equal to nothing), or an equal one."""
    return value is recorded or value == recorded
