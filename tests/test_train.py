"""DreamBooth training on the tiny demo models (CPU, 64 px, a few steps)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.events import (TrainCheckpoint, TrainClassImages, TrainEvent, TrainLog, TrainResume, TrainState, TrainStep,
                            TrainValidation)
from backend.engine.loader import load_pipeline
from backend.models import resolve_model
from backend.training import runs
from backend.training.checkpoints import STATE_FILE
from backend.training.class_images import class_dir
from backend.training.config import TrainRequest
from backend import library
from backend.engine.scheduling import make_scheduler
from backend.training.launch import prepare_run
from backend.training.trainer import DreamBoothTrainer, TrainingError, train
from tui import cli

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three small "photos": a bright square on noise, at different places."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 90, (72, 88, 3), dtype=np.uint8)
        pixels[10 + 8 * i: 40 + 8 * i, 20:50] = (230, 180, 40)
        Image.fromarray(pixels).save(folder / f"dog{i}.png")
    return folder


def _request(photos: Path, out: Path, **extra) -> TrainRequest:
    settings = dict(model="demo", instance_dir=str(photos), instance_prompt="a photo of sks dog", resolution=64,
                    max_steps=2, checkpoint_every=2, seed=7, output=str(out))
    return TrainRequest(**{**settings, **extra})


def _run(request: TrainRequest, **kwargs) -> Path:
    prepared = prepare_run(request)
    train(prepared.request, prepared.run_dir, **kwargs)
    return prepared.run_dir


def test_a_long_prompt_without_spaces_names_a_run_folder_that_fits(photos, tmp_path):
    prompt = "一张sks狗在草地上奔跑的照片" * 30  # CJK: one word of 420 characters, 1260 bytes
    prepared = prepare_run(_request(photos, tmp_path, instance_prompt=prompt, output=None), runs_root=tmp_path)
    assert prepared.run_dir.is_dir() and prepared.run_dir.name.endswith(prompt[:40])
    assert len(prepared.run_dir.name.encode()) <= 255


def test_runs_sent_at_once_never_share_a_folder(photos, tmp_path, monkeypatch):
    """Without ``output``, runs sent in the same second with the same prompt get a folder each (name, name-2,
    ...); with the same ``output``, one takes it and the others are refused, not written over it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from backend.errors import RequestError
    from backend.training import launch

    monkeypatch.setattr(launch.time, "strftime", lambda _format: "20261206-120000-")  # one second for all
    gate = threading.Barrier(4)

    def prepare(request: TrainRequest):
        gate.wait()
        try:
            return prepare_run(request, runs_root=tmp_path / "runs")
        except RequestError as exc:
            return exc

    requests = [_request(photos, tmp_path, output=None, seed=n) for n in range(4)]
    with ThreadPoolExecutor(4) as pool:
        prepared = list(pool.map(prepare, requests))
    names = sorted(p.run_dir.name for p in prepared)
    assert names == ["20261206-120000-sks-dog"] + [f"20261206-120000-sks-dog-{n}" for n in (2, 3, 4)]
    assert sorted(runs.read_run_json(p.run_dir)["settings"]["seed"] for p in prepared) == [0, 1, 2, 3]
    gate.reset()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(prepare, [replace(r, output=str(tmp_path / "one")) for r in requests]))
    refused = [a for a in answers if isinstance(a, RequestError)]
    (taken,) = [a for a in answers if not isinstance(a, RequestError)]
    assert len(refused) == 3 and all(e.field == "output" and "already running" in str(e) for e in refused), refused
    assert runs.read_run_json(tmp_path / "one")["settings"]["seed"] == taken.request.seed
    (tmp_path / "file").write_text("x")
    with pytest.raises(RequestError, match=f"^output: cannot make a run folder in {tmp_path}/file: it is not a "
                                           "folder; give the run a folder$"):
        prepare_run(requests[0], runs_root=tmp_path / "file")


def _events(run_dir: Path) -> list[TrainEvent]:
    return runs.EventTail(run_dir).read()


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; after a resume, the resumed run's values win."""
    progress = runs.RunProgress()
    for event in _events(run_dir):
        progress.apply(event)
    return progress.losses


def _image(pipe, seed: int = 1) -> np.ndarray:
    # Our loop leaves its last scheduler on a pipeline: start every image from the model's own.
    pipe.scheduler = make_scheduler(pipe.dreamtty.scheduler_config, "euler", "normal")
    return pipe("a photo of sks dog", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def test_full_run_with_prior_then_lora_reuses_class_images(photos, tmp_path, sd_pipe):
    run_dir = _run(_request(photos, tmp_path / "full", method="full", lr=1e-3, class_prompt="a photo of dog",
                            num_class_images=2, validation_prompt="sks dog", validation_every=2))
    data = runs.read_run_json(run_dir)
    assert data["state"] == "done" and data["output"]["kind"] == "model" and data["step"] == 2

    events = _events(run_dir)
    assert isinstance(events[0], TrainState) and isinstance(events[-1], TrainState) and events[-1].state == "done"
    assert [e.done for e in events if isinstance(e, TrainClassImages)][-1] == 2
    steps = [e for e in events if isinstance(e, TrainStep)]
    assert [e.step for e in steps] == [1, 2]
    for e in steps:
        assert np.isfinite(e.loss) and np.isfinite(e.prior_loss) and e.lr == 1e-3 and e.its > 0
        assert e.max_steps == 2 and e.mem_gib is None  # no CUDA here
    assert [e.step for e in events if isinstance(e, TrainCheckpoint)] == [2]
    validation = [e for e in events if isinstance(e, TrainValidation)]
    assert len(validation) == 1 and all(Image.open(p).size == (64, 64) for p in validation[0].images)
    assert json.loads((run_dir / "checkpoints/checkpoint-2" / STATE_FILE).read_text())["step"] == 2

    weights = run_dir / "model/unet/diffusion_pytorch_model.safetensors"
    assert _mode(weights) == _mode(run_dir / "model/model_index.json")
    # The class images sit in the shared cache, keyed by model + class prompt + resolution.
    cache = class_dir(resolve_model("demo"), "a photo of dog", 64)
    made = sorted(cache.glob("class-*.png"))
    assert len(made) == 2
    stamps = [p.stat().st_mtime_ns for p in made]

    # The result is a diffusers folder that loads (also through the run dir) and draws differently.
    assert runs.run_output(run_dir) == ("model", run_dir / "model")
    assert resolve_model(str(run_dir)).location == str((run_dir / "model").resolve())  # --model RUN_DIR
    trained = load_pipeline(resolve_model(str(run_dir / "model")), CPU, torch.float32)
    assert trained.dreamtty.family == "demo"
    assert not torch.equal(trained.unet.conv_in.weight, sd_pipe.unet.conv_in.weight)
    assert np.abs(_image(trained) - _image(sd_pipe)).max() > 1e-3

    # A LoRA run on the same class reuses the cached class images: nothing generated.
    lora_dir = _run(_request(photos, tmp_path / "lora", max_steps=1, class_prompt="a photo of dog", num_class_images=2))
    generated = [e for e in _events(lora_dir) if isinstance(e, TrainClassImages)]
    assert generated == []
    assert [p.stat().st_mtime_ns for p in made] == stamps
    assert (lora_dir / runs.LORA_FILE).is_file()
    assert Path(library.find("lora", str(lora_dir)).path) == lora_dir / runs.LORA_FILE  # --lora RUN_DIR


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_weights_are_written_with_the_umasks_mode_as_the_other_files(photos, tmp_path):
    from backend import outputs

    kept = os.umask(0o022)  # a umask of 077 would give 0600 to every file
    outputs.umask.cache_clear()
    try:
        run_dir = _run(_request(photos, tmp_path / "modes", max_steps=1, checkpoint_every=1))
    finally:
        os.umask(kept)
        outputs.umask.cache_clear()
    shared = _mode(run_dir / runs.RUN_JSON)  # as Python writes a file: 0666 less the umask
    assert shared == 0o644
    assert _mode(run_dir / "checkpoints/checkpoint-1/trainable_0.safetensors") == shared
    assert _mode(run_dir / runs.LORA_FILE) == shared


def test_sdxl_lora_with_text_encoders_loads_in_diffusers(photos, tmp_path, xl_pipe):
    run_dir = _run(_request(photos, tmp_path / "xl", model="demo-xl", method="lora", lr=1e-2, rank=4,
                            train_text_encoder=True, snr_gamma=5.0, offset_noise=0.05, random_flip=True))
    kind, path = runs.run_output(run_dir)
    assert kind == "lora" and path == run_dir / runs.LORA_FILE
    checkpoint = run_dir / "checkpoints/checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("trainable_*.safetensors")) == [
        "trainable_0.safetensors", "trainable_1.safetensors", "trainable_2.safetensors"]  # unet + 2 text encoders
    pipe = load_pipeline(resolve_model("demo-xl"), CPU, torch.float32)
    base = _image(pipe)
    pipe.load_lora_weights(str(path))
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        assert any("lora" in name for name, _ in module.named_parameters())
    assert np.abs(_image(pipe) - base).max() > 1e-3
    assert np.array_equal(_image(xl_pipe), base)  # the shared fixture was not touched


def test_killed_trainer_resumes_exactly(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "killed"
    code = cli.main(["train", "--model", "demo", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog",
                     "--resolution", "64", "--max-steps", "200", "--checkpoint-every", "2", "--grad-accum", "2",
                     "--batch-size", "2", "--random-flip", "--seed", "7", "--output", str(run_dir), "--detach"])
    assert code == 0 and capsys.readouterr().out.strip() == str(run_dir.resolve())
    pid = int((run_dir / runs.PID_FILE).read_text())
    deadline = time.monotonic() + 180
    try:
        while not runs.list_checkpoints(run_dir):
            assert runs.pid_alive(pid, run_dir), (run_dir / runs.LOG_FILE).read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
        assert runs.effective_state(run_dir)[0] == "running"
    finally:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while runs.pid_alive(pid, run_dir) and time.monotonic() < deadline:  # a zombie until reaped: reads as gone
        time.sleep(0.05)
    state, error = runs.effective_state(run_dir)
    assert state == "failed" and "resume with --resume latest" in error
    prepared_request = TrainRequest.from_dict(runs.read_run_json(run_dir)["settings"])

    saved = runs.list_checkpoints(run_dir)[-1][0]
    end = saved + 2
    run_dir = _run(replace(prepared_request, max_steps=end, resume="latest"))
    resumed = [e for e in _events(run_dir) if isinstance(e, TrainResume)]
    assert [e.step for e in resumed] == [saved]
    after = [e.step for e in _events(run_dir)[_events(run_dir).index(resumed[0]):] if isinstance(e, TrainStep)]
    assert after == [saved + 1, saved + 2]

    reference = _run(replace(prepared_request, max_steps=end, output=str(tmp_path / "reference")))
    expected = _losses(reference)
    assert sorted(_losses(run_dir)) == list(range(1, end + 1))
    assert _losses(run_dir) == pytest.approx(expected, rel=1e-5)


def test_lr_schedule_warms_up_decays_and_resumes_exactly(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = dict(max_steps=6, lr=1e-4, lr_scheduler="linear", lr_warmup_steps=2, checkpoint_every=100)
    reference = _run(_request(photos, tmp_path / "reference", **settings))
    lrs = lambda run_dir: [e.lr for e in _events(run_dir) if isinstance(e, TrainStep)]  # noqa: E731
    assert lrs(reference) == pytest.approx([0, 0.5e-4, 1e-4, 0.75e-4, 0.5e-4, 0.25e-4])  # each step's own lr

    run_dir = tmp_path / "stopped"
    _run(_request(photos, run_dir, **settings), should_stop=lambda: len(lrs(run_dir)) >= 3)
    assert runs.read_run_json(run_dir)["state"] == "stopped"
    _run(_request(photos, run_dir, **settings, resume="latest"))
    assert lrs(run_dir)[3:] == pytest.approx(lrs(reference)[3:], rel=1e-6)
    assert _losses(run_dir) == pytest.approx(_losses(reference), rel=1e-4)  # float noise after the reload


def test_extending_a_finished_run_follows_the_longer_schedule_from_its_first_step(photos, tmp_path):
    settings = dict(lr=1e-4, lr_scheduler="linear", checkpoint_every=100)
    run_dir = _run(_request(photos, tmp_path / "short", max_steps=4, **settings))
    _run(_request(photos, run_dir, max_steps=8, resume="latest", **settings))
    lrs = [e.lr for e in _events(run_dir) if isinstance(e, TrainStep)]
    # A linear decay over 8 steps from step 5 on (the 4-step schedule had reached 0 at its end).
    assert lrs[4:] == pytest.approx([0.5e-4, 0.375e-4, 0.25e-4, 0.125e-4], rel=1e-6)
    # Another --lr on a resume is this run's lr from its first step, with the same schedule.
    _run(_request(photos, run_dir, max_steps=10, resume="latest", **{**settings, "lr": 2e-4}))
    lrs = [e.lr for e in _events(run_dir) if isinstance(e, TrainStep)]
    assert lrs[8:] == pytest.approx([2e-4 * 2 / 10, 2e-4 * 1 / 10], rel=1e-6)


def test_a_resume_that_changes_how_the_run_steps_says_so_and_keeps_the_schedule_and_accumulation(photos, tmp_path,
                                                                                                  monkeypatch):
    """A checkpoint of 2 processes resumed by 1 (the Train screen's Ctrl+R takes every GPU there is) went on at
    twice its step on the lr schedule (accelerate steps it once per process); a new --grad-accum took the old
    micro-batch count, so optimizer steps fell between a step's micro-batches; neither was said."""
    settings = dict(lr=1e-4, lr_scheduler="linear", checkpoint_every=100)
    run_dir = _run(_request(photos, tmp_path / "run", max_steps=3, **settings))
    checkpoint = runs.list_checkpoints(run_dir)[-1][1]
    state = json.loads((checkpoint / STATE_FILE).read_text())
    stepping = {**state["stepping"], "processes": 2}  # as 2 processes saved it:
    (checkpoint / STATE_FILE).write_text(json.dumps({**state, "stepping": stepping}))
    schedule = torch.load(checkpoint / "scheduler.bin", weights_only=True)
    torch.save({**schedule, "last_epoch": 3 * 2}, checkpoint / "scheduler.bin")  # 2 schedule steps per step
    micro_counts = []
    step = DreamBoothTrainer.train_step
    monkeypatch.setattr(DreamBoothTrainer, "train_step",
                        lambda self, micro: micro_counts.append(self.acc.step) or step(self, micro))
    _run(_request(photos, run_dir, max_steps=5, resume="latest", grad_accum=2, batch_size=2, **settings))
    assert micro_counts == [3 * 2, 4 * 2]  # accelerate's micro-batch count, as if the run had had 2 all along
    lrs = [e.lr for e in _events(run_dir) if isinstance(e, TrainStep)]
    assert lrs[3:] == pytest.approx([1e-4 * 2 / 5, 1e-4 * 1 / 5], rel=1e-6)  # a linear decay over 5 steps
    said = [e.message for e in _events(run_dir) if isinstance(e, TrainLog) and e.message.startswith("resume: ")]
    assert said == [f"resume: {name} is {now}, the checkpoint's {then}: the run goes on from step 3, its images in "
                    "another order than a run that kept it" for name, now, then in
                    (("batch_size", 2, 1), ("grad_accum", 2, 1), ("processes", 1, 2))]


def test_run_stopped_on_its_last_step_resumes_to_its_export(photos, tmp_path):
    run_dir = tmp_path / "last"
    answers = [False, True]  # the stop is asked for during step 2 of 2
    _run(_request(photos, run_dir, max_steps=2), should_stop=lambda: answers.pop(0))
    assert runs.read_run_json(run_dir)["state"] == "stopped" and runs.run_output(run_dir) is None
    _run(_request(photos, run_dir, max_steps=2, resume="latest"))  # nothing left to train: it exports
    assert runs.read_run_json(run_dir)["state"] == "done" and runs.run_output(run_dir)[0] == "lora"
    assert [e.step for e in _events(run_dir) if isinstance(e, TrainStep)] == [1, 2]


def test_a_stop_whose_checkpoint_is_not_saved_says_where_a_resume_goes_on(photos, tmp_path, monkeypatch):
    """The run was said "stopped at step 2" as if saved there; a resume then went back to step 1 unsaid."""
    from accelerate import Accelerator

    real_save, calls = Accelerator.save_state, []

    def full_at_the_stop(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the stop's checkpoint, at step 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_the_stop)
    answers = [False, True]  # the stop is asked for during step 2
    run_dir = _run(_request(photos, tmp_path / "run", max_steps=4, checkpoint_every=1),
                   should_stop=lambda: answers.pop(0))
    data = runs.read_run_json(run_dir)
    assert (data["state"], data["step"], data["saved"]) == ("stopped", 2, 1)
    end = [e for e in _events(run_dir) if isinstance(e, TrainState)][-1]
    assert end.message == f"its checkpoint at step 2 was not saved: a resume goes on from step 1; {runs.RESUME_HINT}"


def test_disk_full_keeps_previous_checkpoint_and_stop_saves_one(photos, tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = []

    def flaky_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint (step 4): the disk is full halfway through
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "optimizer.bin").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    steps_done = []
    original_step = DreamBoothTrainer.train_step

    def counting_step(self, micro):
        steps_done.append(micro)
        return original_step(self, micro)

    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, "save_state", flaky_save)
        patch.setattr(DreamBoothTrainer, "train_step", counting_step)
        run_dir = _run(_request(photos, tmp_path / "disk", max_steps=20, keep_checkpoints=3),
                       should_stop=lambda: len(steps_done) >= 5)
    warnings = [e.message for e in _events(run_dir) if isinstance(e, TrainLog) and e.level == "warning"]
    assert any("checkpoint at step 4 not saved: No space left on device; checkpoint-2 is kept" in w for w in warnings)
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [2, 5]  # 4 failed, 5 saved by the stop
    assert not list((run_dir / runs.CHECKPOINTS).glob(".tmp-*"))
    assert (run_dir / "checkpoints/checkpoint-2/trainable_0.safetensors").is_file()
    data = runs.read_run_json(run_dir)
    assert data["state"] == "stopped" and data["step"] == 5
    assert not (run_dir / runs.LORA_FILE).exists()

    # The stopped run continues from step 5.
    resumed = _run(replace(TrainRequest.from_dict(data["settings"]), max_steps=6, resume="latest"))
    assert [e.step for e in _events(resumed) if isinstance(e, TrainResume)] == [5]
    assert runs.read_run_json(resumed)["state"] == "done"


def test_out_of_memory_names_the_settings_and_keeps_the_checkpoint(photos, tmp_path, monkeypatch):
    original = DreamBoothTrainer._loss

    def oom_at_third_step(self, micro):
        if micro >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, micro)

    monkeypatch.setattr(DreamBoothTrainer, "_loss", oom_at_third_step)
    prepared = prepare_run(_request(photos, tmp_path / "oom", max_steps=4, checkpoint_every=2))
    with pytest.raises(TrainingError) as err:
        train(prepared.request, prepared.run_dir)
    message = str(err.value)
    assert message.startswith("out of GPU memory at step 3")
    assert message.startswith("out of GPU memory at step 3; reduce memory with gradient checkpointing, 8-bit Adam, "
                              "mixed precision fp16, a smaller resolution (now 64) or batch size (now 1)")
    assert "method lora" not in message  # it is LoRA already
    assert "checkpoint-2 is kept" in message and "\n" not in message
    assert [s for s, _ in runs.list_checkpoints(prepared.run_dir)] == [2]


def test_resume_with_another_optimizer_is_refused_up_front(photos, tmp_path, capsys):
    run_dir = _run(_request(photos, tmp_path / "adamw", method="full", max_steps=2, checkpoint_every=2))
    code = cli.main(["train", "--output", str(run_dir), "--resume", "latest", "--max-steps", "3", "--use-8bit-adam"])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the earlier run's library warnings
    assert code == 2 and error == ("dreamtty: use_8bit_adam: the checkpoint was trained with False, not True; "
                                   "a resume must keep it (or train a new run in another folder)")
    assert (run_dir / "checkpoints/checkpoint-2").is_dir() and runs.run_output(run_dir)[0] == "model"  # nothing lost


def test_v_prediction_model_trains_on_velocity(photos, tmp_path, demo_dirs, monkeypatch):
    from diffusers import DDPMScheduler

    folder = tmp_path / "demo-v"
    shutil.copytree(demo_dirs["demo"], folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    calls = []
    real = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: calls.append(1) or real(self, *a))
    run_dir = _run(_request(photos, tmp_path / "v", model=str(folder), max_steps=1, snr_gamma=5.0))
    losses = [e.loss for e in _events(run_dir) if isinstance(e, TrainStep)]
    assert len(losses) == 1 and np.isfinite(losses[0]) and calls == [1]


def _tensorboard_scalars(logs: Path) -> dict[str, dict[int, float]]:
    """Scalars in the TensorBoard event files under ``logs`` (TFRecord: length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in logs.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            length = int.from_bytes(data[at:at + 8], "little")
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_report_to_tensorboard_logs_the_loss_curve(photos, tmp_path):
    run_dir = _run(_request(photos, tmp_path / "tb", max_steps=3, report_to="tensorboard",
                            class_prompt="a photo of dog", num_class_images=1))
    scalars = _tensorboard_scalars(run_dir / "logs")
    assert scalars["loss"] == pytest.approx(_losses(run_dir), rel=1e-6)
    assert sorted(scalars["lr"]) == [1, 2, 3] and set(scalars["prior_loss"]) == {1, 2, 3}


def test_a_stop_asked_while_the_model_loads_stops_after_the_first_step(photos, tmp_path):
    prepared = prepare_run(_request(photos, tmp_path / "r", max_steps=4, checkpoint_every=4))
    (prepared.run_dir / runs.STOP_FILE).touch()  # Ctrl-C before the trainer reached its first step
    assert train(prepared.request, prepared.run_dir) == "stopped"
    assert not (prepared.run_dir / runs.STOP_FILE).exists()  # taken: a second Ctrl-C cannot take it back
    data = runs.read_run_json(prepared.run_dir)
    assert data["state"] == "stopped" and data["step"] == 1
    assert [p.name for p in (prepared.run_dir / runs.CHECKPOINTS).iterdir()] == ["checkpoint-1"]


def test_a_relative_resume_path_is_the_same_checkpoint_from_the_trainers_folder(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _run(_request(photos, "run", max_steps=2, checkpoint_every=1, keep_checkpoints=2))
    prepared = prepare_run(_request(photos, "run", max_steps=3, checkpoint_every=1, resume="run/checkpoints/checkpoint-1"))
    assert prepared.request.resume == str(first / "checkpoints" / "checkpoint-1")
    monkeypatch.chdir(prepared.run_dir)  # where the trainer process runs
    assert train(prepared.request, prepared.run_dir) == "done"
    resumed = [e for e in _events(first) if isinstance(e, TrainResume)]
    assert resumed and resumed[-1].step == 1
