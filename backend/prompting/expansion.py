"""Offline prompt expansion: append descriptors that the model's own text encoder finds closest to the prompt.

Descriptors (``vocabulary.DESCRIPTORS``) are ranked by cosine similarity of
their text embeddings to the prompt's; a seeded sample of the best ``POOL``
(at most ``PER_GROUP`` per group) is appended, so one seed always gives the
same words. No extra model weights are needed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from backend.prompting.vocabulary import DESCRIPTORS, GENERAL, GROUP_OF, GROUPS, PER_GROUP

COUNT = 5  # descriptors appended
POOL = 20  # sampled from the best-ranked this many

EmbedTexts = Callable[[list[str]], object]  # list of texts -> array-like [N, D]


def rank(prompt: str, candidates: Sequence[str], embed_texts: EmbedTexts) -> list[str]:
    """``candidates`` from most to least similar to ``prompt`` (cosine of embeddings; ties keep order)."""
    import numpy as np

    vectors = np.asarray(embed_texts(list(candidates)), dtype=np.float64)
    query = np.asarray(embed_texts([prompt]), dtype=np.float64)[0]
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(query)
    similarity = vectors @ query / np.maximum(norms, 1e-12)
    return [candidates[i] for i in np.argsort(-similarity, kind="stable")]


def expand(
    prompt: str,
    seed: int,
    embed_texts: EmbedTexts | None,
    descriptors: Sequence[str] = DESCRIPTORS,
    count: int = COUNT,
    pool: int = POOL,
) -> list[str]:
    """Descriptors to append to ``prompt`` for image seed ``seed`` (empty for an empty prompt).

    Without ``embed_texts`` (no text encoder at hand) it samples general quality words.
    """
    if not prompt.strip():
        return []
    lowered = prompt.lower()
    if embed_texts is None:
        ranked, cap = [d for d in GROUPS[GENERAL] if d in descriptors], pool
    else:  # rank the whole list, so the embedder's cache serves it
        ranked, cap = rank(prompt, descriptors, embed_texts), PER_GROUP
    ranked = [d for d in ranked if d.lower() not in lowered]
    best: list[str] = []
    per_group: dict[str, int] = {}
    for word in ranked:
        group = GROUP_OF.get(word, word)
        if per_group.get(group, 0) < cap:
            best.append(word)
            per_group[group] = per_group.get(group, 0) + 1
        if len(best) == pool:
            break
    picked = random.Random(f"{seed}:expansion").sample(best, min(count, len(best)))
    return sorted(picked, key=best.index)
