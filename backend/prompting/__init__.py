"""Prompt tooling: styles, wildcards, arrays, expansion -> the final prompts of one image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backend.request import GenerateRequest


@dataclass
class PromptPlan:
    """The final prompts for one image and a record of what was done to them."""

    positive: str
    negative: str
    record: dict = field(default_factory=dict)


def build_prompt(request: GenerateRequest, embed_texts: Callable[[list[str]], object] | None = None) -> PromptPlan:
    """Final prompts for image ``request.index`` (a per-image request, seed resolved).

    ``embed_texts`` (worker side, optional) maps texts to pooled text-encoder
    embeddings; prompt expansion uses it to rank descriptors.
    """
    return PromptPlan(request.prompt, request.negative_prompt)
