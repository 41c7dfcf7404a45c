"""A job's images denoised together (``max_batch``): each keeps its seed, prompt, prompt editing, events and
output; reproduce of a batched image runs its batch again and gives identical pixels; a crash mid-batch
resumes at the first unsaved image; bad values are one-line errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from backend import config, events as ev, metadata
from backend.engine import batching
from backend.engine.generate import generate_batch, generate_image
from backend.engine.loader import PipelineCache
from backend.errors import RequestError
from backend.guidance_settings import GuidanceSettings
from backend.models import resolve_model
from backend.queue_store import QueueStore
from backend.request import MAX_SEED, GenerateRequest
from backend.worker import JobGroup, JobRun, LocalOutput, _make_images
from job_helpers import worker_images
from tui.widgets.progress import describe_step

CPU = torch.device("cpu")
SMALL = dict(steps=4, width=64, height=64)


@pytest.fixture(scope="module")
def cache(demo_dirs) -> PipelineCache:
    return PipelineCache(CPU)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


def _request(**fields) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a red fox", "seed": 10, **SMALL, **fields}).resolved(fields.get("model", "demo"))


def _job(request: GenerateRequest, cache, tmp_path, name: str = "job", whole: bool = False,
         **payload) -> tuple[list[str], list]:
    return worker_images({"request": request.to_dict(), "out": str(tmp_path / name), **payload}, cache,
                         tmp_path / "queue.sqlite3", whole=whole)


def _unet_rows(cache, model: str = "demo") -> list[int]:
    """The batch sizes the UNet of ``model`` is called with from now on (a hook that stays: harmless)."""
    rows: list[int] = []
    pipe = cache.get(resolve_model(model), torch.float32)
    pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows


def test_a_job_of_three_is_one_batch_each_image_its_own_and_reproduced_exactly(cache, tmp_path):
    request = _request(prompt="a [[red, green, blue]] fox", count=3, max_batch=3)
    rows = _unet_rows(cache)
    paths, sent = _job(request, cache, tmp_path)
    assert set(rows) == {6}  # one UNet call per step: [uncond x3, cond x3]
    metas = [metadata.read(p) for p in paths]
    assert [m["request"]["seed"] for m in metas] == [10, 11, 12]
    assert [m["prompt"]["positive"] for m in metas] == ["a red fox", "a green fox", "a blue fox"]
    assert [m["request"]["batch"] for m in metas] == [[3, 0], [3, 1], [3, 2]]
    assert [e.image for e in sent if isinstance(e, ev.ImageSaved)] == [0, 1, 2]
    pixels = [_pixels(p) for p in paths]
    assert min(np.abs(a - b).max() for a, b in ((pixels[0], pixels[1]), (pixels[1], pixels[2]))) > 30

    for k, path in enumerate(paths):
        rows.clear()
        again, _ = _job(metadata.request_from_image(path), cache, tmp_path, f"again{k}")
        assert len(again) == 1 and set(rows) == {6}  # the whole batch again, only this image kept
        assert np.array_equal(_pixels(again[0]), pixels[k])
        assert metadata.read(again[0])["request"]["batch"] == [3, k]
        alone, _ = _job(request.per_image(k), cache, tmp_path, f"alone{k}")
        # Alone it differs in the last bits only: oneDNN's convolutions depend on the batch size.
        assert np.abs(_pixels(alone[0]) - pixels[k]).max() <= 2


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_sde", "dpmpp_2m_sde"])
def test_samplers_that_add_noise_draw_each_images_from_its_own_seed(sampler, cache):
    pipe = cache.get(resolve_model("demo"), torch.float32)
    base = _request(sampler=sampler, count=3)
    mates = [base.per_image(k) for k in range(3)]
    batched = [np.asarray(image, dtype=int) for image, _, _ in generate_batch(pipe, mates)]
    for k, mate in enumerate(mates):
        alone = np.asarray(generate_image(pipe, mate)[0], dtype=int)
        assert np.abs(alone - batched[k]).max() <= 2, k
    assert np.abs(batched[0] - batched[1]).max() > 30


def test_prompt_editing_stays_per_image_in_a_batch(cache):
    pipe = cache.get(resolve_model("demo-xl"), torch.float32)
    base = _request(model="demo-xl", prompt="a [[red, blue]] [cat:dog:[[1, 3]]]", count=2)
    mates = [base.per_image(k) for k in range(2)]
    batched = list(generate_batch(pipe, mates))
    assert [place for _, _, place in batched] == [(2, 0), (2, 1)]
    switches = [[(run["text"], run["first_step"]) for run in record["schedule"]["prompt"]] for _, record, _ in batched]
    assert switches == [[("a red cat", 1), ("a red dog", 2)], [("a blue cat", 1), ("a blue dog", 4)]]
    for k, mate in enumerate(mates):
        alone = generate_image(pipe, mate)[0]
        assert np.abs(np.asarray(alone, dtype=int) - np.asarray(batched[k][0], dtype=int)).max() <= 2


def test_prompts_of_different_lengths_are_denoised_apart_and_equal_single_runs(cache):
    pipe = cache.get(resolve_model("demo"), torch.float32)
    long = "a fox " + " ".join(f"detail {n}" for n in range(60))  # more than one 75-token window
    base = _request(prompt=f"[[a fox, {long}]]", count=2)
    mates = [base.per_image(k) for k in range(2)]
    batched = list(generate_batch(pipe, mates))
    assert [place for _, _, place in batched] == [None, None]
    for (image, _, _), mate in zip(batched, mates):
        assert np.array_equal(np.asarray(image), np.asarray(generate_image(pipe, mate)[0]))


def test_events_per_image_and_max_batch_splits_the_job(cache, tmp_path):
    paths, sent = _job(_request(count=5, max_batch=2, steps=3), cache, tmp_path)
    assert [metadata.read(p)["request"]["batch"] for p in paths] == [[2, 0], [2, 1], [2, 0], [2, 1], None]
    steps = [e for e in sent if isinstance(e, ev.Step)]
    assert {e.image for e in steps} == {0, 1, 2, 3, 4}
    last = {e.image: e for e in steps if e.step == e.total}
    assert [last[i].done for i in range(5)] == [6, 6, 12, 12, 15]  # both images of a batch advance at once
    # either image's event says the batch (the Generate panel and the mode bar showed image 1 and image 2)
    shown = [describe_step(last[i]).split(" · ")[0] for i in range(5)]
    assert shown == ["images 1–2/5"] * 2 + ["images 3–4/5"] * 2 + ["image 5/5"]
    assert {e.image for e in sent if isinstance(e, ev.Preview)} <= {0, 1, 2, 3, 4}
    order = [(type(e).__name__, e.image) for e in sent if isinstance(e, (ev.Step, ev.ImageSaved)) and
             (isinstance(e, ev.ImageSaved) or e.step == e.total)]
    assert order.index(("ImageSaved", 1)) < order.index(("Step", 2))  # saved as each batch ends


class Crash(Exception):
    """The worker dying (as far as the queue can tell) after some saves."""


class CrashingOutput(LocalOutput):
    def __init__(self, store, saves: int) -> None:
        super().__init__(store)
        self.saves = saves

    def save(self, run, image, meta, index, seed) -> None:
        if self.saves == 0:
            raise Crash
        self.saves -= 1
        super().save(run, image, meta, index, seed)


def test_a_crash_mid_batch_resumes_at_the_first_unsaved_image(cache, tmp_path):
    request = _request(count=4, max_batch=4)
    store = QueueStore(tmp_path / "queue.sqlite3")
    payload = {"request": request.to_dict(), "out": str(tmp_path / "out")}
    job = store.add("generate", payload, "test")
    run = JobRun(0, {"job": job, "kind": "generate", **payload}, cache, [].append, lambda: False, CrashingOutput(store, 1))
    with pytest.raises(Crash):
        _make_images(JobGroup([run]))
    saved = store.get(job).outputs
    assert len(saved) == 1
    first_image = len(saved)  # what the service hands the retry
    resumed = {"job": job, "kind": "generate", **payload, "first_image": first_image}
    _make_images(JobGroup([JobRun(0, resumed, cache, [].append, lambda: False, LocalOutput(store))]))
    outputs = store.get(job).outputs
    assert outputs[:1] == saved and len(outputs) == 4 == len(list((tmp_path / "out").rglob("*.png")))
    metas = [metadata.read(p)["request"] for p in outputs]
    assert [m["seed"] for m in metas] == [10, 11, 12, 13]
    assert [m["batch"] for m in metas] == [[4, 0], [3, 0], [3, 1], [3, 2]]  # the rest made as a batch of three
    again, _ = _job(metadata.request_from_image(outputs[2]), cache, tmp_path, "again")
    assert np.array_equal(_pixels(again[0]), _pixels(outputs[2]))


def test_a_batch_out_of_memory_is_tried_again_at_half_its_size(cache, tmp_path, monkeypatch):
    from backend.engine import generate

    real = generate.generate_batch

    def tight(pipe, requests, **kwargs):
        if len(requests) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        yield from real(pipe, requests, **kwargs)

    monkeypatch.setattr(generate, "generate_batch", tight)
    paths, sent = _job(_request(count=4, max_batch=4), cache, tmp_path)
    assert [metadata.read(p)["request"]["batch"] for p in paths] == [[2, 0], [2, 1], [2, 0], [2, 1]]
    assert [e.message for e in sent if isinstance(e, ev.Note)] == [
        "out of memory with 4 images at once; trying 2 at a time"]
    monkeypatch.setattr(generate, "generate_batch", lambda *args, **kwargs: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")))  # not even one image fits: the job fails, saying what helps
    paths, sent = _job(_request(count=1), cache, tmp_path, "none", whole=True)
    assert paths == [] and [e.error for e in sent if isinstance(e, ev.Failed)] == [
        "out of memory on cpu at 64x64: lower the size or the image count, or set dtype to fp16"]


def test_sag_and_image_kinds_run_one_image_at_a_time(cache, tmp_path):
    rows = _unet_rows(cache)
    paths, sent = _job(_request(count=2, max_batch=2, guidance=GuidanceSettings(sag=0.5)), cache, tmp_path)
    assert [metadata.read(p)["request"]["batch"] for p in paths] == [None, None]
    assert 4 not in rows  # never two images' [uncond, cond] at once
    assert any(isinstance(e, ev.Note) and e.message.startswith("sag:") for e in sent)


def test_the_default_is_what_memory_holds(monkeypatch):
    import psutil

    gib = 2**30
    request = GenerateRequest(width=512, height=512)
    # 512²: 4096 latent positions x 2 rows x 48 KiB = 384 MiB an image at 2 bytes a value; half of 1.5 GiB holds two.
    assert batching.fitting(int(1.5 * gib), request, 2, 8) == 2
    assert batching.fitting(int(1.5 * gib), request, 4, 8) == 1  # fp32 needs twice as much
    assert batching.fitting(40 * gib, request, 2, 8) == 8
    xl = GenerateRequest(width=1024, height=1024, guidance=GuidanceSettings(perp_neg=1.0))  # SDXL's size
    assert batching.unet_rows(xl) == 3 and batching.fitting(8 * gib, xl, 2, 8) == 1
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 64 * gib})())
    assert batching.max_batch(request, CPU, torch.float32) == batching.CPU_DEFAULT == 4
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2 * gib})())
    assert batching.max_batch(request, CPU, torch.float32) == 1
    assert batching.max_batch(GenerateRequest(max_batch=3), CPU, torch.float32) == 3  # as asked, memory or not


@pytest.mark.parametrize("fields,message", [
    ({"max_batch": 0}, "max_batch: 0 is out of range; allowed 1..64"),
    ({"max_batch": 65}, "max_batch: 65 is out of range; allowed 1..64"),
    ({"max_batch": "two"}, "max_batch: 'two' is not a whole number"),
    ({"batch": [3]}, "batch: [3] is not allowed; give [size, position]"),
    ({"batch": [3, 3]}, "batch: [3, 3] is not allowed; [size, position] with size 2..64"),
    ({"batch": [1, 0]}, "batch: [1, 0] is not allowed"),
])
def test_bad_batch_fields_are_one_line_errors(fields, message):
    with pytest.raises(RequestError) as caught:
        GenerateRequest.from_dict({"prompt": "x", "seed": 5, **fields}).resolved("demo")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_recorded_batch_names_its_mates_and_a_job_of_several_makes_its_own():
    one = GenerateRequest.from_dict({"prompt": "[[a, b, c]]", "seed": 7, "index": 1, "batch": [3, 1]}).resolved("demo")
    mates = one.batch_mates()
    assert [(m.seed, m.index, m.batch, m.count) for m in mates] == [(6, 0, None, 1), (7, 1, None, 1), (8, 2, None, 1)]
    # In a group the image beside it was another job's: seed 0 at position 1 was refused ("needs seeds -1..0")
    grouped = GenerateRequest.from_dict({"prompt": "a cat", "seed": 0, "batch": [2, 1]}).resolved("demo")
    assert [m.seed for m in grouped.batch_mates()] == [MAX_SEED, 0]
    several = GenerateRequest.from_dict({"prompt": "x", "seed": 7, "count": 2, "batch": [3, 1]}).resolved("demo")
    assert several.batch is None


def test_max_batch_comes_from_the_config_below_an_explicit_value(tmp_path, monkeypatch):
    from backend import request_builder

    path = tmp_path / "config.yaml"
    path.write_text("max_batch: 6\n")
    monkeypatch.setenv("DREAMTTY_CONFIG", str(path))
    assert request_builder.build({"prompt": "x"}).max_batch == 6
    assert request_builder.build({"prompt": "x", "max_batch": 2}).max_batch == 2
    path.write_text("max_batch: 0\n")
    cfg = config.load()
    assert cfg.max_batch is None and cfg.warnings == ["config: max_batch: 0 is not allowed; use a whole number 1..64; "
                                                      "using the default"]
    path.write_text("max_batch: yes\n")  # said as YAML writes it, not as Python's True
    assert config.load().warnings[0].startswith("config: max_batch: true is not allowed")


@pytest.mark.parametrize("guidance", [
    GuidanceSettings(perp_neg=1.0), GuidanceSettings(pag=2.0), GuidanceSettings(apg=4.0),
    GuidanceSettings(sharpness=10.0, adaptive_cfg=4.0, cfg_rescale=0.7), GuidanceSettings(adm_scale=(1.5, 0.8, 0.3)),
    GuidanceSettings(freeu=()),
], ids=["perp_neg", "pag", "apg", "sharpness", "adm_scale", "freeu"])
def test_guidance_controls_act_on_each_image_of_a_batch(guidance, cache):
    pipe = cache.get(resolve_model("demo-xl"), torch.float32)
    base = _request(model="demo-xl", prompt="a [[castle, lake]]", negative_prompt="dark, blurry", cfg=9.0, count=2,
                    guidance=guidance)
    mates = [base.per_image(k) for k in range(2)]
    rows = _unet_rows(cache, "demo-xl")
    batched = [np.asarray(image, dtype=int) for image, _, _ in generate_batch(pipe, mates)]
    assert set(rows) == {2 * batching.unet_rows(base)}
    plain = np.asarray(generate_image(pipe, replace(mates[0], guidance=GuidanceSettings()))[0], dtype=int)
    assert np.abs(plain - batched[0]).max() > 2  # the control changes the image
    for k, mate in enumerate(mates):
        assert np.abs(np.asarray(generate_image(pipe, mate)[0], dtype=int) - batched[k]).max() <= 2, k
