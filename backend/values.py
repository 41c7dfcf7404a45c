"""Numbers and switches from text, YAML, JSON or a form, checked the same way everywhere.

Each parser takes the field name and raises a one-line RequestError naming it.
"""

from __future__ import annotations

import math
import os
import re

from backend.errors import RequestError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_WHOLE = re.compile(r"\s*[-+]?[0-9]{1,100}\s*")


def to_int(name: str, value: object) -> int:
    """An int, or a float or text holding a whole number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _WHOLE.fullmatch(value):
        return int(value)  # exact, where a float would round a large number
    try:
        number = float(value) if isinstance(value, (float, str)) else math.nan
    except ValueError:
        number = math.nan
    if not number.is_integer():  # also False for nan and inf
        raise RequestError(name, f"{value!r} is not a whole number")
    return int(number)


def to_float(name: str, value: object) -> float:
    """A finite float from a number or text."""
    try:
        if isinstance(value, bool):
            raise TypeError
        out = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float's range
        out = math.inf
    except (TypeError, ValueError):
        raise RequestError(name, f"{value!r} is not a number") from None
    if not math.isfinite(out):
        raise RequestError(name, f"{value!r} is not a finite number")
    return out


def to_bool(name: str, value: object) -> bool:
    """A real boolean, or the text true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(name, f"{value!r} is not true or false")


def absolute(path: str) -> str:
    """``path`` made absolute (``~`` expanded), so a job run or reproduced elsewhere finds the same file."""
    return os.path.abspath(os.path.expanduser(path)) if path else path
