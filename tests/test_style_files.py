"""Style, preset and config files as users get them: A1111's styles.csv, shared CSVs, hostile nesting, huge packs."""

from __future__ import annotations

import json

import pytest

from backend import config
from backend.errors import RequestError
from backend.prompting.presets import list_presets, load_preset
from backend.prompting.styles import load_styles
from tui.cli import main

DEEP = "[" * 100_000
DEEP_YAML = "[" * 1_000  # past the recursion limit, like 100k; PyYAML's scanner is quadratic in the depth


@pytest.fixture
def styles_dir(user_folder):
    return user_folder("styles")


def test_a1111_styles_csv_with_a_byte_order_mark(styles_dir):
    """A1111 saves styles.csv as UTF-8 with a BOM; the header must still be found."""
    text = 'name,prompt,negative_prompt\nMoody,"{prompt}, moody, dark","bright, sunny"\nÉté,"summer {prompt}",\n'
    (styles_dir / "styles.csv").write_bytes(text.encode("utf-8-sig"))
    bom_json = json.dumps([{"name": "Bom Json", "prompt": "x {prompt}"}])
    (styles_dir / "bom.json").write_bytes(bom_json.encode("utf-8-sig"))
    library = load_styles()
    assert library.warnings == []
    moody = library.get("Moody")
    assert (moody.prompt, moody.negative_prompt) == ("{prompt}, moody, dark", "bright, sunny")
    assert library.get("Été").prompt == "summer {prompt}" and library.get("Bom Json").prompt == "x {prompt}"


def test_a_csv_quote_never_closed_and_a_file_not_utf8_are_said(styles_dir):
    """The quote swallowed every later row into one style's prompt, without a word; a binary file got Python's
    codec message."""
    (styles_dir / "bad.csv").write_text('name,prompt,negative_prompt\nok1,p {prompt},n\nunterminated,"abc\n'
                                        'next,q {prompt},m\n')
    (styles_dir / "multi.csv").write_text('name,prompt\nTwo Lines,"first {prompt}\nsecond"\nAfter,x {prompt}\n')
    (styles_dir / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    library = load_styles()
    assert library.warnings == [
        f"{styles_dir / 'bad.csv'} line 3: a quote opened in this row is never closed (the rest of the file would be "
        "one field); file skipped",
        f"{styles_dir / 'binary.json'} is not UTF-8 text; file skipped"]
    assert {"unterminated", "ok1", "next"}.isdisjoint(library.styles)
    assert library.get("Two Lines").prompt == "first {prompt}\nsecond" and library.get("After").prompt == "x {prompt}"


def test_a_style_that_changes_nothing_or_is_given_twice_is_said(styles_dir):
    """An entry with no prompt and no negative, a CSV row with a name only, and a name given twice in the user's
    files loaded in silence (the last one won)."""
    (styles_dir / "a.json").write_text(json.dumps([{"name": "dup", "prompt": "one {prompt}"}, {"name": "NoPrompt"},
                                                   {"name": "Watercolor", "prompt": "mine {prompt}"}], indent=0))
    (styles_dir / "b.json").write_text(json.dumps([{"name": "DUP", "prompt": "two {prompt}"}]))
    (styles_dir / "c.csv").write_text("name,prompt,negative_prompt\nBad Row\n")
    library = load_styles()
    assert library.warnings == [
        f"{styles_dir / 'a.json'} line 6: 'NoPrompt' has no prompt and no negative_prompt: it would change nothing; "
        "style skipped",
        f"{styles_dir / 'b.json'} line 1: 'DUP' is given again (first in {styles_dir / 'a.json'}); the later one is "
        "used",
        f"{styles_dir / 'c.csv'} line 2: 'Bad Row' has no prompt and no negative_prompt: it would change nothing; "
        "style skipped"]  # a user's Watercolor replaces the shipped one without a word
    assert library.get("dup").prompt == "two {prompt}" and library.get("Watercolor").prompt == "mine {prompt}"


def test_shared_csv_with_spaces_after_the_commas(styles_dir):
    """Shared packs write `name, "prompt", "negative"`: A1111 reads them with skipinitialspace."""
    (styles_dir / "shared.csv").write_text(
        'name, prompt, negative_prompt\n'
        'Cinematic, "cinematic still {prompt}, emotional, harmonious", "anime, cartoon, graphic"\n'
        'Plain, photo of {prompt}, ugly\n'
    )
    library = load_styles()
    assert library.warnings == []
    cinematic, plain = library.get("Cinematic"), library.get("Plain")
    assert cinematic.prompt == "cinematic still {prompt}, emotional, harmonious"
    assert cinematic.negative_prompt == "anime, cartoon, graphic"
    assert (plain.prompt, plain.negative_prompt) == ("photo of {prompt}", "ugly")


def test_deeply_nested_style_file_is_reported_and_skipped(styles_dir, capsys):
    (styles_dir / "deep.json").write_text(DEEP)
    (styles_dir / "fine.json").write_text(json.dumps([{"name": "Fine", "prompt": "fine {prompt}"}]))
    (styles_dir / "long.json").write_text('[{"name": "Long", "n": ' + "9" * 5000 + "}]")  # past int()'s digits
    library = load_styles()
    assert library.warnings == [f"{styles_dir / 'deep.json'}: JSON nested too deeply; file skipped",
                                f"{styles_dir / 'long.json'}: not valid JSON (a number too long); file skipped"]
    assert library.get("Fine").prompt == "fine {prompt}"
    assert main(["styles", "list", "--search", "fine"]) == 0
    out, err = capsys.readouterr()
    assert "Fine" in out and "nested too deeply" in err and "Traceback" not in err


def test_deeply_nested_preset_and_config_are_one_line_errors(user_folder, monkeypatch, tmp_path):
    (user_folder("presets") / "deep.yaml").write_text(DEEP_YAML)
    with pytest.raises(RequestError, match=r"^preset: .*deep\.yaml is not valid YAML \(nested too deeply\)$"):
        load_preset("deep")
    assert any(p.name == "deep" and "nested too deeply" in p.description for p in list_presets())
    deep_config = tmp_path / "deep-config.yaml"
    deep_config.write_text(DEEP_YAML)
    monkeypatch.setenv("DREAMTTY_CONFIG", str(deep_config))
    assert config.load().warnings == [f"config: {deep_config} is not valid YAML (nested too deeply); using defaults"]


def test_a_100k_style_pack_loads_and_lists_in_one_pass(styles_dir, capsys):
    """Loading is linear in the file (it was quadratic: 100k styles took minutes); the line numbers stay right."""
    entries = [{"name": f"Big {i}", "prompt": f"{{prompt}}, look {i}"} for i in range(100_000)]
    entries[99_998] = {"prompt": "no name"}
    (styles_dir / "big.json").write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    library = load_styles()
    assert library.warnings == [f"{styles_dir / 'big.json'} line 100000: style needs a text 'name'; style skipped"]
    assert library.get("Big 99999").prompt == "{prompt}, look 99999"
    assert main(["styles", "list", "--search", "Big "]) == 0
    out, err = capsys.readouterr()
    assert sum(line.startswith("Big ") for line in out.splitlines()) == 99_999



def test_a_user_style_named_random_style_is_skipped_with_a_warning(styles_dir):
    (styles_dir / "mine.json").write_text(json.dumps([{"name": "random-style", "prompt": "mine {prompt}"}]))
    library = load_styles()
    assert library.warnings == [f"{styles_dir / 'mine.json'} line 1: 'random-style' is a reserved name (it picks one "
                                "of the styles per image seed); style skipped"]
    assert all(style.name != "random-style" for style in library.search())


def test_a_style_named_with_a_nul_or_a_lone_surrogate_is_skipped_with_a_warning(styles_dir):
    """It loaded and was listed, and every job using it failed: "styles: holds a NUL character"."""
    (styles_dir / "odd.json").write_text('[\n{"name": "x\\u0000y", "prompt": "a {prompt}"},\n'
                                         '{"name": "s\\ud800", "prompt": "b {prompt}"},\n'
                                         '{"name": "fine", "prompt": "c {prompt}"}]')
    library = load_styles()
    label = styles_dir / "odd.json"
    assert library.warnings == [
        f"{label} line 2: 'x\\x00y': the name holds a NUL character (at character 2); no path or name may hold one; "
        "style skipped",
        f"{label} line 3: 's\\ud800': the name is not valid UTF-8 text (lone surrogate U+D800 at character 2); give "
        "text, and paths, in UTF-8; style skipped"]
    assert [s.name for s in library.search("odd")] == ["fine"]


def test_a_search_finds_a_name_written_as_it_is_looked_up(styles_dir):
    """``--search neon-night`` found nothing, though ``--style neon-night`` selects "Neon Night Photo"."""
    (styles_dir / "mine.json").write_text(json.dumps([{"name": "Neon Night Photo", "prompt": "neon {prompt}"},
                                                      {"name": "Day", "prompt": "qwzx-sun {prompt}"}]))
    library = load_styles()
    for typed in ("neon-night", "NEON_night", "neon night"):
        assert [s.name for s in library.search(typed)] == ["Neon Night Photo"], typed
    assert [s.name for s in library.search("qwzx-sun")] == ["Day"]  # the prompt, as before
    assert library.search("-") == [s for s in library.search() if "-" in f"{s.name}{s.category}{s.prompt}"]
