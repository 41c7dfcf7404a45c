"""``dreamtty models list|pull`` and ``config path``; downloads against an injected fake Hub client."""

from __future__ import annotations

import errno
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from backend import downloads
from backend.errors import DreamttyError, Transient
from tui.cli import main


def _sd1_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(8)}, str(path))
    return path


def test_models_list_json_and_text(tmp_path, monkeypatch, capsys):
    _sd1_file(tmp_path / "ckpt" / "my-model.safetensors")
    (tmp_path / "ckpt" / "partial.safetensors").write_bytes(b"\xff" * 12)
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(tmp_path / "ckpt"))
    assert main(["models", "list", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()  # one JSON object a line, as every --json
    data = json.loads(line)
    mine = next(m for m in data["models"] if m["name"] == "my-model")
    assert (mine["kind"], mine["family"], mine["format"], mine["source"]) == (
        "checkpoint", "sd1", "safetensors", str(tmp_path / "ckpt"))
    assert any("partial.safetensors" in p for p in data["problems"])
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "my-model" in out and "SD 1.x" in out and "skipped (1)" in out and "Recommended" not in out


def test_models_list_recommends_when_only_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(tmp_path / "empty"))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "Recommended models" in out and "stabilityai/stable-diffusion-xl-base-1.0" in out


def test_config_path_and_global_config_option(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DREAMTTY_CONFIG", raising=False)
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip().endswith("config/config.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("paths:\n  loras: 5\n")
    try:
        assert main(["--config", str(bad), "config", "path"]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip() == str(bad.resolve())
        assert "dreamtty: config: paths.loras: must be a list of folder paths" in captured.err
    finally:
        monkeypatch.delenv("DREAMTTY_CONFIG", raising=False)


def test_config_check_prints_every_problem_whole_the_keymaps_too(tmp_path, capsys):
    """Only the TUI read the keymap, and its notice cuts a long list: its problems could be read nowhere whole."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("keymap:\n  generate: f5\n")
    bad.write_text("paths:\n  loras: 5\nkeymap:\n  screen.queue: q\n  bogus.id: x\n")
    assert main(["--config", str(good), "config", "check"]) == 0
    assert capsys.readouterr().out == f"config: no problems in {good}\n"
    assert main(["--config", str(bad), "config", "check"]) == 1
    out, err = capsys.readouterr()
    assert out == f"config: 3 problem(s) in {bad}\n" and err.count("\n") == 3
    assert "dreamtty: config: keymap.screen.queue: 'q' types text, and this binding would take it from every text " \
           "box (use ctrl+, alt+ or an f key); keeping f2\n" in err and "keymap: 'bogus.id' is not a binding id" in err


def test_pull_offline_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "pull", "some/repo"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


@pytest.mark.parametrize("repo", ["a b", "", "../../etc"])
def test_pull_refuses_an_id_that_is_not_one_before_any_network(repo):
    hub = FakeHub.__new__(FakeHub)  # never asked: the id is checked first (the TUI's pull too)
    with pytest.raises(DreamttyError, match=rf"^id: {re.escape(repr(repo))} is not a valid Hugging Face id"):
        downloads.pull(repo, api=hub)


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: a file list with sizes and SHA-256, downloads into a folder."""

    def __init__(self, root: Path, files: dict[str, bytes], corrupt: str | None = None) -> None:
        self.root, self.files, self.corrupt = root, files, corrupt
        self.downloaded: list[str] = []

    def model_info(self, repo, revision=None, files_metadata=False):
        assert files_metadata
        siblings = [SimpleNamespace(rfilename=n, size=len(d), lfs=SimpleNamespace(sha256=hashlib.sha256(d).hexdigest()))
                    for n, d in self.files.items()]
        return SimpleNamespace(sha="c0ffee", siblings=siblings)

    def hf_hub_download(self, repo, filename, revision=None, **kwargs):
        assert revision == "c0ffee"
        self.downloaded.append(filename)
        path = self.root / "snapshots" / revision / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.files[filename]
        path.write_bytes(data[::-1] if filename == self.corrupt else data)
        return str(path)


REPO = {
    "model_index.json": b"{}", "unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"u" * 300,
    "unet/diffusion_pytorch_model.fp16.safetensors": b"h" * 150, "text_encoder/model.safetensors": b"t" * 100,
    "tokenizer/vocab.json": b"{}", "safety_checker/model.safetensors": b"s" * 200,
    "v1-5-pruned.safetensors": b"p" * 500, "README.md": b"# hi",
}


def test_pull_diffusers_repo_fetches_only_what_loads(tmp_path):
    hub = FakeHub(tmp_path, REPO)
    seen = []
    folder = downloads.pull("org/model", api=hub, progress=lambda done, total, name: seen.append((done, total)))
    assert folder == tmp_path / "snapshots" / "c0ffee"
    assert sorted(hub.downloaded) == ["model_index.json", "text_encoder/model.safetensors", "tokenizer/vocab.json",
                                      "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert seen[-1] == (406, 406) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_pull_one_file_and_bad_choices(tmp_path):
    hub = FakeHub(tmp_path, REPO)
    path = downloads.pull("org/model", filename="v1-5-pruned.safetensors", api=hub)
    assert path.read_bytes() == REPO["v1-5-pruned.safetensors"] and hub.downloaded == ["v1-5-pruned.safetensors"]
    with pytest.raises(DreamttyError, match="has no file nope.safetensors; .safetensors files: .*v1-5-pruned"):
        downloads.pull("org/model", filename="nope.safetensors", api=hub)
    two = FakeHub(tmp_path, {"a.safetensors": b"x" * 10, "b.safetensors": b"y" * 10})
    with pytest.raises(DreamttyError, match="not a diffusers repo; pick one file with --file .*a.safetensors, b"):
        downloads.pull("org/two", api=two)


@pytest.mark.parametrize("files, fetched", [
    ({"lora.safetensors": b"x", "README.md": b"#"}, ["lora.safetensors"]),  # a LoRA repo: its one weights file
    ({"pytorch_lora_weights.safetensors": b"x", "other.safetensors": b"y"}, ["pytorch_lora_weights.safetensors"]),
    ({"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"v", "diffusion_pytorch_model.bin": b"b",
      "sdxl_vae.safetensors": b"s"}, ["config.json", "diffusion_pytorch_model.safetensors"]),  # a VAE repo
])
def test_pull_lora_and_vae_repos_without_naming_a_file(tmp_path, files, fetched):
    hub = FakeHub(tmp_path, files)
    downloads.pull("org/extra", api=hub)
    assert sorted(hub.downloaded) == fetched


def test_pull_checks_free_disk_first(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path, REPO)
    monkeypatch.setattr(downloads, "free_bytes", lambda path: 100)
    with pytest.raises(DreamttyError, match=r"needs 406 B but only 100 B is free"):
        downloads.pull("org/model", api=hub)
    assert hub.downloaded == []
    assert [downloads.human(n) for n in (999, 1500, 2.5e9, 7.2e12, 3e15)] == [
        "999 B", "1.5 KB", "2.5 GB", "7.2 TB", "3000.0 TB"]


def test_pull_verifies_hash_and_reports_network_errors(tmp_path, monkeypatch, capsys):
    """Both pass when the pull is run again: exit 3 (a script may try again), not 2 (bad input)."""
    hub = FakeHub(tmp_path, {"w.safetensors": b"abcdef" * 10}, corrupt="w.safetensors")
    with pytest.raises(Transient, match="does not match its SHA-256; it was removed"):
        downloads.pull("org/model", filename="w.safetensors", api=hub)
    assert not (tmp_path / "snapshots" / "c0ffee" / "w.safetensors").exists()

    class Down(FakeHub):
        def model_info(self, *a, **k):
            raise ConnectionError("Name or service not known")

    with pytest.raises(Transient, match="cannot reach the Hugging Face Hub for org/model: Name or service"):
        downloads.pull("org/model", api=Down(tmp_path, {}))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    down = Down(tmp_path, {})
    monkeypatch.setattr(downloads, "pull", lambda *args, **kwargs: downloads.plan(down, "org/m", None, None))
    assert main(["models", "pull", "org/m"]) == 3
    said = capsys.readouterr().err
    assert said == "dreamtty: pull: cannot reach the Hugging Face Hub for org/m: Name or service not known\n"


def test_a_missing_lora_is_said_before_the_model_downloads(monkeypatch, capsys):
    """``--preset fast`` downloaded SDXL (7 GB) and then refused its LoRA, not in the cache."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    pulled: list = []
    monkeypatch.setattr(downloads, "pull", lambda *args, **kwargs: pulled.append(args))
    assert main(["generate", "x", "--local", "--model", "org/not-cached", "--lora", "org/lcm-lora"]) == 2
    assert pulled == [] and capsys.readouterr().err == (
        "dreamtty: lora: org/lcm-lora is not in the local Hugging Face cache; get it with: dreamtty models pull "
        "org/lcm-lora\n")


@pytest.mark.parametrize("file, hint", [("sd15.safetensors", "sd15"), ("ckpts/sd15.safetensors", "{path}")])
def test_pull_of_one_file_says_the_name_it_is_found_by(file, hint, tmp_path, monkeypatch, capsys):
    """A file in a subfolder of the repo is not listed by its name (only a repo's top files are): the hint gave
    ``--model sd15``, which said "does not exist"."""
    path = tmp_path / "snapshots" / "abc" / file
    monkeypatch.setattr(downloads, "pull", lambda *args, **kwargs: path)
    assert main(["models", "pull", "org/model", "--file", file]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}\n" and err == f'use it with: dreamtty generate "..." --model {hint.format(path=path)}\n'


def test_pull_of_a_file_one_of_the_users_has_the_name_of_gives_the_name_it_got(tmp_path, monkeypatch, capsys):
    """A pulled file whose name one of the user's checkpoints has is named owner/repo/name: the hint said the bare
    name, which is the user's own file."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / "abc"
    pulled = _sd1_file(snapshot / "sd15.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _sd1_file(tmp_path / "mine" / "sd15.safetensors")
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(tmp_path / "mine"))
    monkeypatch.setattr(downloads, "pull", lambda *args, **kwargs: pulled)
    assert main(["models", "pull", "org/model", "--file", "sd15.safetensors"]) == 0
    assert capsys.readouterr().err == 'use it with: dreamtty generate "..." --model org/model/sd15\n'


def test_a_hub_model_a_job_cannot_fetch_is_one_line_saying_why(monkeypatch):
    """A job naming a Hub model not cached fetched it with no error of its own: "model: cannot fetch ...:
    HfHubHTTPError: <the server's whole multi-line answer>"; a gated or missing repo now says what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    from backend.engine.loader import local_folder
    from backend.models import ModelRef

    ref = ModelRef("org/model", "hub", "org/model", "unknown")
    missing = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)  # as the Hub answers 404
    for raised, said, transient in (
            (missing, "model: no model org/model on the Hub (or it is private: set HF_TOKEN)", False),
            (OSError("network is unreachable\nretrying"), "model: cannot reach the Hugging Face Hub for org/model: "
                                                          "network is unreachable", True),
            (OSError(errno.ENOSPC, "No space left on device", "/hub/blobs/x.incomplete"),  # "cannot reach the Hub"
             "model: cannot save org/model here: No space left on device: /hub/blobs/x.incomplete (free space, or set "
             "HF_HOME to a writable folder)", False)):
        def fail(*args, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(DreamttyError) as err:
            local_folder(ref)
        assert str(err.value) == said and isinstance(err.value, Transient) == transient
