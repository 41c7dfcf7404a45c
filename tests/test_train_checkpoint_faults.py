"""Checkpoints under faults: a full disk while saving, a finished run extended, incomplete or damaged checkpoints.

A full disk is a file-size limit (RLIMIT_FSIZE): writes past it fail in the kernel, so torch and
safetensors take their own error paths, as they do on a full disk.
"""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from backend.errors import RequestError
from backend.events import TrainLog, TrainResume, TrainStep
from backend.training import runs, trainer_process
from backend.training.checkpoints import STATE_FILE, CheckpointError
from backend.training.config import TrainRequest
from backend.training.launch import prepare_run, resume_checkpoint
from backend.training.trainer import train
from tests.test_train import _events, _losses, _request, _run, photos  # noqa: F401  (photos: a fixture)


@contextmanager
def disk_full_after(limit: int):
    """Writes that would make a file larger than ``limit`` bytes fail (EFBIG) in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _warnings(run_dir: Path) -> list[str]:
    return [e.message for e in _events(run_dir) if isinstance(e, TrainLog) and e.level == "warning"]


def _steps_after_resume(run_dir: Path) -> tuple[int, list[int]]:
    """(the step the last resume started from, the steps trained after it)."""
    events = _events(run_dir)
    resumed = [i for i, e in enumerate(events) if isinstance(e, TrainResume)][-1]
    return events[resumed].step, [e.step for e in events[resumed:] if isinstance(e, TrainStep)]


def _settings(run_dir: Path, **changes) -> TrainRequest:
    return replace(TrainRequest.from_dict(runs.read_run_json(run_dir)["settings"]), **changes)


@pytest.mark.parametrize("failing", ["safetensors", "torch.save"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint_and_trains_on(photos, tmp_path, monkeypatch, failing):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = []

    def second_save_on_a_full_disk(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) != 2:
            return real_save(self, output_dir, **kwargs)
        # The trainable weights come first, then torch.save's optimizer state (larger than the weights).
        weights = (Path(output_dir).parent / "checkpoint-1/trainable_0.safetensors").stat().st_size
        with disk_full_after(0 if failing == "safetensors" else weights):
            return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", second_save_on_a_full_disk)
    run_dir = _run(_request(photos, tmp_path / "full", max_steps=3, checkpoint_every=1, keep_checkpoints=3))

    assert runs.read_run_json(run_dir)["state"] == "done" and runs.run_output(run_dir)[0] == "lora"
    assert [e.step for e in _events(run_dir) if isinstance(e, TrainStep)] == [1, 2, 3]
    reason = "File too large" if failing == "safetensors" else "torch could not write its file (disk full?)"
    assert _warnings(run_dir) == [f"checkpoint at step 2 not saved: {reason}; checkpoint-1 is kept"]
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [1, 3]
    assert sorted(p.name for p in (run_dir / runs.CHECKPOINTS).iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_run_json_not_written_at_a_checkpoint_is_a_warning(photos, tmp_path, monkeypatch):
    real_update = runs.update_run_json

    def full_disk_at_first_checkpoint(run_dir, **changes):
        if changes.get("step") != 1 or "checkpoint" not in changes:
            return real_update(run_dir, **changes)
        with disk_full_after(0):
            return real_update(run_dir, **changes)

    monkeypatch.setattr(runs, "update_run_json", full_disk_at_first_checkpoint)
    run_dir = _run(_request(photos, tmp_path / "json", max_steps=2, checkpoint_every=1))

    assert _warnings(run_dir) == ["run.json not updated at step 1: File too large"]
    data = runs.read_run_json(run_dir)
    assert data["state"] == "done" and data["step"] == 2 and data["checkpoint"].endswith("checkpoint-2")
    assert [p.name for p in run_dir.glob(".run.json*")] == []  # no temp file left behind


def test_failed_json_write_leaves_the_file_and_no_temp_file(tmp_path):
    path = tmp_path / "run" / runs.RUN_JSON
    path.parent.mkdir()
    runs.write_json_atomic(path, {"state": "running"})
    with disk_full_after(0), pytest.raises(OSError):
        runs.write_json_atomic(path, {"state": "done"})
    assert json.loads(path.read_text()) == {"state": "running"}
    assert [p.name for p in path.parent.iterdir()] == [runs.RUN_JSON]


def test_finished_run_is_extended_from_its_last_step(photos, tmp_path):
    run_dir = _run(_request(photos, tmp_path / "finished", max_steps=3, checkpoint_every=2))
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [2, 3]
    killed_save = run_dir / "checkpoints/.tmp-checkpoint-9"
    killed_save.mkdir()
    (killed_save / "optimizer.bin").write_bytes(b"partial")

    _run(_settings(run_dir, max_steps=5, resume="latest"))
    assert _steps_after_resume(run_dir) == (3, [4, 5])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]  # keep 2
    reference = _run(_request(photos, tmp_path / "reference", max_steps=5, checkpoint_every=2))
    assert _losses(run_dir) == pytest.approx(_losses(reference), rel=1e-5)


def test_latest_skips_a_folder_without_its_state_file(tmp_path):
    for step, complete in ((2, True), (4, False)):
        folder = tmp_path / runs.CHECKPOINTS / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainable_0.safetensors").write_bytes(b"")
        if complete:
            (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    assert runs.list_checkpoints(tmp_path) == [(2, tmp_path / "checkpoints/checkpoint-2")]
    assert resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints/checkpoint-2"


def test_damaged_checkpoint_named_fails_and_latest_falls_back(photos, tmp_path):
    run_dir = _run(_request(photos, tmp_path / "damaged", max_steps=4, checkpoint_every=2))
    first = _losses(run_dir)
    damaged = run_dir / "checkpoints/checkpoint-4"
    weights = damaged / "trainable_0.safetensors"
    cut = weights.read_bytes()[: weights.stat().st_size // 2]  # a power cut before the data reached the disk
    weights.write_bytes(cut)

    prepare_run(_settings(run_dir, max_steps=5, resume=str(damaged)))
    assert trainer_process.main([str(run_dir)]) == 1  # the trainer process, in this one
    error = (f"resume: cannot load {damaged}: trainable_0.safetensors is damaged "
             "(Error while deserializing header: incomplete metadata, file not fully covered)")
    assert runs.read_run_json(run_dir)["error"] == error
    assert weights.read_bytes() == cut and [s for s, _ in runs.list_checkpoints(run_dir)] == [2, 4]  # nothing lost

    _run(_settings(run_dir, max_steps=5, resume="latest"))
    assert _warnings(run_dir)[-2] == f"{error}; passed over"
    assert _steps_after_resume(run_dir) == (2, [3, 4, 5])
    (moved,) = (run_dir / runs.CHECKPOINTS / runs.ABANDONED).iterdir()  # moved aside when passed over, as it was
    assert (moved / "checkpoint-4/trainable_0.safetensors").read_bytes() == cut
    again = _losses(run_dir)
    assert [again[3], again[4]] == pytest.approx([first[3], first[4]], rel=1e-5)
    with safe_open(weights, framework="pt") as saved:  # step 4 saved again, whole
        assert len(list(saved.keys())) > 0
    assert runs.read_run_json(run_dir)["state"] == "done"


def test_a_run_whose_every_checkpoint_is_damaged_starts_again_from_step_0(photos, tmp_path):
    """It said it resumed from the one before, then failed on that one too, for good: nothing was moved aside, and
    every later resume failed alike."""
    run_dir = _run(_request(photos, tmp_path / "all-damaged", max_steps=4, checkpoint_every=2))
    for step in (2, 4):
        (run_dir / f"checkpoints/checkpoint-{step}" / STATE_FILE).write_text('{"step": ')
    _run(_settings(run_dir, max_steps=5, resume="latest"))
    warnings = _warnings(run_dir)
    assert [w.split(": ")[1] for w in warnings[:2]] == [f"cannot load {run_dir}/checkpoints/checkpoint-{step}"
                                                       for step in (4, 2)]
    assert all(w.endswith("is damaged (Expecting value: line 1 column 10 (char 9)); passed over") for w in warnings[:2])
    assert "resume: no checkpoint of this run loads; it starts again from step 0" in warnings
    assert _steps_after_resume(run_dir) == (0, [1, 2, 3, 4, 5])
    (moved,) = (run_dir / runs.CHECKPOINTS / runs.ABANDONED).iterdir()  # kept, out of the way
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert runs.read_run_json(run_dir)["state"] == "done"


def test_a_state_file_without_a_step_is_a_damaged_checkpoint(photos, tmp_path):
    trained = _run(_request(photos, tmp_path / "state", max_steps=4, checkpoint_every=2))
    for n, (text, why) in enumerate((("[]", "its step is None"), ("{}", "its step is None"),
                                     ('{"step": -5}', "its step is -5"), ('{"step": "4"}', "its step is '4'"),
                                     ('{"step": true}', "its step is True"))):
        run_dir = shutil.copytree(trained, tmp_path / f"case{n}")
        (run_dir / "checkpoints/checkpoint-4" / STATE_FILE).write_text(text)
        _run(_settings(run_dir, output=str(run_dir), max_steps=5, resume="latest"))
        damaged = run_dir / "checkpoints/checkpoint-4"
        assert _warnings(run_dir)[-2] == (f"resume: cannot load {damaged}: {STATE_FILE} is damaged ({why}, not a whole "
                                          "number from 1); passed over")
        assert _steps_after_resume(run_dir) == (2, [3, 4, 5])


def test_checkpoint_of_another_layout_names_the_flags(photos, tmp_path):
    run_dir = _run(_request(photos, tmp_path / "layout", max_steps=1))
    checkpoint = run_dir / "checkpoints/checkpoint-1"
    # launch refuses these settings up front; the trainer's own message is for a checkpoint it cannot check
    changes = ((dict(rank=8), "size mismatch for "), (dict(train_text_encoder=True), "(no trainable_1.safetensors)"))
    for change, words in changes:
        with pytest.raises(CheckpointError) as err:
            train(_settings(run_dir, max_steps=2, resume="latest", **change), run_dir)
        message = str(err.value)
        assert message.startswith(f"resume: cannot load {checkpoint}: ") and words in message and "\n" not in message
        flags = "--rank, --method or --train-text-encoder" if "rank" in change else "--method or --train-text-encoder"
        assert message.endswith(f"; was {flags} changed?")
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [1] and runs.run_output(run_dir)[0] == "lora"


def test_a_full_disk_at_validation_warns_and_training_goes_on(photos, tmp_path, monkeypatch):
    from PIL import Image

    real_save = Image.Image.save

    def full_disk(self, path, *args, **kwargs):
        if "validation" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    run_dir = _run(_request(photos, tmp_path / "v", max_steps=2, validation_prompt="sks dog", validation_every=1))
    assert _warnings(run_dir) == [f"validation images of step {n} not saved: No space left on device" for n in (1, 2)]
    assert runs.read_run_json(run_dir)["state"] == "done" and (run_dir / runs.LORA_FILE).is_file()


def test_a_full_disk_at_the_export_keeps_the_checkpoint_and_a_resume_saves_the_result(photos, tmp_path, monkeypatch):
    from backend.training import trainer as trainer_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "export", full_disk)
        prepared = prepare_run(_request(photos, tmp_path / "x", max_steps=2, checkpoint_every=5))
        assert trainer_process.main([str(prepared.run_dir)]) == 1
    data = runs.read_run_json(prepared.run_dir)
    assert data["state"] == "failed" and data["error"] == (
        f"the result was not saved in {prepared.run_dir}: No space left on device; checkpoint-2 is kept: "
        "free some space, then resume with --resume latest (ctrl+r on the Train screen)")
    assert [s for s, _ in runs.list_checkpoints(prepared.run_dir)] == [2]
    _run(_settings(prepared.run_dir, resume="latest"))  # the same max_steps: nothing to train, the result saved
    assert runs.read_run_json(prepared.run_dir)["state"] == "done" and (prepared.run_dir / runs.LORA_FILE).is_file()
    assert _steps_after_resume(prepared.run_dir) == (2, [])


def test_an_event_the_full_disk_cannot_take_is_left_out_whole_and_said_later(tmp_path):
    """A torn line in events.jsonl would swallow the next event; a full disk must not stop the run either."""
    writer = runs.EventWriter(tmp_path)
    writer(TrainLog(level="info", message="first"))
    size = (tmp_path / runs.EVENTS).stat().st_size
    with disk_full_after(size + 20):  # 20 bytes of the next line fit
        writer(TrainLog(level="info", message="x" * 100))
        writer(TrainLog(level="info", message="y" * 100))
    assert (tmp_path / runs.EVENTS).stat().st_size == size
    writer(TrainLog(level="info", message="last"))
    assert [e.message for e in _events(tmp_path)] == ["first", "2 events were not written here (the disk was full)",
                                                      "last"]


def test_a_run_folder_removed_mid_run_fails_the_run_and_is_not_made_again(photos, tmp_path):
    """Its checkpoints went with it: training on into a new folder would leave a run.json without settings."""
    from backend.training.trainer import TrainingError

    prepared = prepare_run(_request(photos, tmp_path / "gone", max_steps=3, checkpoint_every=1))
    removed = lambda: shutil.rmtree(prepared.run_dir, ignore_errors=True) or False  # noqa: E731
    with pytest.raises(TrainingError, match="was removed or moved while training; stopped"):
        train(prepared.request, prepared.run_dir, should_stop=removed)
    assert not prepared.run_dir.exists()
    assert runs.effective_state(prepared.run_dir) == ("failed", f"{prepared.run_dir} is gone (removed or moved?)")
    prepared.run_dir.mkdir()
    gone = prepared.run_dir / runs.RUN_JSON
    assert runs.effective_state(prepared.run_dir)[1] == f"{gone} is gone (removed or moved?)"


def _folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / runs.CHECKPOINTS).iterdir())


def _cut_short(checkpoint: Path) -> None:
    weights = checkpoint / "trainable_0.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def test_a_resume_from_an_older_checkpoint_moves_the_branch_it_leaves_aside(photos, tmp_path):
    """The first run's checkpoint-6 is not the newest work once a run resumed from step 4: latest and pruning
    must not see it (else pruning removes the new branch's checkpoints and latest continues the old one)."""
    run_dir = _run(_request(photos, tmp_path / "branch", max_steps=6, checkpoint_every=2))
    assert _folders(run_dir) == ["checkpoint-4", "checkpoint-6"]

    _run(_settings(run_dir, max_steps=5, checkpoint_every=1, lr=3e-5, resume=str(run_dir / "checkpoints/checkpoint-4")))
    assert _folders(run_dir) == [runs.ABANDONED, "checkpoint-4", "checkpoint-5"]
    (moved,) = (run_dir / runs.CHECKPOINTS / runs.ABANDONED).iterdir()
    assert _warnings(run_dir)[-1] == f"resume from step 4: checkpoint-6 (of the branch left behind) moved to {moved}"
    assert [p.name for p in moved.iterdir()] == ["checkpoint-6"]
    assert json.loads((moved / "checkpoint-6" / STATE_FILE).read_text())["step"] == 6  # kept whole

    _run(_settings(run_dir, max_steps=7, resume="latest"))
    assert _steps_after_resume(run_dir) == (5, [6, 7])  # the newest work, not the first run's step 6
    assert _folders(run_dir) == [runs.ABANDONED, "checkpoint-6", "checkpoint-7"]
    assert len(list((run_dir / runs.CHECKPOINTS / runs.ABANDONED).iterdir())) == 1  # nothing more moved

    # the abandoned branch taken up again: its run's settings are checked, and the branch it leaves goes aside whole
    with pytest.raises(RequestError, match="^train_text_encoder: the checkpoint was trained with False, not True"):
        prepare_run(_settings(run_dir, max_steps=7, train_text_encoder=True, resume=str(moved / "checkpoint-6")))
    _run(_settings(run_dir, max_steps=7, resume=str(moved / "checkpoint-6")))
    assert _steps_after_resume(run_dir) == (6, [7])
    first, second = sorted((run_dir / runs.CHECKPOINTS / runs.ABANDONED).iterdir())
    assert first == moved and sorted(p.name for p in second.iterdir()) == ["checkpoint-6", "checkpoint-7"]
    assert _folders(run_dir) == [runs.ABANDONED, "checkpoint-7"]


def test_a_damaged_checkpoint_passed_over_is_moved_aside_and_not_kept_instead_of_a_good_one(photos, tmp_path):
    run_dir = _run(_request(photos, tmp_path / "cut", max_steps=4, checkpoint_every=2))
    _cut_short(run_dir / "checkpoints/checkpoint-4")

    _run(_settings(run_dir, max_steps=8, checkpoint_every=1, resume="latest"), should_stop=lambda: True)
    assert _steps_after_resume(run_dir) == (2, [3])
    assert _folders(run_dir) == [runs.ABANDONED, "checkpoint-2", "checkpoint-3"]  # keep 2: both load
    (moved,) = (run_dir / runs.CHECKPOINTS / runs.ABANDONED).iterdir()
    assert [p.name for p in moved.iterdir()] == ["checkpoint-4"]


def test_pruning_keeps_the_newest_checkpoints_that_load(photos, tmp_path):
    """A damaged checkpoint among the newest is not one of the --keep-checkpoints kept (nor removed early)."""
    run_dir = _run(_request(photos, tmp_path / "keep", max_steps=4, checkpoint_every=1, keep_checkpoints=3))
    _cut_short(run_dir / "checkpoints/checkpoint-3")

    _run(_settings(run_dir, max_steps=5, resume="latest"))
    assert _steps_after_resume(run_dir) == (4, [5])
    assert _folders(run_dir) == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_a_checkpoint_is_on_the_disk_before_its_rename_and_the_rename_before_older_ones_go(photos, tmp_path,
                                                                                           monkeypatch):
    """Nothing was flushed: a power cut soon after a save could leave the new checkpoint's files empty, the older
    ones already pruned."""
    from backend.training import checkpoints

    synced: list[Path] = []
    real_replace, real_prune = checkpoints.os.replace, checkpoints._prune
    monkeypatch.setattr(checkpoints, "_fsync", synced.append)
    monkeypatch.setattr(checkpoints.os, "replace", lambda a, b: (synced.append(("rename", Path(b))),
                                                                  real_replace(a, b))[-1])
    monkeypatch.setattr(checkpoints, "_prune", lambda run_dir, keep: (synced.append("prune"), real_prune(run_dir,
                                                                                                      keep))[-1])
    run_dir = _run(_request(photos, tmp_path / "run", max_steps=2, checkpoint_every=1, keep_checkpoints=1))
    final = runs.list_checkpoints(run_dir)[-1][1]
    rename = synced.index(("rename", final))
    files = {path.relative_to(final) for path in final.rglob("*")} | {Path(".")}
    tmp = final.with_name(f".tmp-{final.name}")
    assert {path.relative_to(tmp) for path in synced[:rename] if isinstance(path, Path) and path.is_relative_to(tmp)
            } == files  # every file and folder of it, itself too, before it is renamed into place
    assert synced[rename + 1:rename + 3] == [final.parent, "prune"]  # the rename is on the disk before a prune


def test_a_run_whose_pid_a_kernel_thread_took_reads_as_ended(tmp_path):
    """A kernel thread's cmdline is empty, as a process's while it execs: one that took a killed trainer's pid
    kept its run "running" for ever (a resume refused, its device held)."""
    kthread = next((pid for pid in (2, 3, 4) if Path(f"/proc/{pid}/stat").is_file()
                    and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[6]) & runs.PF_KTHREAD),
                   None)
    if kthread is None:
        pytest.skip("needs Linux procfs with a kernel thread at pid 2, 3 or 4")
    assert not runs.pid_alive(kthread, tmp_path / "run")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": "running", "pid": kthread, "created": 0})
    assert runs.effective_state(run_dir)[0] == "failed"


def test_only_the_runs_own_trainer_keeps_it_running(tmp_path):
    """Any process with "accelerate" or "backend.training" on its command line kept a run "running": another
    accelerate job, or another run's trainer, that took an ended trainer's pid held it (a resume refused, its
    device held) until that one ended too."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    for run_dir in (mine, other):
        run_dir.mkdir()
    (tmp_path / "link").symlink_to(mine)  # the runs folder lists a run made elsewhere through a link

    def process(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])

    procs = {"accelerate": process("accelerate", "launch", "train.py"),
             "other": process("-m", runs.TRAINER_MODULE, str(other)),
             "mine": process("-m", runs.TRAINER_MODULE, str(mine))}
    try:
        for name, proc in procs.items():
            runs.write_json_atomic(mine / runs.RUN_JSON, {"state": "running", "pid": proc.pid, "created": 0})
            assert runs.effective_state(mine)[0] == ("running" if name == "mine" else "failed"), name
            assert runs.pid_alive(proc.pid, tmp_path / "link") == (name == "mine"), name
        assert runs.pid_alive(procs["other"].pid, other)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_stop_asked_of_a_run_folder_that_takes_no_file_is_one_line(tmp_path):
    from backend.training.launch import request_stop

    with pytest.raises(RequestError, match=r"^output: cannot ask the trainer to stop: .*/gone/STOP: No such file or "
                                           r"directory; send it SIGTERM instead \(it stops as asked\)$"):
        request_stop(tmp_path / "gone")
