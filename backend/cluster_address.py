"""The text of a Ray cluster address (``--cluster``, the config's ``workers``), checked without Ray."""

from __future__ import annotations

import re

from backend.errors import RequestError

ADDRESS = re.compile(r"(?:ray://)?(?P<host>[\w.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,20})")  # 20: past any port


def check_address(text: str, field: str, allowed: str) -> re.Match:
    """``text`` as ``HOST:PORT`` or ``ray://HOST:PORT``; RequestError naming ``field`` and the ``allowed``
    values otherwise."""
    match = ADDRESS.fullmatch(text)
    if not match:
        raise RequestError(field, f"{text!r} is not allowed; use {allowed}")
    port = match["port"].lstrip("0")
    if not port or len(port) > 5 or int(port) > 65535:  # leading zeros allowed, as Ray's int() reads them
        raise RequestError(field, f"{text!r} is not allowed: port {match['port']} is out of range 1..65535")
    return match
