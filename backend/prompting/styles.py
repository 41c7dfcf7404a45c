"""Styles: prompt templates (Fooocus / SDXL-styles JSON schema, A1111 ``styles.csv``) and their composition.

Sources, later ones overriding earlier ones of the same name: the shipped
``styles/*.json``, then the user's ``<config dir>/styles/*.json`` and
``*.csv``. A malformed file or entry is reported (file and line) and skipped.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, field

from backend import user_files
from backend.errors import RequestError
from backend.prompting.datafiles import DataFile, data_files
from backend.style_names import RANDOM_STYLE, style_key
from backend.values import check_text

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = PLACEHOLDER
    negative_prompt: str = ""
    category: str = ""
    source: str = ""

    def apply(self, prompt: str) -> str:
        """Wrap ``prompt`` in this style (a style without ``{prompt}`` is appended)."""
        if PLACEHOLDER in self.prompt:
            out = self.prompt.replace(PLACEHOLDER, prompt)
            return out.strip(" ,") if not prompt.strip() else out
        return join_terms([prompt, self.prompt])


_RANDOM = Style(RANDOM_STYLE, category="built-in", source="built-in: picks one of the other styles per image seed")


@dataclass
class StyleLibrary:
    styles: dict[str, Style] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, style: Style, line: int | None = None) -> None:
        """Add ``style`` (from ``line`` of its file): a user's replaces a shipped one of its name; one that would
        change nothing, a reserved name, a name no request takes (a NUL, a lone surrogate) and a name a user's file
        already gave are said."""
        key, where = style_key(style.name), f"{style.source} line {line}" if line else style.source
        try:
            check_text("name", style.name)  # as a request checks its styles: every job using it would fail
        except RequestError as exc:
            self.warnings.append(f"{where}: {style.name!r}: the name {exc.message}; style skipped")
            return
        if key == style_key(RANDOM_STYLE):  # the built-in pick would hide it
            self.warnings.append(f"{where}: {style.name!r} is a reserved name (it picks one of the styles "
                                 "per image seed); style skipped")
            return
        if style.prompt.strip() in ("", PLACEHOLDER) and not style.negative_prompt.strip():
            self.warnings.append(f"{where}: {style.name!r} has no prompt and no negative_prompt: it would "
                                 "change nothing; style skipped")
            return
        earlier = self.styles.get(key)
        if earlier is not None and not earlier.source.startswith("shipped:"):
            self.warnings.append(f"{where}: {style.name!r} is given again (first in {earlier.source}); the "
                                 "later one is used")
        self.styles[key] = style

    def get(self, name: str) -> Style:
        """The style called ``name``; "Random Style" gives a stand-in describing the seeded pick."""
        if style_key(name) == style_key(RANDOM_STYLE):
            return _RANDOM
        try:
            return self.styles[style_key(name)]
        except KeyError:
            raise RequestError("styles", f"unknown {name!r}; see dreamtty styles list") from None

    def search(self, text: str = "") -> list[Style]:
        """Styles whose name, category or prompt contain ``text`` (all when empty), by category and name; a name
        matches as it is looked up, whatever its case, hyphens and underscores ("neon-night" finds "Neon Night")."""
        needle, name_needle = text.lower().strip(), style_key(text)
        found = [s for s in self.styles.values()
                 if needle in f"{s.name}\n{s.category}\n{s.prompt}".lower() or (name_needle and name_needle in style_key(s.name))]
        return sorted(found, key=lambda s: (s.category.lower(), s.name.lower()))

    def pick_random(self, rng: random.Random, exclude: list[str]) -> Style:
        """A style not in ``exclude``; RequestError("styles") when every one is."""
        names = sorted(k for k, s in self.styles.items() if s.name not in exclude)
        if not names:
            raise RequestError("styles", f"{RANDOM_STYLE} has no style left to pick: every one of the "
                                         f"{len(self.styles)} is selected or picked already; select fewer")
        return self.styles[rng.choice(names)]


def load_styles() -> StyleLibrary:
    """Shipped styles, then the user's JSON and CSV files; problems land in ``warnings``."""
    library = StyleLibrary()
    for file in data_files("styles", "styles", (".json", ".csv")):
        try:
            text = file.read_text()
        except UnicodeDecodeError:
            library.warnings.append(f"{file.label} is not UTF-8 text; file skipped")
            continue
        except OSError as exc:
            library.warnings.append(f"{user_files.read_problem(file.label, exc)}; file skipped")
            continue
        reader = _read_csv if file.suffix == ".csv" else _read_json
        reader(file, text, library)
    return library


def _read_json(file: DataFile, text: str, library: StyleLibrary) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        library.warnings.append(f"{file.label} line {exc.lineno}: not valid JSON ({exc.msg}); file skipped")
        return
    except RecursionError:
        library.warnings.append(f"{file.label}: JSON nested too deeply; file skipped")
        return
    except ValueError:  # an integer of more digits than int() takes
        library.warnings.append(f"{file.label}: not valid JSON (a number too long); file skipped")
        return
    if not isinstance(data, list):
        library.warnings.append(f"{file.label} line 1: expected a JSON list of styles; file skipped")
        return
    for line, entry in zip(_entry_lines(text), data):
        problem = _check_entry(entry)
        if problem:
            library.warnings.append(f"{file.label} line {line}: {problem}; style skipped")
            continue
        category = entry.get("category") or file.stem
        library.add(Style(entry["name"].strip(), entry.get("prompt", PLACEHOLDER), entry.get("negative_prompt", ""),
                          category, file.label), line)


def _entry_lines(text: str) -> list[int]:
    """1-based line of each element of a valid top-level JSON list (one pass over the text)."""
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    pos, lines = text.index("[") + 1, []
    line, counted = 1, 0
    while True:
        pos = gap.match(text, pos).end()
        if text[pos] == "]":
            return lines
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)


def _check_entry(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return "each style must be an object with name, prompt and negative_prompt"
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        return "style needs a text 'name'"
    for key in ("prompt", "negative_prompt", "category"):
        if key in entry and not isinstance(entry[key], str):
            return f"{name!r}: {key!r} must be text"
    return None


def _read_csv(file: DataFile, text: str, library: StyleLibrary) -> None:
    unclosed = _unclosed_quote(text)
    if unclosed is not None:
        library.warnings.append(f"{file.label} line {unclosed}: a quote opened in this row is never closed (the rest "
                                "of the file would be one field); file skipped")
        return
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)  # `name, "prompt", "negative"` as shared
    try:
        styles = _csv_styles(file, reader, library.warnings)
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit(), a NUL byte
        library.warnings.append(f"{file.label} line {reader.reader.line_num}: not valid CSV ({exc}); file skipped")
        return
    for style, line in styles:
        library.add(style, line)


def _unclosed_quote(text: str) -> int | None:
    """The line of the row whose quoted field runs to the end of ``text`` (the csv module reads the rest of the
    file into it without a word), else None."""
    reader = csv.reader(io.StringIO(text), skipinitialspace=True, strict=True)
    start = 1
    try:
        for _ in reader:
            start = reader.line_num + 1
    except csv.Error as exc:
        return start if "unexpected end of data" in str(exc) else None
    return None


def _csv_styles(file: DataFile, reader: csv.DictReader, warnings: list[str]) -> list[tuple[Style, int]]:
    """The styles of a CSV file, each with its line; raises csv.Error for a file the csv module cannot read."""
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if "name" not in header or "prompt" not in header:
        warnings.append(f"{file.label} line 1: needs a header with columns name,prompt,negative_prompt; file skipped")
        return []
    reader.fieldnames = header
    styles = []
    for row in reader:
        name = (row.get("name") or "").strip()
        if not name:
            warnings.append(f"{file.label} line {reader.line_num}: row has no name; style skipped")
            continue
        style = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "", file.stem, file.label)
        styles.append((style, reader.line_num))
    return styles


# -- composition ---------------------------------------------------------------
def split_terms(text: str) -> list[str]:
    """Comma-separated terms, not splitting inside brackets (so ``(a, b:1.2)`` stays whole)."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [t.strip() for t in terms if t.strip()]


def join_terms(texts: list[str]) -> str:
    return ", ".join(t.strip(" ,") for t in texts if t.strip(" ,"))


def merge_negatives(texts: list[str]) -> str:
    """Join negative prompts term by term, dropping repeated terms (case-insensitive)."""
    seen: dict[str, str] = {}
    for text in texts:
        for term in split_terms(text):
            seen.setdefault(term.lower(), term)
    return ", ".join(seen.values())


def apply_styles(
    prompt: str, negative: str, names: list[str], library: StyleLibrary, seed: int
) -> tuple[str, str, list[str]]:
    """Apply styles in order. Returns (positive, negative, names of the styles used).

    "Random Style" picks a style (seeded by the image seed) not otherwise selected.
    """
    used: list[str] = []
    explicit = [library.get(n).name for n in names if style_key(n) != style_key(RANDOM_STYLE)]
    rng = random.Random(f"{seed}:random-style")
    negatives = [negative]
    for name in names:
        is_random = style_key(name) == style_key(RANDOM_STYLE)
        style = library.pick_random(rng, exclude=explicit + used) if is_random else library.get(name)
        used.append(style.name)
        prompt = style.apply(prompt)
        negatives.append(style.negative_prompt)
    if any(n.strip() for n in negatives[1:]):
        negative = merge_negatives(negatives)
    return prompt, negative, used
