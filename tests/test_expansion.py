"""Offline prompt expansion: ranking by embedding similarity, seeded choice, recording."""

from __future__ import annotations

import numpy as np
import pytest

from backend.prompting import build_prompt
from backend.prompting.expansion import expand, rank
from backend.prompting.vocabulary import DESCRIPTORS, GROUP_OF, GROUPS, PER_GROUP
from backend.request import MAX_PROMPT_CHARS, GenerateRequest

# A stub text encoder with known embeddings: the prompt points along x; descriptors
# are at known angles from it, so their cosine similarity to the prompt is known.
ANGLES = {"warm glow": 0.1, "soft light": 0.3, "gentle haze": 0.5, "cold steel": 1.2, "harsh noise": 2.5, "void": 3.0}


def stub_embed(texts: list[str]) -> np.ndarray:
    def vector(text: str) -> list[float]:
        angle = ANGLES.get(text, 0.0)
        return [np.cos(angle), np.sin(angle), 0.0]

    return np.array([vector(t) for t in texts])


def test_rank_follows_cosine_similarity():
    words = list(ANGLES)[::-1]
    assert rank("a prompt", words, stub_embed) == sorted(ANGLES, key=ANGLES.get)


def test_expansion_picks_among_the_most_similar():
    words = list(ANGLES)
    for seed in range(10):
        picked = expand("a prompt", seed, stub_embed, descriptors=words, count=2, pool=3)
        assert len(picked) == 2 and set(picked) <= {"warm glow", "soft light", "gentle haze"}
        assert picked == sorted(picked, key=ANGLES.get)  # listed best first
    assert expand("a prompt", 0, stub_embed, descriptors=words, count=2, pool=2) == ["warm glow", "soft light"]


def test_same_seed_same_words_other_seeds_vary():
    runs = {seed: expand("a castle on a hill", seed, stub_embed) for seed in range(8)}
    assert all(runs[s] == expand("a castle on a hill", s, stub_embed) for s in runs)
    assert len({tuple(words) for words in runs.values()}) > 1
    for words in runs.values():
        assert len(words) == 5 and set(words) <= set(DESCRIPTORS)
        groups = [GROUP_OF[w] for w in words]
        assert max(groups.count(g) for g in groups) <= PER_GROUP


def test_words_already_in_the_prompt_and_empty_prompts_are_skipped():
    words = list(ANGLES)
    assert "warm glow" not in expand("a Warm Glow over hills", 1, stub_embed, descriptors=words, count=3, pool=3)
    assert expand("   ", 1, stub_embed) == []


def test_without_an_encoder_general_quality_words_are_used():
    words = expand("a fox", 3, None)
    assert words == expand("a fox", 3, None) and len(words) == 5 and set(words) <= set(GROUPS["quality"])


def test_build_prompt_appends_and_records_expansion():
    request = GenerateRequest(prompt="a fox", styles=["Watercolor"], expand=True, seed=9)
    plan = build_prompt(request, stub_embed)
    words = plan.record["expansion"]
    assert words == expand("a fox", 9, stub_embed) and plan.record["expansion_ranked"] is True
    assert plan.positive.endswith(", ".join(words)) and plan.positive.startswith("watercolor painting of a fox")
    assert plan.record["positive"] == plan.positive and plan.record["negative"] == plan.negative
    off = build_prompt(GenerateRequest(prompt="a fox", expand=False, seed=9), stub_embed)
    assert off.positive == "a fox" and off.record["expansion"] == []


def test_expansion_keeps_the_prompt_within_its_limit():
    """A prompt just under 10,000 characters came out at 10,060 with its expansion words."""
    prompt = "fox, " * 1990
    words = expand(prompt, 3, None)
    plan = build_prompt(GenerateRequest(prompt=prompt, expand=True, seed=3))
    assert len(plan.positive) <= MAX_PROMPT_CHARS < len(", ".join([prompt, *words]))
    kept = plan.record["expansion"]
    assert kept and kept == words[:len(kept)] and plan.positive.endswith(", ".join(kept))


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_model_embedder_ranks_with_the_text_encoder(family, sd_pipe, xl_pipe):
    from backend.engine.text_embed import make_embedder

    pipe = sd_pipe if family == "sd" else xl_pipe
    embed = make_embedder(pipe)
    vectors = embed(["a fox", "sharp focus", "a fox"])
    assert vectors.shape == (3, 32) and np.array_equal(vectors[0], vectors[2])
    assert not np.allclose(vectors[0], vectors[1])
    words = expand("a fox in snow", 2, embed)
    assert words == expand("a fox in snow", 2, make_embedder(pipe))  # cached per pipeline, same result
    assert len(words) == 5
