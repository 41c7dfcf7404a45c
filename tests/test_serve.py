"""``dreamtty serve`` and its clients with real processes and sockets: the CLI in subprocesses, the
service in its own process (its own DREAMTTY_HOME and XDG_RUNTIME_DIR), the demo model on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from safetensors.numpy import save_file

from backend import locations, remote_client
from backend.api import Api, peer_uid
from backend.errors import DreamttyError, RequestError, ServiceUnavailable
from backend.http_server import MAX_CONNECTIONS
from backend.events import Done, ImageSaved, Queued, Started, Step
from backend.remote_client import Address, RemoteClient
from backend.safetext import error_line
from backend.queue_store import QueueStore
from backend.request import GenerateRequest
from backend.service import Service
from backend.service_files import ServiceFiles

ROOT = Path(__file__).resolve().parents[1]
START = 90  # seconds a service may take to answer (2 shared cores)


@dataclass
class Dirs:
    home: Path
    run: Path  # XDG_RUNTIME_DIR: short, since a socket path has at most ~104 bytes
    out: Path

    def env(self) -> dict:
        env = {**os.environ, "DREAMTTY_HOME": str(self.home), "XDG_RUNTIME_DIR": str(self.run),
               "DREAMTTY_OUTPUTS": str(self.out), "DREAMTTY_CONFIG": str(self.home / "config.yaml")}
        env.pop("DREAMTTY_LOCAL", None)
        return env

    def files(self) -> ServiceFiles:
        """The service files as the service under this home sees them."""
        saved = {k: os.environ.get(k) for k in ("DREAMTTY_HOME", "XDG_RUNTIME_DIR")}
        os.environ.update(DREAMTTY_HOME=str(self.home), XDG_RUNTIME_DIR=str(self.run))
        try:
            return ServiceFiles.default()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _make_dirs(root: Path, dreamtty_home: Path) -> Dirs:
    home = root / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "demo-models").symlink_to(dreamtty_home / "data" / "demo-models")  # built once per session
    (home / "config.yaml").write_text("{}\n")
    run = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))
    return Dirs(home, run, root / "out")


def _stop_any(dirs: Dirs) -> None:
    """Kill the services left running under ``dirs`` (a detached one a test started, and one started at the same
    moment that took the lock as the first stopped), then its folder."""
    files = dirs.files()
    deadline = time.monotonic() + 30
    while files.locked() and time.monotonic() < deadline:
        info = files.read_pid_file()
        if info is None:  # one starting: its pid file comes once it answers
            time.sleep(0.1)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(info["pid"]), signal.SIGTERM)
        stopping = time.monotonic() + 5
        while files.locked() and files.read_pid_file() == info and time.monotonic() < stopping:
            time.sleep(0.1)
        if files.locked() and files.read_pid_file() == info:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(info["pid"]), signal.SIGKILL)
    shutil.rmtree(dirs.run, ignore_errors=True)


@pytest.fixture
def dirs(tmp_path, dreamtty_home, demo_dirs, monkeypatch):
    """A fresh home and runtime dir, also set in this process (for in-process clients)."""
    d = _make_dirs(tmp_path, dreamtty_home)
    _use(d, monkeypatch)
    yield d
    _stop_any(d)


def _use(d: Dirs, monkeypatch) -> None:
    for key in ("DREAMTTY_HOME", "XDG_RUNTIME_DIR", "DREAMTTY_OUTPUTS", "DREAMTTY_CONFIG"):
        monkeypatch.setenv(key, d.env()[key])
    monkeypatch.delenv("DREAMTTY_LOCAL", raising=False)


class ServeProcess:
    """``dreamtty serve --device cpu`` in the foreground of a subprocess."""

    def __init__(self, dirs: Dirs, *args: str) -> None:
        self.dirs = dirs
        self.log = dirs.home / f"serve-{time.monotonic_ns()}.out"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "serve", "--device", "cpu", *args],
                                         env=dirs.env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self) -> "ServeProcess":
        files = self.dirs.files()
        deadline = time.monotonic() + START
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if files.read_pid_file() and _connects(files.socket):
                return self
            time.sleep(0.1)
        raise AssertionError(f"no service after {START} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def shared(tmp_path_factory, dreamtty_home, demo_dirs):
    """One service for the tests that only use it."""
    d = _make_dirs(tmp_path_factory.mktemp("serve"), dreamtty_home)
    service = ServeProcess(d).wait_ready()
    yield d
    service.stop()
    _stop_any(d)


@pytest.fixture
def service(shared, monkeypatch) -> Dirs:
    _use(shared, monkeypatch)
    return shared


def cli(dirs: Dirs, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], env=dirs.env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def client(dirs: Dirs, patience: float | None = 30.0) -> RemoteClient:
    return RemoteClient(Address(socket=dirs.files().socket), start=None, previews=False, patience=patience)


def _request(**fields) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a red fox", "model": "demo", "steps": 4, "width": 64, "height": 64,
                              "seed": 1, **fields})


GENERATE = ("generate", "a red fox", "--demo", "--steps", "4", "--size", "64x64", "--seed", "3")


# -- clients of one service ------------------------------------------------------------
async def test_two_cli_clients_queue_and_a_third_watches(service):
    watcher = client(service)
    events = watcher.subscribe()
    await watcher.start()
    try:
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tui.cli", *GENERATE[:-1], str(seed), env=service.env(), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (11, 12)]
        outputs = [await asyncio.wait_for(p.communicate(), 180) for p in procs]
        seen: list = []
        while not events.empty():
            seen.append(events.get_nowait())
    finally:
        await watcher.close()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()
        assert Path(out.decode().strip()).is_file()
    queued = [e.job for e in seen if isinstance(e, Queued)]
    assert len(queued) == 2
    for job in queued:  # the third client saw each job from queue to done
        kinds = [type(e) for e in seen if getattr(e, "job", None) == job]
        assert kinds[0] is Queued and Started in kinds and ImageSaved in kinds and kinds[-1] is Done


def test_generate_twice_loads_the_model_once(service):
    first, second = cli(service, *GENERATE), cli(service, *GENERATE)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout != second.stdout  # two images, same seed: two files
    status = json.loads(cli(service, "serve", "--status", "--json").stdout)
    (worker,) = status["workers"]
    assert worker["loads"] == 1 and status["service"] == "running" and status["running"] == 0  # jobs running
    assert [m["model"] for m in worker["models"]] == ["demo"] and worker["models"][0]["bytes"] > 0
    text = cli(service, "serve", "--status").stdout
    assert f"pid {status['pid']}" in text and "1 load(s)" in text and "demo (float32" in text


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="--cluster needs Ray (the test extra has it)")
def test_a_device_or_cluster_the_running_service_does_not_use_is_said(service):
    """It was ignored: the job ran on the service's workers, and nothing said so (test_placement_differs: when
    they agree)."""
    other = cli(service, *GENERATE, "--cluster", "127.0.0.1:1")  # no cluster is asked: the job runs on the service's
    assert other.returncode == 0 and Path(other.stdout.strip()).is_file(), other.stderr
    assert other.stderr.strip() == ("dreamtty: warning: service: the running service's workers are on this machine; "
                                    "--cluster 127.0.0.1:1 takes effect when it starts again (dreamtty serve --stop)")


@pytest.mark.parametrize("devices,cluster,status,said", [
    ("auto", None, {"cluster": "ray://h:10001", "workers": []}, None),
    ("cpu", None, {"workers": [{"device": "cpu"}, {"device": "cpu"}]}, None),
    ("cuda:1", None, {"workers": [{"device": "auto"}]}, None),  # not started yet: not known
    ("cuda,cuda:1", None, {"workers": [{"device": "cuda:1"}, {"device": "cuda:0"}]}, None),
    ("cuda:1", None, {"workers": [{"device": "cuda:0"}, {"device": "cuda:1"}]}, "on cuda:0, cuda:1; --device cuda:1"),
    ("cuda:0", None, {"workers": [{"device": "cpu"}]}, "on cpu; --device cuda:0"),
    ("cuda:0", None, {"cluster": "auto", "workers": [{"device": "cuda:0"}]}, None),  # the cluster places them
    ("auto", "auto", {"cluster": "ray://h:10001", "workers": []}, None),
    ("auto", "ray://h:10001", {"cluster": "ray://h:10001", "workers": []}, None),
    ("auto", "ray://g:10001", {"cluster": "ray://h:10001", "workers": []}, "on the Ray cluster ray://h:10001; --clu"),
    ("auto", "local", {"cluster": "ray://h:10001", "workers": []}, "on the Ray cluster ray://h:10001; --cluster local"),
    ("auto", "auto", {"workers": [{"device": "cpu"}]}, "on this machine; --cluster auto"),
    ("auto", "h:6379", {"cluster": "auto", "head": "h:6379", "workers": []}, None),  # the head auto found
])
def test_placement_differs(devices, cluster, status, said):
    from backend.service_status import placement_differs

    found = placement_differs(status, devices, cluster)
    assert (found is None) if said is None else (said in found and found.endswith("(dreamtty serve --stop)")), found


def test_jobs_cancel_and_wait_commands(service):
    made = cli(service, *GENERATE, "-n", "1")
    listing = json.loads(cli(service, "jobs", "--json", "--limit", "1").stdout)
    (job,) = listing
    assert job["state"] == "done" and job["outputs"] == [made.stdout.strip()]
    waited = cli(service, "wait", str(job["id"]))  # an ended job: its images at once
    assert waited.returncode == 0 and waited.stdout.strip() == made.stdout.strip()
    assert str(job["id"]) in cli(service, "jobs").stdout
    done = cli(service, "cancel", str(job["id"]))
    assert done.returncode == 1 and "not queued or running" in done.stderr
    missing = cli(service, "wait", "999999")
    assert missing.returncode == 2 and missing.stderr.strip() == "dreamtty: job 999999: no such job"
    local = cli(service, "--local", "wait", str(job["id"]))
    assert local.returncode == 2 and "drop --local" in local.stderr


def test_a_describe_jobs_text_is_kept_and_read_back(service):
    """Its text was only sent live: `wait` on the ended job, or GET /v1/jobs/ID, had nothing to show."""
    from image_helpers import write_image

    service.out.mkdir(parents=True, exist_ok=True)
    image = write_image(service.out / "in.png")
    described = cli(service, "describe", str(image), "--model", "demo")
    assert described.returncode == 0 and len(described.stdout.split()) == 8, described.stderr
    (job,) = json.loads(cli(service, "jobs", "--json", "--limit", "1").stdout)
    assert job["kind"] == "describe" and job["texts"] == [described.stdout.strip()]
    waited = cli(service, "wait", str(job["id"]))
    assert waited.returncode == 0 and waited.stdout == described.stdout


async def test_bad_bodies_get_one_line_errors_and_queue_nothing(service):
    socket_path = str(service.files().socket)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as http:
        async def post(data: bytes) -> tuple[int, dict]:
            async with http.post("http://dreamtty/v1/jobs", data=data) as r:
                return r.status, await r.json(content_type=None)

        before = len((await (await http.get("http://dreamtty/v1/jobs")).json())["jobs"])
        status, body = await post(b'{"request": {"prompt": ')
        assert status == 400 and body["field"] == "body" and "not valid JSON" in body["error"]
        status, body = await post(json.dumps({"request": {"prompt": "x", "stepz": 4}}).encode())
        assert status == 400 and body["field"] == "stepz" and body["error"].startswith("stepz: unknown field")
        status, body = await post(json.dumps({"request": {}, "priority": 1}).encode())
        assert status == 400 and body["field"] == "priority"
        status, body = await post(json.dumps({"request": {"steps": 0}}).encode())
        assert status == 400 and body["field"] == "steps"
        for data, error in (({"request": {"steps": True}}, "steps: true is not a whole number"),  # JSON's words
                            ({"request": {"model": None}}, "model: must be text, got null"),
                            ({"request": {}, "kind": ["generate"]}, "kind: expected a name, got a list"),
                            ([{"request": {}}], "body: expected a JSON object, got a list")):
            status, body = await post(json.dumps(data).encode())
            assert (status, body["error"]) == (400, error)
        status, body = await post(json.dumps({"request": {}, "out": "relative/dir"}).encode())
        assert status == 400 and body["field"] == "out"
        for kind, request, key, said in (  # read in the service's folder before
                ("img2img", {"image": "in.png"}, "image", "image: 'in.png'"),
                ("inpaint", {"image": "/in.png", "mask": "m.png"}, "mask", "mask: 'm.png'"),
                ("generate", {"image_prompts": [{"path": "/a.png"}, {"path": "ref.png", "type": "canny"}]},
                 "image_prompts", "image_prompts: 2 (canny): 'ref.png'")):  # which reference: numbered
            status, body = await post(json.dumps({"kind": kind, "request": request}).encode())
            assert status == 400 and body["field"] == key
            assert body["error"] == f"{said} is relative; give an absolute path (the service reads it)"
        status, body = await post(json.dumps({"request": {"styles": ["Enhance", "enhance"]}}).encode())  # as the CLI
        assert (status, body["error"]) == (400, "styles: 'enhance' is given twice")
        fast = {"image": "/in.png", "fast": True, "strength": 0.5}  # the CLI refuses --fast --strength too
        status, body = await post(json.dumps({"kind": "upscale", "request": fast}).encode())
        assert (status, body["error"]) == (400, "strength: is unused with fast (the upscaler alone repaints nothing); "
                                                "leave it out or turn fast off")
        status, body = await post(b'{"request": {"prompt": "' + b"x" * (2 << 20) + b'"}}')
        assert status == 413 and body["error"].startswith("body: larger than")
        async with http.get("http://dreamtty/v1/nowhere") as r:
            assert r.status == 404
            assert (await r.json())["error"] == "/v1/nowhere: no such route (docs/api.md lists them)"
        async with http.delete("http://dreamtty/v1/jobs/1") as r:
            assert r.status == 405 and (await r.json())["error"] == "DELETE /v1/jobs/1: not allowed; use GET,HEAD"
        async with http.get("http://dreamtty/v1/jobs/abc") as r:
            assert r.status == 400 and (await r.json())["field"] == "job"
        for request in ({"model": "nosuch"}, {}):
            status, body = await post(json.dumps({"request": request, "out": "/proc/nope"}).encode())
            assert status == 400 and body["error"] == f"{body['field']}: {body['message']}", body
            assert body["field"] == ("model" if request else "out")
        for request, key in (({"loras": [["a", 5]]}, "loras"), ({"image_prompts": [{"path": "/no/such.png"}]},
                                                                   "image_prompts")):  # the JSON key, not --lora
            status, body = await post(json.dumps({"request": request}).encode())
            assert status == 400 and body["field"] == key and body["error"] == f"{key}: {body['message']}", body
        for route in ("validate", "jobs"):  # validate refuses what submit refuses
            async with http.post(f"http://dreamtty/v1/{route}", json={"request": {}, "out": "/proc/nope"}) as r:
                assert r.status == 400 and (await r.json())["field"] == "out"
        async with http.post("http://dreamtty/v1/validate", json={"request": {}, "out": str(service.out / "new")}) as r:
            assert r.status == 200 and not (service.out / "new").exists()  # a dry run makes no folder
        for route in ("cancel", "forget"):  # the POST route: GET of it was read as a job id, 'cancel'
            for method, query in (("GET", ""), ("GET", "?days=1"), ("PUT", ""), ("DELETE", "")):  # all said POST
                async with http.request(method, f"http://dreamtty/v1/jobs/{route}{query}") as r:
                    answer = (r.status, r.headers["Allow"], (await r.json())["error"])
                assert answer == (405, "POST", f"{method} /v1/jobs/{route}: not allowed; use POST"), (method, query)
            async with http.post(f"http://dreamtty/v1/jobs/{route}/cancel") as r:  # a job id there
                assert (r.status, (await r.json())["field"]) == (400, "job")
        async with http.post("http://dreamtty/v1/jobs/forget") as r:  # it said "days: '' is not a whole number"
            assert (await r.json())["error"] == "days: missing; give ?days=N (0: every ended job)"
        for route in ("jobs/1/cancel", "jobs/cancel", "runs/1/stop", "shutdown"):  # a body was ignored
            async with http.post(f"http://dreamtty/v1/{route}", json={"bogus": 1}) as r:
                assert (r.status, (await r.json())["error"]) == (400, "body: this route takes none; send the request "
                                                                      "without one")
        for encoding in ("deflate", "bogus"):  # an unknown one was passed over
            headers = {"Content-Encoding": encoding}
            async with http.post("http://dreamtty/v1/jobs", data=b"garbage", headers=headers) as r:
                body = await r.json()
                assert r.status == 400 and body["error"] == (f"body: cannot be decoded (Content-Encoding: {encoding}); "
                                                             "send plain JSON"), body
        status, body = await post(b'{"request": {"seed": ' + b"9" * 5000 + b"}}")
        assert status == 400 and body["error"] == "body: holds a number of more than 4300 digits"
        async with http.get("http://dreamtty/v1/events") as r:  # not a WebSocket upgrade
            assert r.status == 400 and (await r.json())["field"] == "events"
        async with http.get("http://dreamtty/v1/jobs?brief=false&images=yes") as r:  # spelled as booleans are
            assert r.status == 200
        for path, line in (("jobs?stat=queued", "stat: unknown query parameter; allowed: limit, state, images, brief"),
                           ("status?verbose=1", "verbose: unknown query parameter; allowed: none"),  # ignored
                           ("jobs?state=queued&state=done", "state: given twice; give it once (state takes a comma-"
                                                            "separated list)")):
            async with http.get(f"http://dreamtty/v1/{path}") as r:
                assert r.status == 400 and (await r.json())["error"] == line
        async with http.post("http://dreamtty/v1/jobs/forget?days=0&days=30") as r:  # the first was taken: all gone
            assert r.status == 400 and (await r.json())["field"] == "days"
        async with http.get("http://dreamtty/v1/events?previews=off") as r:  # turned them on
            assert r.status == 400 and (await r.json())["error"] == ("previews: 'off' is not allowed; use 1 (preview "
                                                                     "pixels, the default) or 0")
        async with http.get("http://dreamtty/v1/jobs?images=1&brief=1") as r:  # listed jobs without images
            assert r.status == 400 and (await r.json())["field"] == "images"
        async with http.delete("http://dreamtty/v1/jobs") as r:
            assert r.status == 405 and "POST" in r.headers["Allow"] and (await r.json())["error"]
        for body in (await post(b"[1]"))[1], (await post(b"{}"))[1]:
            assert "\n" not in body["error"] and "Traceback" not in body["error"]
        # a value or key echoed in an error: written out visibly (a client may print it as it is), and cut
        status, body = await post(json.dumps({"request": {"model": "a\nb\x1b[2J" + "m" * 100_000}}).encode())
        assert status == 400 and body["field"] == "model" and body["error"].startswith("model: a\\nb\\x1b[2Jmmm")
        assert len(body["error"]) < 2100 and " … (cut) … " in body["error"] and len(body["message"]) < 2100
        status, body = await post(json.dumps({"request": {"\n\x1b[31mevil": 1}}).encode())
        assert status == 400 and body["field"] == "\\n\\x1b[31mevil" and "\x1b" not in body["error"]
        for key in ("a\\u2028b", "\\ud800"):  # a line break to splitlines(), and what no UTF-8 encoder takes
            status, body = await post(b'{"request": {"' + key.encode() + b'": 1}}')  # echoed as JSON escaped them
            assert status == 400 and body["error"].startswith(f"{key}: unknown field") and body["field"] == key
        status, head = await asyncio.to_thread(_expecting, socket_path, 2 << 20)  # curl sends such a header
        assert status == 413 and b'"body: larger than' in head  # before the body is sent: not 100 Continue
        assert (await asyncio.to_thread(_expecting, socket_path, 20))[0] == 100
        after = len((await (await http.get("http://dreamtty/v1/jobs")).json())["jobs"])
    assert after == before


def _expecting(socket_path: str, length: int) -> tuple[int, bytes]:
    """The first status a POST /v1/jobs of ``length`` bytes with ``Expect: 100-continue`` gets, before its body."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: dreamtty\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length)
        head = sock.recv(4096)
    return int(head.split()[1]), head


async def test_closest_leaves_out_the_loras_the_service_lacks(service):
    """Reproducing another tool's image on a service (maybe on another machine, with files of its own): what the
    service has decides. The CLI cut every LoRA missing where it ran, one the service had included."""
    served = service.home / "data" / "models" / "loras"
    served.mkdir(parents=True, exist_ok=True)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    save_file({key: np.zeros((4, 768), dtype=np.float16)}, str(served / "ink.safetensors"))  # looked for, not loaded
    remote = client(service)
    await remote.start()
    try:
        request = _request(prompt="a fox <lora:ink:0.5>\n<lora:gone> on snow", loras=[("ink", 0.3), ("gone", 1.0)])
        closest, left = await remote.closest(request)
    finally:
        await remote.close()
        (served / "ink.safetensors").unlink()
    assert (closest.prompt, closest.loras) == ("a fox <lora:ink:0.5>\non snow", [("ink", 0.3)])
    assert left == ["not carried over: <lora:gone> (no LoRA gone here); LoRA gone: 1 (not here)"]


async def test_ids_and_limits_are_ascii_digits_in_range(service):
    huge, past_int = "99999999999999999999", "9" * 5000  # past_int: more digits than int() reads
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(service.files().socket))) as http:
        async def call(method: str, path: str) -> tuple[int, dict]:
            async with http.request(method, "http://dreamtty" + path) as r:
                return r.status, await r.json()

        for method, path, what, key in (("GET", "/v1/jobs/{}", "job", huge), ("GET", "/v1/jobs/{}", "job", str(2**63)),
                                        ("POST", "/v1/jobs/{}/cancel", "job", huge), ("GET", "/v1/runs/{}", "run", huge),
                                        ("POST", "/v1/runs/{}/stop", "run", huge), ("GET", "/v1/jobs/{}", "job", past_int),
                                        ("POST", "/v1/runs/{}/stop", "run", past_int)):
            line = f"{what} {key}: no such {what}"  # the id echoed is cut: it may be megabytes long
            assert await call(method, path.format(key)) == (404, {"error": error_line(line)})
        async with http.post("http://dreamtty/v1/jobs", json={"request": {"model": "demo", "steps": 2}}) as r:
            job = (await r.json())["id"]
        status, body = await call("GET", f"/v1/jobs/{job}/images/{past_int}")
        assert status == 404 and body["error"] == error_line(f"job {job}: no image {past_int} (it has 0)")
        await call("POST", f"/v1/jobs/{job}/cancel")
        for odd in ("+1", "%201", "%D9%A1", "1_0", "-1"):
            status, body = await call("GET", f"/v1/jobs/{odd}")
            assert status == 400 and body["field"] == "job", (odd, body)
        for what in ("jobs", "runs"):
            for limit in (huge, past_int):
                status, body = await call("GET", f"/v1/{what}?limit={limit}")
                assert status == 400 and body["field"] == "limit"
                shown = limit if len(limit) <= 40 else limit[:39] + "…"
                assert body["error"] == f"limit: {shown} is out of range; give 1 to {2**63 - 1} {what[:-1]}s"
            assert (await call("GET", f"/v1/{what}?limit=+5"))[1]["field"] == "limit"


async def test_an_image_is_served_from_its_recorded_path_and_never_through_a_link_put_there(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer
    from test_tui import NoWorkers

    owner = Service(devices="cpu", db_path=tmp_path / "q.sqlite3", pool=NoWorkers("cpu", tmp_path / "q.sqlite3"))
    job = owner.store.add("generate", {"request": {"prompt": "p"}, "out": str(tmp_path)}, owner="gone")
    owner.store.set_state(job, "cancelled")  # nothing runs it any more
    (tmp_path / "a.png").write_bytes(b"\x89PNG a")
    (tmp_path / "b.png").symlink_to("/etc/hostname")  # an output replaced by a link since it was saved
    (tmp_path / "day").symlink_to("/etc")  # or the folder it was saved in
    for name in ("a.png", "b.png", "day/hostname"):
        owner.store.add_output(job, str(tmp_path / name))
    async with TestClient(TestServer(Api(owner, token="t").app), headers={"Authorization": "Bearer t"}) as http:
        async with http.get(f"/v1/jobs/{job}/images/0") as r:
            assert r.status == 200 and await r.read() == b"\x89PNG a"
        async with http.get(f"/v1/jobs/{job}/images/1") as r:
            error = (await r.json())["error"]
            assert r.status == 404 and error == f"job {job}: image 1 is no longer at {tmp_path / 'b.png'}"
        async with http.get(f"/v1/jobs/{job}/images/2") as r:
            assert r.status == 404 and "image 2 is no longer at" in (await r.json())["error"]
        owner.store.add("generate", {"request": {"prompt": "p"}}, owner="gone")  # newer, and no image
        for images, ids in (("1", [job]), ("0", [job + 1, job])):
            async with http.get(f"/v1/jobs?images={images}&state=queued,cancelled") as r:
                assert [j["id"] for j in (await r.json())["jobs"]] == ids
        async with http.get("/v1/jobs?state=queued,running&brief=1") as r:  # what a TUI counts: no job read whole
            assert await r.json() == {"jobs": [{"id": job + 1, "state": "queued"}]}
        for flag in ("images", "brief"):
            async with http.get(f"/v1/jobs?{flag}=maybe") as r:
                assert r.status == 400 and (await r.json())["field"] == flag
        async with http.post("/v1/jobs/cancel") as r:  # every active job: the one queued above
            assert await r.json() == {"cancelled": [job + 1]} and owner.store.get(job + 1).state == "cancelled"
        async with http.post("/v1/jobs/forget?days=-1") as r:
            assert r.status == 400 and (await r.json())["field"] == "days"
        async with http.post("/v1/jobs/forget?days=0") as r:  # both ended: forgotten; the image files stay
            assert await r.json() == {"forgotten": 2} and owner.store.jobs() == [] and (tmp_path / "a.png").exists()
    await owner.close()


async def test_a_client_killed_mid_stream_harms_nothing(service):
    follower = client(service)
    try:
        job = await follower.submit(_request(steps=300, count=2), service.out)  # seconds: outlives the watcher's start
        watcher = subprocess.Popen([sys.executable, "-m", "tui.cli", "wait", str(job)], env=service.env(), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(600):
            if (await follower.status())["streams"] or watcher.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert watcher.poll() is None, watcher.stderr.read()
        watcher.kill()  # SIGKILL: its socket closes without a goodbye, mid-job
        watcher.wait()
        ended = [e async for e in follower.wait(job)][-1]
        status = await follower.status()
    finally:
        await follower.close()
    assert isinstance(ended, Done) and len(ended.paths) == 2
    assert status["streams"] == 1  # the follower's own: the killed one's is gone


async def test_a_submit_interrupted_before_its_answer_is_cancelled_on_close(service, monkeypatch):
    """Ctrl-C after the service queued the job but before its id came back: closing with cancel_jobs still
    finds the job (by the client_ref the submit sent) and cancels it; another client's job goes on."""
    other = client(service)
    kept = await other.submit(_request(steps=500, width=256, height=256), service.out)  # cancelled at the end
    lost = client(service)
    answered = RemoteClient._request

    async def interrupted(self, method, path, body=None, quick=False, **params):
        answer = await answered(self, method, path, body, quick, **params)
        if method == "POST":
            raise asyncio.CancelledError  # the job is queued; its id never reaches the caller
        return answer

    monkeypatch.setattr(RemoteClient, "_request", interrupted)
    with pytest.raises(asyncio.CancelledError):
        await lost.submit(_request(steps=300), service.out)
    monkeypatch.setattr(RemoteClient, "_request", answered)
    await lost.close(cancel_jobs=True)
    try:
        jobs = {job.id: job for job in await other.jobs(3)}
        (queued,) = [job for job in jobs.values() if job.id > kept]  # the lost one, queued after it
        assert queued.state == "cancelled" and len(queued.payload["client_ref"]) == 32
        assert jobs[kept].state in ("queued", "running")
        assert (await other.cancel(kept)) is True
    finally:
        await other.close()


async def test_a_client_ref_that_is_not_a_short_text_is_refused(service):
    lone = client(service)
    try:
        before = [job.id for job in await lone.jobs()]
        for ref in ("", "x" * 65, 7, "a\nb", "é"):
            body = {"kind": "generate", "request": _request().to_dict(), "client_ref": ref}
            with pytest.raises(DreamttyError, match="^client_ref: give up to 64 printable ASCII characters, got "):
                await lone._call("POST", "/v1/jobs", body)
        assert [job.id for job in await lone.jobs()] == before  # nothing queued (earlier tests' jobs move on)
    finally:
        await lone.close()


# -- permissions -------------------------------------------------------------------------
def test_runtime_files_are_private(service):
    files = service.files()
    assert stat.S_IMODE(files.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.folder.parent.stat().st_mode) == 0o700
    for path in (files.socket, files.pid_file, files.lock_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_ISSOCK(files.socket.stat().st_mode)


def test_a_runtime_dir_open_to_others_is_refused(dirs):
    files = dirs.files()
    files.folder.parent.mkdir(mode=0o755)
    os.chmod(files.folder.parent, 0o755)
    result = cli(dirs, "serve", "--detach")
    assert result.returncode == 2 and "is not private" in result.stderr and "0755" in result.stderr
    assert not files.socket.exists()


def test_a_missing_runtime_dir_is_named(dirs):
    env = {**dirs.env(), "XDG_RUNTIME_DIR": str(dirs.run / "gone")}
    result = subprocess.run([sys.executable, "-m", "tui.cli", "serve", "--detach"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"{dirs.run / 'gone'} does not exist; create it (mkdir -m 700) "
                                          "or set XDG_RUNTIME_DIR to a folder of yours")


def test_peer_uid_of_a_unix_socket_is_the_connecting_process():
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_uid(a) == os.getuid()


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("curl"), reason="needs root (to act as another user) and curl")
async def test_another_user_is_refused(dirs, tmp_path):
    """Through the 0700 folder another user cannot reach the socket; where permissions would let
    them (a socket opened up on purpose), the peer-uid check answers 403."""
    nobody = 65534
    files = dirs.files()
    files.make_folder()
    open_dir = Path(tempfile.mkdtemp(prefix="dt-open-", dir="/tmp"))
    open_dir.chmod(0o777)
    api = Api(Service(devices="cpu", db_path=tmp_path / "queue.sqlite3"))
    runner = web.AppRunner(api.app)
    await runner.setup()
    try:
        for path in (files.socket, open_dir / "s"):
            await web.UnixSite(runner, str(path)).start()
        os.chmod(open_dir / "s", 0o666)

        async def curl(path: Path, user: int | None) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                "curl", "-s", "-w", "\n%{http_code}", "--unix-socket", str(path), "http://x/v1/version",
                user=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, _ = await proc.communicate()
            return proc.returncode, out.decode()

        code, _ = await curl(files.socket, nobody)
        assert code == 7  # curl: could not connect (permission denied on the folder)
        code, out = await curl(open_dir / "s", nobody)
        assert code == 0 and out.splitlines() == ['{"error": "forbidden"}', "403"]
        code, out = await curl(open_dir / "s", None)
        assert code == 0 and out.splitlines()[-1] == "200"
    finally:
        await runner.cleanup()
        shutil.rmtree(open_dir)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_tcp_needs_the_token_and_says_nothing_else(dirs):
    port = _free_port()
    serve = ServeProcess(dirs, "--listen", f"127.0.0.1:{port}").wait_ready()
    try:
        token_file = dirs.home / "state" / "serve.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                            {"Authorization": f"Basic {token}"}):
                for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/shutdown"), ("GET", "/v1/events"),
                                     ("GET", "/nowhere")):
                    async with http.request(method, url + path, headers=headers) as r:
                        assert r.status == 401, (headers, path)
                        assert await r.text() == '{"error": "unauthorized"}'
            async with http.get(url + "/v1/version", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200 and (await r.json())["api"] >= 1
        with socket.create_connection(("127.0.0.1", port)) as raw:  # bytes no client library sends
            raw.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                        b"Connection: close\r\n\r\n")
            answer = b"".join(iter(lambda: raw.recv(4096), b""))
        assert answer.startswith(b"HTTP/1.1 401 ") and answer.endswith(b'{"error": "unauthorized"}')
        env = {**dirs.env(), "DREAMTTY_SERVICE": f"127.0.0.1:{port}"}
        result = subprocess.run([sys.executable, "-m", "tui.cli", "jobs", "--json"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and json.loads(result.stdout) == []
        env["DREAMTTY_TOKEN"] = "wrong"
        result = subprocess.run([sys.executable, "-m", "tui.cli", "jobs"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stderr.strip() == "dreamtty: service: unauthorized (the token is wrong or missing: DREAMTTY_TOKEN)"
        assert serve.proc.poll() is None  # the refused shutdown did nothing
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            async with http.post(url + "/v1/runs", json={"request": {}, "launcher": "sh -c 'id > /tmp/x'"}) as r:
                assert r.status == 400 and (await r.json())["field"] == "launcher"  # a command: not over TCP
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]  # no token, no request
        try:
            result = subprocess.run([sys.executable, "-m", "tui.cli", "jobs", "--json"], env=env | {
                "DREAMTTY_TOKEN": token}, cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr  # the token holder gets in past them over TCP
            assert cli(dirs, "jobs", "--json").returncode == 0  # and the owner's socket answers
        finally:
            for raw in held:
                raw.close()
    finally:
        serve.stop()


def test_a_token_short_enough_to_guess_is_warned_about(dirs):
    """A token file the user wrote by hand with a few characters was taken without a word."""
    token_file = dirs.home / "state" / "serve.token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text("abc\n")
    token_file.chmod(0o600)
    serve = ServeProcess(dirs, "--listen", f"127.0.0.1:{_free_port()}").wait_ready()
    try:
        status = json.loads(cli(dirs, "serve", "--status", "--json").stdout)
    finally:
        serve.stop()
    said = f"the token in {token_file} is 3 characters long, short enough to guess"
    assert any(w.startswith(said) for w in status["warnings"]), status
    assert f"dreamtty: warning: {said}" in serve.log.read_text()


# -- one service per user ---------------------------------------------------------------
def test_a_second_service_says_where_the_first_runs(dirs):
    first = ServeProcess(dirs).wait_ready()
    try:
        pid = dirs.files().read_pid_file()["pid"]
        for args in (("serve",), ("serve", "--detach")):
            again = cli(dirs, *args)
            assert again.returncode == 1
            assert f"already running (pid {pid}, socket {dirs.files().socket})" in again.stderr
        assert first.proc.poll() is None
        stopped = cli(dirs, "serve", "--stop")
        assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
        assert first.proc.wait(10) == 0
        assert not dirs.files().socket.exists() and not dirs.files().pid_file.exists()
        assert cli(dirs, "serve", "--status").returncode == 1
    finally:
        first.stop()


def test_a_second_service_of_the_queue_under_another_runtime_dir_is_refused(dirs):
    """The runtime dir's lock keeps one service per runtime dir; a lock beside the queue keeps one per queue
    (logind removes XDG_RUNTIME_DIR at the last logout while the service runs on; two shells may differ)."""
    from dataclasses import replace

    first = ServeProcess(dirs).wait_ready()
    other = replace(dirs, run=Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp")))
    try:
        pid = dirs.files().read_pid_file()["pid"]
        for args in (("serve",), ("serve", "--detach")):
            again = cli(other, *args)
            assert again.returncode == 1, again.stderr
            assert (f"dreamtty: service: another one (pid {pid}, socket {dirs.files().socket}) runs the queue in "
                    f"{dirs.home / 'state'}, started with another runtime dir") in again.stderr
        for args in (("serve", "--status"), ("serve", "--stop"), ("serve", "--status", "--json")):  # "none runs"
            said = cli(other, *args)
            assert said.returncode == 1 and said.stderr.startswith(
                f"dreamtty: service: another one (pid {pid}, socket {dirs.files().socket}) runs the queue"), said.stderr
        assert json.loads(said.stdout) == {"service": "elsewhere", "pid": None}
        queued = cli(other, "generate", "x", "--model", "demo")  # a fault that passes (exit 3), not bad input (2)
        assert queued.returncode == 3 and "started with another runtime dir" in queued.stderr, queued.stderr
        assert first.proc.poll() is None and not other.files().socket.exists()
    finally:
        first.stop()
        shutil.rmtree(other.run, ignore_errors=True)


def test_detach_names_a_foreign_listener_on_the_socket(dirs):
    files = dirs.files()
    files.make_folder()
    with socket.socket(socket.AF_UNIX) as foreign:
        foreign.bind(str(files.socket))
        foreign.listen()
        result = cli(dirs, "serve", "--detach")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"dreamtty: service: something that is not a dreamtty service listens on "
                                     f"{files.socket} (nothing holds {files.lock_file}); stop it, or remove {files.socket}")


def test_two_services_started_at_once_one_wins(dirs):
    both = [ServeProcess(dirs), ServeProcess(dirs)]
    try:
        deadline = time.monotonic() + START
        while sum(s.proc.poll() is None for s in both) == 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        (loser,) = [s for s in both if s.proc.poll() is not None]
        (winner,) = [s for s in both if s is not loser]
        winner.wait_ready()
        assert loser.proc.returncode == 1
        assert "already running" in loser.log.read_text() or "another one is starting" in loser.log.read_text()
        assert dirs.files().read_pid_file()["pid"] == winner.proc.pid
    finally:
        for s in both:
            s.stop()


def test_of_two_detached_starts_at_once_one_says_started_the_other_already_running(dirs):
    """Both said "service started in the background (pid N)" of the one that won."""
    both = [subprocess.Popen([sys.executable, "-m", "tui.cli", "serve", "--detach", "--device", "cpu"], env=dirs.env(),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    said = sorted((proc.wait(timeout=START), *proc.communicate()) for proc in both)
    pid = dirs.files().read_pid_file()["pid"]
    assert [code for code, _, _ in said] == [0, 1], said
    assert said[0][1].startswith(f"dreamtty: service started in the background (pid {pid})")
    assert said[1][2].startswith(f"dreamtty: service: one is already running (pid {pid}")


def test_stale_socket_and_pid_file_are_cleaned(dirs):
    files = dirs.files()
    files.make_folder()
    with socket.socket(socket.AF_UNIX) as dead:  # a socket file nobody listens on, as a crash leaves it
        dead.bind(str(files.socket))
    files.write_pid_file({"pid": 999999999, "socket": str(files.socket)})
    status = cli(dirs, "serve", "--status")
    assert status.returncode == 1 and "a crashed one left its socket; the next start removes it" in status.stderr
    started = cli(dirs, "serve", "--detach", "--device", "cpu")
    assert started.returncode == 0, started.stderr
    info = files.read_pid_file()
    assert info["pid"] != 999999999 and _connects(files.socket)
    # A command asking for settings the running service was not started with is refused, not run with the service's.
    other = cli(dirs, "jobs", "--allow-pickle")
    assert other.returncode == 3 and other.stderr.count("\n") == 1, other.stderr  # no service it can use
    assert "(allow_pickle: unset there, 1 here)" in other.stderr and "--local" in other.stderr
    assert cli(dirs, "jobs", "--allow-pickle", "--local").returncode == 0
    assert cli(dirs, "serve", "--stop").returncode == 0


def test_idle_exit_stops_a_quiet_service(dirs):
    serve = ServeProcess(dirs, "--idle-exit", "0.05").wait_ready()  # 3 s
    assert serve.proc.wait(60) == 0
    assert "idle for 0.05 minutes" in serve.log.read_text()
    assert not dirs.files().socket.exists()
    bad = cli(dirs, "serve", "--idle-exit", "0")
    assert bad.returncode == 2 and "idle-exit" in bad.stderr


# -- faults ------------------------------------------------------------------------------
async def test_kill_9_mid_job_then_restart_runs_every_job(dirs):
    serve = ServeProcess(dirs).wait_ready()
    follower = client(dirs, patience=None)
    events = follower.subscribe()
    try:
        long_job = await follower.submit(_request(steps=20, count=2), dirs.out)
        short_job = await follower.submit(_request(seed=5), dirs.out)
        while not isinstance(await asyncio.wait_for(events.get(), 120), Step):
            pass
        serve.proc.kill()  # SIGKILL: no cleanup at all
        serve.proc.wait()
        assert (await asyncio.to_thread(cli, dirs, "serve", "--status")).returncode == 1
        again = ServeProcess(dirs).wait_ready()  # adopts the jobs once the dead one's lease ran out
        try:
            ends = {job: [e async for e in follower.wait(job, events)][-1] for job in (long_job, short_job)}
            jobs = {job.id: job for job in await follower.jobs()}
        finally:
            again.stop()
    finally:
        await follower.close()
        serve.stop()
    for job in (long_job, short_job):
        assert isinstance(ends[job], Done), ends[job]
        assert jobs[job].state == "done"
        assert all(Path(p).is_file() for p in jobs[job].outputs)
    assert len(set(jobs[long_job].outputs)) >= 2


async def test_a_service_that_does_not_answer_is_one_error(dirs, monkeypatch):
    import backend.remote_client as remote

    async def hang(request):
        await asyncio.sleep(2)  # past ANSWER_TIMEOUT

    app = web.Application()
    app.router.add_get("/v1/version", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    files = dirs.files()
    files.make_folder()
    await web.UnixSite(runner, str(files.socket)).start()
    monkeypatch.setattr(remote, "QUICK_TIMEOUT", 0.2)  # a listing waits this, not ANSWER_TIMEOUT (minutes)
    quiet = RemoteClient(Address(socket=files.socket), start=None, previews=False)
    try:
        with pytest.raises(ServiceUnavailable, match=r"did not answer GET /v1/version in time$"):  # exit 3
            await asyncio.wait_for(quiet.jobs(), 1.5)
    finally:
        await quiet.close()
        await runner.cleanup()


async def test_version_mismatch_says_to_restart_the_service(dirs):
    """A service of other code (an old one still running after an upgrade of the same version number)
    answers the CLI."""
    from backend.versions import versions

    ours = versions()
    app, shutdowns = web.Application(), []
    app.router.add_get("/v1/version", lambda request: web.json_response({**ours, "build": "0ld"}))
    app.router.add_get("/v1/status", lambda request: web.json_response({**ours, "build": "0ld", "pid": 7}))  # its shape
    app.router.add_post("/v1/shutdown", lambda request: shutdowns.append(1) or web.json_response({}))
    runner = web.AppRunner(app)
    await runner.setup()
    files = dirs.files()
    files.make_folder()
    await web.UnixSite(runner, str(files.socket)).start()
    try:
        ended = []
        for command in ("attach", "serve --status", "serve --stop"):  # the way out it names works on it
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tui.cli", *command.split(),
                                                        env=dirs.env(), cwd=ROOT, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            ended.append((proc.returncode, err.decode()))
    finally:
        await runner.cleanup()
    (attached, err), (told, status_err), (stopped, _) = ended
    assert attached == 3 and told == 2 and stopped == 0 and shutdowns == [1]  # none it can use; an answer unread
    (line,) = err.splitlines()
    differ = (f"it runs dreamtty {ours['dreamtty']} (API 1, events 1, build 0ld) and this is {ours['dreamtty']} "
              f"(API 1, events 1, build {ours['build']}); restart the service: dreamtty serve --stop, then run this "
              "again")
    assert line == f"dreamtty: service: {differ}"
    (line,) = status_err.splitlines()  # serve --status reads a service of any version, as far as its answer reads
    assert line.startswith("dreamtty: service: ")
    assert "its answer does not read (ValueError: status field 'uptime'" in line
    assert line.endswith(f"; {differ}")


def test_generate_starts_a_service_and_ctrl_c_cancels_its_job(dirs):
    first = cli(dirs, *GENERATE, "--device", "cpu")  # no service yet: started in the background
    assert first.returncode == 0, first.stderr
    info = dirs.files().read_pid_file()
    assert info and _connects(dirs.files().socket)
    said = (f"dreamtty: started the service in the background (pid {info['pid']}); it stays, keeping models loaded "
            "for the next command: dreamtty serve --stop ends it")
    assert first.stderr.splitlines() == [said]  # it outlives the command, holding the model: not in silence
    assert cli(dirs, *GENERATE).stderr == ""  # the next command used it: nothing to say
    with open(dirs.home / "gen.err", "w") as err:
        # long enough on any CPU that the poll below sees it run: a job of seconds ended between two polls in CI
        gen = subprocess.Popen([sys.executable, "-m", "tui.cli", *GENERATE, "--steps", "500", "--size", "256x256",
                                "-n", "3"], env=dirs.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = json.loads(cli(dirs, "jobs", "--json", "--limit", "1").stdout)
        if jobs and jobs[0]["state"] == "running" and jobs[0]["id"] > 1:
            break
        assert gen.poll() is None, "the job ended before it was seen running"
        time.sleep(0.3)
    gen.send_signal(signal.SIGINT)
    assert gen.wait(60) == 130
    job = json.loads(cli(dirs, "jobs", "--json", "--limit", "1").stdout)[0]
    for _ in range(100):
        if job["state"] == "cancelled":
            break
        time.sleep(0.2)
        job = json.loads(cli(dirs, "jobs", "--json", "--limit", "1").stdout)[0]
    assert job["state"] == "cancelled"
    assert dirs.files().read_pid_file()["pid"] == info["pid"]  # the service outlives its clients


def test_what_a_started_service_finds_damaged_is_said_to_the_client_that_started_it(dirs):
    db = locations.queue_db()
    db.parent.mkdir(parents=True)
    db.write_bytes(b"garbage" * 100)
    made = cli(dirs, *GENERATE, "--device", "cpu")  # starts the service, which moves the queue aside
    assert made.returncode == 0, made.stderr
    (moved,) = db.parent.glob("queue.sqlite3.corrupt-*")
    said = f"queue: {db} is damaged (file is not a database); moved it to {moved.name} and started an empty queue"
    assert [line for line in made.stderr.splitlines() if "warning" in line] == [f"dreamtty: warning: {said}"]
    assert f"warning   {said}" in cli(dirs, "serve", "--status").stdout.splitlines()
    assert "warning" not in cli(dirs, "jobs").stderr  # a client that did not start it is not told again


def test_local_mode_starts_no_service(dirs):
    result = subprocess.run([sys.executable, "-m", "tui.cli", *GENERATE, "--local", "--device", "cpu"],
                            env=dirs.env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and Path(result.stdout.strip()).is_file()
    env = {**dirs.env(), "DREAMTTY_LOCAL": "1"}
    result = subprocess.run([sys.executable, "-m", "tui.cli", "jobs", "--json"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and len(json.loads(result.stdout)) == 1
    assert not dirs.files().folder.exists()


async def test_no_service_and_no_start_is_one_line(dirs):
    lone = client(dirs)
    with pytest.raises(DreamttyError, match="none is running at .*start one with dreamtty serve --detach"):
        await lone.jobs()
    await lone.close()


def test_connect_picks_the_client(monkeypatch, tmp_path):
    from backend.client import LocalClient, connect
    from backend.errors import RequestError
    from backend.service_files import make_token, read_token

    monkeypatch.delenv("DREAMTTY_LOCAL", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    remote = connect("cpu")
    assert isinstance(remote, RemoteClient) and remote.address.socket == ServiceFiles.default().socket
    assert isinstance(connect("cpu", local=True), LocalClient)
    monkeypatch.setenv("DREAMTTY_LOCAL", "1")
    assert isinstance(connect("cpu"), LocalClient)
    monkeypatch.setenv("DREAMTTY_LOCAL", "0")
    monkeypatch.setenv("DREAMTTY_SERVICE", "127.0.0.1:7860")
    monkeypatch.setenv("DREAMTTY_TOKEN", "t")
    tcp = connect("cpu")
    assert (tcp.address.host, tcp.address.port, tcp.address.token) == ("127.0.0.1", 7860, "t")
    monkeypatch.delenv("DREAMTTY_TOKEN")
    make_token()  # this machine's token goes to this machine's addresses only
    assert connect("cpu").address.token == read_token() and read_token()
    monkeypatch.setenv("DREAMTTY_SERVICE", "[::1]:7860")
    assert connect("cpu").address.token == read_token()
    for elsewhere in ("gpu-box.example:7860", "0.0.0.0:7860", "[::ffff:10.0.0.1]:7860"):
        monkeypatch.setenv("DREAMTTY_SERVICE", elsewhere)
        assert connect("cpu").address.token is None, elsewhere
    monkeypatch.setenv("DREAMTTY_SERVICE", "localhost")
    with pytest.raises(RequestError, match="^DREAMTTY_SERVICE: 'localhost' is not HOST:PORT"):
        connect("cpu")


def test_bad_serve_options_are_one_line(dirs):
    for args, field in ((("--listen", "nowhere"), "listen"), (("--idle-exit", "-1"), "idle-exit"),
                        (("--idle-exit", "inf"), "idle-exit"),  # it was taken, and wrote Infinity into the status JSON
                        (("--json",), "json"), (("--status", "--idle-exit", "-3"), "idle-exit"),
                        (("--stop", "--listen", "foo"), "listen")):
        result = cli(dirs, "serve", *args)  # the last two were ignored
        assert result.returncode == 2 and result.stderr.startswith(f"dreamtty: {field}: ")
        assert len(result.stderr.splitlines()) == 1
    result = cli(dirs, "serve", "--listen", "0.0.0.0:1", "--idle-exit", "-1")  # said before the bad option
    assert result.stderr.splitlines()[0] == ("dreamtty: serving plain HTTP on 0.0.0.0:1, the token in clear; put TLS "
                                             "in front of it (an SSH tunnel or a reverse proxy)")
    assert not dirs.files().socket.exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_tui_is_a_client_and_its_kill_spares_the_job(dirs):
    """``dreamtty`` starts the service and queues on it; a second TUI (``dreamtty attach``) sees the job live;
    the first, killed mid-job, leaves the job to end in a PNG."""
    from test_e2e_tmux import Tmux, _command

    (dirs.home / "config" / "presets").mkdir(parents=True)
    (dirs.home / "config" / "presets" / "long.yaml").write_text("description: a long demo job\nsteps: 500\n")
    attach = cli(dirs, "attach")  # nothing to attach to yet: it says so, and starts nothing
    assert attach.returncode == 3 and "none is running" in attach.stderr and not dirs.files().socket.exists()
    env = {**dirs.env(), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color",
           "DREAMTTY_DEFAULT_PRESET": "long"}
    tmux = Tmux(env)
    try:
        assert tmux("new-session", "-d", "-s", "app", "-x", "200", "-y", "60", _command(dirs.out)).returncode == 0
        tmux("set-option", "-t", "app", "remain-on-exit", "on")
        tmux.wait(lambda: "worker ready" in tmux.screen(), "the app to draw and its service to start", 120)
        attach = shlex.join([sys.executable, "-m", "tui.cli", "attach"])
        assert tmux("new-session", "-d", "-s", "second", "-x", "200", "-y", "60", attach).returncode == 0
        tmux.wait(lambda: "worker ready" in tmux.screen("second"), "the second TUI on the same service", 60)
        tmux("send-keys", "-t", "second", "F2")  # its queue screen, before the job exists
        tmux.wait(lambda: "Jobs" in tmux.screen("second"), "the second TUI's queue screen", 30)
        tmux("send-keys", "-t", "app", "-l", "a red fox in the snow")
        tmux.wait(lambda: "a red fox in the snow" in tmux.screen(), "the typed prompt", 30)
        tmux("send-keys", "-t", "app", "C-g")
        tmux.wait(lambda: re.search(r"step \d+/500", tmux.screen()), "the job's progress from the service")
        tmux.wait(lambda: re.search(r"step \d+/500", screen := tmux.screen("second")) and "a red fox" in screen,
                  "the job live in the second TUI: its progress line and its queue")
        tmux("set-option", "-t", "second", "remain-on-exit", "on")
        tmux("send-keys", "-t", "second", "C-q")  # it quits at once: the job goes on, as it says
        tmux.wait(lambda: "1 job queued or running goes on in the service" in tmux.screen("second"),
                  "the second TUI's line as it quit", 30)
        assert not list(dirs.out.rglob("*.png"))
        pane_pid = int(tmux("display", "-p", "-t", "app", "#{pane_pid}").stdout)
        os.kill(pane_pid, signal.SIGKILL)  # the TUI dies mid-job, as with an SSH drop
    finally:
        tmux("kill-server")
    deadline = time.monotonic() + 120
    while not list(dirs.out.rglob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.2)
    (png,) = dirs.out.rglob("*.png")
    (job,) = json.loads(cli(dirs, "jobs", "--json").stdout)
    assert job["state"] == "done" and job["outputs"] == [str(png)]


async def test_calls_made_at_once_share_one_start(dirs):
    """A TUI's screens call the client together as it starts: one service is started, all calls answer."""
    from backend.client import connect

    together = connect("cpu", tui=True)
    events = together.subscribe()
    try:
        _, jobs, active, status = await asyncio.gather(together.start(), together.jobs(), together.active_jobs(),
                                                       together.status())
        job = await together.submit(_request(), dirs.out)
        ended = [e async for e in together.wait(job, events)][-1]
    finally:
        await together.close()
    assert jobs == [] and active == [] and status["pid"] == dirs.files().read_pid_file()["pid"]
    assert isinstance(ended, Done)


def test_files_a_request_names_are_sent_absolute(tmp_path, monkeypatch):
    """The service does not share the client's working folder: relative paths are resolved here."""
    from backend.image_prompts import ImagePrompt
    from backend.jobkinds.img2img import Img2ImgRequest
    from backend.remote_client import _paths_for_service

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "style.safetensors").write_bytes(b"")
    request = Img2ImgRequest(image="in.png", model="models/mine", loras=[("style.safetensors", 0.5), ("hub/lora", 1.0)],
                             vae="stabilityai/sd-vae-ft-mse", image_prompts=[ImagePrompt(path="ref.png")])
    sent = _paths_for_service(request)
    assert sent.image == str(tmp_path / "in.png") and sent.model == str(tmp_path / "models" / "mine")
    assert sent.loras == [(str(tmp_path / "style.safetensors"), 0.5), ("hub/lora", 1.0)]
    assert sent.vae == "stabilityai/sd-vae-ft-mse" and sent.image_prompts[0].path == str(tmp_path / "ref.png")
    assert _paths_for_service(_request()).model == "demo"
    from backend.jobkinds.describe import DescribeRequest
    from backend.jobkinds.inpaint import InpaintRequest

    assert _paths_for_service(DescribeRequest(image="in.png")).image == str(tmp_path / "in.png")
    masked = _paths_for_service(InpaintRequest(image="in.png", mask="mask.png"))
    assert (masked.image, masked.mask) == (str(tmp_path / "in.png"), str(tmp_path / "mask.png"))


def test_listing_or_cancelling_with_no_service_starts_none(dirs):
    """jobs and cancel read the queue in their own process when no service runs; wait says there is none."""
    store = QueueStore(locations.queue_db())
    job = store.add("generate", {"request": _request().to_dict()}, "gone/1/x")
    store.close()
    listed = cli(dirs, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [job]
    assert cli(dirs, "cancel", str(job)).returncode == 0
    assert QueueStore(locations.queue_db()).get(job).state == "cancelled"
    waited = cli(dirs, "wait", str(job))
    assert waited.returncode == 3 and "no dreamtty serve is running" in waited.stderr
    status = cli(dirs, "serve", "--status", "--json")  # a script reads stdout: JSON there too
    assert status.returncode == 1 and json.loads(status.stdout) == {"service": "not running", "pid": None}
    forgot = cli(dirs, "jobs", "--forget", "0", "--json")
    assert forgot.returncode == 0 and json.loads(forgot.stdout) == {"forgotten": 1}
    assert dirs.files().read_pid_file() is None and not dirs.files().locked()  # nothing was started


def test_stopping_a_service_that_takes_connections_but_answers_none_gives_its_pid(dirs, monkeypatch, capsys):
    """``serve --stop`` of a stuck service (kill -STOP) said only that it did not answer."""
    from tui.cli import main

    monkeypatch.setattr(remote_client, "QUICK_TIMEOUT", 0.5)
    files = dirs.files()
    files.make_folder()
    files.write_pid_file({"pid": 4321})
    with socket.socket(socket.AF_UNIX) as stuck:  # it accepts (the kernel's backlog), and never answers
        stuck.bind(str(files.socket))
        stuck.listen(8)
        assert main(["serve", "--stop"]) == 3
        err = capsys.readouterr().err
        assert err.endswith("; if pid 4321 stays stuck, end it with: kill 4321\n") and err.count("\n") == 1, err
        assert main(["serve", "--status", "--json"]) == 1  # it printed no JSON, and exited 3
    out, err = capsys.readouterr()
    assert json.loads(out) == {"service": "not answering", "pid": 4321}
    assert err.startswith("dreamtty: the service (pid 4321) does not answer: it is starting, stopping or busy")


def test_listen_on_a_port_in_use_is_one_line(dirs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli(dirs, "serve", "--listen", f"127.0.0.1:{port}", "--device", "cpu")
        detached = cli(dirs, "serve", "--listen", f"127.0.0.1:{port}", "--device", "cpu", "--detach")
    assert out.returncode == 3 and "Traceback" not in out.stderr  # a fault that passes: 3, not 2 (bad input)
    assert (f"listen: cannot listen on 127.0.0.1:{port}: Address already in use; try again once it is free, or "
            "another port") in out.stderr  # not asyncio's "error while attempting to bind on address ('127...
    # detached, the same fault: the same exit and line, not "service: did not start (dreamtty: listen: ...)"
    assert detached.returncode == 3 and detached.stderr.startswith(f"dreamtty: listen: cannot listen on 127.0.0.1:{port}")
    assert detached.stderr.count("dreamtty:") == 1, detached.stderr


def test_requests_it_cannot_parse_write_no_tracebacks(service):
    """A client without the token could otherwise fill the disk with aiohttp's tracebacks."""
    logs = {p: p.stat().st_size for p in service.home.glob("serve-*.out")}  # the shared service's output
    for head in (b"Content-Length: -1\r\n\r\n", b"Content-Length: 99\r\nContent-Length: 1\r\n\r\n",
                 b"X: " + b"y" * 9000 + b"\r\n\r\n", b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"):
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(service.files().socket))
            raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + head)
            assert raw.recv(4096).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    time.sleep(0.5)
    grown = b"".join(p.read_bytes()[size:] for p, size in logs.items())
    assert logs and b"Traceback" not in grown and b"Error handling request" not in grown, grown[-2000:]


async def test_a_client_names_the_field_as_the_cli_does(service):
    """The API answers ``loras``; the client raises the error for ``lora`` (--lora), as a local run does."""
    remote = client(service)
    try:
        with pytest.raises(RequestError) as refused:
            await remote.submit(_request(loras=[("a", 5.0)]))
        assert refused.value.field == "lora" and str(refused.value).startswith("lora: ")
    finally:
        await remote.close()


async def test_a_submission_waiting_for_a_locked_queue_file_holds_up_no_other_request(tmp_path):
    """Another program holds the queue file locked (an sqlite3 shell, a backup): a POST waits for it, off the
    event loop. Its write ran on the loop: every client waited sqlite's 10 s with it."""
    import sqlite3

    from aiohttp.test_utils import TestClient, TestServer
    from test_tui import NoWorkers

    db = tmp_path / "q.sqlite3"
    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await service.start()
    try:
        async with TestClient(TestServer(Api(service, token="t").app), headers={"Authorization": "Bearer t"}) as http:
            other = sqlite3.connect(db, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            posted = asyncio.create_task(http.post("/v1/jobs", json={"request": _request().to_dict(),
                                                                     "out": str(tmp_path / "out")}))
            await asyncio.sleep(0.5)  # the POST is at the queue file
            began = time.monotonic()
            async with http.get("/v1/version") as r:
                assert r.status == 200 and time.monotonic() - began < 3
            assert not posted.done()
            other.execute("COMMIT")
            async with await posted as r:
                job = (await r.json())["id"]
                assert r.status == 201 and service.store.get(job).state == "queued"
            # Forgetting ended jobs waits on a connection of its own too, as a submission does. It ran in a thread on
            # the service's connection, amid the event loop's transactions, and was refused at once.
            other.execute("BEGIN EXCLUSIVE")
            forgetting = asyncio.create_task(http.post("/v1/jobs/forget?days=0"))
            await asyncio.sleep(0.5)
            began = time.monotonic()
            async with http.get("/v1/jobs") as r:
                assert r.status == 200 and [j["id"] for j in (await r.json())["jobs"]] == [job]
                assert time.monotonic() - began < 3
            assert not forgetting.done()
            other.execute("COMMIT")
            other.close()
            async with await forgetting as r:
                assert r.status == 200 and await r.json() == {"forgotten": 0}
    finally:
        await service.close()
    with pytest.raises(ServiceUnavailable, match="^service: it is stopping"):  # not sqlite's "closed database"
        await service.enqueue_in_thread(service.prepare(_request(), tmp_path / "out"))
    with pytest.raises(ServiceUnavailable, match="^service: it is stopping; forget them once it runs$"):
        await service.forget_ended(0)


async def test_a_queue_file_that_takes_no_writes_is_a_passing_fault_to_a_remote_client(tmp_path, monkeypatch, capsys):
    """The API answers 503 (not 400: bad input) while the queue file is locked, the remote client raises it as a
    passing fault, and a command exits 3, as when no service answers: a script may try again later."""
    import sqlite3

    from backend.errors import Transient
    from tui import cli_queue
    from tui.cli import main

    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    service, runner = await _serve_in_test(db, sock)
    service.store._db.execute("PRAGMA busy_timeout = 50")  # SQLite waits 10 s for a lock by default
    remote = RemoteClient(Address(socket=sock), start=None, previews=False, patience=None)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(Transient, match=rf"^queue: cannot use {re.escape(str(db))}: database is locked; "):
            await remote.cancel_all()
        monkeypatch.setattr(cli_queue, "_client", lambda args: RemoteClient(Address(socket=sock), start=None,
                                                                           previews=False, patience=None))
        monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's SIGTERM handler: the main thread's only
        assert await asyncio.to_thread(main, ["cancel", "--all"]) == 3
        assert capsys.readouterr().err.startswith("dreamtty: queue: cannot use ")
    finally:
        other.close()
        await remote.close()
        await runner.cleanup()
        await service.close()


async def _serve_in_test(db: Path, sock: Path) -> tuple[Service, web.AppRunner]:
    """A service without workers, its API on ``sock``, in this process."""
    from backend import http_server
    from test_tui import NoWorkers

    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await service.start()
    runner = http_server.make_runner(Api(service, token="t").app)
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    return service, runner


async def test_a_tui_says_its_service_is_lost_and_reads_the_queue_again_when_it_is_back(tmp_path):
    """The service stops under an attached TUI: it says so at once, shows no stale job, and once a service
    runs again it reads the queue as it is then (a job cancelled meanwhile is no longer counted)."""
    from test_tui import opened, wait_for
    from tui.app import DreamttyApp
    from tui.widgets.progress import JobProgress

    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    serve = partial(_serve_in_test, db, sock)
    service, runner = await serve()
    job = service.store.add("generate", {"request": {"prompt": "a fox"}}, service.owner)  # no worker: it waits
    app = DreamttyApp(model="demo", out=tmp_path / "out",
                      client=RemoteClient(Address(socket=sock), start=None, previews=False, patience=None))
    async with opened(app, size=(120, 40)) as pilot:
        try:
            await wait_for(pilot, lambda: app.activity() == "1 queued", what="the queued job")
            progress = app.generate_screen.query_one(JobProgress)
            app.generate_screen.handle_job_event(Queued(job=job, kind="generate", request={}))  # the job shown
            await pilot.press("f2")
            rows = lambda: [tuple(map(str, app.screen.query_one("#jobs").get_row_at(i)[:2]))  # noqa: E731
                            for i in range(app.screen.query_one("#jobs").row_count)]
            await wait_for(pilot, lambda: rows() == [(f"#{job}", "queued")], what="the job's row")
            await runner.cleanup()
            await service.close()
            await wait_for(pilot, lambda: app.activity() == "no service: trying again…", what="the lost service")
            await wait_for(pilot, lambda: rows() == [], what="no stale row")  # it showed the job queued on
            assert progress.status == f"Job #{job}: no service; it stays queued, and shows here again once it is back"
            with closing(QueueStore(db)) as store:
                store.set_state(job, "cancelled")  # by another client, while this one was away
            service, runner = await serve()
            await wait_for(pilot, lambda: app.activity() == "starting the worker…", what="the service back")
            assert app.active == {}
            await wait_for(pilot, lambda: rows() == [(f"#{job}", "cancelled")], what="the job read again")
            await wait_for(pilot, lambda: progress.status == f"Job #{job} cancelled.", what="its end shown")
        finally:
            await runner.cleanup()
            await service.close()


async def test_a_tui_client_says_a_service_it_cannot_use_and_follows_its_own_once_it_is_back(tmp_path, monkeypatch):
    """A service of another build (or token) in its service's place: a TUI's client said nothing and stopped
    following for good, so the TUI showed "trying again" while its own service ran again."""
    from backend.events import ServiceLost, ServiceReady

    monkeypatch.setattr(remote_client, "RECONNECT_DELAY", (0.05, 0.1))
    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    service, runner = await _serve_in_test(db, sock)
    client = RemoteClient(Address(socket=sock), start=None, previews=False, patience=None)  # as the TUI's
    events = client.subscribe()
    other_build = {"on": True}
    real = remote_client.versions_differ
    try:
        await client.jobs()  # connected, following the events
        monkeypatch.setattr(remote_client, "versions_differ",
                            lambda theirs: "it runs build 0ld0ld" if other_build["on"] else real(theirs))
        await runner.cleanup()
        await service.close()
        service, runner = await _serve_in_test(db, sock)  # "another build"
        said = []
        while len(said) < 2:
            said.append(await asyncio.wait_for(events.get(), 10))
        assert [type(e) for e in said] == [ServiceLost, ServiceLost]
        assert said[1].message == "service: it runs build 0ld0ld; trying again"
        other_build["on"] = False  # its own build runs there now
        assert isinstance(await asyncio.wait_for(events.get(), 10), ServiceReady)
    finally:
        await client.close()
        await runner.cleanup()
        await service.close()


async def test_a_client_that_may_start_a_service_starts_one_when_its_service_is_gone(tmp_path, monkeypatch):
    """As for its first request: a request whose service stopped meanwhile was never sent, so it goes to the
    service started for it (the TUI's ctrl+g after ``dreamtty serve --stop``)."""
    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    loop, started = asyncio.get_running_loop(), []

    def start_detached(options):  # called in a thread, as it spawns ``dreamtty serve --detach``
        started.append(asyncio.run_coroutine_threadsafe(_serve_in_test(db, sock), loop).result())
        return {"pid": os.getpid(), "started": True}

    monkeypatch.setattr(remote_client, "start_detached", start_detached)
    service, runner = await _serve_in_test(db, sock)
    job = service.store.add("generate", {"request": {"prompt": "a fox"}}, service.owner)
    starter = RemoteClient(Address(socket=sock), start=remote_client.ServeOptions(devices="cpu"), previews=False)
    try:
        assert [j.id for j in await starter.jobs()] == [job]
        await runner.cleanup()
        await service.close()
        assert [j.id for j in await starter.jobs()] == [job] and len(started) == 1
    finally:
        await starter.close()
        for service, runner in started:
            await runner.cleanup()
            await service.close()


async def test_a_waiting_client_does_not_start_again_a_service_that_was_stopped(tmp_path, monkeypatch):
    """``dreamtty generate`` waiting for its job re-reads the job's record every few seconds: after ``serve
    --stop`` that read started a new service (without the stopped one's options) instead of leaving the job
    queued for the next start and saying so."""
    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    started = []
    monkeypatch.setattr(remote_client, "start_detached", lambda options: started.append(options))
    monkeypatch.setattr(remote_client, "RECHECK", 0.2)
    service, runner = await _serve_in_test(db, sock)
    waiter = RemoteClient(Address(socket=sock), start=remote_client.ServeOptions(devices="cpu"), previews=False,
                          patience=2.0)
    try:
        job = await waiter.submit(_request(), tmp_path)
        read_back, catch_up = [], waiter._catch_up

        async def counted(*args):
            caught = await catch_up(*args)
            read_back.append(caught)
            return caught

        async def follow() -> None:
            async for _ in waiter.wait(job):
                pass

        monkeypatch.setattr(waiter, "_catch_up", counted)
        waiting = asyncio.create_task(follow())
        async with asyncio.timeout(30):
            while not read_back:  # it follows the job: its first read of the record is done
                await asyncio.sleep(0.05)
        await runner.cleanup()
        await service.close()
        with pytest.raises(ServiceUnavailable, match="for 2 s; its jobs stay queued"):
            await asyncio.wait_for(waiting, 30)
    finally:
        await waiter.close()
    assert started == []



async def test_overlapping_waits_that_hold_back_starts_leave_the_client_able_to_start_one(tmp_path):
    """Each catch-up swapped the start options out and back: two that overlapped left none, for good."""
    options = remote_client.ServeOptions(devices="cpu")
    client = RemoteClient(Address(socket=tmp_path / "s.sock"), start=options, previews=False)

    async def catch_up(seconds: float) -> None:
        with client._starting_none():
            assert client._options_to_start() is None
            await asyncio.sleep(seconds)

    await asyncio.gather(catch_up(0.05), catch_up(0.1))  # the first ends while the second still holds
    assert client._options_to_start() is options

def test_a_service_that_is_stopping_is_said_so_and_a_start_waits_for_it_to_go(dirs):
    """A service stops for seconds with jobs running, holding its lock. The status said none runs (a crashed
    one left its socket), and a command that needed a service failed: "one is already running ... stop it"."""
    import fcntl
    import threading

    from backend import serve
    from backend.service_files import ServiceFiles

    files = ServiceFiles.default()
    files.make_folder()
    files.socket.touch()  # a socket that no longer answers
    files.write_pid_file({"pid": 4242})
    lock = os.open(files.lock_file, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    status = cli(dirs, "serve", "--status")
    assert status.returncode == 1
    assert status.stderr.startswith("dreamtty: the service (pid 4242) does not answer: it is starting, stopping or busy")
    threading.Timer(3.0, os.close, (lock,)).start()  # it exits: the lock goes with it
    info = serve.start_detached(serve.ServeOptions(devices="cpu"))
    assert info["pid"] != 4242 and serve.is_running(files)


def test_a_state_folder_that_takes_no_log_is_one_line(tmp_path, monkeypatch):
    from backend import serve

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    serve.log_path().mkdir(parents=True)  # a log it cannot write, as in a read-only state folder
    with pytest.raises(DreamttyError, match=r"^service: cannot write its log .*serve\.log: Is a directory; the state "
                                            r"folder must be writable$"):
        serve.start_detached(serve.ServeOptions(devices="cpu"))


async def test_the_status_says_why_a_worker_cannot_start_after_the_queue_files_warnings(tmp_path, caplog):
    """A worker of code changed on disk (backend.pool): its pool's line reaches the log, the event stream and
    ``serve --status``, beside the warnings the service had from its start."""
    from aiohttp.test_utils import TestClient, TestServer
    from test_job_groups import _StartedPool

    from backend.events import Log
    from backend.service_status import checked_status
    from tui.cli_serve import format_status

    why = "worker 0: dreamtty was changed on disk since this service started (…): restart the service"

    class StalePool(_StartedPool):
        def status(self) -> dict:
            return {"workers": [], "warnings": [why]}

    service = Service(devices="cpu", db_path=tmp_path / "q.sqlite3", pool=StalePool(1))
    events = service.subscribe()
    waiting = service.wait(7, service.subscribe())  # a client following a job is told too
    service._handle(Log(message=why, level="error"))  # as the pool says it, once
    assert events.get_nowait() == Log(message=why, level="error")
    assert await anext(waiting) == Log(message=why, level="error")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "dreamtty.service"] == [("ERROR", why)]
    api = Api(service, token="t", info=lambda: {"warnings": ["queue: a damaged queue.sqlite3 was moved aside"]})
    async with TestClient(TestServer(api.app), headers={"Authorization": "Bearer t"}) as http:
        async with http.get("/v1/status") as r:
            status = checked_status(await r.json())
    assert status["warnings"] == ["queue: a damaged queue.sqlite3 was moved aside", why]
    assert f"warning   {why}" in format_status(status)
    service.store.close()


async def test_a_client_that_gave_up_on_its_lost_service_leaves_its_jobs_queued(tmp_path, monkeypatch):
    """``generate`` says "its jobs stay queued" when its service is gone for its patience: it then cancels
    nothing, and starts no service to cancel them (as it would for Ctrl-C)."""
    from backend import remote_client

    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    started = []
    monkeypatch.setattr(remote_client, "start_detached", started.append)
    monkeypatch.setattr(remote_client, "POLL", 0.1)
    service, runner = await _serve_in_test(db, sock)
    starter = RemoteClient(Address(socket=sock), start=remote_client.ServeOptions(devices="cpu"), previews=False,
                           patience=0.5)
    events = starter.subscribe()
    try:
        job = await starter.submit(_request(), tmp_path / "out")
        waiting = asyncio.create_task(_drain(starter.wait(job, events)))  # it follows the job's events
        await asyncio.sleep(0.5)
        await runner.cleanup()
        await service.close()
        with pytest.raises(ServiceUnavailable, match=r"for 0\.5 s; its jobs stay queued"):  # the CLI exits 3
            async with asyncio.timeout(30):
                await waiting
    finally:
        await starter.close(cancel_jobs=True)
    assert started == []
    with closing(QueueStore(db)) as store:
        assert store.get(job).state == "queued"


async def test_a_client_interrupted_while_its_service_is_gone_starts_none_to_cancel_its_jobs(tmp_path, monkeypatch):
    """Ctrl-C on ``generate`` after ``serve --stop``: a service started to cancel would first run the jobs (it
    adopts them) and stay; they are left queued, and named."""
    from backend import remote_client

    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    started = []
    monkeypatch.setattr(remote_client, "start_detached", started.append)
    service, runner = await _serve_in_test(db, sock)
    starter = RemoteClient(Address(socket=sock), start=remote_client.ServeOptions(devices="cpu"), previews=False)
    job = await starter.submit(_request(), tmp_path / "out")
    await runner.cleanup()
    await service.close()
    await starter.close(cancel_jobs=True)  # as the interrupted generate does
    assert started == [] and starter.kept == [job]
    with closing(QueueStore(db)) as store:
        assert store.get(job).state == "queued"


async def test_a_client_whose_service_is_replaced_by_one_of_other_settings_says_so(tmp_path, monkeypatch):
    """Not "lost the connection … for 30 s" while a service answers: the reason, at once."""
    from backend import remote_client
    from backend.versions import versions

    monkeypatch.setattr(remote_client, "POLL", 0.1)
    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    service, runner = await _serve_in_test(db, sock)
    follower = RemoteClient(Address(socket=sock), start=None, previews=False, patience=30)
    events = follower.subscribe()
    other = None
    try:
        job = await follower.submit(_request(), tmp_path / "out")
        waiting = asyncio.create_task(_drain(follower.wait(job, events)))
        await asyncio.sleep(0.5)
        await runner.cleanup()
        await service.close()
        app = web.Application()  # started with DREAMTTY_ALLOW_PICKLE=1, say
        app.router.add_get("/v1/version", lambda request: web.json_response({**versions(),
                                                                             "settings": {"allow_pickle": True}}))
        other = web.AppRunner(app)
        await other.setup()
        await web.UnixSite(other, str(sock)).start()
        with pytest.raises(DreamttyError, match=r"^service: it runs with other settings \(allow_pickle: True there, "
                                                r"unset here; config: unset there, /"):  # each said once
            async with asyncio.timeout(20):
                await waiting
    finally:
        await follower.close()
        if other is not None:
            await other.cleanup()


async def test_following_a_job_says_its_retry_and_why_no_worker_runs_it(capsys):
    from backend.events import Done, Log, Retrying
    from tui.cli_jobs import follow

    class Said:
        async def wait(self, job_id, events):
            yield Retrying(job=job_id, error="worker crashed (exit code -9)", first_image=2)
            yield Log(message="worker 0: dreamtty was changed on disk …", level="error")
            yield Done(job=job_id, paths=[])

    assert await follow(Said(), [3], None, False) == (0, [])
    assert capsys.readouterr().err.splitlines() == [
        "dreamtty: job 3: worker crashed (exit code -9); it runs again from image 3",
        "dreamtty: service: worker 0: dreamtty was changed on disk …"]


async def test_waiting_for_jobs_prints_those_already_ended_first(capsys):
    """``wait 2 1`` with job 1 done: its image is printed at once, not after job 2, by when another client may
    have forgotten job 1."""
    from types import SimpleNamespace

    from backend.events import Done, ImageSaved
    from tui.cli_jobs import follow

    class TwoJobs:
        def __init__(self) -> None:
            self.states = {1: "done", 2: "running"}

        async def job(self, job_id):
            return SimpleNamespace(state=self.states[job_id]) if job_id in self.states else None

        async def wait(self, job_id, events):
            if job_id not in self.states:
                raise DreamttyError(f"job {job_id}: no such job")
            yield ImageSaved(job=job_id, image=0, path=f"/out/{job_id}.png", seed=job_id)
            yield Done(job=job_id, paths=[f"/out/{job_id}.png"])
            self.states.pop(1, None)  # once a job ended, another client forgets job 1

    assert await follow(TwoJobs(), [2, 1], None, False) == (0, ["/out/1.png", "/out/2.png"])
    assert capsys.readouterr().out.splitlines() == ["/out/1.png", "/out/2.png"]


async def _drain(events) -> None:
    async for _ in events:
        pass


async def test_serve_status_says_to_restart_a_service_of_other_code_whose_status_reads(monkeypatch, capsys):
    from backend.versions import versions
    from tui import cli_serve

    class OldService:  # one left running by an upgrade in place: its status reads alike
        async def status(self) -> dict:
            return {**versions(), "build": "0ld0ld0ld0ld", "pid": 7, "uptime": 1.0, "queued": 0, "running": 0,
                    "workers": [], "streams": 0}

        async def close(self) -> None:
            pass

    monkeypatch.setattr(cli_serve, "_answers", lambda: True)
    monkeypatch.setattr(cli_serve, "_client", OldService)
    assert await cli_serve._status(False) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "build 0ld0ld0ld0ld) and this is" in warnings[0]
    assert warnings[0].endswith("restart the service: dreamtty serve --stop, then run this again")
    assert await cli_serve._status(True) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [warnings[0].removeprefix("warning   ")]


async def test_a_stream_whose_client_stopped_reading_is_closed_and_a_reading_one_gets_every_event(tmp_path,
                                                                                                  monkeypatch):
    """A WebSocket client that takes nothing (its window full) while events pile up must not hold the service's
    memory: past Fanout.BACKLOG unread events its stream is closed. A client that reads misses nothing."""
    from backend import api
    from backend.events import Fanout, Log

    monkeypatch.setattr(api, "CLOSE_TIMEOUT", 0.5)
    monkeypatch.setattr(Fanout, "PATIENCE", 0.2)
    service, runner = await _serve_in_test(tmp_path / "queue.sqlite3", tmp_path / "serve.sock")
    follower = RemoteClient(Address(socket=tmp_path / "serve.sock", token="t"), start=None, previews=False)
    stalled = socket.socket(socket.AF_UNIX)
    try:
        events = follower.subscribe()
        await follower.status()  # connects, and opens its stream
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await asyncio.to_thread(stalled.connect, str(tmp_path / "serve.sock"))
        stalled.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: aaaaaaaaaaaaaaaaaaaaaa==\r\n\r\n")
        while len(service._fanout.queues) < 2:
            await asyncio.sleep(0.05)
        sent = 0
        while len(service._fanout.queues) == 2 and sent < 20 * Fanout.BACKLOG:
            for _ in range(50):
                service._fanout.publish(Log(message=f"{sent} " + "x" * 4000))
                sent += 1
            await asyncio.sleep(0.01)  # the follower reads as they come
        assert len(service._fanout.queues) == 1 and sent < 20 * Fanout.BACKLOG  # the stalled one was dropped
        service._fanout.publish(Log(message="the end"))
        got = []
        while not got or got[-1] != "the end":
            event = await asyncio.wait_for(events.get(), 10)
            if isinstance(event, Log):
                got.append(event.message)
        assert [int(m.split()[0]) for m in got[:-1]] == list(range(sent))  # every one, in order
        for _ in range(100):  # the stalled one's stream is closed within CLOSE_TIMEOUT; the follower's stays
            if (streams := (await follower.status())["streams"]) == 1:
                break
            await asyncio.sleep(0.05)
        assert streams == 1
    finally:
        stalled.close()
        await follower.close()
        await runner.cleanup()
        await service.close()


async def test_a_client_says_why_the_service_closed_its_stream(tmp_path):
    from backend.events import ServiceLost

    service, runner = await _serve_in_test(tmp_path / "queue.sqlite3", tmp_path / "serve.sock")
    follower = RemoteClient(Address(socket=tmp_path / "serve.sock", token="t"), start=None, previews=False)
    try:
        events = follower.subscribe()
        await follower.status()  # connects, and opens its stream
        while not (await follower.status())["streams"]:
            await asyncio.sleep(0.05)
        await runner.cleanup()  # the service stops: it closes each stream with its reason
        while not isinstance(event := await asyncio.wait_for(events.get(), 10), ServiceLost):
            pass
        assert event.message == (f"service: lost the connection to {follower.address} (service stopping); trying "
                                 "again (its jobs stay queued)")
    finally:
        await follower.close()
        await service.close()


async def test_waiting_on_a_job_another_process_runs_ends_when_it_ends(tmp_path, monkeypatch):
    """``dreamtty wait`` on a job a ``--local`` command runs: the service gets no event of it, and the wait hung
    after the job had ended. Its record is read again every RECHECK seconds: images and the end come through."""
    monkeypatch.setattr(remote_client, "RECHECK", 0.2)
    service, runner = await _serve_in_test(tmp_path / "queue.sqlite3", tmp_path / "serve.sock")
    follower = RemoteClient(Address(socket=tmp_path / "serve.sock", token="t"), start=None, previews=False)
    with closing(QueueStore(tmp_path / "queue.sqlite3")) as local:  # the --local command's own connection
        job = local.add("generate", {"request": {"prompt": "p"}}, owner="local/1/x")
        local.set_running([job])
        try:
            waiting = asyncio.create_task(_collect(follower.wait(job)))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            local.add_output(job, str(tmp_path / "a.png"))
            local.set_state(job, "done")
            events = await asyncio.wait_for(waiting, 10)
        finally:
            await follower.close()
            await runner.cleanup()
            await service.close()
    assert [type(e).__name__ for e in events] == ["ImageSaved", "Done"]
    assert events[0].path == str(tmp_path / "a.png") and events[1].paths == [str(tmp_path / "a.png")]


async def _collect(events) -> list:
    return [event async for event in events]


def test_a_token_file_that_does_not_read_is_one_line(tmp_path, monkeypatch):
    from backend.service_files import read_token, token_file

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    token_file().parent.mkdir(parents=True)
    token_file().write_bytes(b"\xff\xfe token")
    token_file().chmod(0o600)
    with pytest.raises(DreamttyError, match=r"^token: cannot read .*serve\.token: it is not UTF-8 text; delete it "
                                            r"and a new token is made$"):
        read_token()
    token_file().unlink()
    token_file().mkdir(mode=0o700)
    with pytest.raises(DreamttyError, match=r"^token: cannot read .*serve\.token: Is a directory; delete it"):
        read_token()


def test_a_folder_that_takes_no_locks_is_one_line(tmp_path, monkeypatch):
    """NFS without lockd: flock fails with ENOLCK, which escaped as a traceback."""
    import errno

    from backend import service_files

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(service_files.fcntl, "flock", no_locks)
    files = ServiceFiles(tmp_path / "run")
    files.make_folder()
    with pytest.raises(DreamttyError, match=r"^lock: cannot lock .*: No locks available \(a file system without "
                                            r"locks, as NFS without lockd\); put dreamtty's folders on a local disk"):
        files.acquire()
    with pytest.raises(DreamttyError, match=r"^lock: cannot lock .*serve\.lock: No locks available"):
        service_files.hold_queue(tmp_path / "state", {})


async def test_idle_exit_waits_through_a_locked_queue_and_exits_after(monkeypatch):
    """A queue locked for a while (a backup) ended the idle check for good: the service never exited."""
    from types import SimpleNamespace

    import sqlite3

    from backend import serve
    from backend.queue_store import QueueUnavailable

    answers = [QueueUnavailable(Path("queue.sqlite3"), sqlite3.OperationalError("database is locked")), {}, {}]

    def counts(owner):
        answer = answers.pop(0) if answers else {}
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(serve, "IDLE_CHECK", 0.05)
    service = SimpleNamespace(store=SimpleNamespace(counts=counts), owner="me", training=SimpleNamespace(busy=bool))
    api = SimpleNamespace(streams=[], last_request=time.monotonic())
    stop, said = asyncio.Event(), []
    await asyncio.wait_for(serve._exit_when_idle(service, api, 0.1, stop, said.append), 5)
    assert stop.is_set() and said == ["dreamtty: idle for 0.00166667 minutes; exiting to free the workers"]


async def test_a_stop_cuts_off_a_stream_whose_client_takes_no_close(tmp_path, monkeypatch):
    """Closing each stream in turn waited for ever on a client that reads nothing (a TUI stopped with Ctrl-Z,
    its socket full): the service never stopped, its workers kept the GPU."""
    from types import SimpleNamespace

    from backend import api as api_module

    class Stuck:
        async def close(self, code, message):
            await asyncio.Event().wait()

    class Reading:
        closed = False

        async def close(self, code, message):
            self.closed = True

    monkeypatch.setattr(api_module, "CLOSE_TIMEOUT", 0.2)
    api = Api(Service(devices="cpu", db_path=tmp_path / "queue.sqlite3"))
    aborted: list[str] = []
    requests = [SimpleNamespace(transport=SimpleNamespace(abort=partial(aborted.append, name))) for name in "ab"]
    stuck, reading = [Stuck(), Stuck()], Reading()
    api.streams.update({stuck[0]: requests[0], reading: SimpleNamespace(transport=None), stuck[1]: requests[1]})
    began = time.monotonic()
    await asyncio.wait_for(api._close_streams(api.app), 5)
    await asyncio.sleep(0.1)
    assert time.monotonic() - began < 1 and sorted(aborted) == ["a", "b"] and reading.closed  # at once, not in turn
    api.service.store.close()


async def test_a_client_follows_its_service_again_after_a_call_dropped_its_session(tmp_path, monkeypatch):
    """A call whose service start failed dropped the client's session; the stream's reconnect loop then died of an
    AttributeError on the missing session, unsaid: a TUI never heard of its service again, a ``wait`` never gave
    up."""
    from backend.events import ServiceLost, ServiceReady

    monkeypatch.setattr(remote_client, "RECONNECT_DELAY", (0.05, 0.1))
    db, sock = tmp_path / "queue.sqlite3", tmp_path / "serve.sock"
    service, runner = await _serve_in_test(db, sock)
    client = RemoteClient(Address(socket=sock, token="t"), start=None, previews=False, patience=None)
    events = client.subscribe()
    try:
        await client.jobs()  # connected, following the events
        await runner.cleanup()
        await service.close()
        assert isinstance(await asyncio.wait_for(events.get(), 10), ServiceLost)
        client._drop_http()  # as _call does before a start that fails
        await asyncio.sleep(0.3)  # reconnect tries meanwhile
        service, runner = await _serve_in_test(db, sock)
        assert isinstance(await asyncio.wait_for(events.get(), 10), ServiceReady)
        assert not client._stream.done()
    finally:
        await client.close()
        await runner.cleanup()
        await service.close()
