"""Prompt tooling: arrays, wildcards, styles, expansion -> the final prompts of one image.

Order: ``[[a, b]]`` arrays -> ``__wildcards__`` -> styles -> expansion. A1111
prompt editing ``[a:b:10]`` / ``[a|b]`` and weights ``(word:1.2)`` stay in the
text: :meth:`PromptPlan.schedule` gives the text of each sampling step and the
encoder (backend.engine.conditioning) applies the weights. Both are checked here
so a bad bracket or ``when`` fails before any GPU work.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from backend.errors import RequestError
from backend.prompting.expansion import expand
from backend.prompting.editing import PromptSchedule, parse_editing, schedule_prompts
from backend.prompting.styles import PLACEHOLDER, apply_styles, join_terms, load_styles
from backend.prompting.wildcards import expand_arrays, expand_wildcards, load_wildcards
from backend.request import MAX_PROMPT_CHARS, GenerateRequest, check_prompt_length


@dataclass
class PromptPlan:
    """The final prompts for one image and a record of what was done to them."""

    positive: str
    negative: str
    record: dict = field(default_factory=dict)

    def schedule(self, steps: int) -> PromptSchedule:
        """The text of each of ``steps`` sampling steps (prompt editing applied)."""
        return schedule_prompts(self.positive, self.negative, steps)


def build_prompt(request: GenerateRequest, embed_texts: Callable[[list[str]], object] | None = None) -> PromptPlan:
    """Final prompts for image ``request.index`` (a per-image request, seed resolved).

    ``embed_texts`` (worker side, ``backend.engine.text_embed.make_embedder(pipe)``)
    maps texts to pooled text-encoder embeddings; expansion ranks descriptors with it.
    Raises RequestError for an unknown style or wildcard, a malformed weight or
    prompt-editing group, or ``AND``.
    """
    texts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    for name, text in texts.items():
        parse_editing(text, name)  # errors point at the user's own text
    arrays: list[dict] = []
    wildcard_picks: list[dict] = []
    table = load_wildcards() if any("__" in t for t in texts.values()) else {}
    for name, text in texts.items():
        text, chosen = expand_arrays(text, request.index, name)
        text, picked = expand_wildcards(text, table, random.Random(f"{request.seed}:wildcards:{name}"), name)
        texts[name] = text
        arrays += chosen
        wildcard_picks += picked
    positive, negative, used = texts["prompt"], texts["negative_prompt"], []
    if request.styles:
        positive, negative, used = apply_styles(positive, negative, request.styles, load_styles(), request.seed)
    words = expand(texts["prompt"], request.seed, embed_texts) if request.expand else []
    while words and len(join_terms([positive, *words])) > MAX_PROMPT_CHARS:  # the limit bounds the encoder's time
        words = words[:-1]
    positive = join_terms([positive, *words]) if words else positive
    for name, text in (("prompt", positive), ("negative_prompt", negative)):
        try:
            parse_editing(text, name)
        except RequestError as exc:
            source = _source_of_fault(name, wildcard_picks, used)
            raise RequestError(name, f"after wildcards and styles: {exc.message}{source}") from None
    record = {
        "preset": request.preset,
        "styles": used,
        "wildcards": wildcard_picks,
        "arrays": arrays,
        "expansion": words,
        "expansion_ranked": bool(words) and embed_texts is not None,
        "positive": positive,
        "negative": negative,
    }
    return PromptPlan(positive, negative, record)


def _source_of_fault(name: str, picks: list[dict], styles: list[str]) -> str:
    """`` (from ...)`` naming the first wildcard pick or style text of field ``name`` that does not parse on its
    own: the user never typed the column the error names."""
    library = load_styles() if styles else None
    texts = [(f"wildcard __{p['name']}__, which picked {p['pick']!r}", p["pick"]) for p in picks if p["field"] == name]
    texts += [(f"the {name} of style {n!r}", getattr(library.get(n), name).replace(PLACEHOLDER, "")) for n in styles]
    for label, text in texts:
        try:
            parse_editing(text, name)
        except RequestError:
            return f" (from {label})"
    return ""


def check_prompts(request: GenerateRequest) -> None:
    """Raise now (at submission) the RequestError that the worker would raise for any image.

    With ``request.steps`` set (a resolved request) the text of every step is checked too.
    """
    checked: set[tuple[str, str]] = set()
    for i in range(request.count):
        plan = build_prompt(replace(request.per_image(i), expand=False))
        check_prompt_length("prompt", plan.positive, " after wildcards and styles")
        check_prompt_length("negative_prompt", plan.negative, " after wildcards and styles")
        if request.steps is not None and (plan.positive, plan.negative) not in checked:
            plan.schedule(request.steps)
            checked.add((plan.positive, plan.negative))
