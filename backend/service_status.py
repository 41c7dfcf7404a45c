"""The service's status (``GET /v1/status``) as a client reads it: checked field by field, so that an
answer of another make is one line naming the field, never a traceback in a front end."""

from __future__ import annotations

from backend.values import is_number, is_whole, optional, shape_fault

_MODEL = {"model": str, "dtype": str, "bytes": is_number}
_WORKER = {"id": is_whole, "device": str, "pid": optional(is_whole), "ready": bool, "jobs": [is_whole],
           "models": [_MODEL], "loads": is_whole}
_NODE = {"host": str, "address": str, "gpus": is_number, "alive": bool}
_REQUIRED = {"pid": is_whole, "uptime": is_number, "queued": is_whole, "running": is_whole, "workers": [_WORKER],
             "dreamtty": str, "streams": is_whole}
_OPTIONAL = {"idle_exit": is_number, "socket": str, "listen": str, "log": str, "cluster": str, "nodes": [_NODE],
             "warnings": [str]}  # may be null, or left out


def checked_status(data: object) -> dict:
    """``data`` when it reads as a service's status; ValueError naming the first field that does not."""
    if not isinstance(data, dict):
        raise ValueError("the status is not a JSON object")
    given = {key: shape for key, shape in _OPTIONAL.items() if data.get(key) is not None}
    bad = shape_fault(data, {**_REQUIRED, **given})
    if bad is not None:
        raise ValueError(f"status field {bad!r} is missing or of the wrong type")
    return data
