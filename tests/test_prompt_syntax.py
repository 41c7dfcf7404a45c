"""Prompt syntax: A1111 weights, wildcards and arrays (pure text, no model)."""

from __future__ import annotations

import random

import pytest

from backend.errors import RequestError
from backend.prompting import build_prompt, check_prompts
from backend.prompting.weights import DOWN, UP, Fragment, is_plain, parse_weights
from backend.prompting.wildcards import MAX_DEPTH, expand_arrays, expand_wildcards, load_wildcards
from backend.request import GenerateRequest


def _weights(text: str) -> list[tuple[str, float]]:
    return [(f.text, round(f.weight, 6)) for f in parse_weights(text)]


# -- weighting -------------------------------------------------------------------
def test_explicit_and_default_weights():
    assert _weights("a (red:1.3) fox") == [("a ", 1.0), ("red", 1.3), (" fox", 1.0)]
    assert _weights("(red) [fox]") == [("red", round(UP, 6)), (" ", 1.0), ("fox", round(DOWN, 6))]
    assert _weights("(a:.5)(b:-1)") == [("a", 0.5), ("b", -1.0)]


def test_nesting_multiplies():
    assert _weights("((red))") == [("red", round(UP * UP, 6))]
    assert _weights("(big [red] fox:2)") == [("big ", 2.0), ("red", round(2 * DOWN, 6)), (" fox", 2.0)]


def test_escapes_are_literal_and_not_plain():
    assert _weights(r"\(1990\) \[draft\] a\\b") == [("(1990) [draft] a\\b", 1.0)]
    assert not is_plain(r"\(x\)")
    assert is_plain("a plain prompt: with colon") and is_plain("")


def test_colon_without_number_is_text():
    assert _weights("(time: noon)") == [("time: noon", round(UP, 6))]
    assert _weights("(x:\u0661)") == [("x:\u0661", round(UP, 6))]  # another script's digit is text, as in A1111


def test_break_splits_chunks():
    frags = parse_weights("a cat BREAK a dog")
    assert frags == [Fragment("a cat"), Fragment("", 1.0, is_break=True), Fragment("a dog")]


@pytest.mark.parametrize(
    "text,message",
    [
        ("a (red fox", "'(' at column 3 is never closed"),
        ("a red) fox", "unmatched ')' at column 6"),
        ("(red]", "'(' at column 1 is closed by ']' at column 5"),
        ("[red:1.2)", "closed by ')'"),
        ("a ]", "unmatched ']' at column 3"),
    ],
)
def test_malformed_weights_are_one_line_errors(text, message):
    with pytest.raises(RequestError) as err:
        parse_weights(text)
    assert err.value.field == "prompt" and message in str(err.value) and "\n" not in str(err.value)


def test_build_prompt_rejects_malformed_negative():
    with pytest.raises(RequestError, match=r"negative_prompt: '\(' at column 1"):
        build_prompt(GenerateRequest(prompt="ok", negative_prompt="(blurry", seed=1))


# -- wildcards -------------------------------------------------------------------
TABLE = {"color": ["red", "green", "blue", "gold"], "thing": ["a __color__ hat", "a __color__ coat"],
         "loop": ["__loop__"], "empty": []}


def _expand(text: str, seed: int) -> tuple[str, list[dict]]:
    return expand_wildcards(text, TABLE, random.Random(seed), "prompt")


def test_wildcards_seeded_and_nested():
    first = _expand("__thing__ and __color__", 7)
    assert first == _expand("__thing__ and __color__", 7)
    text, picks = first
    assert "__" not in text
    assert [p["name"] for p in picks] == ["thing", "color", "color"]
    outputs = {_expand("__color__", seed)[0] for seed in range(40)}
    assert outputs == set(TABLE["color"])  # every line reachable, choice depends on the seed


def test_wildcard_errors_name_the_wildcard():
    with pytest.raises(RequestError, match=r"unknown wildcard __nope__"):
        _expand("a __nope__", 1)
    with pytest.raises(RequestError, match=rf"deeper than {MAX_DEPTH} levels at __loop__"):
        _expand("__loop__", 1)
    with pytest.raises(RequestError, match=r"__empty__ has no lines"):
        _expand("__empty__", 1)



def test_a_bracket_fault_a_wildcard_or_style_brought_names_it(user_folder):
    """"'(' at column 1 is never closed" for a prompt of "__unbal__": a column of text the user never typed."""
    import json

    (user_folder("wildcards") / "unbal.txt").write_text("(unbalanced\n")
    (user_folder("styles") / "mine.json").write_text(json.dumps([{"name": "Bad Neg", "prompt": "{prompt}, ok",
                                                                  "negative_prompt": "[blurry"}]))
    with pytest.raises(RequestError) as err:
        build_prompt(GenerateRequest(prompt="a __unbal__ cat", seed=1))
    assert str(err.value) == ("prompt: after wildcards and styles: '(' at column 3 is never closed; add ')' or escape "
                              "it (from wildcard __unbal__, which picked '(unbalanced')")
    with pytest.raises(RequestError) as err:
        build_prompt(GenerateRequest(prompt="a cat", styles=["Bad Neg"], seed=1))
    assert str(err.value).endswith("add ']' or escape it (from the negative_prompt of style 'Bad Neg')")


def test_an_unknown_wildcard_names_the_folder_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMTTY_WILDCARDS", str(tmp_path / "mine"))
    with pytest.raises(RequestError, match=rf"^prompt: unknown wildcard __nope__; add nope.txt to {tmp_path / 'mine'}$"):
        check_prompts(GenerateRequest(prompt="a __nope__", seed=1))


def test_shipped_and_user_wildcards(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    (tmp_path / "config" / "wildcards" / "mine").mkdir(parents=True)
    (tmp_path / "config" / "wildcards" / "color.txt").write_text("# my colours\n\nultraviolet\n")
    (tmp_path / "config" / "wildcards" / "mine" / "pet.txt").write_text("axolotl\n")
    table = load_wildcards()
    assert len(table["animal"]) >= 20  # shipped
    assert table["color"] == ["ultraviolet"]  # the user's file wins
    request = GenerateRequest(prompt="__mine/pet__ in __color__, __scene__", negative_prompt="__color__", seed=3)
    plan = build_prompt(request)
    assert plan.positive.startswith("axolotl in ultraviolet, ") and "__" not in plan.positive
    assert plan.negative == "ultraviolet"
    assert {"field": "negative_prompt", "name": "color", "pick": "ultraviolet"} in plan.record["wildcards"]


def test_wildcard_pick_follows_image_seed():
    base = GenerateRequest(prompt="__animal__", seed=100, count=8)
    picks = [build_prompt(base.per_image(i)).positive for i in range(8)]
    assert picks == [build_prompt(base.per_image(i)).positive for i in range(8)]
    assert len(set(picks)) > 1


# -- arrays ----------------------------------------------------------------------
def test_arrays_give_element_i_to_image_i():
    base = GenerateRequest(prompt="a [[red, green, blue]] [[cat,dog]]", seed=5, count=4)
    positives = [build_prompt(base.per_image(i)).positive for i in range(4)]
    assert positives == ["a red cat", "a green dog", "a blue cat", "a red dog"]
    record = build_prompt(base.per_image(1)).record["arrays"]
    assert record[0] == {"field": "prompt", "options": ["red", "green", "blue"], "pick": "green"}


def test_double_brackets_without_comma_stay_a_weight():
    text, choices = expand_arrays("[[faint]]", 3, "prompt")
    assert text == "[[faint]]" and choices == []
    assert _weights(text) == [("faint", round(DOWN * DOWN, 6))]


def test_check_prompts_finds_errors_of_any_image(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    (tmp_path / "config" / "wildcards").mkdir(parents=True)
    (tmp_path / "config" / "wildcards" / "odd.txt").write_text("(broken\n")
    check_prompts(GenerateRequest(prompt="a [[fine, __odd__]]", seed=1, count=1))  # image 0 is fine
    with pytest.raises(RequestError, match=r"after wildcards and styles: '\(' at column 3 is never closed"):
        check_prompts(GenerateRequest(prompt="a [[fine, __odd__]]", seed=1, count=2))



def test_a_prompt_made_too_long_by_its_wildcards_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    (tmp_path / "config" / "wildcards").mkdir(parents=True)
    (tmp_path / "config" / "wildcards" / "long.txt").write_text("x" * 6000 + "\n")
    check_prompts(GenerateRequest(prompt="__long__", seed=1))
    with pytest.raises(RequestError, match=r"^negative_prompt: is 12,001 characters after wildcards and styles; "
                                           r"allowed up to 10,000$"):
        check_prompts(GenerateRequest(prompt="a", negative_prompt="__long__ __long__", seed=1))
