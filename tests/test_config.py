"""The YAML config: defaults, keys, bad values (one-line warnings), env overrides, --config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from backend import config
from backend.errors import DreamttyError


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch):
    for name in ("DREAMTTY_CONFIG", "DREAMTTY_LORAS", "DREAMTTY_CHECKPOINTS", "DREAMTTY_DEFAULT_MODEL",
                 "DREAMTTY_ALLOW_PICKLE"):
        monkeypatch.delenv(name, raising=False)


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_missing_file_gives_xdg_defaults(dreamtty_home):
    cfg = config.load()
    assert cfg.warnings == [] and cfg.source is None
    assert cfg.folders("checkpoints") == [dreamtty_home / "data" / "models" / "checkpoints"]
    assert cfg.folders("wildcards") == [dreamtty_home / "config" / "wildcards"]
    assert config.config_path() == dreamtty_home / "config" / "config.yaml"
    assert cfg.default_model is None and cfg.allow_pickle is False


def test_valid_file_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("DREAMTTY_OUTPUTS")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("ckpt", "more", "loras"):
        (tmp_path / name).mkdir()
    path = _write(tmp_path / "c.yaml", {
        "paths": {"checkpoints": [str(tmp_path / "ckpt"), "~/more"], "loras": str(tmp_path / "loras"),
                  "outputs": "/data/out"},  # made when an image is saved: need not exist yet
        "default_model": "sdxl-base", "default_preset": "anime", "keymap": {"generate": "ctrl+g"},
    })
    cfg = config.load(path)
    assert cfg.warnings == []
    assert cfg.folders("checkpoints") == [tmp_path / "ckpt", tmp_path / "more"]
    assert cfg.folders("loras") == [tmp_path / "loras"]
    assert cfg.outputs_dir() == Path("/data/out")
    assert (cfg.default_model, cfg.default_preset, cfg.keymap) == ("sdxl-base", "anime", {"generate": "ctrl+g"})


def test_a_relative_folder_is_taken_from_the_config_files_folder(tmp_path, monkeypatch):
    """Not from the current folder: a service started in another folder than its client searched elsewhere (a
    LoRA that `models list` showed was "not found")."""
    monkeypatch.delenv("DREAMTTY_OUTPUTS")
    (tmp_path / "conf").mkdir()
    path = _write(tmp_path / "conf" / "c.yaml", {"paths": {"loras": ["lo", "../shared"], "outputs": "out"}})
    monkeypatch.chdir(tmp_path)
    cfg = config.load(Path("conf/c.yaml"))
    assert cfg.folders("loras") == [path.parent / "lo", path.parent / "../shared"]
    assert cfg.outputs_dir() == path.parent / "out"


def test_bad_values_name_the_key_and_keep_defaults(tmp_path):
    path = _write(tmp_path / "c.yaml", {
        "paths": {"loras": 5, "checkpoints": ["/ok"], "models": ["/x"]},
        "default_model": 3, "keymap": ["ctrl+g"], "colour": "red", "allow_pickle": "yes",
    })
    cfg = config.load(path)
    text = "\n".join(cfg.warnings)
    assert all("\n" not in w and w.startswith("config: ") for w in cfg.warnings)
    for key in ("paths.loras", "paths.models", "default_model", "keymap", "'colour'", "allow_pickle"):
        assert key in text, key
    assert cfg.folders("checkpoints") == [Path("/ok")]  # the good key still applies
    assert cfg.folders("loras") == config.default_folders("loras")
    assert cfg.default_model is None and cfg.allow_pickle is False


def test_null_means_not_set(tmp_path):
    """``speed: null`` warned "null is not allowed", though the docs' example writes null for keys left unset."""
    path = tmp_path / "c.yaml"
    path.write_text("speed: null\nmax_batch: ~\ndefault_model: null\nallow_pickle: null\nworkers: null\n"
                    "paths:\n  loras: null\n  outputs: null\n")
    cfg = config.load(path)
    assert cfg.warnings == [] and (cfg.speed, cfg.max_batch, cfg.default_model, cfg.allow_pickle) == (
        None, None, None, False)
    assert cfg.folders("loras") == config.default_folders("loras")


def test_a_control_character_in_yaml_is_said_on_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('speed: "x\x1b"\n')
    assert config.load(path).warnings == [f"config: {path} is not valid YAML (unacceptable character #x001b: special "
                                          "characters are not allowed); using defaults"]


def test_broken_yaml_is_one_warning_and_defaults(tmp_path):
    path = _write(tmp_path / "c.yaml", "paths:\n  checkpoints: [/a\n default_model: x\n")
    cfg = config.load(path)
    assert len(cfg.warnings) == 1 and "not valid YAML at line" in cfg.warnings[0]
    assert cfg.folders("checkpoints") == config.default_folders("checkpoints")
    assert "must be a mapping" in config.load(_write(tmp_path / "l.yaml", "- a\n- b\n")).warnings[0]
    twice = _write(tmp_path / "t.yaml", "default_model: a\ndefault_model: b\n")
    assert config.load(twice).warnings == [
        f"config: {twice} is not valid YAML at line 2 (the key 'default_model' is given twice); using defaults"]
    with pytest.raises(DreamttyError, match=r"^config: cannot update .*t.yaml: not valid YAML at line 2 \(the key"):
        config.set_value("default_model", "c", twice)
    assert twice.read_text() == "default_model: a\ndefault_model: b\n"  # the user's file is left as it was
    huge = _write(tmp_path / "h.yaml", "max_batch: " + "9" * 5000 + "\n")  # more digits than int() takes
    assert config.load(huge).warnings == [
        f"config: {huge} is not valid YAML at line 1 (a number of 5000 characters is too long); using defaults"]


def test_env_overrides_single_keys(tmp_path, monkeypatch):
    path = _write(tmp_path / "c.yaml", {"paths": {"loras": ["/from/file"]}, "default_model": "file-model"})
    monkeypatch.setenv("DREAMTTY_LORAS", f"{tmp_path}{__import__('os').pathsep}{tmp_path / 'b'}")
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("DREAMTTY_DEFAULT_MODEL", "env-model")
    monkeypatch.setenv("DREAMTTY_ALLOW_PICKLE", "1")
    cfg = config.load(path)
    assert cfg.folders("loras") == [tmp_path, tmp_path / "b"]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DREAMTTY_OUTPUTS", "~/pics")
    assert config.load(path).outputs_dir() == tmp_path / "pics"  # as paths.outputs: ~ is the home folder
    assert cfg.default_model == "env-model" and cfg.allow_pickle
    monkeypatch.setenv("DREAMTTY_ALLOW_PICKLE", "garbage")  # not a switch: said, and the file's value applies
    path = _write(tmp_path / "p.yaml", {"allow_pickle": True})
    cfg = config.load(path)
    assert cfg.allow_pickle and cfg.warnings == [
        "config: DREAMTTY_ALLOW_PICKLE: 'garbage' is not true or false; the config file's allow_pickle applies"]
    monkeypatch.setenv("DREAMTTY_ALLOW_PICKLE", "off")
    assert not config.load(path).allow_pickle


def test_a_folder_path_that_names_a_file_or_nothing_is_said(tmp_path, monkeypatch):
    styles = _write(tmp_path / "styles.json", {})
    monkeypatch.setenv("DREAMTTY_WILDCARDS", str(styles))
    cfg = config.load(_write(tmp_path / "c.yaml", {"paths": {"styles": [str(styles), str(tmp_path)],
                                                             "loras": [str(tmp_path / "lroas")]}}))
    assert cfg.folders("styles") == [tmp_path] and cfg.folders("wildcards") == []
    assert cfg.folders("loras") == [tmp_path / "lroas"]  # searched once it is made
    assert sorted(cfg.warnings) == [f"config: DREAMTTY_WILDCARDS: {styles} is a file, not a folder; ignored",
                                    f"config: paths.loras: {tmp_path / 'lroas'} does not exist; nothing is found there",
                                    f"config: paths.styles: {styles} is a file, not a folder; ignored"]
    monkeypatch.delenv("DREAMTTY_WILDCARDS")
    assert config.load(_write(tmp_path / "d.yaml", {})).warnings == []  # the default folders need not exist


def test_a_folder_the_environment_names_is_said_under_its_variable(tmp_path, monkeypatch):
    """The user set DREAMTTY_CHECKPOINTS, not paths.checkpoints: the warning names what they wrote."""
    passwd = _write(tmp_path / "passwd", {})
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", f"{tmp_path / 'nope'}{os.pathsep}{passwd}")
    cfg = config.load(_write(tmp_path / "c.yaml", {"paths": {"loras": [str(tmp_path / "lroas")]}}))
    assert cfg.warnings == [
        f"config: DREAMTTY_CHECKPOINTS: {tmp_path / 'nope'} does not exist; nothing is found there",
        f"config: DREAMTTY_CHECKPOINTS: {passwd} is a file, not a folder; ignored",
        f"config: paths.loras: {tmp_path / 'lroas'} does not exist; nothing is found there"]


def test_set_config_path_reaches_other_processes_through_env(tmp_path, monkeypatch):
    path = _write(tmp_path / "c.yaml", {"default_model": "chosen"})
    config.set_config_path(path)
    try:
        import os

        assert os.environ["DREAMTTY_CONFIG"] == str(path.resolve())
        assert config.load().default_model == "chosen"
    finally:
        config.set_config_path(None)
    missing = tmp_path / "nope.yaml"
    config.set_config_path(missing)
    try:
        assert "does not exist" in config.load().warnings[0]
    finally:
        config.set_config_path(None)


def test_set_value_keeps_other_keys(tmp_path):
    path = _write(tmp_path / "c.yaml", {"paths": {"loras": ["/l"]}, "keymap": {"a": "b"}})
    config.set_value("default_model", "mine", path)
    data = yaml.safe_load(path.read_text())
    assert data == {"paths": {"loras": ["/l"]}, "keymap": {"a": "b"}, "default_model": "mine"}
    assert config.load(path).default_model == "mine"
    with pytest.raises(Exception, match="unknown key"):
        config.set_value("nope", 1, path)


def test_a_model_name_that_is_not_utf8_is_never_saved_and_never_the_default(tmp_path, monkeypatch):
    """A file whose name does not decode (made the default from the Models screen) broke every later command."""
    path = _write(tmp_path / "c.yaml", "default_model: mine\n")
    undecodable = os.fsdecode(b"a\xffb.safetensors")
    with pytest.raises(DreamttyError, match=r"^default_model: is not valid UTF-8 text \(byte 0xff at character 2\)"):
        config.set_value("default_model", undecodable, path)
    assert path.read_text() == "default_model: mine\n"
    _write(path, 'default_model: "a\\udcffb.safetensors"\n')  # written so by an older version
    cfg = config.load(path)
    assert cfg.default_model is None and cfg.warnings == [
        "config: default_model: is not valid UTF-8 text (byte 0xff at character 2); give text, and paths, in UTF-8; "
        "using the default"]
    _write(path, "default_model: mine\n")
    monkeypatch.setenv("DREAMTTY_DEFAULT_MODEL", undecodable)
    cfg = config.load(path)
    assert cfg.default_model == "mine" and cfg.warnings == [
        "config: DREAMTTY_DEFAULT_MODEL: is not valid UTF-8 text (byte 0xff at character 2); give text, and paths, "
        "in UTF-8; the config file's default_model applies"]
    assert cfg.origin("default_model") == f"default_model of {path}"  # the value's origin, not the variable refused


def test_set_value_keeps_comments_anchors_and_a_dotfiles_link(tmp_path):
    dotfile = tmp_path / "dotfiles" / "dreamtty.yaml"
    dotfile.parent.mkdir()
    dotfile.write_text("# my settings\npaths: &p\n  loras: [/l]  # shared\ndefault_model:\n  old\n"
                       "keymap: {generate: f5}\n")
    dotfile.chmod(0o600)
    link = tmp_path / "linked.yaml"
    link.symlink_to(dotfile)
    assert config.set_value("default_model", "new one", link) == dotfile
    assert link.is_symlink() and dotfile.stat().st_mode & 0o777 == 0o600
    assert dotfile.read_text() == ("# my settings\npaths: &p\n  loras: [/l]  # shared\ndefault_model: \"new one\"\n"
                                   "keymap: {generate: f5}\n")
    config.set_value("default_preset", "a\nb", link)  # added at the end, on one line
    assert yaml.safe_load(dotfile.read_text())["default_preset"] == "a\nb"
    assert dotfile.read_text().splitlines()[0] == "# my settings"


@pytest.mark.parametrize("text", ["- default_model: x\n", "just text\n"])
def test_set_value_refuses_a_config_that_is_not_a_mapping(tmp_path, text):
    """It is read with a warning and the defaults; writing one key would replace what the user wrote."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(DreamttyError, match=r"^config: cannot update .*c.yaml: it holds (a list|text), not a mapping"):
        config.set_value("default_model", "mine", path)
    assert path.read_text() == text


def test_a_config_that_is_not_a_regular_file_or_too_large_is_not_read(tmp_path):
    """``--config /dev/zero`` would read forever: a device or a file over the limit is one warning."""
    assert config.load("/dev/null").warnings == ["config: /dev/null is not a regular file; using defaults"]
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(17 * 2**20)  # sparse: its size is all that is read
    assert config.load(big).warnings == [f"config: {big} is 17 MiB; allowed up to 16 MiB; using defaults"]


ALLOWED = "allowed: paths, default_model, default_preset, speed, max_batch, keymap, allow_pickle, workers"
KINDS = ("allowed: checkpoints, loras, vae, embeddings, upscalers, ip_adapters, controlnets, depth_models, captioners, "
         "wildcards, styles, outputs")


@pytest.mark.parametrize("text, unknown", [
    ("1: a\nfoo: b\n", ["1", "'foo'"]),
    ("~: 1\nfoo: 2\n", ["null", "'foo'"]),
    ("yes: 1\nfoo: 2\nno: 3\n", ["true", "'foo'", "false"]),  # YAML reads yes and no as true and false
    ("1.5: a\n\"\\e[31m\": b\n", ["1.5", "'\\x1b[31m'"]),  # control characters escaped
])
def test_unknown_keys_of_mixed_types_are_one_warning(tmp_path, text, unknown):
    """Unknown keys that are numbers, null or true next to texts once made sorted() raise a TypeError; each is
    said, in the file's order, in one line."""
    cfg = config.load(_write(tmp_path / "c.yaml", text + "default_model: kept\n"))
    assert cfg.warnings == [f"config: unknown keys {', '.join(unknown)}; {ALLOWED}"]
    assert cfg.default_model == "kept"


def test_a_train_yaml_given_as_the_app_config_is_one_warning_that_says_where_it_goes(tmp_path, capsys):
    """It was a line per key (15 for a train.yaml), then a misleading "model: empty"."""
    from tui.cli import main

    train = _write(tmp_path / "train.yaml", "model: demo\ninstance_dir: photos\ninstance_prompt: a sks dog\n")
    assert main(["--config", str(train), "styles", "list"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        f"dreamtty: config: unknown keys 'model', 'instance_dir', 'instance_prompt'; {ALLOWED}; training settings "
        "go in `dreamtty train --config FILE`")


def test_unknown_path_kinds_of_mixed_types_are_one_warning_each(tmp_path):
    cfg = config.load(_write(tmp_path / "c.yaml", f"paths:\n  1: [a]\n  foo: [b]\n  ~: [c]\n  loras: [{tmp_path}]\n"))
    assert cfg.warnings == [f"config: paths.{kind}: unknown kind; {KINDS}" for kind in ("1", "foo", "null")]
    assert cfg.folders("loras") == [tmp_path] and cfg.folders("vae") == config.default_folders("vae")


def test_a_folder_that_cannot_be_searched_is_said_not_a_traceback(tmp_path, monkeypatch):
    """Path.exists() raises for a name too long (and no permission), and calls a symlink loop missing."""
    long = Path("/" + "a" * 300)
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.setenv("DREAMTTY_LORAS", str(tmp_path / "loop"))  # the environment's folders too
    cfg = config.load(_write(tmp_path / "c.yaml", {"paths": {"checkpoints": [str(long), str(tmp_path)],
                                                             "vae": [str(tmp_path / "missing")]}}))
    assert cfg.warnings == [
        f"config: paths.checkpoints: {long} cannot be searched: File name too long; ignored",
        f"config: DREAMTTY_LORAS: {tmp_path / 'loop'} cannot be searched: Too many levels of symbolic links; ignored",
        f"config: paths.vae: {tmp_path / 'missing'} does not exist; nothing is found there"]
    assert cfg.folders("checkpoints") == [tmp_path] and cfg.folders("loras") == []
    assert cfg.folders("vae") == [tmp_path / "missing"]  # searched once it is made


def test_set_config_path_keeps_a_symlink_loop_for_load_to_say(tmp_path, monkeypatch):
    """Path.resolve() raises RuntimeError for a loop (Python 3.11); the path is kept as given instead."""
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    config.set_config_path(tmp_path / "loop1")
    try:
        assert config.config_path() == tmp_path / "loop1"
        assert config.load().warnings == [
            f"config: cannot read {tmp_path / 'loop1'}: Too many levels of symbolic links; using defaults"]
    finally:
        config.set_config_path(None)
    with pytest.raises(DreamttyError, match=r"^config: cannot update .*loop1: Too many levels of symbolic links$"):
        config.set_value("default_model", "x", tmp_path / "loop1")


def test_a_config_link_to_a_file_not_there_is_said_not_taken_for_no_config(tmp_path):
    """A dotfiles link whose target is not checked out read as "no config yet": the defaults, in silence."""
    link = tmp_path / "linked.yaml"
    link.symlink_to(tmp_path / "dotfiles" / "config.yaml")
    cfg = config.load(link)
    assert cfg.source is None and cfg.warnings == [
        f"config: {link} links to {tmp_path}/dotfiles/config.yaml, which does not exist; using defaults"]
    folder = tmp_path / "dreamtty"  # ~/.config/dreamtty linked to a dotfiles folder not there
    folder.symlink_to(tmp_path / "dotfiles" / "dreamtty")
    assert config.load(folder / "config.yaml").warnings == [
        f"config: {folder} links to {tmp_path}/dotfiles/dreamtty, which does not exist; using defaults"]
    assert config.load(tmp_path / "plain" / "config.yaml").warnings == []  # no link: no config yet
