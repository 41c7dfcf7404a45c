"""LoRAs, embeddings, VAE override and refiner on the tiny demo models, through ``apply_extras``."""

from __future__ import annotations

import torch
from PIL import Image
from safetensors.torch import save_file

import pytest

from backend.engine.conditioning import encode
from backend.engine.extras import apply_extras
from backend.engine.generate import generate_image
from backend.engine.loader import PipelineCache, load_pipeline
from backend.errors import ModelError, RequestError
from backend.extras_check import check_extras, effective_request
from job_helpers import worker_images
from backend.models import resolve_model
from backend.request import GenerateRequest
from ckpt_helpers import tiny_refiner, vae_to_ldm

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, demo_dirs):
    """A LoRA made with peft on the demo UNet, embeddings and an alternative VAE, in their folders."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("extras")
    unet = UNet2DConditionModel.from_pretrained(demo_dirs["demo"] / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(root / "loras", unet_lora_layers=layers, weight_name="fox.safetensors")
    torch.manual_seed(1)
    (root / "emb").mkdir()
    save_file({"emb_params": torch.randn(1, 32)}, str(root / "emb" / "mytok.safetensors"))
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}, str(root / "emb" / "xltok.safetensors"))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(demo_dirs["demo"] / "vae")
    alt = {k: v + 0.05 * torch.randn_like(v) for k, v in vae.state_dict().items()}
    (root / "vae").mkdir()
    save_file(vae_to_ldm(alt, dict(vae.config)), str(root / "vae" / "alt.safetensors"))
    tiny_refiner().save_pretrained(root / "refiner")
    return root


@pytest.fixture(autouse=True)
def _folders(folders, monkeypatch):
    monkeypatch.setenv("DREAMTTY_LORAS", str(folders / "loras"))
    monkeypatch.setenv("DREAMTTY_EMBEDDINGS", str(folders / "emb"))
    monkeypatch.setenv("DREAMTTY_VAE", str(folders / "vae"))


@pytest.fixture(scope="module")
def pipe(demo_dirs):
    """Our own demo pipeline (the session's must not be changed)."""
    return load_pipeline(resolve_model("demo"), CPU, torch.float32)


def _image(pipe, cache=None, **fields) -> tuple[bytes, dict]:
    request = GenerateRequest(**{"prompt": "a red fox", "model": "demo", "steps": 2, "width": 32, "height": 32,
                                 "seed": 11, **fields})
    request = apply_extras(pipe, request.resolved("demo"), cache)
    image, record = generate_image(pipe, request)
    return image.tobytes(), record


def test_lora_changes_output_weight_zero_does_not_and_switching_never_reloads(pipe, monkeypatch):
    base, _ = _image(pipe)
    calls = []
    original = pipe.load_lora_weights
    monkeypatch.setattr(pipe, "load_lora_weights", lambda *a, **k: (calls.append(a), original(*a, **k))[1])
    unet = pipe.unet
    full, record = _image(pipe, loras=[("fox", 1.0)])
    assert full != base
    assert record["loras"][0]["name"] == "fox" and len(record["loras"][0]["hash"]) == 10
    assert len(record["loras"][0]["a1111_hash"]) == 12  # for A1111's "Lora hashes"
    zero, _ = _image(pipe, loras=[("fox", 0.0)])
    assert zero == base
    half, _ = _image(pipe, loras=[("fox", 0.5)])
    assert half not in (base, full)
    assert len(calls) == 1 and pipe.unet is unet  # weights switched, nothing reloaded
    again, record = _image(pipe)
    assert again == base and "loras" not in record
    assert not any(pipe.get_list_adapters().values())


def test_lora_request_errors(pipe):
    with pytest.raises(RequestError, match="^lora: nope not found; known: fox"):
        _image(pipe, loras=[("nope", 1.0)])
    with pytest.raises(RequestError, match="at most 5"):
        effective_request(GenerateRequest(loras=[(f"l{i}", 1.0) for i in range(6)]))
    with pytest.raises(RequestError, match="given twice"):
        effective_request(GenerateRequest(prompt="<lora:fox:1>", loras=[("a", 1.0), ("a", 0.5)]))
    req = effective_request(GenerateRequest(prompt="a <lora:fox:0.3> cat <lora:b>", loras=[("fox", 1.0)]))
    assert req.prompt == "a cat" and req.loras == [("fox", 0.3), ("b", 1.0)]


def test_embedding_token_changes_the_conditioning(pipe):
    with torch.inference_mode():
        before = encode(pipe, "a mytok photo", "", False).cond.clone()
        plain = encode(pipe, "a photo", "", False).cond.clone()
    _, record = _image(pipe, prompt="a mytok photo")
    assert record["embeddings"] == [{"name": "mytok", "hash": record["embeddings"][0]["hash"]}]
    with torch.inference_mode():
        after = encode(pipe, "a mytok photo", "", False).cond
        assert not torch.equal(before, after)
        assert torch.equal(plain, encode(pipe, "a photo", "", False).cond)
    assert "xltok" not in pipe.tokenizer.get_vocab()  # only embeddings named in the prompt load


def test_a_damaged_lora_and_an_embedding_of_another_width_say_why_in_a_line(pipe, tmp_path, monkeypatch):
    """A LoRA without its up weights failed with a bare tensor name (a KeyError's text); an embedding of another
    width with diffusers' message, its {...} placeholders unfilled."""
    (tmp_path / "loras").mkdir()
    (tmp_path / "emb").mkdir()
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    save_file({down: torch.zeros(4, 32)}, str(tmp_path / "loras" / "ink.safetensors"))
    save_file({"emb_params": torch.zeros(1, 768)}, str(tmp_path / "emb" / "wide.safetensors"))
    monkeypatch.setenv("DREAMTTY_LORAS", str(tmp_path / "loras"))
    monkeypatch.setenv("DREAMTTY_EMBEDDINGS", str(tmp_path / "emb"))
    with pytest.raises(ModelError) as err:
        apply_extras(pipe, GenerateRequest(model="demo", loras=[("ink", 1.0)]).resolved("demo"))
    assert str(err.value).startswith("lora: cannot load ink: it has no tensor ") and "'" not in str(err.value)[:40]
    assert str(err.value).endswith("lora_up.weight (a damaged file, or one made for another tool)")
    # Keys no layer of the model has: diffusers loaded nothing and said so in a warning; set_adapters then failed
    # with "Adapter name(s) {...} not in the list of present adapters".
    save_file({f"\x1b[2J{down}": torch.zeros(4, 32), f"\x1b[2J{down.replace('down', 'up')}": torch.zeros(32, 4)},
              str(tmp_path / "loras" / "keys.safetensors"))
    with pytest.raises(ModelError, match=r"^lora: cannot load keys: none of its weights names a layer of this model"):
        apply_extras(pipe, GenerateRequest(model="demo", loras=[("keys", 1.0)]).resolved("demo"))
    assert not any(pipe.get_list_adapters().values())
    # Keys of its layers, sizes of another model's: torch's "Error(s) in loading state_dict for UNet2DConditionModel:"
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{q}.lora_down.weight": torch.zeros(4, 65), f"{q}.lora_up.weight": torch.zeros(64, 4)},
              str(tmp_path / "loras" / "sizes.safetensors"))
    with pytest.raises(ModelError) as err:
        apply_extras(pipe, GenerateRequest(model="demo", loras=[("sizes", 1.0)]).resolved("demo"))
    assert str(err.value) == ("lora: cannot load sizes: its weights' sizes do not fit this model's layers (a LoRA made "
                              "for another model or family)")
    assert not any(pipe.get_list_adapters().values())
    # Keys of blocks the model does not have: peft's "Target modules {...every one...} not found in the base
    # model. Please check the target modules and try again."
    far = [f"lora_unet_down_blocks_{i}_attentions_0_transformer_blocks_0_attn1_to_q" for i in (3, 4)]
    save_file({f"{key}.lora_{end}.weight": torch.zeros(shape) for key in far
               for end, shape in (("down", (4, 32)), ("up", (32, 4)))}, str(tmp_path / "loras" / "big.safetensors"))
    with pytest.raises(ModelError) as err:
        apply_extras(pipe, GenerateRequest(model="demo", loras=[("big", 1.0)]).resolved("demo"))
    assert str(err.value) == ("lora: cannot load big: it names layers this model does not have (a LoRA made for a "
                              "larger model or another family)")
    assert not any(pipe.get_list_adapters().values())
    with pytest.raises(ModelError, match=r"^embedding: cannot load wide: its vectors are 768 wide, and this model's "
                                         r"text encoder takes 32 \(an embedding for another model family\)$"):
        apply_extras(pipe, GenerateRequest(model="demo", prompt="a wide cat").resolved("demo"))


def test_a_lora_of_another_family_is_refused_before_queueing(tmp_path, monkeypatch):
    """It was queued, and failed in its worker (a missing LoRA was refused at once)."""
    (tmp_path / "loras").mkdir()
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048)},
              str(tmp_path / "loras" / "xl-lora.safetensors"))
    monkeypatch.setenv("DREAMTTY_LORAS", str(tmp_path / "loras"))
    with pytest.raises(RequestError, match="^lora: xl-lora is for SDXL; the model is SD 1.x$"):
        check_extras(GenerateRequest(loras=[("xl-lora", 1.0)]), "sd1")
    assert check_extras(GenerateRequest(loras=[("xl-lora", 1.0)]), "sdxl").loras == [("xl-lora", 1.0)]


def test_sdxl_embedding_loads_into_both_encoders(demo_dirs):
    xl = load_pipeline(resolve_model("demo-xl"), CPU, torch.float32)
    request = GenerateRequest(prompt="xltok castle", model="demo-xl", steps=2, width=32, height=32, seed=1)
    with torch.inference_mode():
        before = encode(xl, "xltok castle", "", False)
    apply_extras(xl, request.resolved("demo-xl"))
    assert "xltok" in xl.tokenizer.get_vocab() and "xltok" in xl.tokenizer_2.get_vocab()
    with torch.inference_mode():
        after = encode(xl, "xltok castle", "", False)
    assert not torch.equal(before.cond, after.cond) and not torch.equal(before.pooled, after.pooled)


def test_vae_override_and_restore(pipe):
    base, _ = _image(pipe)
    original = pipe.vae
    other, record = _image(pipe, vae="alt")
    assert other != base and record["vae"]["name"] == "alt" and pipe.vae is not original
    again, record = _image(pipe)
    assert again == base and pipe.vae is original and "vae" not in record
    with pytest.raises(RequestError, match="^vae: nope not found; known: alt"):
        _image(pipe, vae="nope")


def test_refiner_hands_over_at_the_switch(folders, demo_dirs):
    cache = PipelineCache(CPU)
    xl = cache.get(resolve_model("demo-xl"), torch.float32)
    refiner = str(folders / "refiner")

    def run(**fields) -> tuple[bytes, dict]:
        request = GenerateRequest(prompt="a castle", model="demo-xl", steps=3, width=32, height=32, seed=5, **fields)
        request = apply_extras(xl, request.resolved("demo-xl"), cache)
        image, record = generate_image(xl, request)
        return image.tobytes(), record

    base, _ = run()
    never, _ = run(refiner=refiner, refiner_switch=1.0)
    assert never == base  # switching after the last step: the base did everything
    handed, record = run(refiner=refiner, refiner_switch=0.5)
    assert handed != base
    assert record["refiner"]["switch"] == 0.5 and len(record["refiner"]["hash"]) == 10
    refiner_pipe = cache.get(resolve_model(refiner), torch.float32)
    with pytest.raises(ModelError, match="is an SDXL refiner; use it with --refiner"):
        apply_extras(refiner_pipe, GenerateRequest(model=refiner))
    sd = load_pipeline(resolve_model("demo"), CPU, torch.float32)
    with pytest.raises(RequestError, match="^refiner: .* does not share the latent space"):
        apply_extras(sd, GenerateRequest(model="demo", refiner=refiner), cache)


def test_a_refiner_as_the_model_is_refused_before_it_is_queued(folders, tmp_path):
    """The job was queued, and failed when its worker loaded the refiner."""
    from backend.service import Service

    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    try:
        with pytest.raises(ModelError, match=r"^model: .*refiner is an SDXL refiner; use it with --refiner on an SDXL"):
            service.submit(GenerateRequest(prompt="a castle", model=str(folders / "refiner")))
        assert service.jobs() == []
    finally:
        service.store.close()


def _worker_images(payload: dict, cache, tmp_path) -> list[str]:
    return worker_images(payload, cache, tmp_path / "queue.sqlite3")[0]


def test_worker_saves_extras_in_metadata_and_reproduces_pixels(folders, tmp_path):
    from backend import metadata

    cache = PipelineCache(CPU)
    request = GenerateRequest(prompt="a fox mytok <lora:fox:0.7>", model="demo", steps=2, width=32, height=32,
                              seed=21, vae="alt").resolved("demo")
    first = _worker_images({"request": request.to_dict(), "out": str(tmp_path / "a")}, cache, tmp_path)[0]
    meta = metadata.read(first)
    assert meta["request"]["loras"] == [["fox", 0.7]] and meta["request"]["prompt"] == "a fox mytok"
    assert {x["name"] for x in meta["prompt"]["embeddings"]} == {"mytok"}
    assert meta["prompt"]["vae"]["name"] == "alt" and meta["prompt"]["loras"][0]["weight"] == 0.7
    # Reproduce on a fresh cache from the metadata alone.
    again = _worker_images({"request": meta["request"], "out": str(tmp_path / "b")}, PipelineCache(CPU), tmp_path)[0]
    assert Image.open(first).tobytes() == Image.open(again).tobytes()


KOHYA_TO_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # demo UNet: 32 -> 64
LYCORIS_FILES = {  # tiny LyCORIS files made by hand (kohya key names), one cross-attention projection each
    "LoHa": {f"{KOHYA_TO_K}.{k}": torch.randn(*s) for k, s in
             (("hada_w1_a", (64, 2)), ("hada_w1_b", (2, 32)), ("hada_w2_a", (64, 2)), ("hada_w2_b", (2, 32)))},
    "LoKr": {f"{KOHYA_TO_K}.lokr_w1": torch.randn(8, 4), f"{KOHYA_TO_K}.lokr_w2": torch.randn(8, 8)},
}


@pytest.mark.parametrize("algorithm", list(LYCORIS_FILES))
def test_lycoris_files_are_listed_as_unsupported_and_refused_in_one_line(algorithm, pipe, tmp_path, monkeypatch):
    """diffusers 0.42 refuses LoHa and LoKr files for SD/SDXL pipelines; the library says so instead of a traceback."""
    from backend import config, library

    tensors = {**LYCORIS_FILES[algorithm], f"{KOHYA_TO_K}.alpha": torch.tensor(2.0)}
    save_file(tensors, str(tmp_path / "tiny.safetensors"))
    monkeypatch.setenv("DREAMTTY_LORAS", str(tmp_path))
    entry = library.find("lora", "tiny", config.load())
    assert (entry.variant, entry.note) == (algorithm, f"LyCORIS {algorithm}: not supported; only LoRA files load")
    with pytest.raises(RequestError) as caught:
        _image(pipe, loras=[("tiny", 1.0)])
    assert str(caught.value) == (f"lora: tiny is a LyCORIS {algorithm} file; only LoRA files load "
                                 "(lora_down/lora_up or lora_A/lora_B weights)")
    assert not any(pipe.get_list_adapters().values())  # nothing half-loaded
    with pytest.raises(RequestError, match=f"^lora: tiny is a LyCORIS {algorithm} file"):  # before queueing too
        check_extras(GenerateRequest(loras=[("tiny", 1.0)]), "demo")
    with pytest.raises(ValueError):  # diffusers itself refuses it: the reason for the check (drop it when this fails)
        pipe.load_lora_weights(str(tmp_path), weight_name="tiny.safetensors", adapter_name="tiny")
    assert not any(pipe.get_list_adapters().values())


def test_a_group_records_each_jobs_own_embeddings_and_a_bad_one_fails_alone(tmp_path):
    """Jobs of one group (backend.job_groups) share a pipeline: each image's metadata names the embeddings of
    its own prompt, and a job whose own extras fail ends failed while its group-mates run."""
    from backend import events as ev, metadata
    from backend.queue_store import QueueStore
    from backend.worker import JobRun, LocalOutput, run_jobs

    store, sent = QueueStore(tmp_path / "queue.sqlite3"), []
    prompts = ["a mytok photo", "a plain photo", "an xltok photo"]  # xltok is an SDXL embedding: refused on SD1
    runs = []
    for k, prompt in enumerate(prompts):
        request = GenerateRequest(prompt=prompt, seed=k, steps=2, width=64, height=64, max_batch=3).resolved("demo")
        payload = {"request": request.to_dict(), "out": str(tmp_path / f"out{k}"), "family": "sd1"}
        job = store.add("generate", payload, "me")
        runs.append(JobRun(0, {"job": job, "kind": "generate", **payload}, PipelineCache(CPU), sent.append,
                           lambda: False, LocalOutput(store)))
    run_jobs(runs)
    ends = {e.job: e for e in sent if isinstance(e, ev.FINAL_EVENTS)}
    jobs = [run.job["job"] for run in runs]
    assert [type(ends[j]).__name__ for j in jobs] == ["Done", "Done", "Failed"]
    assert "xltok" in ends[jobs[2]].error
    records = [metadata.read(store.get(j).outputs[0])["prompt"] for j in jobs[:2]]
    assert [e["name"] for e in records[0]["embeddings"]] == ["mytok"] and "embeddings" not in records[1]
    assert [metadata.read(store.get(j).outputs[0])["request"]["batch"] for j in jobs[:2]] == [[2, 0], [2, 1]]
    store.close()
