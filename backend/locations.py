"""Where dreamtty keeps its files (XDG paths via platformdirs).

``DREAMTTY_HOME`` redirects them all to one root for config, data, state and outputs (the tests
use it to stay inside a temporary directory). ``DREAMTTY_OUTPUTS``, the outputs directory alone, is
read by ``backend.config`` with the other settings a variable overrides.

The service's socket, pid and lock files live in the user's runtime dir (``XDG_RUNTIME_DIR``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import platformdirs

from backend.errors import RequestError

APP = "dreamtty"
HOME_PREFIX = "home-"  # the runtime subfolder of a DREAMTTY_HOME


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
    """Where images go by default (``config.Config.outputs_dir`` applies the config's and ``DREAMTTY_OUTPUTS``)."""
    if os.environ.get("DREAMTTY_HOME"):
        return _root("outputs")
    return Path(platformdirs.user_pictures_dir()) / APP


def demo_models_dir() -> Path:
    return data_dir() / "demo-models"


def queue_db() -> Path:
    return state_dir() / "queue.sqlite3"


def runtime_dir() -> Path:
    """The private folder of this user's service (socket, pid and lock files); not created here.

    ``$XDG_RUNTIME_DIR/dreamtty``, else ``/run/user/UID/dreamtty``, else ``$TMPDIR/dreamtty-UID``. With
    ``DREAMTTY_HOME`` set, a subfolder named after that home: each home has its own service.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    session = Path(f"/run/user/{os.getuid()}")
    if xdg:
        folder = Path(xdg) / APP
    elif session.is_dir():
        folder = session / APP
    else:
        folder = Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    home = os.environ.get("DREAMTTY_HOME")
    if home:
        folder = folder / (HOME_PREFIX + hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:12])
    return folder
