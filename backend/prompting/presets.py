"""Presets: named bundles of request settings (model, sampler, steps, cfg, size, styles, guidance, LoRAs...).

YAML files whose keys are ``GenerateRequest`` field names, plus ``size: WxH``
and ``description``. Shipped in ``presets/``; the user's in
``<config dir>/presets/`` win over shipped ones of the same name. Precedence
when building a request: dataclass defaults < preset < explicit values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from backend import user_files, yaml_text
from backend.errors import RequestError
from backend.guidance_settings import GuidanceSettings
from backend.prompting import check_prompts
from backend.prompting.datafiles import DataFile, data_files, user_dir
from backend.prompting.styles import load_styles
from backend.request import GenerateRequest, parse_size
from backend.values import check_text, plain_float, shown

NOT_IN_PRESETS = ("prompt", "seed", "index", "batch", "preset")  # per job, never part of a preset
ALLOWED = tuple(f.name for f in fields(GenerateRequest) if f.name not in NOT_IN_PRESETS) + ("size", "description")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NAME_MAX = 250  # characters of a name: NAME.yaml fits a file name of 255 bytes


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    source: str  # "shipped:<file>" or the user's path
    usable: bool = True


def _files() -> dict[str, DataFile]:
    """Preset files by name in lower case, as style names match: a user's ``Fast.yaml`` replaces the shipped
    ``fast`` (it stood beside it)."""
    return _by_name()[0]


def _by_name() -> tuple[dict[str, DataFile], dict[DataFile, str]]:
    """:func:`_files`, and each user file no name reaches, with why: one hidden by another of the user's (their
    names differ in case only), one whose name starts or ends with white space (a name given is stripped), or
    is not UTF-8 (no request may name it)."""
    files: dict[str, DataFile] = {}
    unnamed: dict[DataFile, str] = {}
    for file in data_files("presets", "presets", (".yaml", ".yml")):
        if file.stem != file.stem.strip():
            unnamed[file] = "its name starts or ends with white space, which a preset's name is read without; rename it"
            continue
        try:
            check_text("preset", file.stem)
        except RequestError as exc:
            unnamed[file] = f"its name {exc.message}; rename it"
            continue
        earlier = files.get(file.stem.lower())
        if earlier is not None and earlier.path is not None:
            unnamed[earlier] = f"hidden by {file.label}: preset names match in any case; rename one"
        files[file.stem.lower()] = file
    return files, unnamed


def is_preset(name: str) -> bool:
    """Whether a preset (shipped or the user's) is named ``name``, matched as :func:`preset_file` matches it."""
    return name.strip().lower() in _files()


def known_presets() -> str:
    """The presets to name in an error: ``allowed: <the usable ones>``, then ``; unusable: <the others>``."""
    found = list_presets()
    usable = ", ".join(p.name for p in found if p.usable) or "none"
    unusable = ", ".join(p.name for p in found if not p.usable)
    return f"allowed: {usable}" + (f"; unusable: {unusable}" if unusable else "")


def list_presets() -> list[PresetInfo]:
    """All presets by name; one that cannot be used (it does not parse, or holds an unknown key or a bad value)
    is listed with the error as its description."""
    files, unnamed = _by_name()
    out = [PresetInfo(file.stem, f"(unusable: {why})", file.label, False) for file, why in unnamed.items()]
    for file in files.values():
        try:
            data = _read(file)
            description, usable = str(data.get("description", "")), True
            _fields(file, data)
        except RequestError as exc:
            description = f"(unusable: {exc.message if exc.field == 'preset' else exc})"  # the key it names
            usable = False
        out.append(PresetInfo(file.stem, description, file.label, usable))
    return sorted(out, key=lambda p: p.name)


def _read(file: DataFile) -> dict:
    try:
        data = yaml_text.load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RequestError("preset", f"{file.label} is not valid YAML{yaml_text.fault(exc)}") from None
    except UnicodeDecodeError:
        raise RequestError("preset", f"{file.label} is not UTF-8 text") from None
    except OSError as exc:
        raise user_files.read_error("preset", file.label, exc) from None
    if not isinstance(data, dict):
        raise RequestError("preset", f"{file.label}: expected a mapping of settings")
    return data


def preset_file(name: str) -> DataFile:
    """Preset ``name``'s file; RequestError("preset") naming the known ones when there is none."""
    file = _files().get(name.strip().lower())
    if file is None:
        raise RequestError("preset", f"unknown {name!r}; {known_presets()}")
    return file


def load_preset(name: str) -> dict:
    """The request fields preset ``name`` sets (``size`` split into width/height), checked and converted."""
    return _loaded(name)[1]


def _loaded(name: str) -> tuple[DataFile, dict]:
    """Preset ``name``'s file and the request fields it sets."""
    file = preset_file(name)
    return file, _fields(file, _read(file))


def _fields(file: DataFile, read: dict) -> dict:
    """The request fields of ``read``, preset ``file``'s mapping as read, checked and converted."""
    data = dict(read)
    unknown = sorted(set(data) - set(ALLOWED), key=str)
    if unknown:
        raise RequestError("preset", f"{file.label}: unknown key {unknown[0]!r}; allowed: {', '.join(ALLOWED)}")
    description = data.pop("description", "")
    if not isinstance(description, str):
        raise RequestError("description", f"in preset {file.label}: {shown(description)} is not text")
    if "size" in data:
        if "width" in data or "height" in data:  # one of them would be dropped without a word
            raise RequestError("size", f"in preset {file.label}: give size, or width and height, not both")
        data["width"], data["height"] = _size(data.pop("size"), file.label)
    if "loras" in data:
        data["loras"] = _loras(data["loras"], file.label)
    try:
        GenerateRequest.check_given(data)
        request = GenerateRequest.from_dict(dict(data))
        # The checks that need no model family (names, ranges); stand-ins for what the family fills.
        # Guidance rules depend on the family (SDXL-only controls) and the cfg: those are checked when queueing.
        stand_ins = {k: 8 for k in ("steps", "width", "height") if getattr(request, k) is None}
        resolved = replace(request, guidance=GuidanceSettings(), **stand_ins).resolved("")
        check_prompts(replace(resolved, prompt="", count=1, steps=None))  # its negative prompt's syntax, wildcards
        request.guidance.check_values()
        library = load_styles()
        for style in request.styles:
            library.get(style)
    except RequestError as exc:
        raise RequestError(exc.field, f"in preset {file.label}: {exc.message}") from None
    return _checked(data, request)


def _checked(data: dict, request: GenerateRequest) -> dict:
    """The keys of ``data`` with ``request``'s converted values (of guidance, only the controls ``data`` sets)."""
    values = request.to_dict()
    values["guidance"] = {k: v for k, v in values["guidance"].items() if k in (data.get("guidance") or {})}
    return {key: values[key] for key in data}


def _size(value: object, label: str) -> tuple[int, int]:
    try:
        return parse_size(value)
    except RequestError as exc:
        raise RequestError("size", f"in preset {label}: {exc.message}") from None


_LORA_FORMS = "[name, weight] or 'name:weight' (weight a number, -2..2)"


def _loras(value: object, label: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError("lora", f"in preset {label}: loras {shown(value)} must be a list of {_LORA_FORMS}")
    return [_lora(item, label) for item in value]


def _lora(item: object, label: str) -> list:
    """``[name, weight]``, ``name:weight`` or ``name`` -> ``[name, weight]``."""
    given = item
    if isinstance(item, str):
        name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        item = [name, weight]
    try:
        name, weight = item  # type: ignore[misc]
        weight = plain_float(weight)
    except (TypeError, ValueError):
        raise RequestError("lora", f"in preset {label}: {shown(given)} must be {_LORA_FORMS}") from None
    if not str(name).strip():
        raise RequestError("lora", f"in preset {label}: {shown(given)}: the name is empty")
    return [str(name), weight]


def preset_fields(name: str, model: str | None = None) -> dict:
    """Preset ``name``'s request fields, recording ``preset: name`` (``backend.request_builder`` lays them
    under explicit values), for a job on ``model`` (:func:`for_model`)."""
    file, fields = _loaded(name)
    return for_model({**fields, "preset": file.stem}, model)  # as its file names it: " FAST " is recorded as fast


def for_model(fields: dict, model: str | None) -> dict:
    """A preset's ``fields`` for a job on ``model``. A preset's size belongs to its model: for another ``model``
    it is left out (that model's family default applies unless a size is given). A preset that names no model
    keeps it."""
    if fields.get("model") is not None and model not in (None, fields["model"]):
        return without_size(fields)
    return fields


def without_size(fields: dict) -> dict:
    """A preset's ``fields`` without its size (``width`` and ``height``)."""
    return {k: v for k, v in fields.items() if k not in ("width", "height")}


def save_preset(name: str, request: dict, description: str = "") -> Path:
    """Write ``request`` (a ``GenerateRequest.to_dict()``) as the user preset ``name``; returns its path.

    Per-job fields (prompt, seed, index, preset) are left out; guidance keeps only the controls that are on.
    """
    if not _NAME.match(name):
        raise RequestError("preset", f"name {name!r} is not allowed; use letters, digits, '-', '_' or '.'")
    if len(name) > NAME_MAX:
        raise RequestError("preset", f"the name is {len(name)} characters long; at most {NAME_MAX}")
    data: dict = {"description": description} if description else {}
    for key, value in request.items():
        if key in NOT_IN_PRESETS or key not in ALLOWED:
            continue
        if key == "guidance":
            value = {k: list(v) if isinstance(v, tuple) else v
                     for k, v in GuidanceSettings.from_dict(dict(value or {})).non_neutral().items()}
        elif key == "loras":
            value = [[str(n), float(w)] for n, w in value or []]
        data[key] = value
    width, height = data.pop("width", 0), data.pop("height", 0)
    if width and height:
        data["size"] = f"{width}x{height}"
    path = _user_path(name)
    text = f"# dreamtty preset, saved from the form\n{yaml.safe_dump(data, sort_keys=False)}"
    try:  # a FIFO there is refused, never opened: the TUI waits for this
        path.parent.mkdir(parents=True, exist_ok=True)
        user_files.write_text_atomic(path, text)
    except (user_files.RefusedFile, IsADirectoryError) as exc:
        raise RequestError("preset", f"cannot save: {path} {exc.strerror}; move it away") from None
    except OSError as exc:
        raise RequestError("preset", f"cannot save {path}: {exc.strerror or exc}") from None
    return path


def _user_path(name: str) -> Path:
    """Where user preset ``name`` is saved: over the user's file it matches (``Mine.yaml`` for ``mine``, as
    :func:`preset_file` matches names), else ``<config dir>/presets/NAME.yaml``."""
    file = _files().get(name.lower())
    return file.path if file is not None and file.path is not None else user_dir("presets") / f"{name}.yaml"
