"""First frame of ``dreamtty --demo`` against a minimal Textual app (header, a label, footer).

Both run in a pseudo-terminal (as a real terminal would), alternately (A B A B ...),
each from a fresh process; a run is timed from the start of the process until
its first frame is on the terminal: the footer's text, which Textual draws with
the rest of the screen. The figure is the ratio of the medians; the spread is
the smallest and largest time of each. dreamtty's first frame shows the Generate screen without its
form, which is mounted just after it: the time until the form is drawn is printed too.

Both run with their bytecode cached, as installed packages do: in a private
``PYTHONPYCACHEPREFIX``, written by a first, unmeasured run of each (with
``PYTHONDONTWRITEBYTECODE`` set, every start would compile dreamtty's own
modules again, about 0.1 s here, while Textual's come precompiled).

    python benchmarks/tui_startup.py [--runs 7] [--styles 20000]

``--styles N`` gives dreamtty a user style pack of N entries (it must not delay the first frame).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.tui_latency import Terminal, app_command, app_home

MINIMAL_APP = """
from textual.app import App
from textual.widgets import Footer, Header, Label

class Minimal(App):
    def compose(self):
        yield Header()
        yield Label("minimal app")
        yield Footer()

Minimal().run()
"""
FOOTER_TEXT = b"palette"  # the command palette's key, drawn at the right end of every Footer
FORM_TEXT = b"Negative prompt"  # a label of dreamtty's form, mounted just after the first frame
TIMEOUT = 60.0


def write_style_pack(home: Path, entries: int) -> None:
    """A user style pack of ``entries`` styles, one JSON object per line."""
    styles = home / "config" / "styles"
    styles.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps({"name": f"pack style {i}", "prompt": f"{{prompt}}, look {i}",
                                   "negative_prompt": f"not {i}"}) for i in range(entries))
    (styles / "pack.json").write_text(f"[\n{lines}\n]\n")


def first_frame(argv: list[str], env: dict, cols: int, rows: int, then: bytes = b"") -> tuple[float, float]:
    """Seconds from starting ``argv`` in a pty until its footer is drawn, and until ``then`` is drawn too."""
    start = time.perf_counter()
    term = Terminal(argv, env, cols, rows)
    try:
        times = []
        for text in (FOOTER_TEXT, then):
            shown = term.wait_for(text, 0, TIMEOUT)
            if shown is None:
                raise SystemExit(f"{argv[0]}: no {text!r} in {TIMEOUT:.0f} s; output:\n{term.text_since(0)[-2000:]}")
            times.append(shown - start)
        return times[0], times[1]
    finally:
        term.close()


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each app, interleaved")
    parser.add_argument("--size", default="120x40", help="terminal COLSxROWS")
    parser.add_argument("--styles", type=int, default=0, help="entries of a user style pack for dreamtty (0 = none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cols, rows = (int(v) for v in args.size.lower().split("x"))
    with app_home() as (tmp, env):
        home = tmp / "home"
        (home / "config").mkdir(parents=True)
        if args.styles:
            write_style_pack(home, args.styles)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        dreamtty = [*app_command(), "--demo", "--device", "cpu", "--out", str(tmp / "out")]
        minimal = [sys.executable, "-c", MINIMAL_APP]
        first_frame(dreamtty, env, cols, rows, FORM_TEXT)  # warm the file and bytecode caches for both
        first_frame(minimal, env, cols, rows)
        times: dict[str, list[float]] = {"dreamtty": [], "minimal": [], "form": []}
        for _ in range(args.runs):
            times["minimal"].append(first_frame(minimal, env, cols, rows)[0])
            frame, form = first_frame(dreamtty, env, cols, rows, FORM_TEXT)
            times["dreamtty"].append(frame)
            times["form"].append(form)
    ratio = statistics.median(times["dreamtty"]) / statistics.median(times["minimal"])
    ratios = [d / m for d, m in zip(times["dreamtty"], times["minimal"])]
    result = {
        "dreamtty_s": [round(t, 3) for t in times["dreamtty"]],
        "minimal_s": [round(t, 3) for t in times["minimal"]],
        "dreamtty_form_s": [round(t, 3) for t in times["form"]],
        "ratio_of_medians": round(ratio, 2),
        "ratio_per_pair_min_max": [round(min(ratios), 2), round(max(ratios), 2)],
        "style_pack_entries": args.styles,
        "terminal": f"{cols}x{rows}",
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'dreamtty first frame':>24}: {spread(times['dreamtty'])}")
    print(f"{'minimal Textual app':>24}: {spread(times['minimal'])}")
    print(f"{'dreamtty form drawn':>24}: {spread(times['form'])}")
    print(f"{'ratio (medians)':>24}: {ratio:.2f}x (per pair {min(ratios):.2f}..{max(ratios):.2f})")
    if args.styles:
        print(f"{'user style pack':>24}: {args.styles} entries")


if __name__ == "__main__":
    main()
