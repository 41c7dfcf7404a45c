"""Data-parallel training: two trainer processes (torch.distributed.run, gloo on the CPU) share one run."""

from __future__ import annotations

import shlex

import pytest
import torch

from backend.events import TrainClassImages, TrainResume, TrainState, TrainStep
from backend.training import runs
from tests.test_train import photos  # noqa: F401  (a fixture)
from tui import cli


def test_two_processes_share_class_images_steps_and_checkpoints(photos, tmp_path, monkeypatch,  # noqa: F811
                                                               two_process_launcher):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # accelerate: several processes on the CPU (MULTI_CPU)
    run_dir = tmp_path / "ddp"
    code = cli.main(["train", "--model", "demo", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks dog",
                     "--class-prompt", "a photo of dog", "--num-class-images", "4", "--resolution", "64",
                     "--method", "full", "--max-steps", "3", "--checkpoint-every", "2", "--output", str(run_dir),
                     "--launcher", shlex.join(two_process_launcher)])
    assert code == 0, (run_dir / runs.LOG_FILE).read_text()[-2000:]
    events = runs.EventTail(run_dir).read()
    started = next(e for e in events if isinstance(e, TrainState))
    assert started.processes == 2
    steps = [e for e in events if isinstance(e, TrainStep)]
    assert [e.step for e in steps] == [1, 2, 3]  # the main process alone writes
    assert [e.epoch for e in steps] == [0, 1, 2]  # 2 of the 3 photos a step
    classes = [e for e in events if isinstance(e, TrainClassImages)]
    assert (classes[-1].done, classes[-1].total) == (4, 4)
    checkpoint = runs.list_checkpoints(run_dir)[-1][1]
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    # DDP reduces into the flat buckets' gradients: the optimizer state is per bucket, as in one process.
    assert len(torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]) < 10
    assert runs.run_output(run_dir)[0] == "model" and runs.read_run_json(run_dir)["state"] == "done"

    # The run continues in one process from the two processes' checkpoint.
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert cli.main(["train", "--output", str(run_dir), "--resume", "latest", "--max-steps", "5"]) == 0
    events = runs.EventTail(run_dir).read()
    resumed = next(e for e in events if isinstance(e, TrainResume))
    # A finished run checkpoints its last step too, so it goes on from step 3.
    assert resumed.step == 3 and [e.step for e in events[events.index(resumed):] if isinstance(e, TrainStep)] == [4, 5]
    assert [e.processes for e in events if isinstance(e, TrainState) and e.state == "running"] == [2, 1]


def test_demo_model_built_by_two_processes_at_once_is_kept(tmp_path, monkeypatch):
    """Two trainer processes (or workers) building a missing demo model: the loser keeps the winner's folder."""
    from backend.engine import demo_models

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))
    target = demo_models.locations.demo_models_dir() / "demo"
    build = demo_models.build_sd

    def other_process_finishes_first(xl: bool):
        pipe = build(xl)
        pipe.save_pretrained(target)
        (target / "dreamtty_demo.json").write_text('{"family": "demo"}')
        (target / "winner").touch()
        return pipe

    monkeypatch.setattr(demo_models, "build_sd", other_process_finishes_first)
    assert demo_models.ensure_demo("demo") == target
    assert (target / "winner").exists() and (target / "text_encoder").is_dir()
    assert [p.name for p in target.parent.iterdir()] == ["demo"]  # no temp folder left


def test_demo_model_built_by_a_rank_that_cannot_save_is_not_kept(tmp_path, monkeypatch):
    """transformers saves model files on rank 0 only; a demo built elsewhere is refused, not kept half-empty."""
    from transformers import PreTrainedModel

    from backend.engine import demo_models
    from backend.errors import ModelError

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
        with pytest.raises(ModelError, match='demo must first be built by one process; run once: dreamtty --model demo'):
            demo_models.ensure_demo("demo")
    root = demo_models.locations.demo_models_dir()
    assert list(root.iterdir()) == []  # neither a broken demo nor a temp folder left
    assert any((demo_models.ensure_demo("demo") / "text_encoder").glob("*.safetensors"))

