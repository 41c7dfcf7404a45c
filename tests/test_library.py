"""Discovery and detection from tensor names/shapes (torch-free), damaged files, pickles, hashes."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend import config, library, models
from backend.errors import ModelError
from backend.library import CorruptFile, checkpoint_family, embedding_family, lora_family, read_shapes

U = "model.diffusion_model."


def _write(path: Path, shapes: dict[str, tuple], metadata: dict | None = None) -> Path:
    """A real safetensors file with (small) tensors of the given shapes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def _checkpoint(text: dict[str, tuple], unet_in: int = 4) -> dict[str, tuple]:
    return {U + "input_blocks.0.0.weight": (8, unet_in, 3, 3), U + "out.2.bias": (4,), **text}


SD1_TEXT = {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)}
SD2_TEXT = {"cond_stage_model.model.token_embedding.weight": (10, 8)}
XL_TEXT = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": (8,),
           "conditioner.embedders.1.model.positional_embedding": (77, 8)}
REFINER_TEXT = {"conditioner.embedders.0.model.text_projection": (8, 8)}


@pytest.mark.parametrize("text, unet_in, name, expected", [
    (SD1_TEXT, 4, "model", ("sd1", None)),
    (SD1_TEXT, 9, "model-inpainting", ("sd1", "inpaint")),
    (SD2_TEXT, 4, "v2-1_768-ema-pruned", ("sd2-v", None)),  # SD2 defaults to v-prediction
    (SD2_TEXT, 4, "v2-1_512-ema-pruned", ("sd2", None)),  # "512" in the name: epsilon
    (SD2_TEXT, 9, "512-inpainting-ema", ("sd2", "inpaint")),
    (XL_TEXT, 4, "sd_xl_base", ("sdxl", None)),
    (XL_TEXT, 9, "sd_xl_inpaint", ("sdxl", "inpaint")),
    (REFINER_TEXT, 4, "sd_xl_refiner", ("sdxl-refiner", None)),
])
def test_checkpoint_family_from_tensor_names(tmp_path, text, unet_in, name, expected):
    path = _write(tmp_path / f"{name}.safetensors", _checkpoint(text, unet_in))
    shapes, meta = read_shapes(path)
    assert checkpoint_family(path, shapes, meta) == expected


def test_sd2_prediction_rules(tmp_path):
    shapes = _checkpoint(SD2_TEXT)
    eps_meta = _write(tmp_path / "a-768-v.safetensors", shapes, {"modelspec.prediction_type": "epsilon"})
    assert checkpoint_family(eps_meta, *read_shapes(eps_meta))[0] == "sd2"  # metadata beats the name
    marker = _write(tmp_path / "b-base.safetensors", {**shapes, "v_pred": (0,)})
    assert checkpoint_family(marker, *read_shapes(marker))[0] == "sd2-v"
    sidecar = _write(tmp_path / "c.safetensors", shapes)
    sidecar.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert checkpoint_family(sidecar, *read_shapes(sidecar))[0] == "sd2-v"
    sidecar.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert checkpoint_family(sidecar, *read_shapes(sidecar))[0] == "sd2"
    for text, family in (('model:\n  params:\n    parameterization: "v"   # v-prediction\n', "sd2-v"),  # read as YAML
                         ('model: {params: {parameterization: v}}\n', "sd2-v"),
                         ('model:\n  params:\n    parameterization: "eps"\n', "sd2"),
                         ('notes: "parameterization: v"\n', "sd2"),  # not the setting
                         ("", "sd2")):
        sidecar.with_suffix(".yaml").write_text(text)
        assert checkpoint_family(sidecar, *read_shapes(sidecar))[0] == family, text
    sidecar.with_suffix(".yaml").write_text("model: [unclosed\n")  # its setting is not guessed: noise if wrong
    with pytest.raises(CorruptFile, match=r"^model: .*c\.yaml is not valid YAML at line 2 .*; fix it or move it away "
                                          r"\(it says whether the model predicts v or epsilon\)$"):
        checkpoint_family(sidecar, *read_shapes(sidecar))
    for i, make in enumerate((os.mkfifo, os.mkdir, lambda p: p.symlink_to(tmp_path / "gone.yaml"))):  # a guess
        odd = _write(tmp_path / f"odd{i}.safetensors", shapes)
        make(odd.with_suffix(".yaml"))
        with pytest.raises(CorruptFile, match=rf"^model: .*odd{i}\.yaml.*; fix it or move it away \(it says whether"):
            checkpoint_family(odd, *read_shapes(odd))


def test_a_checkpoint_variant_is_refused_with_its_article(tmp_path):
    from backend.models import resolve_model

    pix2pix = _write(tmp_path / "p2p.safetensors", _checkpoint(SD1_TEXT, 8))
    with pytest.raises(ModelError, match=r"^model: p2p.safetensors is a pix2pix checkpoint, for nothing in dreamtty"):
        resolve_model(str(pix2pix))


def test_not_a_checkpoint(tmp_path):
    path = _write(tmp_path / "x.safetensors", {"encoder.conv_in.weight": (4, 3, 3, 3)})
    assert checkpoint_family(path, *read_shapes(path)) is None


@pytest.mark.parametrize("shapes, expected", [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)}, "sd1"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024)}, "sd2"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)}, "sdxl"),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)}, "sdxl"),
    ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1024)}, "sd2"),
    ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": (4, 32)}, "unknown"),
    ({"encoder.conv_in.weight": (4, 3, 3, 3)}, None),
])
def test_lora_family(shapes, expected):
    assert lora_family(shapes) == expected


@pytest.mark.parametrize("shapes, expected", [
    ({"emb_params": (2, 768)}, "sd1"),
    ({"emb_params": (1, 1024)}, "sd2"),
    ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "sdxl"),
    ({"clip_l": (2, 768), "clip_g": (3, 1280)}, None),  # a token of 2 vectors for one encoder, 3 for the other
    ({"clip_l": (2, 768), "clip_g": (2, 1280, 1)}, None),
    ({"clip_l": (0, 768), "clip_g": (0, 1280)}, None),
    ({"<my-token>": (768,)}, "sd1"),
    ({"string_to_param.*": (3, 768), "string_to_token.*": (1,)}, "sd1"),
    ({"a": (2, 768), "b": (2, 768)}, None),
])
def test_embedding_family(shapes, expected):
    assert embedding_family(shapes) == expected


def test_damaged_files_raise_one_line_errors(tmp_path):
    good = _write(tmp_path / "good.safetensors", _checkpoint(SD1_TEXT))
    data = good.read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFile, match=r"cut\.safetensors is truncated: \d+ bytes on disk, \d+ expected"):
        read_shapes(truncated)
    garbage = tmp_path / "junk.safetensors"
    garbage.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 10)
    with pytest.raises(CorruptFile, match="junk.safetensors has a corrupt safetensors header"):
        read_shapes(garbage)
    for header in (b'{"__metadata__": [1, 2]}', b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}',
                   b"[" * 100_000 + b"]" * 100_000,  # metadata not a mapping, one offset, nested too deeply
                   b'{"a": {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 64]}}',  # 128 bytes' shape
                   b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
                   b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}',
                   b'{"a": {"dtype": "F16", "shape": [1e400], "data_offsets": [0, 2]}}',  # JSON's infinity
                   b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 1e400]}}'):
        garbage.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
        with pytest.raises(CorruptFile, match="junk.safetensors has a corrupt safetensors header"):
            read_shapes(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFile, match=r"empty\.safetensors is empty or truncated \(0 bytes\)$"):
        read_shapes(empty)
    empty.write_bytes(b"x")
    with pytest.raises(CorruptFile, match=r"is empty or truncated \(1 byte\)$"):
        read_shapes(empty)
    half_zip = tmp_path / "half.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, half_zip)
    half_zip.write_bytes(half_zip.read_bytes()[:50])
    with pytest.raises(CorruptFile, match="half.ckpt is truncated"):
        read_shapes(half_zip)


class _Evil:
    """Unpickling this would create a file (stands in for arbitrary code)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _sd1_state(unet_in: int = 4) -> dict:
    return {U + "input_blocks.0.0.weight": torch.zeros(8, unet_in, 3, 3),
            **{k: torch.zeros(s) for k, s in SD1_TEXT.items()}}


def test_pickle_shapes_are_read_without_running_it(tmp_path):
    path = tmp_path / "model.ckpt"
    plain = {"epoch": 3, "tags": {"a", "b"}, "order": collections.OrderedDict(a=1)}  # what weights_only allows
    torch.save({"state_dict": _sd1_state(unet_in=9), **plain}, path, pickle_module=pickle)
    shapes, _ = read_shapes(path)
    assert shapes[U + "input_blocks.0.0.weight"] == (8, 9, 3, 3)
    assert checkpoint_family(path, shapes, {}) == ("sd1", "inpaint")


def test_a_pickle_holding_other_objects_is_skipped_and_refused_before_a_job(tmp_path, monkeypatch):
    """Under --allow-pickle such a file was listed and queued, then the job failed with torch's "Unable to load
    weights from checkpoint file": weights_only refuses the object. Nothing in it is ever run."""
    from backend.models import resolve_model

    target = tmp_path / "pwned"
    path = tmp_path / "ckpt" / "evilzip.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {**_sd1_state(), "x": _Evil(str(target))}}, path, pickle_module=pickle)
    why = (f"model: {path} holds objects other than tensors ('{os.system.__module__}.system'), which are never "
           "loaded (weights_only); convert it to .safetensors")
    lib = library.discover(config.Config(paths={"checkpoints": [path.parent]}, allow_pickle=True), hub=False)
    assert lib.problems == [why] and "evilzip" not in [e.name for e in lib.entries]
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(path.parent))
    monkeypatch.setenv("DREAMTTY_ALLOW_PICKLE", "1")
    for name in ("evilzip", str(path)):
        with pytest.raises(CorruptFile) as caught:
            resolve_model(name)
        assert str(caught.value) == why
    assert not target.exists()


def test_discover_lists_each_kind_and_skips_damaged(tmp_path, demo_dirs):
    root = tmp_path / "lib"
    _write(root / "ckpt" / "mysd.safetensors", _checkpoint(SD1_TEXT), {"modelspec.title": "x"})
    _write(root / "ckpt" / "nested" / "myxl.safetensors", _checkpoint(XL_TEXT))
    (root / "ckpt" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    os.symlink(demo_dirs["demo"], root / "ckpt" / "folder-model")
    _write(root / "loras" / "style.safetensors",
           {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)})
    _write(root / "loras" / "notalora.safetensors", {"emb_params": (1, 768)})
    _write(root / "vae" / "myvae.safetensors", {"encoder.conv_in.weight": (4, 3, 3, 3), "decoder.conv_out.weight": (3, 4, 3, 3)})
    _write(root / "emb" / "bad-hands.safetensors", {"emb_params": (4, 768)})
    (root / "emb" / "old.pt").write_bytes(b"")
    os.symlink(".", root / "loras" / "all")  # a link back up the tree: searched once, not 40 deep
    (root / "vae" / "listvae").mkdir()
    (root / "vae" / "listvae" / "config.json").write_text("[1]")  # JSON, but not an object
    cfg = config.Config(paths={"checkpoints": [root / "ckpt"], "loras": [root / "loras"], "vae": [root / "vae"],
                               "embeddings": [root / "emb"]})
    lib = library.discover(cfg, hub=False)
    got = {(e.kind, e.name): (e.family, e.format, e.source) for e in lib.entries}
    assert got[("checkpoint", "mysd")] == ("sd1", "safetensors", str(root / "ckpt"))
    assert got[("checkpoint", "myxl")][0] == "sdxl"
    assert got[("checkpoint", "folder-model")] == ("demo", "diffusers", str(root / "ckpt"))
    assert got[("checkpoint", "demo-xl")] == ("demo-xl", "diffusers", "built-in")
    assert got[("lora", "style")][0] == "sd1"
    assert [e.name for e in lib.entries if e.kind == "lora"] == ["style"]
    assert got[("vae", "myvae")][0] == "any"
    assert got[("embedding", "bad-hands")][0] == "sd1"
    assert ("checkpoint", "broken") not in got and ("lora", "notalora") not in got
    problems = "\n".join(lib.problems)
    assert "broken.safetensors" in problems and "notalora.safetensors is not a LoRA" in problems
    assert "old.pt" in problems and "listvae/config.json is not a JSON object" in problems
    size = next(e.size for e in lib.entries if e.name == "mysd")
    assert size == (root / "ckpt" / "mysd.safetensors").stat().st_size
    assert library.find("lora", "STYLE", cfg).name == "style"  # case-insensitive fallback
    assert library.find("lora", "nothing", cfg) is None
    with pytest.raises(ModelError, match="broken.safetensors"):
        library.find("checkpoint", "broken", cfg)


def test_files_whose_tensors_have_too_few_dimensions_are_skipped_with_a_line(tmp_path):
    """A checkpoint whose UNet input convolution is 1-D or 0-D, an IP-Adapter whose key projection is 1-D, an
    embedding of no vector: each is a skipped line. The first crashed the listing (IndexError: `models list`, every
    ``--model NAME``, and the TUI's Models screen)."""
    root = tmp_path / "lib"
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    _write(root / "ckpt" / "onedim.safetensors", {conv: (2,)})
    _write(root / "ckpt" / "nodim.safetensors", {conv: ()})
    _write(root / "ckpt" / "good.safetensors", _checkpoint(SD1_TEXT))
    _write(root / "ip" / "flat.safetensors", {"image_proj.proj.weight": (4, 4), "ip_adapter.1.to_k_ip.weight": (768,)})
    _write(root / "emb" / "empty.safetensors", {"emb_params": (0, 768)})
    cfg = config.Config(paths={"checkpoints": [root / "ckpt"], "ip_adapters": [root / "ip"],
                               "embeddings": [root / "emb"]})
    lib = library.discover(cfg, hub=False)
    assert {(e.kind, e.name) for e in lib.entries if e.source != "built-in"} == {("checkpoint", "good"),
                                                                                 ("ip_adapter", "flat")}
    assert next(e.family for e in lib.entries if e.name == "flat") == "unknown"
    problems = "\n".join(lib.problems)
    for name, shape in (("onedim", [2]), ("nodim", [])):
        assert f"{name}.safetensors has a UNet input convolution of shape {shape}; a checkpoint's has 4" in problems
    assert "empty.safetensors is not a textual-inversion embedding" in problems
    with pytest.raises(ModelError, match="onedim.safetensors has a UNet input convolution"):
        library.find("checkpoint", "onedim", cfg)
    assert library.find("checkpoint", "good", cfg).family == "sd1"


@pytest.mark.parametrize("folders", [("lib", "lib/sub"), ("lib/sub", "lib"), ("lib", "lib", "link")])
def test_a_folder_configured_twice_or_inside_another_lists_its_files_once(tmp_path, folders):
    """The same file was listed twice, under its whole path, and its name was ambiguous with itself."""
    lora = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)}
    _write(tmp_path / "lib" / "sub" / "subfox.safetensors", lora)
    _write(tmp_path / "lib" / "fox.safetensors", lora)
    os.symlink(tmp_path / "lib", tmp_path / "link")
    cfg = config.Config(paths={"loras": [tmp_path / f for f in folders]})
    assert sorted(e.name for e in library.discover(cfg, kinds=("lora",), hub=False).entries) == ["fox", "subfox"]
    assert library.find("lora", "subfox", cfg).path.endswith("/sub/subfox.safetensors")  # not ambiguous


def test_an_inpainting_checkpoint_is_flagged_as_a_folder_as_a_file(tmp_path, monkeypatch):
    """The note a single file got ("inpaint model: ..."); a diffusers folder, or a repo in the Hugging Face
    cache, was listed without it."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--hub-inpaint" / "snapshots" / "c0ffee"
    for folder in (tmp_path / "ckpt" / "sd-inpaint", snapshot):
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        (folder / "unet" / "config.json").write_text('{"in_channels": 9}')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c0ffee")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _write(tmp_path / "ckpt" / "file-inpaint.safetensors", _checkpoint(SD1_TEXT, unet_in=9))
    lib = library.discover(config.Config(paths={"checkpoints": [tmp_path / "ckpt"]}))
    notes = {e.name: (e.variant, e.note) for e in lib.entries if e.kind == "checkpoint" and "inpaint" in e.name}
    assert notes == {name: ("inpaint", "inpaint model: for inpaint and outpaint only")
                     for name in ("sd-inpaint", "file-inpaint", "org/hub-inpaint")}


def test_a_damaged_hf_cache_lists_nothing_from_it_and_stops_nothing(tmp_path, monkeypatch):
    """The cache lookups catch what the Hub's readers raise, no longer every exception: a ref file that is not
    UTF-8 (hand-edited, a bad disk) raises UnicodeDecodeError out of its cache scan, which must stop nothing."""
    from huggingface_hub import constants

    refs = tmp_path / "hub" / "models--org--m" / "refs"
    (refs.parent / "snapshots").mkdir(parents=True)
    refs.mkdir()
    (refs / "main").write_bytes(b"\xff\xfe")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    lib = library.discover(config.Config())
    assert [e.name for e in lib.entries if e.kind == "checkpoint"] == ["demo", "demo-xl"]
    assert library.hub_cache_folder("org/m") is None and library.hub_cache_folder("not a repo id") is None


def test_short_hash_is_sha256_prefix_and_cached(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert library.short_hash(path) == expected
    cache = library._hash_cache_file()
    assert str(path.resolve()) in cache.read_text()
    # A cache hit does not read the file: a fake cached value is returned while size and mtime match.
    text = cache.read_text().replace(expected, "abcdef0123")
    cache.write_text(text)
    assert library.short_hash(path) == "abcdef0123"
    path.write_bytes(b"other" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert library.short_hash(path) == expected
    # A cache damaged or written by hand is read past (a list failed every LoRA job; a cached value of another
    # type or with control characters went into images' metadata).
    st = path.stat()
    for damaged in ([1, 2], {str(path.resolve()): [st.st_size, st.st_mtime_ns, "\x1b[2Jx"]},
                    {str(path.resolve()): [st.st_size, st.st_mtime_ns, 5]}, {str(path.resolve()): 7}):
        cache.write_text(json.dumps(damaged))
        assert library.short_hash(path) == expected


def test_single_files_pulled_into_the_hf_cache_are_found(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--sdxl"
    blob = _write(repo / "blobs" / "abc123", _checkpoint(XL_TEXT))
    snapshot = repo / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "sd_xl_base.safetensors").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = library.find("checkpoint", "sd_xl_base", config.Config())
    assert (entry.family, entry.source) == ("sdxl", "hf-cache:org/sdxl")
    from backend.models import resolve_model

    assert resolve_model("sd_xl_base").family == "sdxl"
    named = library.find("checkpoint", "org/sdxl/sd_xl_base", config.Config())  # its name in a clash, kept (a
    assert named.path == str(snapshot / "sd_xl_base.safetensors")               # default_model set then)
    with pytest.raises(ModelError, match="^model: org/sdxl is cached as single files, not a diffusers folder; use one "
                                         "by its name: org/sdxl/sd_xl_base$") as hint:  # "model_index.json is missing"
        resolve_model("org/sdxl")
    assert resolve_model(str(hint.value).rpartition(": ")[2]).location == str(blob)  # the name it gives: this file
    # A download of a name the user's folder has: the user's keeps it (a config's default_model, a script's
    # --model went "ambiguous"), the cache's is named by its repo.
    mine = _write(tmp_path / "ckpt" / "sd_xl_base.safetensors", _checkpoint(SD1_TEXT))
    cfg = config.Config(paths={"checkpoints": [tmp_path / "ckpt"]})
    assert library.find("checkpoint", "sd_xl_base", cfg).path == str(mine)
    assert library.find("checkpoint", "org/sdxl/sd_xl_base", cfg).source == "hf-cache:org/sdxl"
    broken = tmp_path / "hub" / "models--org--broken" / "snapshots" / "abc"  # a cached diffusers repo: said, not
    broken.mkdir(parents=True)                                               # dropped in silence
    (broken / "model_index.json").write_text("{not json")
    (broken.parents[1] / "refs").mkdir()
    (broken.parents[1] / "refs" / "main").write_text("abc")
    problems = library.discover(cfg, kinds=("checkpoint",)).problems
    assert [p for p in problems if "org/broken" in p] == [
        f"model: cannot read {broken}/model_index.json: Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1) (the Hugging Face cache's org/broken)"]


def test_a_name_the_hub_would_refuse_is_no_hub_id(monkeypatch):
    """``[/]`` was queued as a Hugging Face id and failed when the worker asked the hub; now refused at once."""
    from backend.models import resolve_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("org/sdxl-1.0").kind == "hub"  # fetched when the job runs
    for name in ("[/]", "not a/valid repo", "\x1b[2J/x", "a--b/c", "a/" + "b" * 97):
        with pytest.raises(ModelError, match=r"^model: .* does not exist; use demo"):
            resolve_model(name)


def test_check_extras_refuses_early_without_torch(tmp_path):
    from backend.errors import RequestError
    from backend.extras_check import check_extras
    from backend.request import GenerateRequest

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    _write(tmp_path / "loras" / "ink.safetensors", {key: (4, 768)})
    torch.save({key: torch.zeros(4, 768)}, tmp_path / "loras" / "old.pt")
    cfg = config.Config(paths={"loras": [tmp_path / "loras"], "vae": [tmp_path / "vae"]})
    ok = check_extras(GenerateRequest(prompt="a cat <lora:ink:0.5>"), "demo", cfg)
    assert ok.loras == [("ink", 0.5)] and ok.prompt == "a cat"
    with pytest.raises(RequestError, match="^lora: ink2 not found; known: ink, old"):
        check_extras(GenerateRequest(loras=[("ink2", 1.0)]), "demo", cfg)
    with pytest.raises(RequestError, match=r"^lora: old is a pickle \(\.pt\); refused without --allow-pickle"):
        check_extras(GenerateRequest(loras=[("old", 1.0)]), "demo", cfg)
    with pytest.raises(RequestError, match="^vae: mine not found; none found in"):
        check_extras(GenerateRequest(vae="mine"), "demo", cfg)
    os.mkfifo(tmp_path / "vae.safetensors")  # it said "not found", though it is there
    fifo_vae = GenerateRequest(vae=str(tmp_path / "vae.safetensors"))
    for request in (fifo_vae, GenerateRequest(loras=[("/dev/zero", 1.0)])):
        with pytest.raises(RequestError, match=r"^(vae|lora): \S+ is not a regular file; give a .safetensors file$"):
            check_extras(request, "demo", cfg)
    with pytest.raises(ModelError, match="^refiner: nope/nothing"):  # the refiner's own field
        check_extras(GenerateRequest(refiner="nope/nothing"), "demo", cfg)


def test_a_pickle_is_listed_as_refused_only_while_pickles_are(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    (tmp_path / "loras").mkdir()
    torch.save({key: torch.zeros(4, 768)}, tmp_path / "loras" / "old.pt")
    for allowed, note in ((False, "pickle: refused unless --allow-pickle"), (True, "")):
        cfg = config.Config(paths={"loras": [tmp_path / "loras"]}, allow_pickle=allowed)
        assert [e.note for e in library.discover(cfg, kinds=("lora",)).of_kind("lora")] == [note]


def test_files_that_differ_only_in_suffix_get_names_of_their_own(tmp_path):
    from backend.errors import DreamttyError
    from backend.extras_check import check_extras
    from backend.request import GenerateRequest

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    (tmp_path / "loras").mkdir()
    torch.save({key: torch.zeros(4, 768)}, tmp_path / "loras" / "evil.pt")
    torch.save({key: torch.ones(4, 768)}, tmp_path / "loras" / "evil.ckpt")
    _write(tmp_path / "loras" / "sub" / "evil.ckpt.safetensors", {key: (4, 768)})
    _write(tmp_path / "loras" / "a" / "ink.safetensors", {key: (4, 768)})
    _write(tmp_path / "loras" / "b" / "ink.safetensors", {key: (4, 768)})
    cfg = config.Config(paths={"loras": [tmp_path / "loras"]}, allow_pickle=True)
    names = library.names("lora", cfg)
    assert sorted(names) == sorted(["evil.pt", "evil.ckpt", "evil.ckpt.safetensors"] + [
        str(tmp_path / "loras" / d / "ink.safetensors") for d in "ab"])  # same file name: the path
    assert len(set(names)) == len(names)
    assert library.find("lora", "evil.ckpt", cfg).path == str(tmp_path / "loras" / "evil.ckpt")
    with pytest.raises(DreamttyError, match="^lora: evil is ambiguous: .*evil.pt.*; give one of these names"):
        check_extras(GenerateRequest(loras=[("evil", 1.0)]), "demo", cfg)


def test_a_model_folder_whose_config_is_not_a_mapping_is_skipped_with_a_line(tmp_path):
    (tmp_path / "controlnets" / "odd").mkdir(parents=True)
    (tmp_path / "controlnets" / "odd" / "config.json").write_text("[1, 2]")
    (tmp_path / "controlnets" / "deep").mkdir()
    (tmp_path / "controlnets" / "deep" / "config.json").write_text("[" * 100_000)
    lib = library.discover(config.Config(paths={"controlnets": [tmp_path / "controlnets"]}), kinds=("controlnet",))
    assert [e for e in lib.of_kind("controlnet") if e.source != "built-in"] == []
    assert any("odd/config.json is not a JSON object" in p for p in lib.problems)
    assert any("deep/config.json" in p for p in lib.problems)


def test_a_model_folder_whose_index_is_a_fifo_a_folder_or_a_dangling_link_is_skipped_with_a_line(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("fifo", "dir", "link", "vae"):
        (root / name).mkdir(parents=True)
    os.mkfifo(root / "fifo" / "model_index.json")  # read, it would hang the scan
    (root / "dir" / "model_index.json").mkdir()
    (root / "link" / "model_index.json").symlink_to(tmp_path / "gone")
    os.mkfifo(root / "vae" / "config.json")
    cfg = config.Config(paths={"checkpoints": [root], "vae": [root]})
    lib = library.discover(cfg, kinds=("checkpoint", "vae"))
    assert [e for e in lib.entries if e.source != "built-in"] == []
    assert sorted(lib.problems) == [f"model: {root}/dir/model_index.json is a folder; give a file",
                                    f"model: {root}/fifo/model_index.json is not a regular file",
                                    f"model: {root}/link/model_index.json is missing",
                                    f"vae: {root}/vae/config.json is not a regular file"]


@pytest.mark.parametrize("typed", ["DEMO", "Demo-XL"])
def test_a_built_in_model_named_in_another_case_is_that_model(typed, demo_dirs):
    from backend.models import resolve_model

    assert resolve_model(typed) == resolve_model(typed.lower())  # not a folder named "demo" in the working directory


def test_model_folders_whose_configs_hold_the_wrong_types_are_skipped_with_a_line(tmp_path):
    """Each a damaged or hand-made config: named with its key in one line, and the listing goes on."""
    checkpoints, controlnets, captioners = (tmp_path / kind for kind in ("checkpoints", "controlnets", "captioners"))
    folders = {
        checkpoints / "te": {"model_index.json": {"_class_name": "StableDiffusionXLPipeline", "text_encoder": 5}},
        checkpoints / "cls": {"model_index.json": {"_class_name": 5}},
        checkpoints / "unet": {"model_index.json": {"_class_name": "StableDiffusionPipeline"},
                               "unet/config.json": {"in_channels": [4]}},
        checkpoints / "demo": {"model_index.json": {}, "dreamtty_demo.json": {}},
        controlnets / "cn-canny": {"config.json": {"_class_name": "ControlNetModel", "cross_attention_dim": [768]}},
        captioners / "cap": {"config.json": {"architectures": 5}},
    }
    for folder, files in folders.items():
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(data))
    refiner = checkpoints / "refiner"  # an SDXL refiner's index: no first text encoder, or an empty entry
    refiner.mkdir()
    (refiner / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": []}')
    paths = {"checkpoints": [checkpoints], "controlnets": [controlnets], "captioners": [captioners]}
    lib = library.discover(config.Config(paths=paths), kinds=("checkpoint", "controlnet", "captioner"), hub=False)
    assert sorted(lib.problems) == sorted([
        f"model: {checkpoints}/cls/model_index.json: _class_name is a number, not text",
        f"model: {checkpoints}/demo/dreamtty_demo.json names no family",
        f"model: {checkpoints}/te/model_index.json: text_encoder is a number, not a list",
        f"model: {checkpoints}/unet/unet/config.json: in_channels is a list, not a number",
        f"controlnet: {controlnets}/cn-canny/config.json: cross_attention_dim is a list, not a number",
        f"captioner: {captioners}/cap/config.json: architectures is a number, not a list",
    ])
    assert [(e.name, e.family) for e in lib.of_kind("checkpoint") if e.source != "built-in"] == [
        ("refiner", "sdxl-refiner")]


def test_a_diffusers_folder_lacking_a_part_or_of_another_pipeline_is_skipped_with_a_line(tmp_path, demo_dirs):
    """A copy of the demo without vae/, or whose UNet has no weights, was listed, then failed in its job ("no file
    named config.json found in directory <the folder>"); an SD3 folder said its unet/config.json was missing."""
    root = tmp_path / "ckpt"
    for name in ("novae", "noweights", "whole"):
        shutil.copytree(demo_dirs["demo"], root / name)
    shutil.rmtree(root / "novae" / "vae")
    for weights in (root / "noweights" / "unet").glob("*.safetensors"):
        weights.unlink()
    (root / "sd3").mkdir()
    (root / "sd3" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline", '
                                                   '"transformer": ["diffusers", "SD3Transformer2DModel"]}')
    cfg = config.Config(paths={"checkpoints": [root]})
    lib = library.discover(cfg, kinds=("checkpoint",), hub=False)
    assert [e.name for e in lib.entries if e.source != "built-in"] == ["whole"]
    assert sorted(lib.problems) == [f"model: {root}/novae lacks vae/, which its model_index.json lists",
                                    f"model: {root}/noweights/unet holds no weights (.safetensors or .bin)",
                                    f"model: {root}/sd3 holds a 'StableDiffusion3Pipeline' (a transformer, no UNet); "
                                    "dreamtty runs Stable Diffusion 1.x, 2.x and SDXL"]
    with pytest.raises(ModelError, match="lacks vae/"):
        models.resolve_model(str(root / "novae"))


def test_a_vae_of_another_latent_space_is_skipped_saying_so(tmp_path):
    """An SD3 or Flux VAE (16 latent channels) was listed for every family, then failed in its job with
    "Error(s) in loading state_dict for AutoencoderKL"."""
    root = tmp_path / "vae"
    parts = {"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.weight": (3, 8, 3, 3)}
    _write(root / "lat16.safetensors", {**parts, "decoder.conv_in.weight": (8, 16, 3, 3)})
    _write(root / "lat4.safetensors", {**parts, "decoder.conv_in.weight": (8, 4, 3, 3)})
    (root / "flux-vae").mkdir()
    (root / "flux-vae" / "config.json").write_text('{"_class_name": "AutoencoderKL", "latent_channels": 16}')
    lib = library.discover(config.Config(paths={"vae": [root]}), kinds=("vae",), hub=False)
    assert [e.name for e in lib.entries if e.source != "built-in"] == ["lat4"]
    why = "is a VAE of 16 latent channels (SD3 or Flux have 16); Stable Diffusion's have 4"
    assert sorted(lib.problems) == [f"vae: {root}/flux-vae {why}", f"vae: {root}/lat16.safetensors {why}"]


def test_a_checkpoint_named_by_its_file_name_and_a_broken_folder_by_its_name(tmp_path, monkeypatch):
    """``--model x.safetensors`` (the file's name, not its stem) and a folder listed as skipped both said
    "does not exist"."""
    from backend.models import resolve_model

    ckpt = tmp_path / "ckpt"
    good = _write(ckpt / "sd1model.safetensors", _checkpoint(SD1_TEXT))
    (ckpt / "badindex").mkdir()
    (ckpt / "badindex" / "model_index.json").write_text("{not json")
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(ckpt))
    assert resolve_model("sd1model.safetensors").location == str(good)
    with pytest.raises(ModelError, match=rf"^model: cannot read {ckpt}/badindex/model_index.json"):
        resolve_model("badindex")
    for other in ("index", "ckpt", "model", "cannot"):  # a part of its name, a folder of its path, a word of its line
        with pytest.raises(ModelError, match=f"^model: {other} does not exist"):
            resolve_model(other)


def test_a_folder_named_like_a_model_file_is_skipped_with_why_and_named_it_says_so(tmp_path, monkeypatch):
    """A folder x.safetensors was left out of the list without a word, and ``--model x`` said it did not exist."""
    from backend.models import resolve_model

    ckpt, loras = tmp_path / "ckpt", tmp_path / "loras"
    (ckpt / "x.safetensors").mkdir(parents=True)
    (loras / "y.ckpt").mkdir(parents=True)
    (ckpt / ".hidden.safetensors").mkdir()  # hidden: not searched, not said
    lib = library.discover(config.Config(paths={"checkpoints": [ckpt], "loras": [loras]}), hub=False)
    assert lib.problems == [f"model: {ckpt}/x.safetensors has no model_index.json; it is not a diffusers folder",
                            f"lora: {loras}/y.ckpt is a folder, not a model file"]
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(ckpt))
    for name in ("x", "x.safetensors"):
        with pytest.raises(ModelError, match=rf"^model: {ckpt}/x.safetensors has no model_index.json; it is not a "):
            resolve_model(name)


def test_each_skipped_line_names_the_kind_and_the_whole_path(tmp_path):
    """Two empty files, a checkpoint and a LoRA, gave the same line: "model: empty.safetensors is empty ..."."""
    from backend.extras_check import check_extras
    from backend.request import GenerateRequest

    folders = {kind: tmp_path / kind for kind in ("checkpoints", "loras", "embeddings")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "empty.safetensors").write_bytes(b"")
    cfg = config.Config(paths={kind: [folder] for kind, folder in folders.items()})
    lib = library.discover(cfg, kinds=("checkpoint", "lora", "embedding"), hub=False)
    assert lib.problems == [f"{field}: {folders[kind]}/empty.safetensors is empty or truncated (0 bytes)"
                            for field, kind in (("model", "checkpoints"), ("lora", "loras"),
                                                ("embedding", "embeddings"))]
    with pytest.raises(ModelError, match=rf"^lora: {folders['loras']}/empty.safetensors is empty or truncated"):
        check_extras(GenerateRequest(loras=[("empty", 1.0)]), "demo", cfg)  # its field once, not "lora: lora:"
