"""YAML from users' files (config, presets, training configs), read with PyYAML's safe loader.

PyYAML parses nested collections recursively, so text nested thousands deep (``[[[[...``) raises
RecursionError; it is reported here as a ``yaml.YAMLError``, which every caller already turns into
a one-line message.
"""

from __future__ import annotations

import yaml


def load(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
