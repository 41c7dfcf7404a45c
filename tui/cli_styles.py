"""``dreamtty styles list [--search TEXT]`` and ``dreamtty styles show NAME``."""

from __future__ import annotations

import argparse
import json
import sys

from backend.prompting.styles import RANDOM_STYLE, StyleLibrary, load_styles
from backend.safetext import cut_line, one_line
from tui.cli_output import add_list_show, print_warnings

NAME_COLUMN = 40  # characters of the list's name column: a longer name is cut with "…" (--json gives it whole)


def register(subparsers) -> None:
    listing = add_list_show(subparsers, "styles", "list and show prompt styles", "list styles (shipped and yours)",
                            "show one style's templates", cmd_list, cmd_show)
    listing.add_argument("--search", default="", metavar="TEXT",
                         help="only styles whose name, category or prompt contain TEXT")


def _load() -> StyleLibrary:
    library = load_styles()
    print_warnings(library.warnings)
    return library


def cmd_list(args: argparse.Namespace) -> int:
    library = _load()
    found = library.search(args.search)
    random = args.search.lower().strip() in RANDOM_STYLE.lower()  # the seeded pick, listed last when it matches
    if args.json:
        listed = [*found, library.get(RANDOM_STYLE)] if random else found
        print(json.dumps([{"name": s.name, "category": s.category, "source": s.source} for s in listed]))
        return 0
    names = [cut_line(s.name, NAME_COLUMN) for s in found]  # one row each: a newline in a name is shown as \n
    width = max(map(len, [*names, RANDOM_STYLE])) + 2
    for name, style in zip(names, found):
        print(f"{name:<{width}}{one_line(style.category)}")
    if random:
        print(f"{RANDOM_STYLE:<{width}}(picks one of the above per image seed)")
    print(f"\n{len(found)} styles", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    style = _load().get(args.name)
    if args.json:
        print(json.dumps({"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt,
                          "category": style.category, "source": style.source}))
        return 0
    fields = {"name": style.name, "category": style.category, "source": style.source, "prompt": style.prompt,
              "negative": style.negative_prompt}
    for label, value in fields.items():
        print(f"{label + ':':<10}{one_line(value)}")
    return 0
