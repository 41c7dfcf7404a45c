"""Training runs through ``dreamtty serve``, with real processes: ``dreamtty train`` waits for a job
on the service's only device and says so, the API's run routes refuse bad input in one line."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest
import numpy as np
from PIL import Image

from backend.events import Step
from backend.training.config import TrainRequest
from test_run_schedule import FAKE_TRAINER
from test_serve import ROOT, _request, cli, client, dirs, service, shared  # noqa: F401 (fixtures)


def _photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 50 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _train_args(photos: Path, run_dir: Path) -> list[str]:
    return ["train", "--model", "demo", "--instance-dir", str(photos), "--instance-prompt", "a photo of sks toy",
            "--resolution", "64", "--output", str(run_dir), "--launcher", FAKE_TRAINER]


async def _line(stream: asyncio.StreamReader, words: str, seen: list[str]) -> str:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 120)).decode()
        assert line, f"no line with {words!r} in: {seen}"
        seen.append(line)
        if words in line:
            return line


async def _ended(follower, run_id: int):
    """The run once its service has seen its trainer end (it checks every second)."""
    deadline = time.monotonic() + 60
    while (run := next(r for r in await follower.runs() if r.id == run_id)).state != "ended":
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.2)
    return run


async def test_train_waits_for_the_running_job_and_says_so(service, tmp_path):
    photos, run_dir = _photos(tmp_path / "photos"), tmp_path / "run"
    follower = client(service)
    events = follower.subscribe()
    try:
        job = await follower.submit(_request(steps=500, width=256, height=256), service.out)  # cancelled below
        while not isinstance(event := await asyncio.wait_for(events.get(), 120), Step) or event.job != job:
            pass
        train = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tui.cli", *_train_args(photos, run_dir), env=service.env(), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen: list[str] = []
        line = await _line(train.stderr, "waiting for", seen)
        assert line.strip() == (f"dreamtty: waiting for the CPU: job {job} is running; the run starts when it is "
                                "free (Ctrl-C takes it off the queue)")
        assert json.loads((run_dir / "run.json").read_text())["state"] == "waiting"
        (scheduled,) = [r for r in await follower.runs() if r.path == str(run_dir.resolve())]
        assert scheduled.state == "waiting" and scheduled.waiting_for == f"the CPU: job {job} is running"
        await follower.cancel(job)
        line = await _line(train.stderr, "training on", seen)
        assert line.startswith("dreamtty: training on the CPU (pid ")
        (run_dir / "GO").touch()
        out, err = await asyncio.wait_for(train.communicate(), 120)
        assert train.returncode == 0, "".join(seen) + err.decode()
        assert out.decode().strip() == str(run_dir.resolve() / "lora" / "pytorch_lora_weights.safetensors")
        assert (await _ended(follower, scheduled.id)).outcome == "done"
    finally:
        await follower.close()


async def test_detached_train_while_another_run_trains(service, tmp_path):
    photos = _photos(tmp_path / "photos")
    first = subprocess.run([sys.executable, "-m", "tui.cli", *_train_args(photos, tmp_path / "first"), "--detach"],
                           env=service.env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    second = subprocess.run([sys.executable, "-m", "tui.cli", *_train_args(photos, tmp_path / "second"), "--detach"],
                            env=service.env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and "training in the background (pid" in first.stderr, first.stderr
    assert second.returncode == 0 and "queued: it starts when the CPU is free;" in second.stderr, second.stderr
    assert second.stdout.strip() == str((tmp_path / "second").resolve())
    follower = client(service)
    try:
        runs = {Path(r.path).name: r for r in await follower.runs()}
        assert runs["second"].waiting_for == "the CPU: training run first"
        assert await follower.stop_run(runs["second"].id) and await follower.stop_run(runs["first"].id)
        assert [(await _ended(follower, runs[name].id)).outcome for name in ("first", "second")] == ["stopped"] * 2
    finally:
        await follower.close()


async def test_run_routes_refuse_bad_input_in_one_line(service, tmp_path):
    photos = _photos(tmp_path / "photos")
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(service.files().socket))) as http:
        async def post(body) -> tuple[int, dict]:
            async with http.post("http://dreamtty/v1/runs", json=body) as r:
                return r.status, await r.json()

        settings = {"model": "demo", "instance_dir": str(photos), "instance_prompt": "a photo of sks toy"}
        for body, field in (({"request": settings, "gpu": 1}, "gpu"), ({}, "request"),
                            ({"request": {**settings, "rankk": 4}}, "rankk"),
                            ({"request": {**settings, "instance_dir": str(tmp_path / "none")}}, "instance_dir"),
                            ({"request": settings, "devices": "gpu"}, "devices"),
                            ({"request": settings, "devices": 3}, "devices"),
                            ({"request": settings, "runs_root": "relative"}, "runs_root"),
                            ({"request": settings, "runs_root": "/tmp/a\0b"}, "runs_root"),
                            ({"request": {**settings, "instance_dir": "photos"}}, "instance_dir"),  # the service's cwd
                            ({"request": {**settings, "output": "run"}}, "output"),
                            ({"request": {**settings, "output": "latest"}}, "output"),  # as resume's word
                            ({"request": {**settings, "output": str(tmp_path / "r\0")}}, "output"),
                            ({"request": settings, "devices": "cuda:99"}, "devices")):
            status, answer = await post(body)
            assert status == 400 and answer["field"] == field and "\n" not in answer["error"], (body, answer)
        said = "request: expected an object of the run's settings, got a number"
        assert (await post({"request": 5}))[1]["error"] == said
        relative = {**settings, "output": str(tmp_path / "r"), "resume": "r/checkpoints/checkpoint-1"}  # the service's
        assert (await post({"request": relative}))[1]["error"] == "resume: must be an absolute folder path"  # cwd's
        async with http.get("http://dreamtty/v1/runs/999") as r:
            assert r.status == 404 and (await r.json())["error"] == "run 999: no such run"
        async with http.get("http://dreamtty/v1/runs?state=paused") as r:
            assert r.status == 400 and (await r.json())["field"] == "state"
        async with http.get("http://dreamtty/v1/runs") as r:
            assert r.status == 200 and all(Path(run["path"]).parent != tmp_path for run in (await r.json())["runs"])



async def test_a_run_whose_answer_is_lost_to_ctrl_c_is_found_by_its_ref_and_stopped(service, tmp_path, monkeypatch):
    """Ctrl-C after the service queued the run but before the answer came back: the client finds the run
    by the client_ref it sent and stops it, as it would one whose answer came."""
    from backend.remote_client import RemoteClient

    run_dir = tmp_path / "run"
    request = TrainRequest(model="demo", instance_dir=str(_photos(tmp_path / "photos")), output=str(run_dir),
                           instance_prompt="a photo of sks toy", resolution=64)
    answered = RemoteClient._request

    async def interrupted(self, method, path, body=None, quick=False, **params):
        answer = await answered(self, method, path, body, quick, **params)
        if (method, path) == ("POST", "/v1/runs"):
            raise asyncio.CancelledError  # the run is queued; the answer never reaches the caller
        return answer

    monkeypatch.setattr(RemoteClient, "_request", interrupted)
    lost = client(service)
    try:
        with pytest.raises(asyncio.CancelledError):
            await lost.start_run(request, launcher=FAKE_TRAINER)
        (run,) = [r for r in await lost.runs() if r.path == str(run_dir.resolve())]
        assert len(run.client_ref) == 32 and (await _ended(lost, run.id)).outcome == "stopped"
    finally:
        await lost.close()


@pytest.mark.parametrize("cancels", [False, True], ids=["service's server", "handler cancelled on hang-up"])
async def test_a_run_whose_client_hangs_up_before_the_answer_is_not_started(tmp_path, demo_dirs, monkeypatch, cancels):
    """Ctrl-C while the service checks the run: the folder it made reads "stopped", and nothing is
    queued, whether or not aiohttp cancels the request's handler when its client goes."""
    from aiohttp import web

    from backend import http_server
    from backend.api import Api
    from backend.service import Service
    from backend.training import launch, runs
    from test_tui import NoWorkers

    prepare = launch.prepare_run

    def slow_prepare(*args):
        prepared = prepare(*args)
        time.sleep(1.0)  # the folder is made; the answer is not back yet
        return prepared

    monkeypatch.setattr(launch, "prepare_run", slow_prepare)
    db = tmp_path / "queue.sqlite3"
    owner = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await owner.start()
    app = Api(owner, token="t").app
    runner = web.AppRunner(app, handler_cancellation=True) if cancels else http_server.make_runner(app)
    await runner.setup()
    folder = tempfile.mkdtemp(dir="/tmp")  # a socket path under 104 bytes; a launcher is taken over it only
    await web.UnixSite(runner, f"{folder}/s.sock").start()
    run_dir = tmp_path / "run"
    body = {"request": {"model": "demo", "instance_dir": str(_photos(tmp_path / "photos")), "output": str(run_dir),
                        "instance_prompt": "a photo of sks toy", "resolution": 64}, "launcher": FAKE_TRAINER}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(f"{folder}/s.sock")) as http:
            with pytest.raises(asyncio.TimeoutError):  # the client gives up (Ctrl-C) and closes its connection
                await http.post("http://service/v1/runs", json=body, timeout=aiohttp.ClientTimeout(total=0.5))
        deadline = time.monotonic() + 20
        while runs.read_run_json(run_dir).get("state") != "stopped":
            assert time.monotonic() < deadline, runs.read_run_json(run_dir)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert owner.training.listing() == [] and runs.effective_state(run_dir) == ("stopped", None)
    finally:
        await runner.cleanup()
        await owner.close()
        shutil.rmtree(folder)


def test_a_train_that_starts_the_service_says_so(dirs, tmp_path):
    """The service it starts outlives it, holding what it loads: said, as generate says it."""
    from backend.training import runs

    photos, run_dir = _photos(tmp_path / "photos"), tmp_path / "run"
    try:
        started = cli(dirs, *_train_args(photos, run_dir), "--detach", "--device", "cpu")
        assert started.returncode == 0, started.stderr
        pid = dirs.files().read_pid_file()["pid"]
        assert (f"dreamtty: started the service in the background (pid {pid}); it stays, keeping models loaded for "
                "the next command: dreamtty serve --stop ends it") in started.stderr.splitlines()
    finally:
        (run_dir / runs.STOP_FILE).touch()  # the stand-in trainer waits for it (it outlived the test by minutes)


def test_a_relative_checkpoint_to_resume_is_sent_absolute_though_it_is_missing(tmp_path, monkeypatch):
    """It went as typed (only paths that exist were made absolute), and the service said "resume: must be an
    absolute folder path" where the checkpoint was missing."""
    from backend.remote_client import _train_paths_for_service
    from backend.training.config import TrainRequest

    monkeypatch.chdir(tmp_path)
    request = TrainRequest(model="demo", instance_dir="photos", instance_prompt="sks", output="run",
                           resume="run/checkpoints/checkpoint-99")
    assert _train_paths_for_service(request).resume == str(tmp_path / "run/checkpoints/checkpoint-99")
    assert _train_paths_for_service(TrainRequest(resume="latest")).resume == "latest"


def test_a_launcher_s_program_is_found_on_the_caller_s_path(tmp_path, monkeypatch):
    """The service looked it up on its own PATH: `accelerate` of a virtualenv activated after the service started
    was "no such program"."""
    from backend.remote_client import _program_found_here

    program = tmp_path / "bin" / "accelerate"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(program.parent))
    assert _program_found_here("accelerate launch --num_processes 2") == f"{program} launch --num_processes 2"
    assert _program_found_here("nowhere launch") == "nowhere launch"  # the service says it is missing
    assert _program_found_here("accelerate 'launch") == "accelerate 'launch"  # and that its quote is not closed
    assert _program_found_here(None) is None
