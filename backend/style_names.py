"""Style names as users give them: the key they are matched by, the Random Style, and the check that each is
chosen once. Apart from the style library (backend.prompting.styles), so that a request checks them without
importing it."""

from __future__ import annotations

from backend.errors import RequestError

RANDOM_STYLE = "Random Style"


def style_key(name: str) -> str:
    """Lookup key: case, hyphens, underscores and extra spaces do not matter."""
    return " ".join(name.replace("-", " ").replace("_", " ").lower().split())


def check_once_each(styles: object) -> None:
    """RequestError("styles") for a style chosen twice (but "Random Style", which picks another each time). Only
    what a user gives is checked: a request read back is taken as it is (an image made so reproduces)."""
    if not isinstance(styles, (list, tuple)) or not all(isinstance(style, str) for style in styles):
        return  # the request's own check says what is wrong
    seen: set[str] = set()
    for style in styles:
        if (key := style_key(style)) in seen:
            raise RequestError("styles", f"{style!r} is given twice")
        if key != style_key(RANDOM_STYLE):
            seen.add(key)
