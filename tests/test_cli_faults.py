"""Bad input and faults around the headless CLI: option placement, devices, output and state
folders, a damaged queue, Ctrl-C. Each bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import sqlite3
import stat
import subprocess
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from backend import devices, locations
from backend.errors import DreamttyError, RequestError
from backend.queue_store import QueueStore
from image_helpers import write_image
from tui import cli, cli_jobs
from tui.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def generated(monkeypatch) -> list:
    """``generate`` builds its request but queues nothing; (request, args) pairs land in the list."""
    seen: list = []
    monkeypatch.setattr(cli_jobs, "cmd_generate", lambda args: seen.append((cli_jobs.request_from_args(args), args)))
    return seen


def _one_error(capsys, *parts: str) -> None:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(p in err for p in parts), err


@pytest.fixture
def gpus(tmp_path, monkeypatch):
    """``gpus(n)``: pretend this is Linux whose NVIDIA driver lists ``n`` GPUs, and no GPU device nodes."""

    def make(count: int) -> None:
        folder = tmp_path / f"nvidia-{count}"
        folder.mkdir()
        for n in range(count):
            (folder / f"0000:0{n}:00.0").mkdir()
        monkeypatch.setattr(devices, "_NVIDIA_GPUS", folder)

    (tmp_path / "dev").mkdir()
    monkeypatch.setattr(devices, "_DEV", tmp_path / "dev")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return make


# -- 1: global options after the subcommand ------------------------------------------
def test_global_options_after_the_subcommand(generated, tmp_path):
    assert main(["generate", "--out", str(tmp_path), "a fox", "--model", "demo-xl", "--steps", "2"]) == 0
    assert main(["generate", "--model", "demo", "a red fox", "--steps", "3"]) == 0
    assert main(["--model", "demo-xl", "--out", str(tmp_path / "o"), "generate", "a hen", "--device", "cpu"]) == 0
    assert [(r.prompt, r.model, a.out, a.device) for r, a in generated] == [
        ("a fox", "demo-xl", tmp_path, "auto"), ("a red fox", "demo", None, "auto"), ("a hen", "demo-xl", tmp_path / "o", "cpu")]
    args = cli.build_parser().parse_args(["--config", "app.yaml", "train", "--model", "demo", "--config", "t.yaml"])
    assert (args.config, args.train_config, args.train_model) == (Path("app.yaml"), Path("t.yaml"), "demo")
    for argv, model in ((["--model", "x", "describe", "a.png"], "x"), (["describe", "a.png", "--model", "y"], "y"),
                        (["describe", "a.png"], None)):  # describe's own --model left out keeps the global one
        assert cli.build_parser().parse_args(argv).model == model, argv


def test_flags_without_their_subject_are_warned_about(generated, capsys):
    assert main(["generate", "a fox", "--model", "demo-xl", "--refiner-switch", "0.6"]) == 0
    assert capsys.readouterr().err == ("dreamtty: warning: refiner_switch: unused without a refiner (--refiner); "
                                       "ignored\n")
    assert main(["generate", "a fox", "--model", "demo-xl", "--refiner", "demo-xl", "--refiner-switch", "0.6"]) == 0
    assert capsys.readouterr().err == ""
    assert [r.refiner_switch for r, _ in generated] == [0.6, 0.6]
    assert main(["generate", "a fox", "--model", "demo", "--show-preprocessed"]) == 0
    assert capsys.readouterr().err == ("dreamtty: warning: show_preprocessed: there is no image prompt "
                                       "(--image-prompt) to show; ignored\n")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["samplers"], ["styles", "list", "--json"]])
def test_a_full_disk_under_stdout_is_one_line(argv):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "tui.cli", *argv], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=120)
    assert (r.returncode, r.stderr) == (1, "dreamtty: stdout: cannot write (No space left on device)\n")


@pytest.mark.parametrize("argv", [["samplers", "extra"], ["cancel", "--json"], ["--local", "jobs", "extra"]])
def test_extra_argument_is_unrecognized_by_its_subcommand(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_error(capsys, f"dreamtty {argv[-2]}: error: unrecognized arguments: {argv[-1]}")


@pytest.mark.parametrize("argv,prog", [
    (["--config", " ", "generate", "x"], "dreamtty"),  # not the working folder
    (["vary", "in.png", "--strength", ""], "dreamtty vary"),
    (["generate", "x", "--size", " "], "dreamtty generate"),
    (["inpaint", "in.png", "--box", ""], "dreamtty inpaint"),
])
def test_an_empty_option_is_refused_not_read_as_its_default(argv, prog, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    flag = next(arg for arg, value in zip(argv, argv[1:]) if not value.strip())
    error = f"{prog}: error: argument {flag}: is empty; give a value or leave the option out\n"
    assert capsys.readouterr().err == error


# -- 7: silent overrides ----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--demo", "generate", "x", "--model", "demo-xl"], "model: --demo and --model demo-xl conflict"),
        (["generate", "x", "--model", ""],
         "model: is empty; use demo, demo-xl, a checkpoint name (dreamtty models list), a .safetensors file"),
        (["generate", "x", "--model", "   "], "model: is empty"),
        (["generate", "x", "--out", ""], "out: is empty"),
    ],
)
def test_conflicting_or_empty_options(argv, message, generated, capsys):
    assert main(argv) == 2
    _one_error(capsys, message)
    assert generated == []


# -- 2: devices ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x", "cuda:0,", ""])
def test_device_syntax(device, generated, capsys):
    assert main(["generate", "x", "--device", device]) == 2
    _one_error(capsys, "device:", "allowed; use auto, cpu, cuda or cuda:N[,cuda:M...]")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:0,cuda:1"])
def test_cuda_without_a_gpu_is_refused_up_front(device, gpus, generated, capsys):
    gpus(0)
    assert main(["generate", "x", "--device", device]) == 2
    _one_error(capsys, "device: cuda", "is not available; this machine has no CUDA GPU (use auto or cpu)")
    assert generated == []


def test_cuda_index_beyond_the_gpus(gpus, generated, capsys):
    gpus(2)
    assert main(["generate", "x", "--device", "cuda:1,cuda:0"]) == 0
    assert main(["generate", "x", "--device", "cuda:2"]) == 2
    _one_error(capsys, "device: cuda:2 is not available; this machine has cuda:0, cuda:1")


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="--cluster needs Ray")
def test_cluster_workers_take_auto_or_cpu_not_this_machines_gpus(gpus, generated, capsys, tmp_path):
    """With --cluster the GPUs are the cluster's: cuda:N was checked against this machine (no GPU here,
    refused as missing; one here, taken as every GPU of the cluster). A training run's are this machine's."""
    gpus(0)
    assert main(["--cluster", "auto", "generate", "x", "--device", "cuda:1"]) == 2
    _one_error(capsys, "device: cuda:1 names GPUs of this machine; on a Ray cluster use auto")
    assert main(["--cluster", "auto", "generate", "x", "--device", "cpu"]) == 0
    assert main(["--cluster", "auto", "train", "--device", "cuda:0"]) == 2
    _one_error(capsys, "device: cuda:0 is not available; this machine has no CUDA GPU")
    assert [a.cluster for _, a in generated] == ["auto"]
    config = tmp_path / "ray.yaml"
    config.write_text("workers: ray\n")  # a cluster the config names: the same (the service refused to start)
    assert main(["--config", str(config), "generate", "x", "--device", "cuda:1"]) == 2
    _one_error(capsys, "device: cuda:1 names GPUs of this machine; on a Ray cluster use auto")


@pytest.mark.parametrize("visible,count", [("1", 1), ("", 0), ("-1", 0), ("0,7,1", 1), ("GPU-1a2b,GPU-3c4d", 2)])
def test_cuda_visible_devices_narrows_the_gpus(visible, count, gpus, monkeypatch):
    gpus(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert devices.visible_gpus() == count


@pytest.mark.parametrize("node", [None, "nvidia0", "kfd", "dxg"])
def test_gpus_without_the_driver_list(node, gpus, tmp_path, monkeypatch):
    """No driver list: GPU device nodes (NVIDIA, ROCm, WSL) leave the check to the worker; none means no GPU."""
    gpus(0)
    monkeypatch.setattr(devices, "_NVIDIA_GPUS", tmp_path / "no-such-list")
    if node is None:
        assert devices.visible_gpus() == 0
    else:
        (tmp_path / "dev" / node).touch()
        assert devices.visible_gpus() is None
        assert devices.check_devices("cuda:3") == ["cuda:3"]


# -- 3: output folder ------------------------------------------------------------------------
def test_out_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file.png"
    blocker.write_bytes(b"x")
    assert main(["generate", "x", "--model", "demo", "--out", str(blocker)]) == 2
    _one_error(capsys, f"out: {blocker} is a file")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_unwritable_out_is_refused_before_queueing(capsys):
    """/sys/kernel exists and passes ``os.access`` for root, yet nothing can be created in it."""
    before = [j.id for j in QueueStore(locations.queue_db()).jobs()]
    assert main(["generate", "x", "--model", "demo", "--out", "/sys/kernel"]) == 2
    _one_error(capsys, "out: cannot create /sys/kernel/")
    assert [j.id for j in QueueStore(locations.queue_db()).jobs()] == before


# -- 6: state folder -------------------------------------------------------------------------
def test_home_that_is_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "home").write_text("")
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))
    assert main(["--model", "demo", "generate", "a"]) == 2
    _one_error(capsys, f"DREAMTTY_HOME: {tmp_path / 'home'} is a file")


def test_home_that_cannot_be_created(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", "/proc/nope")
    assert main(["--model", "demo", "generate", "a"]) == 2
    _one_error(capsys, "DREAMTTY_HOME: cannot create /proc/nope")


def test_queue_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "state").write_text("")
    with pytest.raises(DreamttyError, match="^queue: .*state is a file; give a folder$"):
        QueueStore(tmp_path / "state" / "queue.sqlite3")
    with pytest.raises(DreamttyError, match="^queue: cannot create .*state/sub: Not a directory; give a writable folder$"):
        QueueStore(tmp_path / "state" / "sub" / "queue.sqlite3")


# -- 5: damaged queue -------------------------------------------------------------------------
def _truncated_queue(path: Path) -> bytes:
    store = QueueStore(path)
    for _ in range(500):
        store.add("generate", {"request": {"prompt": "x" * 500}}, owner=1)
    store.close()
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_queue_is_moved_aside(damage, tmp_path):
    db = tmp_path / "queue.sqlite3"
    content = b"not a database at all " * 100 if damage == "garbage" else _truncated_queue(db)
    db.write_bytes(content)
    store = QueueStore(db)
    (moved,) = tmp_path.glob("queue.sqlite3.corrupt-*")
    assert moved.read_bytes() == content
    if damage == "garbage":
        assert store.warnings == [f"queue: {db} is damaged (file is not a database); moved it to {moved.name} and "
                                  "started an empty queue"]
        assert store.jobs() == [] and store.add("generate", {}, owner=1) == 1
    else:  # the jobs on the pages left are kept, with their ids; one cut in half is failed, saying so
        kept = [job for job in store.jobs() if job.state == "queued"]
        assert store.warnings[0] == (f"queue: {db} is damaged (database disk image is malformed); moved it to "
                                     f"{moved.name} and started a new queue with the {len(store.jobs())} jobs it "
                                     "could read")
        assert 200 < len(kept) < 250 and kept[-1].id == 1 and all(j.request == {"prompt": "x" * 500} for j in kept)
        assert all("in the queue file; it cannot run" in j.error for j in store.jobs() if j.state != "queued")
        assert store.add("generate", {}, owner=1) > kept[0].id
    store.close()
    db.write_bytes(content)
    QueueStore(db).close()
    assert len(list(tmp_path.glob("queue.sqlite3.corrupt-*"))) == 2  # never overwritten


def test_unopenable_queue_is_left_alone(tmp_path):
    db = tmp_path / "state" / "queue.sqlite3"
    db.mkdir(parents=True)
    with pytest.raises(DreamttyError, match="queue: cannot open .*queue.sqlite3: unable to open"):
        QueueStore(db)
    assert list(db.parent.iterdir()) == [db] and db.is_dir()


def test_cli_warns_about_a_damaged_queue(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    locations.queue_db().parent.mkdir(parents=True)
    locations.queue_db().write_bytes(b"garbage" * 100)
    (tmp_path / "file").touch()
    assert main(["generate", "x", "--model", "demo", "--out", str(tmp_path / "file")]) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"dreamtty: warning: queue: {locations.queue_db()} is damaged")
    assert error.endswith("is a file; give a folder")
    assert list(locations.queue_db().parent.glob("queue.sqlite3.corrupt-*"))


@pytest.mark.parametrize("argv", [["jobs"], ["cancel", "1"]])
def test_listing_or_cancelling_warns_about_a_damaged_queue_once(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))  # no service runs: the queue is read here
    locations.queue_db().parent.mkdir(parents=True)
    locations.queue_db().write_bytes(b"garbage" * 100)
    main(argv)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"dreamtty: warning: queue: {locations.queue_db()} is damaged")


def test_a_row_that_does_not_read_is_listed_failed_and_cancel_goes_past_a_missing_id(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))  # no service runs: the queue is read here
    store = QueueStore(locations.queue_db())
    broken, erred, queued = (store.add("generate", {"request": {"prompt": p}}, owner="gone") for p in "abc")
    store.set_state(erred, "failed", "line one\nline two")
    with sqlite3.connect(locations.queue_db()) as conn:  # while the store is open, as by another program
        conn.execute("UPDATE jobs SET created = 'yesterday' WHERE id = ?", (broken,))
    assert [j.id for j in store.jobs(("queued",))] == [queued] and store.next_queued("gone").id == queued
    store.close()
    with sqlite3.connect(locations.queue_db()) as conn:  # unread yet by the next store
        conn.execute("UPDATE jobs SET state = 'queued', error = NULL WHERE id = ?", (broken,))
    assert main(["jobs"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"dreamtty: warning: queue: job {broken} has an id, time, owner, error or attempt "
                                f"count of the wrong type in {locations.queue_db()}; marked it failed"]
    lines = out.splitlines()
    assert lines[1].split()[:2] == [str(queued), "queued"] and "no running process holds it" in lines[2]  # no lease
    assert lines[3].split()[:2] == [str(erred), "failed"]
    assert lines[4].strip() == "line one\\nline two" and lines[5].split()[:2] == [str(broken), "failed"]
    assert "in the queue file; it cannot run" in lines[6] and len(lines) == 7
    assert main(["cancel", "99999", str(queued), str(queued)]) == 2  # an id given twice is cancelled once
    out, err = capsys.readouterr()
    assert out == f"job {queued} cancelled\n" and err == "dreamtty: job 99999: no such job\n"
    assert QueueStore(locations.queue_db()).get(queued).state == "cancelled"


def test_jobs_lists_a_describe_job_as_text_not_missing_images(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))  # no service runs: the queue is read here
    store = QueueStore(locations.queue_db())
    described, drawn = store.add("describe", {"request": {"image": "/a.png"}}, "x"), store.add("generate", {
        "request": {"prompt": "p", "count": 2}}, "x")
    for job in (described, drawn):
        store.set_state(job, "done")
    store.close()
    assert main(["jobs"]) == 0
    rows = {int(line.split()[0]): line.split()[2:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[described][0] == "describe" and rows[described][3] == "text" and rows[drawn][3] == "0/2"


def test_cancel_all_cancels_every_active_job_and_needs_ids_or_all(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))  # no service runs: the queue is read here
    store = QueueStore(locations.queue_db())
    jobs = [store.add("generate", {"request": {"prompt": p}}, "gone") for p in "abcd"]
    store.set_state(jobs[0], "done")
    store.close()
    for argv, said in ((["cancel"], "give the ids of the jobs to cancel, or --all (every queued and running job)"),
                       (["cancel", "--all", str(jobs[1])], "give the ids of the jobs to cancel or --all (every queued "
                                                            "and running job), not both")):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"dreamtty: cancel: {said}\n"
    assert main(["cancel", "--all"]) == 0 and capsys.readouterr().out == "3 jobs cancelled\n"
    assert [QueueStore(locations.queue_db()).get(j).state for j in jobs] == ["done", *["cancelled"] * 3]
    assert main(["cancel", "--all"]) == 1 and capsys.readouterr().err == "dreamtty: no job is queued or running\n"


def test_jobs_forget_drops_the_jobs_ended_long_ago_and_keeps_their_images(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))  # no service runs: the queue is read here
    store = QueueStore(locations.queue_db())
    old, recent, queued = (store.add("generate", {"request": {"prompt": p}}, "gone") for p in "abc")
    (tmp_path / "old.png").write_bytes(b"png")
    store.add_output(old, str(tmp_path / "old.png"))
    for job in (old, recent):
        store.set_state(job, "done")
    store.close()
    with sqlite3.connect(locations.queue_db()) as conn:
        conn.execute("UPDATE jobs SET updated = updated - 40 * 86400 WHERE id = ?", (old,))
    assert main(["jobs", "--forget", "30"]) == 0 and capsys.readouterr().out == "1 ended job forgotten\n"
    kept = QueueStore(locations.queue_db())
    assert kept.get(old) is None and kept.get(recent).state == "done" and (tmp_path / "old.png").exists()
    assert main(["jobs", "--forget", "0"]) == 0 and capsys.readouterr().out == "1 ended job forgotten\n"
    assert [job.id for job in QueueStore(locations.queue_db()).jobs()] == [queued]  # never an active one
    assert main(["jobs", "--forget", "-1"]) == 2
    assert capsys.readouterr().err == "dreamtty: forget: -1 is negative; give a number of days (0 or more)\n"


def test_jobs_and_cancel_wait_for_a_service_that_holds_its_lock_without_answering(tmp_path, monkeypatch, capsys):
    """A service stopping (its workers ending) or starting holds its lock with no socket answering: jobs and
    cancel wait for it, then read the queue here; one that never settles is one line after SETTLE_PATIENCE."""
    from backend.service_files import ServiceFiles
    from tui import cli_queue

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.delenv("DREAMTTY_LOCAL", raising=False)
    run = tempfile.mkdtemp(prefix="dt-", dir="/tmp")  # a socket path under 104 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", run)
    files = ServiceFiles.default()
    files.make_folder()
    store = QueueStore(locations.queue_db())
    first, second = (store.add("generate", {"request": {"prompt": p}}, owner="gone") for p in "ab")
    store.close()
    held, made = files.acquire(), []
    real_client = cli_queue._client

    def client(args):  # the stopping service exits once a first try found it not answering
        made.append(args)
        if len(made) == 2:
            os.close(held)
        return real_client(args)

    monkeypatch.setattr(cli_queue, "_client", client)
    assert main(["cancel", str(first), str(second)]) == 0
    assert capsys.readouterr() == (f"job {first} cancelled\njob {second} cancelled\n", "") and len(made) == 2
    monkeypatch.setattr(cli_queue, "_client", real_client)
    monkeypatch.setattr(cli_queue, "SETTLE_PATIENCE", 0.5)
    held = files.acquire()
    try:
        assert main(["jobs"]) == 3  # not bad input: nothing answers
    finally:
        os.close(held)
    assert capsys.readouterr().err.startswith(f"dreamtty: service: none is running at {files.socket}")
    shutil.rmtree(run)


def test_the_queue_is_private(tmp_path):
    db = tmp_path / "queue.sqlite3"
    db.touch(mode=0o644)  # made by an older dreamtty
    store = QueueStore(db)
    store.add("generate", {"request": {"prompt": "a secret"}}, owner=1)
    files = [db, *tmp_path.glob("queue.sqlite3-*")]
    assert len(files) == 3 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    store.close()
    (tmp_path / "new").mkdir()
    QueueStore(tmp_path / "new" / "queue.sqlite3").close()
    assert stat.S_IMODE((tmp_path / "new" / "queue.sqlite3").stat().st_mode) == 0o600


@pytest.mark.parametrize("argv, said", [
    (["jobs", "--limit", "\u0663"], "invalid integer value"),
    (["generate", "x", "-n", "\u0663"], "count: '\u0663' is not a number (write it in ASCII digits); allowed 1..64"),
    (["generate", "x", "--cfg", "\u0667.5"], "cfg: '\u0667.5' is not a number; allowed 0..30"),
    (["jobs", "--limit", "1_0"], "invalid integer value"),  # 10 to int() and float()
    (["generate", "x", "--cfg", "1_0"], "cfg: '1_0' is not a number; allowed 0..30")])
def test_numbers_in_other_scripts_digits_are_refused(argv, said, capsys):
    """int() reads "٣" as 3: `cancel ٣` acted on job 3 (see also the test of job ids)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["\u0663,1,1", "1_0,1,1"])
def test_a_list_of_numbers_in_other_scripts_digits_is_refused(scale, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "x", "--adm-scale", scale])
    assert exit_.value.code == 2 and "is not a comma-separated list of numbers" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["inpaint", "x.png", "--box", "\u0661,0,8,8"], "box: '\u0661,0,8,8' is not X,Y,W,H"),
    (["inpaint", "x.png", "--box", "0,0," + "9" * 5000 + ",8"], "box: a number of 5000 digits is out of range"),
    (["vary", "x.png", "--strength", "\u0661"], "strength: '\u0661' is not a number"),
    (["train", "--rank", "\u0661"], "rank: '\u0661' is not a number (write it in ASCII digits)"),
    (["generate", "x", "--lora", "ink:\u0660.5"], "lora: 'ink:\u0660.5': weight must be a number"),
    (["--cluster", "h:\u0661\u0662", "jobs"], "cluster: "),
    (["serve", "--listen", "127.0.0.1:\u0661\u0662"], "listen: "),
])
def test_other_scripts_digits_are_refused_by_every_field(argv, message, tmp_path, monkeypatch, capsys):
    """Some fields took "١" for 1 (int() and float() read it) where the options' own types refused it."""
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "x.png")
    assert main([*argv, "--local"] if argv[0] != "serve" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dreamtty: {message}") and err.count("\n") == 1, err


def test_a_local_job_s_out_folder_that_is_not_utf8_is_refused_before_it_runs(tmp_path, monkeypatch, capsys):
    """--local ran the job and saved the image, then failed it: the queue cannot record a path that is not UTF-8."""
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))
    out = tmp_path / "o\udcff"  # the byte 0xff of a file name, as Python reads it
    assert main(["generate", "x", "--model", "demo", "--steps", "1", "--size", "64x64", "--local", "--out",
                 str(out)]) == 2
    _one_error(capsys, "out: is not valid UTF-8 text (byte 0xff at character")
    assert not os.path.lexists(out)


def test_a_list_that_starts_with_a_minus_is_a_value(capsys):
    """argparse took "-1,1,0.5" for an option: "expected one argument" instead of the range."""
    assert main(["generate", "x", "--model", "demo-xl", "--local", "--adm-scale", "-1,1,0.5"]) == 2
    _one_error(capsys, "adm_scale: -1,1,0.5 is out of range")


def test_huge_job_ids_and_limits_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    huge = "99999999999999999999"
    assert main(["cancel", huge]) == 2
    _one_error(capsys, f"job {huge}: no such job")
    assert main(["jobs", "--limit", huge]) == 2
    _one_error(capsys, "limit: 99999999999999999999 is out of range")
    assert main(["jobs", "--limit", "0"]) == 2
    _one_error(capsys, "limit: 0 is out of range")


def test_a_job_a_killed_process_left_running_is_listed_as_such(tmp_path, monkeypatch, capsys):
    """A ``--local`` generate killed with SIGKILL left its job "running" in ``jobs`` for ever, nothing said."""
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    store = QueueStore(locations.queue_db())
    job = store.add("generate", {"request": {"prompt": "killed"}}, owner="gone")
    store.set_state(job, "running")
    store.close()
    assert main(["jobs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == [str(job), "running"] and out[2] == (
        "        no running process holds it (its service stopped, or was killed): a running dreamtty serve or TUI "
        f"takes it, else the next (dreamtty cancel {job} drops it)")  # "killed?" after a clean serve --stop too
    assert main(["jobs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["orphaned"] is True


def test_tui_leaves_a_damaged_queue_warning_on_the_terminal(tmp_path, monkeypatch, capsys):
    import tui.app

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    locations.queue_db().parent.mkdir(parents=True)
    locations.queue_db().write_bytes(b"garbage" * 100)
    monkeypatch.setattr(tui.app.DreamttyApp, "run", lambda self: None)  # it notifies too: see test_tui
    monkeypatch.setenv("TEXTUAL_DRIVER", "textual.drivers.headless_driver:HeadlessDriver")  # pytest has no tty
    assert main(["--demo"]) == 0
    assert capsys.readouterr().err.startswith(f"dreamtty: warning: queue: {locations.queue_db()} is damaged")


# -- 4: Ctrl-C ------------------------------------------------------------------------------
_SIGNALS = {"ctrl-c": lambda proc: os.killpg(proc.pid, signal.SIGINT),  # a terminal's: the group, workers too
            "kill": lambda proc: proc.send_signal(signal.SIGTERM),
            # GNU timeout: the command, then its group; the second SIGTERM interrupted the first one's cleanup (a
            # traceback, the job left running) and the worker died leaving a semaphore (a resource tracker warning)
            "timeout": lambda proc: (proc.send_signal(signal.SIGTERM), os.killpg(proc.pid, signal.SIGTERM))}


@pytest.mark.parametrize("how", _SIGNALS)
def test_ctrl_c_or_sigterm_cancels_the_job_in_the_queue(tmp_path, demo_dirs, how):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "generate", "x", "--model", "demo", "--steps", "500", "--size", "256x256",
         "--device", "cpu", "--out", str(tmp_path), "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    job = None
    for line in proc.stdout:  # a terminal's Ctrl-C reaches the whole process group, workers included
        event = json.loads(line)
        job = event["job"] if event["type"] == "queued" else job
        if event["type"] == "step":
            _SIGNALS[how](proc)
            break
    assert proc.wait(timeout=60) == 130
    assert proc.stderr.read() == "dreamtty: interrupted\n"
    assert QueueStore(locations.queue_db()).get(job).state == "cancelled"


def test_a_burst_of_signals_is_one_interrupt_and_a_later_one_another(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    interrupt = cli.Interrupt()
    with pytest.raises(KeyboardInterrupt):
        interrupt(signal.SIGTERM, None)
    now[0] += 0.01
    assert interrupt(signal.SIGTERM, None) is None  # the same burst: the cleanup goes on
    now[0] += cli.Interrupt.DUPLICATE
    with pytest.raises(KeyboardInterrupt):  # a later one (train: leave the trainer running)
        interrupt(signal.SIGTERM, None)


_WHILE_LOADING = ("import builtins, sys\n"
                  "load = builtins.__import__\n"
                  "def interrupted(name, *args, **kwargs):\n"
                  "    if name == 'backend.samplers' and 'tui.entry' in sys.modules:\n"
                  "        raise KeyboardInterrupt\n"
                  "    return load(name, *args, **kwargs)\n"
                  "builtins.__import__ = interrupted\n")
_WHILE_PARSING = ("import sys, tui.cli\n"
                  "tui.cli.parse_args = lambda argv: (_ for _ in ()).throw(KeyboardInterrupt())\n")


@pytest.mark.parametrize("setup", [_WHILE_LOADING, _WHILE_PARSING], ids=["loading", "parsing"])
def test_ctrl_c_while_the_command_loads_is_one_line(setup):
    """As if Ctrl-C came while ``dreamtty``'s modules load, or while it reads its arguments."""
    code = setup + "from tui.entry import main\nsys.exit(main())\n"
    out = subprocess.run([sys.executable, "-c", code, "jobs"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (130, "dreamtty: interrupted\n")


def test_what_an_in_process_service_logs_is_a_dreamtty_warning_line():
    """A ``--local`` command's service logs, e.g., that it cannot renew its lease: a ``dreamtty: warning:`` line on
    stderr, escaped (Python's last-resort handler printed the bare message, control characters and all)."""
    code = ("import logging, sys\nfrom tui.cli import main\nmain(['samplers'])\nlogging.getLogger('backend.service')"
            ".warning(\"cannot renew this service's lease: %s\", 'x\\x1b[2J\\ny')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stderr == "dreamtty: warning: cannot renew this service's lease: x\\x1b[2J\\ny\n"


# -- 8: models pull ---------------------------------------------------------------------------
@pytest.mark.parametrize("repo", ["a b", "", "../../etc", "a/b/c"])
def test_pull_refuses_invalid_ids(repo, capsys):
    assert main(["models", "pull", repo]) == 2
    _one_error(capsys, f"id: {repo!r} is not a valid Hugging Face id (owner/name)")


def test_models_help_names_only_existing_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    out = capsys.readouterr().out
    assert "list models and pull them" in out and "inspect" not in out


@pytest.mark.parametrize("argv, words", [
    (["generate", "a fox", "--size", "²x64"], "size: '²x64' is not WxH"),
    (["generate", "a fox", "--freeu", "1,2,3"], "freeu: needs 4 comma-separated numbers, got 3"),
    (["generate", "a fox", "--adm-scale", "1,2"], "adm_scale: needs 3 comma-separated numbers, got 2"),  # the field
    (["generate", "a fox", "--freeu", "a,b,c,d"], "freeu: 'a,b,c,d' is not a comma-separated list of numbers"),
    (["generate", "a fox", "--adm-scale", "1,,1"], "adm_scale: '1,,1' has an empty value between commas"),  # "got 2"
    (["generate", "a fox", "--freeu", "1,2,3,4,"], "freeu: '1,2,3,4,' has an empty value after its last comma"),
    (["generate", "a fox", "--sag", "abc"], "argument --sag: sag: 'abc' is not a number; allowed 0..10"),
    (["generate", "a fox", "--cfg", "-inf"], "cfg: -inf is not a finite number; allowed 0..30"),  # "expected one"
    (["generate", "a fox", "--seed", "-nan"],
     "argument --seed: seed: '-nan' is not a whole number"),  # as -n (count) "an"
    (["vary", "x.png", "--seed", "1.5"], "seed: '1.5' is not a whole number; allowed -1..4294967295"),  # no range
    (["inpaint", "x.png", "--box", "1,1,2,2", "--context", "nan"], "context: nan is not a finite number; allowed 0..1"),
    (["inpaint", "x.png", "--box", "1,1,2,2", "--feather", "1e309"],
     "feather: '1e309' is out of range; allowed 0..256"),
    (["outpaint", "x.png", "--feather", "2.5"], "feather: '2.5' is not a whole number; allowed 0..256"),
    (["generate", "a fox", "-n", "-1"], "count: -1 is"),
    (["generate", "a fox", "--clip-skip", "1.5"], "clip_skip: '1.5' is not a whole number; allowed 1..12"),
    (["generate", "a fox", "--pag", "\u0663"], "pag: '\u0663' is not a number; allowed 0..20"),
    (["train", "--out", "runs/x"], "out: is where generated images go; give the run folder with --output RUN_DIR"),
])
def test_more_bad_flags_are_one_line_errors(capsys, argv, words):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_an_error_naming_a_path_with_a_newline_stays_one_line(tmp_path, capsys):
    path = tmp_path / "new\nline\x1b[31m.png"
    assert main(["reproduce", str(path)]) == 2
    assert capsys.readouterr().err == f"dreamtty: image: {tmp_path}/new\\nline\\x1b[31m.png is missing\n"


def test_wait_and_attach_refuse_an_in_process_service(monkeypatch, capsys):
    """They follow the jobs of ``dreamtty serve``: with --local or DREAMTTY_LOCAL there are none to follow."""
    assert main(["wait", "1", "--local"]) == 2
    monkeypatch.setenv("DREAMTTY_LOCAL", "1")
    assert main(["attach"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dreamtty: {verb}: follows the jobs of dreamtty serve; drop --local / DREAMTTY_LOCAL" for verb in ("wait", "attach")]


def test_dreamtty_local_reads_true_and_false_words(monkeypatch):
    """``DREAMTTY_LOCAL=false`` (any value but 0) turned local mode on."""
    from backend.client import is_local

    for value, local in (("", False), ("0", False), ("false", False), ("No", False), ("off", False),
                         ("1", True), ("true", True), (" yes ", True)):
        monkeypatch.setenv("DREAMTTY_LOCAL", value)
        assert is_local() is local, value
    monkeypatch.setenv("DREAMTTY_LOCAL", "banana")
    with pytest.raises(DreamttyError, match="^DREAMTTY_LOCAL: 'banana' is not true or false$"):
        is_local()
    assert main(["jobs"]) == 2  # a command that reads the queue file passed over it


async def test_a_job_that_moved_to_another_service_exits_3_saying_how_to_follow_it(capsys):
    """Another service took the job over while this one renewed no lease: its follower here says where it went and
    exits 3 (try again: ``dreamtty wait`` follows it there), not 1 as if it had failed."""
    from backend.events import Done, ImageSaved, Moved
    from backend.queue_store import JobTaken

    class Fake:
        async def wait(self, job_id, events):
            if job_id == 7:
                yield Moved(job=7, message=str(JobTaken(7)))
            else:
                yield ImageSaved(job=job_id, image=0, seed=1, path="/out/a.png")
                yield Done(job=job_id, paths=["/out/a.png"])

    assert await cli_jobs.follow(Fake(), [7], None, False) == (3, [])
    err = capsys.readouterr().err
    assert err.startswith("dreamtty: job 7 moved: another dreamtty service took it over") and err.count("\n") == 1
    assert err.endswith("it goes on there (dreamtty wait 7)\n")
    assert await cli_jobs.follow(Fake(), [6], None, False) == (0, ["/out/a.png"])


def test_cancel_says_cancelled_once_a_running_job_has_stopped(monkeypatch, capsys):
    """A running job stops after its current step: cancel asks every job first, then waits for the running
    ones together; one still running past CANCEL_WAIT is said as such, and one that ended done before the
    cancel reached it as an error (exit 1)."""
    import asyncio

    from backend.events import Cancelled, Done, Started
    from tui import cli_queue

    ends = {5: Cancelled(job=5), 6: None, 7: Done(job=7, paths=[])}  # 6 never stops; 8 is queued
    states = {5: "running", 6: "running", 7: "running", 8: "queued"}
    calls: list = []

    class Fake:
        warnings: list = []

        async def job(self, job_id):
            return states.get(job_id)

        async def cancel(self, job_id):
            calls.append(("cancel", job_id))
            return True

        async def cancel_all(self):
            return list(states)

        async def active_states(self):
            return dict(states)

        async def wait(self, job_id):
            calls.append(("wait", job_id))
            yield Started(job=job_id)
            await asyncio.sleep(0.2 if ends[job_id] else 60)
            states[job_id] = ends[job_id].type
            yield ends[job_id]

        async def close(self):
            pass

    monkeypatch.setattr(cli_queue, "_client", lambda args: Fake())
    monkeypatch.setattr(cli_queue, "CANCEL_WAIT", 1.0)
    assert main(["cancel", "5", "7"]) == 1
    assert capsys.readouterr() == ("job 5 cancelled\n", "dreamtty: job 7 ended done before the cancel reached it\n")
    assert states[5] == "cancelled" and calls == [("cancel", 5), ("cancel", 7), ("wait", 5), ("wait", 7)]
    states[5] = states[7] = "running"
    assert main(["cancel", "--all"]) == 1
    out, err = capsys.readouterr()
    assert out == ("2 jobs cancelled\n"
                   "job 6: cancel asked; not seen to stop within 1 s (a running job stops after its current step)\n")
    assert err == "dreamtty: job 7 ended done before the cancel reached it\n"


# -- 9: a config that cannot be read ------------------------------------------------------------
def test_a_config_option_naming_a_file_that_cannot_be_used_is_one_error(tmp_path, capsys):
    """``--config LOOP`` once died in Path.resolve() (RuntimeError); then a --config that could not be read
    (a typo, a folder, a loop) was a warning, and the command ran on the defaults: the settings given were lost."""
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    (tmp_path / "list.yaml").write_text("- a\n")
    for name, problem in (("loop1", f"cannot read {tmp_path}/loop1: Too many levels of symbolic links"),
                          ("missing.yaml", f"{tmp_path}/missing.yaml does not exist"),
                          ("list.yaml", f"{tmp_path}/list.yaml must be a mapping of keys, got a list")):
        assert main(["--config", str(tmp_path / name), "samplers"]) == 2
        assert capsys.readouterr() == ("", f"dreamtty: config: {problem}\n")
    assert main(["--config", "/" + "a" * 5000, "samplers"]) == 2
    assert len(capsys.readouterr().err) < 2100  # cut, as every error
    warning = f"dreamtty: config: cannot read {tmp_path}/loop1: Too many levels of symbolic links; using defaults\n"
    assert main(["--config", str(tmp_path / "loop1"), "config", "path"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path}/loop1\n"
    assert captured.err == warning  # said once


def test_the_tui_starts_with_a_config_it_has_yet_to_write(tmp_path, monkeypatch):
    """A command refuses an unusable --config; the TUI starts (it writes the file when a setting is saved)."""
    import tui.app

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setattr(tui.app.DreamttyApp, "run", lambda self: None)
    monkeypatch.setenv("TEXTUAL_DRIVER", "textual.drivers.headless_driver:HeadlessDriver")  # pytest has no tty
    assert main(["--demo", "--config", str(tmp_path / "new.yaml")]) == 0


def test_config_path_says_a_config_that_links_to_itself_cannot_be_read(tmp_path, monkeypatch, capsys):
    """Path.exists() calls a symlink loop missing: "it does not exist yet" was wrong."""
    monkeypatch.delenv("DREAMTTY_CONFIG")
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").symlink_to("config.yaml")
    assert main(["config", "path"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path}/config/config.yaml\n"
    assert captured.err == (f"dreamtty: config: cannot read {tmp_path}/config/config.yaml: Too many levels of "
                            "symbolic links; using defaults\n")
    (tmp_path / "config" / "config.yaml").unlink()
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().err == "(it does not exist yet: the defaults apply)\n"
    (tmp_path / "config" / "config.yaml").mkdir()
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().err == (f"dreamtty: config: cannot read {tmp_path}/config/config.yaml: is a folder; "
                                       "using defaults\n")


@pytest.mark.parametrize("text, warning", [
    ("1: a\nfoo: b\n", "unknown keys 1, 'foo'; allowed: paths, default_model"),
    ("~: 1\nfoo: 2\n", "unknown keys null, 'foo'; allowed: paths, default_model"),
    ("yes: 1\nfoo: 2\n", "unknown keys true, 'foo'; allowed: paths, default_model"),
    ("paths:\n  1: [a]\n  foo: [b]\n", "paths.1: unknown kind; allowed: checkpoints, loras"),
    (f"paths:\n  loras: [/{'a' * 300}]\n",
     f"paths.loras: /{'a' * 300} cannot be searched: File name too long; ignored"),
])
def test_a_config_every_command_reads_warns_and_the_command_runs(tmp_path, capsys, text, warning):
    """Mixed-type unknown keys (sorted() raised TypeError) and a folder name too long (Path.exists() raised)
    made every command die with a traceback."""
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["--config", str(config), "samplers"]) == 0
    captured = capsys.readouterr()
    assert "euler" in captured.out and "Traceback" not in captured.err
    assert f"dreamtty: config: {warning}" in captured.err.splitlines()[0]


@pytest.mark.parametrize("setting, message", [
    ({"steps": 0}, "steps: 0 is out of range; allowed 1..500"),
    ({"sampler": "nosuch"}, "sampler: unknown 'nosuch'"),
    ({"model": "/no/such/model"}, "model: /no/such/model does not exist"),
    ({"guidance": {"sag": -3.0}}, "sag: -3.0 is out of range"),
    ({"cfg": math.nan}, "cfg: nan is not a finite number"),  # "its settings are not used": its prompt was lost
    ({"guidance": {"sag": math.inf}}, "sag: inf is not a finite number"),
])
def test_an_error_in_a_setting_the_input_image_carried_says_so(setting, message, tmp_path, monkeypatch, capsys):
    """``vary photo.png`` refused "steps: 0 is out of range": a value the user never typed, with no word of
    where it came from; the same value typed is refused without the note, another typed value overrides it."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from backend import metadata
    from backend.request import GenerateRequest

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    made = GenerateRequest(prompt="a fox", model="demo", steps=2).resolved("demo").to_dict()
    for key, value in setting.items():
        made[key] = {**made[key], **value} if key == "guidance" else value
    info, path = PngInfo(), tmp_path / "made [b].png"
    info.add_text(metadata.CHUNK, json.dumps({"kind": "generate", "family": "demo", "request": made, "prompt": {}}))
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    assert main(["vary", str(path), "--local"]) == 2
    _one_error(capsys, message, f"(the setting of the input image {path}; give another value to override it)")
    flag, value = next(iter(setting.items()))
    if flag == "guidance":
        flag, value = next(iter(value.items()))
    try:
        code = main(["vary", str(path), "--local", f"--{flag}", str(value)])
    except SystemExit as exc:  # argparse's own errors: a number that is not finite
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "input image" not in err


def test_an_outputs_folder_the_config_or_environment_names_is_said_to_come_from_it(tmp_path, monkeypatch, capsys):
    """A bad paths.outputs stopped generate with "out: ...": a flag the user never typed."""
    monkeypatch.delenv("DREAMTTY_OUTPUTS", raising=False)  # the tests' own
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"paths:\n  outputs: {blocker / 'sub'}\n")
    argv = ["--config", str(config_file), "generate", "x", "--model", "demo", "--local"]
    assert main(argv) == 2
    _one_error(capsys, f"out: cannot create {blocker / 'sub'}", f"(paths.outputs of {config_file}; give --out FOLDER")
    monkeypatch.setenv("DREAMTTY_OUTPUTS", str(blocker))
    assert main(argv) == 2
    _one_error(capsys, "is a file; give a folder (DREAMTTY_OUTPUTS; give --out FOLDER, or change it)")
    assert main([*argv, "--out", str(blocker)]) == 2  # given: no note
    err = capsys.readouterr().err
    assert err.endswith("is a file; give a folder\n") and "DREAMTTY_OUTPUTS" not in err


def test_a_default_model_that_does_not_exist_is_said_to_be_the_default(tmp_path, monkeypatch, capsys):
    """``model: nosuch does not exist`` after a command with no --model: the name came from the config."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text("default_model: nosuch\n")
    assert main(["--config", str(config_file), "generate", "x", "--local"]) == 2
    _one_error(capsys, "model: nosuch does not exist", f"(default_model of {config_file}; give --model NAME, or change")
    monkeypatch.setenv("DREAMTTY_DEFAULT_MODEL", "other")
    assert main(["vary", str(write_image(tmp_path / "in.png")), "--local"]) == 2
    _one_error(capsys, "model: other does not exist", "(DREAMTTY_DEFAULT_MODEL; give --model NAME, or change it)")
    assert main(["generate", "x", "--local", "--model", "typed"]) == 2
    assert "DREAMTTY_DEFAULT_MODEL" not in capsys.readouterr().err


def test_a_model_name_this_process_cannot_resolve_is_left_to_the_service(monkeypatch, tmp_path):
    """A service started with another config (another model library) knows names this client does not: the
    client refused ``--model mine`` as missing before the service was asked."""
    queued = []

    async def run_jobs(args, requests, out):
        queued.extend(requests)
        return 0, []

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.setattr(cli_jobs, "_run_jobs", run_jobs)
    assert main(["generate", "x", "--model", "mine", "--size", "64x64"]) == 0
    assert [request.model for request in queued] == ["mine"]


def test_upscale_fast_with_a_strength_is_refused(tmp_path, capsys):
    """``upscale --fast --strength 0.5`` recorded the strength of a repainting pass it never ran."""
    image = write_image(tmp_path / "in.png")
    with pytest.raises(SystemExit) as exit_:
        main(["upscale", str(image), "--fast", "--strength", "0.5"])
    assert exit_.value.code == 2
    _one_error(capsys, "argument --strength: not allowed with argument --fast")


@pytest.mark.parametrize("argv", [["cancel", "-1"], ["wait", "0"], ["cancel", "1", "x"], ["wait", "\u0661"]])
def test_a_job_id_that_is_no_number_1_or_more_is_refused_before_any_service_is_asked(argv, capsys):
    """``cancel -1`` went to the service and came back as the API's "job: '-1' is not a whole number of digits"."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_error(capsys, f"argument ID: {argv[-1]!r} is not a job id; give a number 1 or more")


@pytest.mark.parametrize("listen, error", [
    ("::1:7860", "listen: '::1:7860': an IPv6 address goes in brackets, as in [::1]:7860"),  # it was taken
    ("[::1:7860", "listen: '[::1:7860': an IPv6 address goes in brackets, as in [::1]:7860"),
    ("nowhere", "listen: 'nowhere' is not HOST:PORT (e.g. 127.0.0.1:7860)"),
    ("[:80", "listen: '[:80': an IPv6 address goes in brackets, as in [::1]:7860"),
    ("foo]:80", "listen: 'foo]:80': an IPv6 address goes in brackets, as in [::1]:7860"),
    ("h\x1b[31m:80", "listen: 'h\\x1b[31m:80': 'h\\x1b[31m' is not a host name or address"),  # "brackets"
    ("127.0.0.1:99999", "listen: '127.0.0.1:99999': port 99999 is out of range; allowed 1..65535"),
    ("127.0.0.1:0", "listen: '127.0.0.1:0': port 0 is out of range; allowed 1..65535"),
])
def test_a_listen_address_a_url_cannot_hold_is_refused(listen, error):
    from backend.serve import parse_listen

    with pytest.raises(RequestError, match=re.escape(error)):
        parse_listen(listen)
    assert parse_listen("[::1]:7860") == ("::1", 7860) and parse_listen("localhost:80") == ("localhost", 80)


async def test_the_service_log_line_of_an_event_sets_its_detail_apart():
    """``job 33 retrying worker actor died``: the reason ran on from the event's name."""
    import asyncio
    from types import SimpleNamespace

    from backend.events import Moved, Queued, Retrying, WorkerReady
    from backend.serve import _log_events

    events: asyncio.Queue = asyncio.Queue()
    for event in (Queued(job=3, kind="generate", request={}), Retrying(job=3, error="worker actor died", first_image=0),
                  WorkerReady(worker=0, device="cpu", cuda_count=0), Moved(job=3, message="another service took it")):
        events.put_nowait(event)
    said: list[str] = []
    logging = asyncio.create_task(_log_events(SimpleNamespace(subscribe=lambda: events), said.append))
    async with asyncio.timeout(5):
        while len(said) < 4:
            await asyncio.sleep(0.01)
    logging.cancel()
    assert said == ["dreamtty: job 3 queued", "dreamtty: job 3 retrying: worker actor died",
                    "dreamtty: worker 0 ready: cpu", "dreamtty: job 3 moved: another service took it"]


def test_a_newline_in_an_argument_forges_no_error_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["samplers", "b\nsecond line: dreamtty: fake"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("dreamtty samplers: error: unrecognized arguments: "
                                       "b\\nsecond line: dreamtty: fake\n")


def test_the_plain_http_warning_is_one_line(capsys):
    from tui.cli_output import warn_plain_http

    warn_plain_http("0.0.0.0\n", "0.0.0.0\n:80")
    assert capsys.readouterr().err.startswith("dreamtty: serving plain HTTP on 0.0.0.0\\n:80, the token in clear;")


def test_the_train_hints_are_one_line_and_their_commands_shell_quoted(tmp_path, monkeypatch, capsys):
    from backend.run_schedule import TRAINING, ScheduledRun
    from backend.training import runs
    from tui import cli_train

    run_dir = tmp_path / "r [b]\nx"
    run = ScheduledRun(id=1, path=str(run_dir), devices=["cpu"], launcher=None, state=TRAINING, pid=7, owner="s",
                       created=0.0, updated=0.0)

    async def schedule(args, request):
        return run

    monkeypatch.setattr(cli_train, "request_from_args", lambda args: None)
    monkeypatch.setattr(cli_train, "_schedule", schedule)
    assert main(["train", "--output", str(run_dir), "--detach"]) == 0
    quoted = f"'{tmp_path}/r [b]\\nx"
    assert capsys.readouterr().err == (
        f"dreamtty: training in the background (pid 7); follow it in the TUI (F3) or {tmp_path}/r [b]\\nx/"
        f"{runs.EVENTS}; stop it there (ctrl+t) or with: touch {quoted}/{runs.STOP_FILE}'\n")
    run_dir.mkdir()
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": "stopped", "step": 3, "settings": {}})
    assert cli_train.follow(run_dir, cli_train.Trainer(None, run_dir)) == 1
    assert capsys.readouterr().err == (f"dreamtty: stopped at step 3; continue with dreamtty train --output {quoted}' "
                                       "--resume latest\n")


@pytest.mark.parametrize("argv,said", [
    (["--local", "train", "--output", "~nosuchuser-dt/run", "--resume", "latest"],
     "dreamtty: resume: ~nosuchuser-dt/run holds no run to continue; "),
    (["--local", "train", "--model", "demo", "--instance-dir", "~nosuchuser-dt/photos", "--instance-prompt", "x"],
     "dreamtty: instance_dir: ~nosuchuser-dt/photos does not exist"),
])
def test_a_tilde_of_no_user_is_a_path_as_the_shell_leaves_it_not_a_traceback(capsys, tmp_path, monkeypatch, argv,
                                                                              said):
    """``Path.expanduser`` raises RuntimeError for ``~name`` of no user (the shell passes it on as typed)."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1, err
