"""Which devices a service's workers may use: ``--device`` parsed and checked, GPUs counted without torch
(the TUI process never imports it, and a CLI call or the TUI's first frame must not wait for it)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from backend.errors import RequestError

_DEVICES = "auto, cpu, cuda or cuda:N[,cuda:M...]"
_CUDA = re.compile(r"cuda(?::([0-9]+))?")
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU this container may use
_DEV = Path("/dev")


def parse_devices(text: str) -> list[str]:
    """``--device`` as the workers' devices: ``["auto"]``, ``["cpu"]`` or CUDA devices, each as ``cuda:N``
    (``cuda`` and ``cuda:00`` are ``cuda:0``: the schedule compares devices by name).

    Raises RequestError("device") when the text is not one of ``_DEVICES`` or names a GPU twice.
    """
    if text.strip() in ("auto", "cpu"):
        return [text.strip()]
    devices: dict[str, str] = {}  # cuda:N -> as given
    for given in (d.strip() for d in text.split(",")):
        if given in ("auto", "cpu"):
            raise RequestError("device", f"{given} stands alone, not in a list of GPUs; use {_DEVICES}")
        if (cuda := _CUDA.fullmatch(given)) is None:
            what = repr(given) if given else f"an empty entry in {text!r}"
            raise RequestError("device", f"{what} is not allowed; use {_DEVICES}")
        device = f"cuda:{int(cuda.group(1) or 0)}"
        if device in devices:
            raise RequestError("device", f"{devices[device]!r} and {given!r} are the same GPU ({device}); "
                                         "name each GPU once")
        devices[device] = given
    return list(devices)


def check_devices(text: str) -> list[str]:
    """``parse_devices``, and every CUDA device named must exist on this machine."""
    devices = parse_devices(text)
    count = visible_gpus()
    if count is None:
        return devices  # cannot tell without torch: the worker reports a missing GPU
    for device in devices:
        if device.startswith("cuda:") and int(device[5:]) >= count:
            have = ", ".join(f"cuda:{n}" for n in range(count)) or "no CUDA GPU"
            raise RequestError("device", f"{device} is not available; this machine has {have} (use auto or cpu)")
    return devices


def check_cluster_devices(text: str) -> list[str]:
    """``--device`` for workers on a Ray cluster: ``auto`` (an actor per GPU of the cluster) or ``cpu`` (one
    per node); this machine's GPUs by number mean nothing there. RequestError("device") otherwise."""
    devices = parse_devices(text)
    if devices not in (["auto"], ["cpu"]):
        raise RequestError("device", f"{text.strip()} names GPUs of this machine; on a Ray cluster use auto (an "
                                     "actor per GPU of the cluster) or cpu (one actor per node)")
    return devices


def visible_gpus() -> int | None:
    """The CUDA GPUs this process may use, counted without torch; None when that cannot be told.

    Importing torch here would cost seconds and is not allowed in the TUI process. On Linux the
    NVIDIA driver lists its GPUs in /proc/driver/nvidia/gpus (containers see only theirs) and
    CUDA_VISIBLE_DEVICES narrows that down. Without that list, GPU device nodes (NVIDIA, AMD ROCm,
    WSL) mean "cannot tell", and none at all means no GPU. macOS has no CUDA.
    """
    if sys.platform == "darwin":
        return 0
    if not sys.platform.startswith("linux"):
        return None
    if _NVIDIA_GPUS.is_dir():
        physical = len(list(_NVIDIA_GPUS.iterdir()))
    elif any(_DEV.glob("nvidia[0-9]*")) or (_DEV / "kfd").exists() or (_DEV / "dxg").exists():
        return None
    else:
        physical = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return physical if visible is None else min(physical, _count_visible(visible, physical))


def _count_visible(visible: str, physical: int) -> int:
    """Entries of CUDA_VISIBLE_DEVICES up to the first invalid one (where CUDA stops reading)."""
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not (entry.startswith(("GPU-", "MIG-")) or (entry.isdigit() and int(entry) < physical)):
            break
        count += 1
    return count
