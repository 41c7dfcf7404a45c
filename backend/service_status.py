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
_OPTIONAL = {"idle_exit": is_number, "socket": str, "listen": str, "log": str, "cluster": str, "head": str,
             "nodes": [_NODE], "warnings": [str]}  # may be null, or left out


def checked_status(data: object) -> dict:
    """``data`` when it reads as a service's status; ValueError naming the first field that does not."""
    if not isinstance(data, dict):
        raise ValueError("the status is not a JSON object")
    given = {key: shape for key, shape in _OPTIONAL.items() if data.get(key) is not None}
    bad = shape_fault(data, {**_REQUIRED, **given})
    if bad is not None:
        raise ValueError(f"status field {bad!r} is missing or of the wrong type")
    return data


def placement_differs(status: dict, devices: str, cluster: str | None) -> str | None:
    """What a running service's workers (its ``status``) do not share with ``--device`` and ``--cluster``
    given to a command that found it running (it keeps its own), as a warning; None when they agree or
    nothing was asked for (``auto``; no ``--cluster``)."""
    from backend.devices import parse_devices

    theirs = status.get("cluster")  # the Ray cluster's address; None: this machine
    on_a_cluster = cluster not in (None, "local")
    named = ("auto", "local", theirs, status.get("head"))  # auto: whatever it joined
    if cluster is not None and (on_a_cluster != (theirs is not None) or cluster not in named):
        asked, there = f"--cluster {cluster}", f"on the Ray cluster {theirs}" if theirs else "on this machine"
    elif devices != "auto" and theirs is None and "auto" not in (held := {w["device"] for w in status["workers"]}) \
            and set(parse_devices(devices)) != held:  # "auto": a worker not started yet, its device not known
        asked, there = f"--device {devices}", f"on {', '.join(sorted(held)) or 'no device'}"
    else:
        return None
    return (f"service: the running service's workers are {there}; {asked} takes effect when it starts again "
            "(dreamtty serve --stop)")
