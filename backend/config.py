"""The user's YAML config: model folders, defaults, key bindings and where workers run.

Where it is read from, first match wins: ``set_config_path()`` (the ``--config``
option), the ``DREAMTTY_CONFIG`` environment variable (so worker processes see
the same file), else ``<config dir>/config.yaml``. A missing file means the
defaults. ``DREAMTTY_*`` environment variables override single keys:
``DREAMTTY_DEFAULT_MODEL``, ``DREAMTTY_DEFAULT_PRESET``, ``DREAMTTY_OUTPUTS`` and
``DREAMTTY_CHECKPOINTS`` / ``_LORAS`` / ``_VAE`` / ``_EMBEDDINGS`` /
``_UPSCALERS`` / ``_IP_ADAPTERS`` / ``_CONTROLNETS`` / ``_DEPTH_MODELS`` / ``_CAPTIONERS`` /
``_WILDCARDS`` / ``_STYLES`` (folder lists separated by ``os.pathsep``).

A bad value never stops the app: that key keeps its default and ``load()``
returns a one-line warning naming the key and the problem. A whole file that cannot be used is a
warning too (``Config.unread``), but a command given it with ``--config`` refuses to run (``tui.cli``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from backend import locations, user_files, yaml_text
from backend.cluster_address import check_address
from backend.errors import DreamttyError, RequestError, noted
from backend.values import check_text, is_whole, kind_of, shown, to_bool

ENV_PATH = "DREAMTTY_CONFIG"
FOLDER_KINDS = ("checkpoints", "loras", "vae", "embeddings", "upscalers", "ip_adapters", "controlnets", "depth_models",
                "captioners", "wildcards", "styles")
TOP_KEYS = ("paths", "default_model", "default_preset", "speed", "max_batch", "keymap", "allow_pickle", "workers")


@dataclass
class Config:
    """The effective configuration (defaults < file < environment)."""

    paths: dict[str, list[Path]] = field(default_factory=dict)  # kind -> folders
    outputs: Path | None = None  # None = backend.locations.outputs_dir()
    default_model: str | None = None
    default_preset: str | None = None
    speed: str | None = None  # default | fast: the default of every request
    max_batch: int | None = None  # images denoised together, the default of every request (None: the device's)
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> key
    allow_pickle: bool = False
    cluster: str | None = None  # ``workers``: None for local processes, else a Ray cluster address (auto...)
    source: Path | None = None  # the file read, if any
    unread: str | None = None  # why the file named (--config, DREAMTTY_CONFIG) or found could not be used
    from_env: set[str] = field(default_factory=set)  # the keys an environment variable set (one refused is not)
    warnings: list[str] = field(default_factory=list)

    def folders(self, kind: str) -> list[Path]:
        return list(self.paths.get(kind, []))

    def outputs_dir(self) -> Path:
        return self.outputs or locations.outputs_dir()

    def outputs_error(self, exc: DreamttyError) -> DreamttyError:
        """``exc``, when it is about :meth:`outputs_dir` (``out: ...``; no ``--out`` given), saying what named that
        folder: "out" alone named a flag the user never typed."""
        if not str(exc).startswith("out: "):
            return exc
        origin = self.origin("outputs") if self.outputs else "the default outputs folder"
        return noted(exc, f" ({origin}; give --out FOLDER, or change it)")

    def model_error(self, exc: DreamttyError) -> DreamttyError:
        """``exc``, when it is about the model this config's ``default_model`` names (no ``--model`` given),
        saying so."""
        if not self.default_model or not str(exc).startswith("model: "):
            return exc
        return noted(exc, f" ({self.origin('default_model')}; give --model NAME, or change it)")

    def setting(self, key: str) -> str:
        """What set ``key``: its environment variable (``DREAMTTY_LORAS``), else its key in the file
        (``paths.loras``)."""
        return f"DREAMTTY_{key.upper()}" if key in self.from_env else _file_key(key)

    def origin(self, key: str) -> str:
        """Where a setting's value came from: its environment variable, else the config file."""
        setting = self.setting(key)
        return setting if key in self.from_env else f"{setting} of {self.source or config_path()}"


def _file_key(key: str) -> str:
    """``key`` as the config file writes it: folders under ``paths.``."""
    return f"paths.{key}" if key in (*FOLDER_KINDS, "outputs") else key


def default_folders(kind: str) -> list[Path]:
    """``<data dir>/models/<kind>`` for model files, ``<config dir>/<kind>`` for wildcards and styles."""
    if kind in ("wildcards", "styles"):
        return [locations.config_dir() / kind]
    return [locations.data_dir() / "models" / kind]


def set_config_path(path: str | Path | None) -> None:
    """Use ``path`` for this process and the worker processes it starts (``--config``)."""
    if path is None:
        os.environ.pop(ENV_PATH, None)
    else:
        # os.path, not Path.resolve() / expanduser(): those raise for a symlink loop or ~unknown-user, where
        # this keeps the path as given and load() says in one line why it cannot be read
        os.environ[ENV_PATH] = os.path.realpath(os.path.expanduser(path))


def service_settings() -> dict[str, str]:
    """What a service's jobs read of the configuration of the process that started it: the config file and
    the environment's model folders and pickle switch. A client whose settings differ must not hand its jobs
    to that service (they would find other models, or load weights it refused)."""
    env = {f"DREAMTTY_{kind.upper()}": os.environ.get(f"DREAMTTY_{kind.upper()}", "") for kind in FOLDER_KINDS}
    pickle = _pickle_env()[0]
    return {"config": str(config_path()), **{k: v for k, v in env.items() if v}, **({"allow_pickle": "1"} if pickle else {})}


def config_path() -> Path:
    env = os.environ.get(ENV_PATH)
    return Path(env) if env else locations.config_dir() / "config.yaml"


def _defaults() -> Config:
    return Config(paths={kind: default_folders(kind) for kind in FOLDER_KINDS})


def _read_yaml(path: Path, cfg: Config) -> dict:
    """The config file's keys; {} (and ``cfg.unread`` with a warning) when it cannot be used."""
    data, cfg.unread = _file_data(path)
    if cfg.unread:
        cfg.warnings.append(f"config: {cfg.unread}; using defaults")
    elif data is not None:
        cfg.source = path
    return data or {}


def _file_data(path: Path) -> tuple[dict | None, str | None]:
    """(the mapping in the YAML file at ``path``, None): None for an empty file, or a missing one unless it was
    named (``DREAMTTY_CONFIG``, ``--config``); else (None, why it cannot be used)."""
    try:
        text = user_files.read_text(path)
    except FileNotFoundError:
        link = _dangling_link(path)
        if link is not None:  # a dotfiles link to a file or folder not there (a repository not checked out)
            return None, f"{link} links to {os.readlink(link)}, which does not exist"
        return None, f"{path} does not exist" if os.environ.get(ENV_PATH) else None
    except user_files.RefusedFile as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text"
    try:
        data = yaml_text.load(text)
    except yaml.YAMLError as exc:
        return None, f"{path} is not valid YAML{yaml_text.fault(exc)}"
    if data is not None and not isinstance(data, dict):
        return None, f"{path} must be a mapping of keys, got {kind_of(data)}"
    return data, None


def _dangling_link(path: Path) -> Path | None:
    """The link, ``path`` or a folder above it, that makes ``path`` missing: it points to nothing."""
    for link in (path, *path.parents):
        if os.path.exists(link):
            return None
        if os.path.islink(link):
            return link
    return None


def _folder_list(key: str, value: object, base: Path) -> list[Path]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key}: must be a list of folder paths")
    return [base / os.path.expanduser(v) for v in value]


def _text(key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: must be a non-empty text, got {shown(value)}")
    check_text(key, value)  # a name of an undecodable file (RequestError is a ValueError): later commands refuse it
    return value.strip()


def _apply(cfg: Config, data: dict, base: Path) -> None:
    """Copy valid keys of ``data`` into ``cfg``; the unknown keys are one warning, each other bad key one. A
    relative folder is taken from ``base`` (the config file's folder): the same for every process that reads the
    file (a service started elsewhere searched another folder than its client)."""
    unknown = [k for k in data if k not in TOP_KEYS]  # in the file's order: keys may be numbers, null, true...
    if unknown:
        # a train.yaml given as the app's --config (before ``train``, not after it) holds dozens
        hint = "; training settings go in `dreamtty train --config FILE`" if "instance_dir" in unknown else ""
        cfg.warnings.append(f"config: unknown key{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(shown, unknown))}; allowed: {', '.join(TOP_KEYS)}{hint}")
    paths = data.get("paths") or {}
    if not isinstance(paths, dict):
        cfg.warnings.append("config: paths: must be a mapping of kind -> folders; using the defaults")
        paths = {}
    for kind in [k for k in paths if k not in (*FOLDER_KINDS, "outputs")]:
        said = kind if isinstance(kind, str) else shown(kind)
        cfg.warnings.append(f"config: paths.{said}: unknown kind; allowed: {', '.join(FOLDER_KINDS)}, outputs")
    parsers = {
        **{("paths", k): (lambda v, k=k: cfg.paths.__setitem__(k, _folder_list(f"paths.{k}", v, base)))
           for k in FOLDER_KINDS},
        ("paths", "outputs"): lambda v: setattr(cfg, "outputs", _outputs(v, base)),
        (None, "default_model"): lambda v: setattr(cfg, "default_model", _text("default_model", v)),
        (None, "default_preset"): lambda v: setattr(cfg, "default_preset", _text("default_preset", v)),
        (None, "speed"): lambda v: setattr(cfg, "speed", _choice("speed", v, _request().SPEEDS)),
        (None, "max_batch"): lambda v: setattr(cfg, "max_batch", _count("max_batch", v, _request().MAX_COUNT)),
        (None, "keymap"): lambda v: setattr(cfg, "keymap", _keymap(v)),
        (None, "allow_pickle"): lambda v: setattr(cfg, "allow_pickle", _bool("allow_pickle", v)),
        (None, "workers"): lambda v: setattr(cfg, "cluster", _workers(v)),
    }
    for (section, key), parse in parsers.items():
        source = paths if section else data
        if source.get(key) is None:  # absent, or null: not set (as the docs' example writes it)
            continue
        try:
            parse(source[key])
        except ValueError as exc:
            cfg.warnings.append(f"config: {exc}; using the default")


def _request():
    """backend.request, imported only for a config that sets what it checks: a TUI's first frame (which reads
    the config) does not wait for it and the image libraries it brings."""
    from backend import request

    return request


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}: {shown(value)} is not allowed; use {' or '.join(allowed)}")
    return value


def _count(key: str, value: object, most: int) -> int:
    if not is_whole(value) or not 1 <= value <= most:
        raise ValueError(f"{key}: {shown(value)} is not allowed; use a whole number 1..{most}")
    return value


def _outputs(value: object, base: Path = Path()) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("paths.outputs: must be one folder path")
    return base / os.path.expanduser(value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false, got {shown(value)}")
    return value


def _workers(value: object) -> str | None:
    """``workers``: local (processes on this machine), ray (this machine's Ray cluster) or a Ray address."""
    text = _text("workers", value)
    if text is None or text == "local":
        return None
    if text in ("ray", "auto"):
        return "auto"
    check_address(text, "workers", "local, ray, ray://HEAD:10001 or HEAD:6379")
    return text


def _keymap(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()):
        raise ValueError("keymap: must be a mapping of binding id -> key, e.g. {generate: ctrl+g}")
    return dict(value)


def _apply_env(cfg: Config) -> None:
    for kind in FOLDER_KINDS:
        env = os.environ.get(f"DREAMTTY_{kind.upper()}")
        if env:
            cfg.paths[kind] = [Path(os.path.expanduser(p)) for p in env.split(os.pathsep) if p]
            cfg.from_env.add(kind)
    if os.environ.get("DREAMTTY_OUTPUTS"):
        cfg.outputs = _outputs(os.environ["DREAMTTY_OUTPUTS"])
        cfg.from_env.add("outputs")
    for key in ("default_model", "default_preset"):
        env = os.environ.get(f"DREAMTTY_{key.upper()}")
        if env:
            try:
                setattr(cfg, key, _text(f"DREAMTTY_{key.upper()}", env))
            except ValueError as exc:
                cfg.warnings.append(f"config: {exc}; the config file's {key} applies")
            else:
                cfg.from_env.add(key)
    pickle, problem = _pickle_env()
    if problem:
        cfg.warnings.append(f"config: {problem}; the config file's allow_pickle applies")
    elif pickle is not None:
        cfg.allow_pickle = pickle


def _pickle_env() -> tuple[bool | None, str | None]:
    """``DREAMTTY_ALLOW_PICKLE``: (its switch, None when unset or not one; why it is not one)."""
    env = os.environ.get("DREAMTTY_ALLOW_PICKLE", "")
    try:
        return (to_bool("DREAMTTY_ALLOW_PICKLE", env) if env else None), None
    except RequestError as exc:
        return None, str(exc)


def load(path: str | Path | None = None) -> Config:
    """The effective config. ``path`` overrides where it is read from (as ``--config``)."""
    cfg = _defaults()
    file = Path(os.path.expanduser(path)) if path is not None else config_path()
    _apply(cfg, _read_yaml(file, cfg), Path(os.path.abspath(file.parent)))
    _apply_env(cfg)
    for kind, folders in cfg.paths.items():  # a folder that cannot be searched: said, not passed over in silence
        defaults = default_folders(kind)  # need not exist
        said = cfg.setting(kind)
        for folder in list(folders):
            problem = _folder_problem(folder)
            if problem == "missing":  # kept: searched once it is made
                if folder not in defaults:
                    cfg.warnings.append(f"config: {said}: {folder} does not exist; nothing is found there")
            elif problem:
                cfg.warnings.append(f"config: {said}: {folder} {problem}; ignored")
                folders.remove(folder)
    return cfg


def _folder_problem(folder: Path) -> str | None:
    """None for a folder; "missing"; else why it cannot be searched (a file, a name too long, a symlink
    loop, no permission). Path.exists() raises for some of these and calls others missing."""
    try:
        info = os.stat(folder)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL character
        return "missing"
    except OSError as exc:
        return f"cannot be searched: {exc.strerror or exc}"
    return None if stat.S_ISDIR(info.st_mode) else "is a file, not a folder"


def set_value(key: str, value: str | int | float | bool | None, path: Path | None = None) -> Path:
    """Set one top-level key in the config file and keep the rest as the user wrote it (comments,
    order, anchors): the key's line is replaced, or a line is added. A linked file (dotfiles) is
    written where the link points. Returns the file written; DreamttyError, the file untouched, when
    that cannot be done."""
    if key not in TOP_KEYS:
        raise DreamttyError(f"config: unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}")
    check_text(key, value)  # JSON would write it as escapes that read back as text no later command accepts
    file = Path(os.path.realpath(path or config_path()))
    text, data, exists = "", {}, True
    try:
        text = user_files.read_text(file)
    except FileNotFoundError:
        exists = False  # made below
    except user_files.RefusedFile as exc:
        raise DreamttyError(f"config: cannot update {exc}") from None
    except OSError as exc:  # a symlink loop, a name too long, no permission: Path.exists() raises or says missing
        raise DreamttyError(f"config: cannot update {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DreamttyError(f"config: cannot update {file}: it is not UTF-8 text") from None
    if exists:
        try:
            loaded = yaml_text.load(text)
        except yaml.YAMLError as exc:
            raise DreamttyError(f"config: cannot update {file}: not valid YAML{yaml_text.fault(exc)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DreamttyError(f"config: cannot update {file}: it holds {kind_of(loaded)}, not a mapping "
                                "of keys; fix it first")
        data = loaded or {}
    updated = _with_line(text, key, f"{key}: {json.dumps(value)}\n")  # JSON text is a YAML scalar
    try:
        same = yaml_text.load(updated) == {**data, key: value}
    except yaml.YAMLError:
        same = False
    if not same:  # the key's value spans lines in a way this edit does not follow
        raise DreamttyError(f"config: cannot update {file} without rewriting it; set {key}: {json.dumps(value)} "
                            "there by hand")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        user_files.write_text_atomic(file, updated)
    except OSError as exc:
        raise DreamttyError(f"config: cannot write {file}: {exc.strerror}") from None
    return file


def _with_line(text: str, key: str, line: str) -> str:
    """``text`` with the top-level ``key:`` entry (its line and the indented or ``-`` lines under it)
    replaced by ``line``, or with ``line`` added at the end."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    head = re.compile(rf"{re.escape(key)}[ \t]*:")
    for i, current in enumerate(lines):
        if head.match(current):
            end = i + 1
            while end < len(lines) and (lines[end][:1] in (" ", "\t") or lines[end].rstrip() == "-"
                                        or lines[end].startswith("- ")):
                end += 1
            return "".join([*lines[:i], line, *lines[end:]])
    return "".join([*lines, line])
