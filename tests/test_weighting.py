"""Weighted and chunked text encoding on the tiny SD and SDXL pipelines.

The tiny tokenizer has one token per character, so 75 tokens = 75 characters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from backend.engine.conditioning import CHUNK, _chunked, _encode_chunks, _encode_stock, chunk_tokens, encode
from backend.engine.demo_models import tiny_tokenizer
from backend.prompting.weights import parse_weights


def _pipe(family, sd_pipe, xl_pipe):
    return sd_pipe if family == "sd" else xl_pipe


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_unweighted_chunk_equals_encode_prompt(family, sd_pipe, xl_pipe):
    """Our chunk encoder with all weights 1 reproduces diffusers' encode_prompt exactly."""
    pipe = _pipe(family, sd_pipe, xl_pipe)
    for text in ("a red fox, snow", "blurry"):
        with torch.inference_mode():
            stock = _encode_stock(pipe, text)
            ours = _encode_chunks(pipe, _chunked(pipe, text, "prompt"), 1)
        assert (stock[1] is None) == (ours[1] is None) == (family == "sd")  # pooled: SDXL only
        for a, b in zip(stock, ours):
            if a is not None:
                assert a.shape == b.shape and torch.equal(a, b), text


@pytest.mark.parametrize("family", ["sd", "xl"])
def test_token_beyond_77_changes_conditioning(family, sd_pipe, xl_pipe):
    pipe = _pipe(family, sd_pipe, xl_pipe)
    head = "a" * 100  # one token per character: already past one window
    with torch.inference_mode():
        a = encode(pipe, head + "x", "", True)
        b = encode(pipe, head + "y", "", True)
    assert a.cond.shape[1] == 154 and a.uncond.shape == a.cond.shape  # two windows, negative padded to match
    assert not torch.equal(a.cond[:, 77:], b.cond[:, 77:])  # the 101st token reaches the model
    assert torch.equal(a.cond[:, :77], b.cond[:, :77])
    if family == "xl":
        assert a.pooled.shape == (1, 32) and torch.equal(a.pooled, b.pooled)  # pooled from the first chunk


def test_xl_weights_keep_the_chunk_mean(xl_pipe):
    with torch.inference_mode():
        plain = encode(xl_pipe, "a red fox", "", False).cond
        heavy = encode(xl_pipe, "a (red:1.5) fox", "", False).cond
        light = encode(xl_pipe, "a (red:0.5) fox", "", False).cond
    assert abs(plain.mean().item()) > 1e-2  # the penultimate layer has a real mean to restore
    for weighted in (heavy, light):
        assert not torch.equal(plain, weighted)
        assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-5)
    # Token 0 is BOS; "a" is token 1, "red" tokens 2..4 (one per character).
    assert heavy[0, 2:5].norm() / heavy[0, 1].norm() > light[0, 2:5].norm() / light[0, 1].norm()


def test_zero_mean_chunk_gets_plain_scaling(sd_pipe):
    """SD's final layer norm (no bias in the tiny model) gives zero-mean chunks: no mean ratio, just weights."""
    long = "a (red:1.3) fox, " * 12 + "BREAK [snow]"
    with torch.inference_mode():
        plain = encode(sd_pipe, "a red fox", "", False).cond
        heavy = encode(sd_pipe, "a (red:1.5) fox", "", False).cond
        cond = encode(sd_pipe, long, "blurry, (ugly:1.2)", True, clip_skip=2)
    assert torch.allclose(heavy[0, 2:5], plain[0, 2:5] * 1.5) and torch.equal(heavy[0, 5:], plain[0, 5:])
    assert torch.isfinite(cond.cond).all() and torch.isfinite(cond.uncond).all()


def test_clip_skip_applies_to_both_prompts(sd_pipe, xl_pipe):
    for pipe in (sd_pipe, xl_pipe):
        with torch.inference_mode():
            last = encode(pipe, "a red fox", "blurry", True, clip_skip=1)
            skip = encode(pipe, "a red fox", "blurry", True, clip_skip=2)
        assert not torch.equal(last.cond, skip.cond) and not torch.equal(last.uncond, skip.uncond)


def test_sd_clip_skip_equals_encoder_without_its_last_layer(sd_pipe):
    """clip_skip 2 = the final layer norm over the penultimate layer = a text encoder one layer shorter."""
    shorter = copy.deepcopy(sd_pipe.text_encoder)
    shorter.encoder.layers = shorter.encoder.layers[:-1]
    ids = sd_pipe.tokenizer("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        ours = encode(sd_pipe, "a red fox", "", False, clip_skip=2).cond
        expected = shorter(ids)[0]
    assert torch.allclose(ours, expected, atol=1e-6)


def test_chunking_rules():
    tok = tiny_tokenizer()
    comma = tok.get_vocab()[",</w>"]
    # A comma within the last 20 tokens of a full chunk moves the rest to the next chunk.
    text = "b" * 60 + "," + "c" * 30
    chunks = chunk_tokens(tok, parse_weights(text))
    assert [len(ids) for ids, _ in chunks] == [61, 30] and chunks[0][0][-1] == comma
    # No comma near the end: a hard cut at 75.
    chunks = chunk_tokens(tok, parse_weights("d" * 100))
    assert [len(ids) for ids, _ in chunks] == [CHUNK, 25]
    # BREAK starts a new chunk; weights follow their tokens.
    chunks = chunk_tokens(tok, parse_weights("(ab:2) BREAK c"))
    assert chunks == [([tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b</w>")], [2.0, 2.0]),
                      ([tok.convert_tokens_to_ids("c</w>")], [1.0])]
    assert chunk_tokens(tok, []) == [([], [])]
