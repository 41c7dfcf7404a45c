"""Searchable multi-select of styles that shows the highlighted style's template."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, OptionList, SelectionList, Static

from tui.text import TextInput, plain

MAX_SHOWN = 300  # options listed at once; searching narrows the rest


@dataclass(frozen=True)
class StyleInfo:
    name: str
    prompt: str
    negative: str = ""


class StylePicker(Vertical):
    """Type to search, tab into the list, space to toggle. ``selected`` keeps the order of picking.

    The styles come later (``set_styles``: a large pack loads in a thread after the first frame);
    a search typed or styles selected before then apply once they are there.
    """

    DEFAULT_CSS = """
    StylePicker { height: auto; }
    StylePicker SelectionList { height: 7; }
    StylePicker .style-template { color: $text-muted; height: auto; max-height: 4; }
    StylePicker .style-selected { height: auto; }
    """

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self.library: dict[str, StyleInfo] = {}
        self._haystacks: list[tuple[str, str]] = []  # (name, lower-case name and prompt) to search
        self.selected: list[str] = []

    def compose(self) -> ComposeResult:
        yield TextInput(placeholder="search styles (loading…)", compact=True, id="style-search")
        yield SelectionList[str](id="style-list")
        yield Static("", classes="style-template")
        yield Static("Selected: none", classes="style-selected")

    def set_styles(self, styles: list[StyleInfo]) -> None:
        """List ``styles``, filtered by what the search box holds now."""
        self.library = {s.name: s for s in styles}
        self._haystacks = [(s.name, f"{s.name}\n{s.prompt}".lower()) for s in self.library.values()]
        search = self.query_one("#style-search", Input)
        search.placeholder = f"search {len(self.library)} styles…"
        self._fill(search.value)

    def matches(self, text: str) -> list[str]:
        text = text.strip().lower()
        return [name for name, haystack in self._haystacks if text in haystack][:MAX_SHOWN]

    def _fill(self, text: str) -> None:
        options = self.query_one(SelectionList)
        names = self.matches(text)
        options.clear_options()
        options.add_options([(plain(name), name, name in self.selected) for name in names])
        # No highlight message: the next keystroke may empty the list before it is handled, and
        # SelectionList would then look up an option that is gone (a crash in Textual 8).
        with options.prevent(OptionList.OptionHighlighted):
            options.highlighted = 0 if names else None
        self._show_template(names[0] if names else None)

    def set_selected(self, names: list[str]) -> None:
        self.selected = list(names)
        self._fill(self.query_one("#style-search", Input).value)
        self._show_selected()

    def _show_selected(self) -> None:
        selected = ", ".join(self.selected) or "none"
        self.query_one(".style-selected", Static).update(plain(f"Selected: {selected}"))

    @on(Input.Changed, "#style-search")
    def _search(self, event: Input.Changed) -> None:
        self._fill(event.value)

    @on(SelectionList.SelectionToggled)
    def _toggled(self, event: SelectionList.SelectionToggled) -> None:
        name = event.selection.value
        if name in self.selected:
            self.selected.remove(name)
        else:
            self.selected.append(name)
        self._show_selected()

    @on(SelectionList.SelectionHighlighted)
    def _highlighted(self, event: SelectionList.SelectionHighlighted) -> None:
        self._show_template(event.selection.value)

    def _show_template(self, name: str | None) -> None:
        style = self.library.get(name) if name is not None else None
        negative = f"\nnegative: {style.negative}" if style is not None and style.negative else ""
        self.query_one(".style-template", Static).update(plain(f"{style.prompt}{negative}" if style else ""))
