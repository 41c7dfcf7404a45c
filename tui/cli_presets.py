"""``dreamtty presets list`` and ``dreamtty presets show NAME``."""

from __future__ import annotations

import argparse
import json

from backend.prompting.presets import list_presets, load_preset, preset_file
from backend.safetext import one_line
from tui.cli_output import add_list_show


def register(subparsers) -> None:
    add_list_show(subparsers, "presets", "list and show presets", "list presets (shipped and yours) with their "
                  "descriptions", "show the settings a preset sets", cmd_list, cmd_show)


def cmd_list(args: argparse.Namespace) -> int:
    found = list_presets()
    if args.json:
        print(json.dumps([{"name": p.name, "description": p.description, "source": p.source,
                           "usable": p.usable} for p in found]))
        return 0
    names = [one_line(p.name) for p in found]
    width = max(map(len, names), default=4) + 2
    for name, preset in zip(names, found):
        print(f"{name:<{width}}{one_line(preset.description)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    fields = load_preset(args.name)  # checked: an unusable preset is a one-line error
    file = preset_file(args.name)
    if args.json:  # its name as its file gives it, as `presets list` does (" FAST " is fast)
        print(json.dumps({"name": file.stem, "source": file.label, "fields": fields}))
        return 0
    if "width" in fields and "height" in fields:  # as a preset's file writes it
        width, height = fields.pop("width"), fields.pop("height")
        fields["size"] = f"{width}x{height}"
    for key, value in {"source": file.label, **fields}.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        print(f"{key + ':':<18}{one_line(shown)}")
    return 0
