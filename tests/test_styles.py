"""Styles: shipped pack, user JSON (Fooocus schema) and A1111 CSV files, composition, CLI."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from backend.errors import RequestError
from backend.prompting import build_prompt
from backend.prompting.styles import PLACEHOLDER, RANDOM_STYLE, apply_styles, load_styles, merge_negatives
from backend.request import GenerateRequest
from tui.cli import main


@pytest.fixture
def user_home(user_folder):
    return user_folder("styles")


def test_shipped_pack_is_complete_and_clean():
    library = load_styles()
    assert library.warnings == []
    shipped = [s for s in library.styles.values() if s.source.startswith("shipped:")]
    assert len(shipped) >= 100
    assert len({s.category for s in shipped}) >= 7
    entries = [e for f in resources.files("styles").iterdir() if f.name.endswith(".json")
               for e in json.loads(f.read_text())]
    assert len(entries) == len(shipped)  # no two shipped styles share a name
    templated = [s for s in shipped if PLACEHOLDER in s.prompt]
    assert len(templated) >= 100
    assert all(s.prompt.count(PLACEHOLDER) <= 1 for s in shipped)


def test_composition_wraps_in_order_and_merges_negatives():
    library = load_styles()
    positive, negative, used = apply_styles("a cat", "blurry, Photo", ["Watercolor", "Enhance", "film-noir"],
                                            library, seed=1)
    watercolor = library.get("Watercolor").apply("a cat")
    enhanced = watercolor + ", " + library.get("Enhance").prompt  # no {prompt}: appended
    assert positive == library.get("Film Noir").prompt.replace(PLACEHOLDER, enhanced)
    assert used == ["Watercolor", "Enhance", "Film Noir"]
    terms = [t.strip() for t in negative.split(",")]
    assert terms[:2] == ["blurry", "Photo"] and "photo" not in terms  # first spelling kept, no duplicates
    assert len({t.lower() for t in terms}) == len(terms)
    assert "cartoon" in terms and "watermark" in terms


def test_negative_merge_keeps_weighted_groups_whole():
    assert merge_negatives(["(ugly, bad:1.2), blurry", "blurry, text"]) == "(ugly, bad:1.2), blurry, text"


def test_unknown_style_is_a_request_error():
    with pytest.raises(RequestError) as err:
        build_prompt(GenerateRequest(prompt="x", styles=["No Such Style"], seed=1))
    assert str(err.value) == "styles: unknown 'No Such Style'; see dreamtty styles list"


def test_random_style_is_seeded_and_recorded():
    def pick(seed: int) -> list[str]:
        return build_prompt(GenerateRequest(prompt="a cat", styles=["Watercolor", RANDOM_STYLE], seed=seed)).record["styles"]

    assert pick(4) == pick(4)
    picks = {pick(seed)[1] for seed in range(12)}
    assert len(picks) > 3 and "Watercolor" not in picks and RANDOM_STYLE not in picks
    every = [style.name for style in load_styles().styles.values()]
    for names in ([*every, RANDOM_STYLE], [RANDOM_STYLE] * (len(every) + 1)):  # none left to pick
        with pytest.raises(RequestError, match=f"^styles: {RANDOM_STYLE} has no style left to pick: every one of "
                                               f"the {len(every)} is selected or picked already; select fewer$"):
            build_prompt(GenerateRequest(prompt="a cat", styles=names, seed=1))


def test_user_json_and_a1111_csv_load(user_home):
    (user_home / "mine.json").write_text(json.dumps([
        {"name": "sai-neon", "prompt": "neon {prompt}, glow", "negative_prompt": "dull"},
        {"name": "Watercolor", "prompt": "my watercolor of {prompt}", "negative_prompt": ""},
    ]))
    (user_home / "styles.csv").write_text(
        'name,prompt,negative_prompt\n"Moody","{prompt}, moody, dark","bright, sunny"\nSuffix only,"grainy",\n'
    )
    library = load_styles()
    assert library.warnings == []
    assert library.get("SAI Neon").apply("a cat") == "neon a cat, glow"
    assert library.get("sai-neon").category == "mine"
    assert library.get("Watercolor").prompt == "my watercolor of {prompt}"  # user overrides shipped
    plan = build_prompt(GenerateRequest(prompt="a cat", styles=["moody", "Suffix only"], seed=1))
    assert plan.positive == "a cat, moody, dark, grainy"
    assert plan.negative == "bright, sunny"
    assert plan.record["styles"] == ["Moody", "Suffix only"]


def test_malformed_files_are_reported_with_line_and_skipped(user_home):
    (user_home / "broken.json").write_text('[\n  {"name": "A", "prompt": "{prompt}"},\n  {"name": "B" "prompt": ""}\n]')
    (user_home / "entries.json").write_text(
        '[\n  {"name": "Good One", "prompt": "good {prompt}"},\n\n  {"prompt": "no name"},\n'
        '  {"name": "Bad Type", "prompt": 3}\n]'
    )
    (user_home / "notalist.json").write_text('{"name": "x"}')
    (user_home / "styles.csv").write_text("title,text\nx,y\n")
    (user_home / "more.csv").write_text("name,prompt,negative_prompt\nFine,{prompt} ok,\n,orphan,\n")
    library = load_styles()
    warnings = "\n".join(library.warnings)
    assert "broken.json line 3: not valid JSON" in warnings
    assert "entries.json line 4: style needs a text 'name'" in warnings
    assert "entries.json line 5: 'Bad Type': 'prompt' must be text" in warnings
    assert "notalist.json line 1: expected a JSON list" in warnings
    assert "styles.csv line 1: needs a header" in warnings
    assert "more.csv line 3: row has no name" in warnings
    assert len(library.warnings) == 6
    assert library.get("Good One").apply("x") == "good x" and library.get("Fine").apply("x") == "x ok"
    assert len(library.styles) >= 102  # shipped styles still load


def test_cli_styles_list_and_show(capsys, user_home):
    (user_home / "bad.json").write_text("[")
    assert main(["styles", "list", "--search", "noir"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["Film", "Noir", "film"] and len(out.splitlines()) == 1
    assert "bad.json line 1" in err
    assert main(["styles", "show", "film noir", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "Film Noir" and PLACEHOLDER in shown["prompt"]
    assert main(["styles", "show", "Nope"]) == 2
    assert "unknown 'Nope'" in capsys.readouterr().err


def test_styles_from_config_folders(tmp_path, monkeypatch):
    extra = tmp_path / "team-styles"
    extra.mkdir()
    (extra / "team.json").write_text(json.dumps([{"name": "Team Look", "prompt": "{prompt}, team look"}]))
    assert "Team Look" not in load_styles().styles
    config = tmp_path / "config.yaml"
    config.write_text(f"paths:\n  styles: [{extra}]\n")
    monkeypatch.setenv("DREAMTTY_CONFIG", str(config))
    style = load_styles().styles["team look"]
    assert (style.name, style.prompt) == ("Team Look", "{prompt}, team look")


def test_styles_list_names_random_style_in_text_and_json_alike(capsys):
    """The text listed Random Style, the JSON did not, and a search for it found nothing in either."""
    from tui.cli import main

    def listed(*argv: str) -> tuple[list[str], list[str]]:
        assert main(["styles", "list", *argv]) == 0
        text = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines() if line]
        assert main(["styles", "list", "--json", *argv]) == 0
        return text, [style["name"] for style in json.loads(capsys.readouterr().out)]

    text, names = listed()
    assert text[-1] == names[-1] == RANDOM_STYLE and text == names and len(names) > 50
    assert listed("--search", "rANDOM") == ([RANDOM_STYLE], [RANDOM_STYLE])
    assert RANDOM_STYLE not in listed("--search", "watercolor")[1]


def test_styles_list_cuts_a_long_name_and_keeps_the_column_narrow(capsys, user_home):
    """One 100,000-character name padded every row to its length (183 lines of 100k columns)."""
    long = "L" * 100_000
    (user_home / "zqx.json").write_text(json.dumps([{"name": long, "prompt": "{prompt}, a"},
                                                     {"name": "Short", "prompt": "{prompt}, b"}]))
    assert main(["styles", "list", "--search", "zqx"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows == [f"{'L' * 39}…  zqx", f"{'Short':<42}zqx"]
    assert main(["styles", "list", "--search", "zqx", "--json"]) == 0
    assert [s["name"] for s in json.loads(capsys.readouterr().out)] == [long, "Short"]
