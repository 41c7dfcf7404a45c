"""Where dreamtty keeps its files (XDG paths via platformdirs).

Every path can be redirected with an environment variable, which the tests
use to stay inside a temporary directory:

- ``DREAMTTY_HOME``: one root for config, data, state and outputs.
- ``DREAMTTY_OUTPUTS``: the outputs directory alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from backend.errors import RequestError

APP = "dreamtty"


def make_folder(folder: Path, field: str) -> Path:
    """Create ``folder`` if missing; a one-line RequestError naming ``field`` when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RequestError(field, f"{folder} is a file; give a folder") from None
    except OSError as exc:
        raise RequestError(field, f"cannot create {folder}: {exc.strerror}; give a writable folder") from None
    return folder


def _root(kind: str) -> Path:
    home = os.environ.get("DREAMTTY_HOME")
    if home:
        return Path(home) / kind
    getter = {
        "config": platformdirs.user_config_dir,
        "data": platformdirs.user_data_dir,
        "state": platformdirs.user_state_dir,
        "cache": platformdirs.user_cache_dir,
    }[kind]
    return Path(getter(APP))


def config_dir() -> Path:
    return _root("config")


def data_dir() -> Path:
    return _root("data")


def state_dir() -> Path:
    return _root("state")


def cache_dir() -> Path:
    return _root("cache")


def outputs_dir() -> Path:
    env = os.environ.get("DREAMTTY_OUTPUTS")
    if env:
        return Path(env)
    if os.environ.get("DREAMTTY_HOME"):
        return _root("outputs")
    return Path(platformdirs.user_pictures_dir()) / APP


def demo_models_dir() -> Path:
    return data_dir() / "demo-models"


def queue_db() -> Path:
    return state_dir() / "queue.sqlite3"
