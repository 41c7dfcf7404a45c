"""The service's status (``GET /v1/status``) as a client reads it: checked field by field, so that an
answer of another make is one line naming the field, never a traceback in a front end."""

from __future__ import annotations

from typing import Callable

from backend.values import is_number, is_whole

Shape = object  # a type, a predicate, [Shape] (a list of it) or {key: Shape} (a record with those keys)


def _optional(shape: Shape) -> Callable[[object], bool]:
    return lambda value: value is None or _reads(value, shape) is None


_MODEL = {"model": str, "dtype": str, "bytes": is_number}
_WORKER = {"id": is_whole, "device": str, "pid": _optional(is_whole), "ready": bool, "jobs": [is_whole],
           "models": [_MODEL], "loads": is_whole}
_NODE = {"host": str, "address": str, "gpus": is_number, "alive": bool}
_REQUIRED = {"pid": is_whole, "uptime": is_number, "queued": is_whole, "running": is_whole, "workers": [_WORKER],
             "dreamtty": str, "streams": is_whole}
_OPTIONAL = {"idle_exit": is_number, "socket": str, "listen": str, "log": str, "cluster": str, "nodes": [_NODE],
             "warnings": [str]}  # may be null, or left out


def _reads(value: object, shape: Shape, where: str = "") -> str | None:
    """None when ``value`` has ``shape``; else the path of the first field that does not (``workers[0].ready``)."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return where
        parts = ((value.get(key), inner, f"{where}.{key}".lstrip(".")) for key, inner in shape.items())
    elif isinstance(shape, list):
        if not isinstance(value, list):
            return where
        parts = ((item, shape[0], f"{where}[{i}]") for i, item in enumerate(value))
    else:
        return None if (isinstance(value, shape) if isinstance(shape, type) else shape(value)) else where
    return next((bad for part in parts if (bad := _reads(*part)) is not None), None)


def checked_status(data: object) -> dict:
    """``data`` when it reads as a service's status; ValueError naming the first field that does not."""
    if not isinstance(data, dict):
        raise ValueError("the status is not a JSON object")
    bad = _reads(data, {**_REQUIRED, **{key: shape for key, shape in _OPTIONAL.items() if data.get(key) is not None}})
    if bad is not None:
        raise ValueError(f"status field {bad!r} is missing or of the wrong type")
    return data
