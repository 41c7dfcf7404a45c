"""A1111 prompt editing: ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and alternation ``[a|b|c]``.

Pure text: a prompt becomes the text of each sampling step; the encoder
(backend.engine.conditioning) encodes each distinct text once. The rules are
those the AUTOMATIC1111 web UI documents ("Prompt editing", "Alternating
words"): ``when`` without a point is a step number (step ``when`` is the last
one with ``from``), with a point a fraction 0..1 of the steps (rounded down to a
step); ``[a|b|c]`` takes the next option at every step; groups nest. A ``[...]``
group whose last ``:`` is not followed by a number stays down-weighted text
(``[style: anime]``), as in A1111. ``AND`` (composable diffusion) is refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction

from backend.errors import RequestError
from backend.prompting.weights import parse_weights

_FIELDS = ("prompt", "negative_prompt")
_TOKEN = re.compile(
    r"(?P<escape>\\.)|(?P<open>[(\[])|(?P<close>[)\]])|(?P<sep>[:|])|(?P<text>[^\\()\[\]:|]+|\\)", re.DOTALL
)
# Numbers in ASCII digits, as A1111 reads them ("٣" is text, where \d and int() would read 3).
_NUMBER = re.compile(r"\s*([+-]?[0-9.]*[0-9][0-9.]*)\s*")  # what reads as a number attempt: signs, digits, points
_STEP = re.compile(r"[0-9]+")
_FRACTION = re.compile(r"[0-9]*\.[0-9]*")
_AND = re.compile(r"\bAND\b")
WHEN_HELP = "a step number (10) or a fraction of the steps from 0.0 to 1.0 (0.5)"


class _Node:
    """A piece of parsed prompt text."""

    def render(self, step: int, steps: int) -> str:
        """Its text at ``step`` (1-based) of ``steps``."""
        raise NotImplementedError

    def changes(self, steps: int) -> set[int]:
        """Steps (2..steps) at which this node's text may differ from the step before."""
        return set()


def _render(nodes: tuple[_Node, ...], step: int, steps: int) -> str:
    return "".join(node.render(step, steps) for node in nodes)


def _changes(nodes: tuple[_Node, ...], steps: int) -> set[int]:
    return set().union(*(node.changes(steps) for node in nodes))


@dataclass(frozen=True)
class _Text(_Node):
    raw: str  # as written, escapes included: the weight parser reads it next

    def render(self, step: int, steps: int) -> str:
        return self.raw


@dataclass(frozen=True)
class _Group(_Node):
    """``(...)`` or a plain ``[...]``: weights, kept with their brackets."""

    open: str
    items: tuple[_Node, ...]
    close: str

    def render(self, step: int, steps: int) -> str:
        return self.open + _render(self.items, step, steps) + self.close

    def changes(self, steps: int) -> set[int]:
        return _changes(self.items, steps)


@dataclass(frozen=True)
class _Edit(_Node):
    """``[before:after:when]``: ``before`` up to step ``last_step``, then ``after``."""

    before: tuple[_Node, ...]
    after: tuple[_Node, ...]
    when: Fraction
    fraction: bool

    def last_step(self, steps: int) -> int:
        return math.floor(self.when * steps) if self.fraction else int(self.when)

    def render(self, step: int, steps: int) -> str:
        return _render(self.before if step <= self.last_step(steps) else self.after, step, steps)

    def changes(self, steps: int) -> set[int]:
        switch = {self.last_step(steps) + 1} & set(range(2, steps + 1))
        return switch | _changes(self.before, steps) | _changes(self.after, steps)


@dataclass(frozen=True)
class _Alternate(_Node):
    """``[a|b|c]``: option ``(step - 1) % n`` at each step."""

    options: tuple[tuple[_Node, ...], ...]

    def render(self, step: int, steps: int) -> str:
        return _render(self.options[(step - 1) % len(self.options)], step, steps)

    def changes(self, steps: int) -> set[int]:
        return set(range(2, steps + 1))


@dataclass
class _Frame:
    """An open bracket while parsing: its parts between top-level ``:``/``|`` separators."""

    open: str
    column: int
    parts: list[list[_Node]] = field(default_factory=lambda: [[]])
    seps: list[str] = field(default_factory=list)

    def close(self, closing: str, text_field: str) -> _Node:
        parts = [tuple(p) for p in self.parts]
        where = f"{self.open!r} at column {self.column}"
        kinds = set(self.seps)
        if not kinds:
            return _Group(self.open, parts[0], closing)
        if kinds == {"|"}:
            return _Alternate(tuple(parts))
        if kinds == {":", "|"}:
            raise RequestError(text_field, f"{where} mixes '|' (alternation) and ':' (prompt editing); "
                                           "nest one group in the other, e.g. [[a|b]:c:10]")
        last = parts[-1]
        number = _NUMBER.fullmatch("".join(n.raw for n in last)) if all(isinstance(n, _Text) for n in last) else None
        if number is None:  # "[style: anime]": down-weighted text, as A1111 reads it
            literal = [node for i, part in enumerate(parts) for node in ((_Text(":"),) if i else ()) + part]
            return _Group(self.open, tuple(literal), closing)
        if len(parts) > 3:
            raise RequestError(text_field, f"{where} has {len(parts) - 1} ':'; prompt editing is "
                                           "[from:to:when], [to:when] or [from::when]")
        when, fraction = _when(number.group(1), where, text_field)
        before, after = parts[:2] if len(parts) == 3 else ((), parts[0])
        return _Edit(before, after, when, fraction)


def _when(text: str, where: str, text_field: str) -> tuple[Fraction, bool]:
    if _STEP.fullmatch(text):
        return Fraction(int(text)), False
    if _FRACTION.fullmatch(text) and Fraction(text) <= 1:
        return Fraction(text), True
    raise RequestError(text_field, f"{where}: when {text!r} is not allowed; use {WHEN_HELP}")


MAX_NESTING = 32  # brackets inside brackets: far beyond any real prompt, well within Python's recursion


def parse_editing(text: str, text_field: str = "prompt") -> tuple[_Node, ...]:
    """Parse ``text`` into nodes; raises RequestError(text_field, ...) for a malformed group or ``AND``.

    Brackets are checked by :func:`parse_weights` first, so its errors (with columns) apply here too; the
    weights' range only where no group edits the text (the weights of a step's text are what count: a group
    read as a ``[...]`` down-weight gave a weight no step has).
    """
    parse_weights(text, text_field, in_range=False)
    found = _AND.search(text)
    if found:
        raise RequestError(text_field, f"'AND' at column {found.start() + 1} (A1111 composable diffusion) is not "
                                       "supported; write 'and' in lower case for the word")
    frames = [_Frame("", 0)]
    for match in _TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group()
        top = frames[-1]
        if kind == "open":
            if len(frames) > MAX_NESTING:
                raise RequestError(text_field, f"brackets nested deeper than {MAX_NESTING} at column "
                                               f"{match.start() + 1}; nest them less")
            frames.append(_Frame(token, match.start() + 1))
        elif kind == "close":
            node = frames.pop().close(token, text_field)
            frames[-1].parts[-1].append(node)
        elif kind == "sep" and top.open == "[":
            top.parts.append([])
            top.seps.append(token)
        else:
            top.parts[-1].append(_Text(token))
    nodes = tuple(frames[0].parts[0])
    if not _uses_editing(nodes):
        parse_weights(text, text_field)
    return nodes


def _uses_editing(nodes: tuple[_Node, ...]) -> bool:
    """True when parsed text has any prompt editing or alternation (at any depth)."""
    return any(
        isinstance(n, (_Edit, _Alternate)) or (isinstance(n, _Group) and _uses_editing(n.items)) for n in nodes
    )


def _step_texts(nodes: tuple[_Node, ...], steps: int) -> tuple[str, ...]:
    switches = _changes(nodes, steps)
    texts: list[str] = []
    for step in range(1, steps + 1):
        texts.append(_render(nodes, step, steps) if step == 1 or step in switches else texts[-1])
    return tuple(texts)


@dataclass(frozen=True)
class PromptSchedule:
    """The prompt and negative prompt of every sampling step: ``prompt[s - 1]`` is step ``s``'s."""

    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...]
    edited: tuple[str, ...] = ()  # the fields written with prompt editing or alternation

    def record(self) -> dict | None:
        """For the image metadata: each edited field as runs of steps with one text; None without editing."""
        if not self.edited:
            return None
        out: dict = {"steps": len(self.prompt)}
        for name in self.edited:
            runs: list[dict] = []
            for step, text in enumerate(getattr(self, name), start=1):
                if runs and runs[-1]["text"] == text:
                    runs[-1]["last_step"] = step
                else:
                    runs.append({"first_step": step, "last_step": step, "text": text})
            out[name] = runs
        return out


def schedule_prompts(prompt: str, negative: str, steps: int) -> PromptSchedule:
    """Per-step texts of both prompts (each ``steps`` long).

    Raises RequestError naming the field of a malformed group, and the step of a text whose
    weights are out of range once editing has chosen it.
    """
    per_field: dict[str, tuple[str, ...]] = {}
    edited: list[str] = []
    for name, text in zip(_FIELDS, (prompt, negative)):
        nodes = parse_editing(text, name)
        if not _uses_editing(nodes):
            per_field[name] = (text,) * steps
            continue
        edited.append(name)
        per_field[name] = _step_texts(nodes, steps)
        first_step: dict[str, int] = {}
        for step, variant in enumerate(per_field[name], start=1):
            first_step.setdefault(variant, step)
        for variant, step in first_step.items():
            try:
                parse_weights(variant, name)
            except RequestError as exc:
                raise RequestError(name, f"at step {step}, which reads {variant!r}: {exc.message}") from None
    return PromptSchedule(per_field["prompt"], per_field["negative_prompt"], tuple(edited))
