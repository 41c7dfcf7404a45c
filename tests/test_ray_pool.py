"""Workers on a Ray cluster: a local Ray runtime (2 CPUs) with two CPU actors on the demo model.

Jobs spread over both actors, go where their model is loaded, survive a killed actor without
duplicate images, and make the same files as the local worker; without Ray, ``--cluster`` says how
to install it. Model affinity in the dispatcher is also tested with fake slots (no Ray).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backend import metadata
from backend.config import load as load_config
from backend.errors import DreamttyError, RequestError
from backend.events import Done, Failed, ImageSaved, Retrying, Started, Step, WorkerReady
from backend.pool import ProcessPool, Slot
from backend.queue_store import QueueStore
from backend.request import GenerateRequest
from backend.service import Prepared, Service, make_pool, pick_slot

TIMEOUT = 90
ROOT = Path(__file__).resolve().parents[1]
ray_installed = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the cluster extra")


# -- model affinity, with fake slots (no Ray) ------------------------------------------------
def test_pick_slot_prefers_the_model_then_an_empty_worker():
    a, b, c = Slot(0, "cpu", models=["demo"]), Slot(1, "cpu", models=["demo-xl"]), Slot(2, "cpu")
    assert pick_slot([a, b, c], "demo-xl") is b
    assert pick_slot([a, b, c], "other") is c  # loads it where no model would be pushed out
    assert pick_slot([a, b], "other") is a
    c.loads("demo-xl")
    c.loads("x")
    c.loads("demo-xl")
    c.loads("y")
    assert c.models == ["demo-xl", "y"]  # the last two models a worker ran (PipelineCache keeps two)


class _FakePool:
    """Slots that are always alive and remember the jobs they were given."""

    def __init__(self, count: int) -> None:
        self.slots = [Slot(i, "cpu") for i in range(count)]
        self.given: list[tuple[int, int]] = []  # (slot, job)

    def alive(self, slot):
        return True

    def run(self, slot, jobs):
        slot.jobs = [job["job"] for job in jobs]
        self.given.append((slot.id, *slot.jobs))


def _queue(service: Service, model: str) -> int:
    request = GenerateRequest(prompt="x", model=model, steps=1).resolved("demo").to_dict()
    return service.store.add("generate", {"request": request, "out": "/nowhere"}, service.owner)


def test_dispatch_sends_each_job_to_the_worker_holding_its_model(tmp_path):
    pool = _FakePool(2)
    service = Service(db_path=tmp_path / "q.sqlite3", pool=pool)
    pool.slots[1].models = ["demo-xl"]
    first, second = _queue(service, "demo-xl"), _queue(service, "demo")
    service._dispatch()
    assert pool.given == [(1, first), (0, second)]  # the oldest job first, to the slot holding its model
    pool.slots[0].jobs = pool.slots[1].jobs = []
    third = _queue(service, "demo")
    service._dispatch()
    assert pool.given[-1] == (0, third) and pool.slots[0].models == ["demo"]
    service.store.close()


# -- without Ray, or with a bad address -----------------------------------------------------
def test_cluster_without_ray_says_how_to_install(monkeypatch):
    from backend import ray_pool

    real = importlib.util.find_spec
    monkeypatch.setattr(ray_pool.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    with pytest.raises(DreamttyError, match=r"^cluster: .*needs Ray; pip install 'dreamtty\[cluster\]'$"):
        ray_pool.check_cluster("auto")
    with pytest.raises(RequestError, match=r"^cluster: 'http://x' is not allowed; use auto, ray://HEAD:10001"):
        ray_pool.check_cluster("http://x")
    for port in ("0", "0000", "99999", "123456"):  # six digits were "not allowed; use auto, ..."
        with pytest.raises(RequestError, match=rf"^cluster: 'h:{port}' is not allowed: port {port} is out of range "
                                               r"1..65535$"):
            ray_pool.check_cluster(f"h:{port}")
    assert ray_pool.check_address("h:06379", "cluster", "")["port"] == "06379"  # as Ray reads it: port 6379


def test_config_workers_picks_the_pool(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    monkeypatch.setenv("DREAMTTY_CONFIG", str(config))
    config.write_text("workers: local\n")
    assert isinstance(make_pool("cpu", tmp_path / "q.sqlite3"), ProcessPool)
    if importlib.util.find_spec("ray") is not None:
        config.write_text("workers: ray\n")
        pool = make_pool("auto", tmp_path / "q.sqlite3")
        assert type(pool).__name__ == "RayPool" and pool.address == "auto" and pool.gpu
        assert make_pool("cpu", tmp_path / "q.sqlite3", cluster="local").__class__ is ProcessPool
        assert not make_pool(" cpu ", tmp_path / "q.sqlite3").gpu  # as --device cpu (it was a GPU actor each)
        with pytest.raises(RequestError, match=r"^device: cuda:1 names GPUs of this machine; on a Ray cluster use "
                                               r"auto \(an actor per GPU of the cluster\) or cpu"):
            make_pool("cuda:1", tmp_path / "q.sqlite3")  # its GPU 1 was taken to mean every GPU of the cluster
    config.write_text("workers: 'not an address'\n")  # a bad value warns and keeps the default, as every key
    assert isinstance(make_pool("cpu", tmp_path / "q.sqlite3"), ProcessPool)
    assert load_config().warnings == ["config: workers: 'not an address' is not allowed; use local, ray, "
                                      "ray://HEAD:10001 or HEAD:6379; using the default"]


class _FakeRay:
    """Just enough of ``ray`` for ``RayPool._start_actor``: each actor answers hello with the next of ``answers``
    (an exception is raised as Ray's)."""

    class exceptions:
        RayError = RuntimeError

    def __init__(self, answers: list) -> None:
        self.answers, self.killed = list(answers), 0
        self.actor_class = type("ActorClass", (), {"remote": lambda *args: self._actor()})

    def _actor(self):
        answer = self.answers.pop(0)
        return type("Actor", (), {"hello": type("Hello", (), {"remote": lambda: answer})})

    def get(self, answer):
        if isinstance(answer, Exception):
            raise answer
        return answer

    def kill(self, actor) -> None:
        self.killed += 1


def test_the_status_answers_while_the_head_does_not(tmp_path, monkeypatch):
    """ray.nodes() blocks while the head is down: ``serve --status`` (and every client) hung a minute."""
    import ray

    from backend import ray_pool

    head_back = threading.Event()
    monkeypatch.setattr(ray, "nodes", lambda: head_back.wait() and [])
    monkeypatch.setattr(ray_pool, "NODES_WAIT", 0.2)
    pool = ray_pool.RayPool("auto", tmp_path / "q.sqlite3", gpu=False)
    for _ in range(2):  # the second status does not wait again, nor ask the head a second time
        started = time.monotonic()
        status = pool.status()
        assert status["nodes"] is None and status["warnings"] == ["cluster: the Ray head at auto does not answer"]
    assert time.monotonic() - started < 0.2 and [t.name for t in threading.enumerate()].count("ray-nodes") == 1
    head_back.set()
    pool._asking[0].join()
    assert pool.status() == {"cluster": "auto", "head": None, "nodes": [], "workers": [], "warnings": []}
    from tui.cli_serve import worker_lines  # not "0 node(s)", as if it had none

    assert worker_lines({"cluster": "auto", "head": "10.0.0.1:6379", "nodes": None, "workers": []}) == [
        "cluster   auto (head 10.0.0.1:6379): nodes unknown"]

    def lost():
        raise ConnectionError("GCS unreachable\n(details)")

    monkeypatch.setattr(ray, "nodes", lost)
    assert pool.status()["warnings"] == ["cluster: cannot list the nodes of auto: GCS unreachable"]


@ray_installed
def test_a_failed_job_points_at_the_node_whose_worker_logs_say_why(tmp_path):
    from backend import ray_pool

    pool = ray_pool.RayPool("auto", tmp_path / "q.sqlite3", gpu=False)
    assert pool.log_of(Slot(0, "cuda", node="gpu-7")) == "the Ray worker logs on gpu-7 (`ray logs` lists them)"


async def test_an_actor_that_runs_other_code_takes_no_job_and_is_said_once(tmp_path, monkeypatch):
    """Nodes must run the service's code (the events and job payloads they pass are read alike): an actor of
    another build is stopped and tried again later, and why is said once, and in the status, until one runs."""
    import ray

    from backend import ray_pool, versions

    monkeypatch.setattr(ray_pool, "RESTART_DELAY", 0)
    monkeypatch.setattr(ray, "nodes", lambda: [])
    other = {"device": "cpu", "cuda_count": 0, "host": "node-b", "build": "0ld0ld0ld0ld"}
    fake = _FakeRay([other, other, RuntimeError("node lost"), {**other, "build": versions.build()}])
    pool = ray_pool.RayPool("auto", tmp_path / "q.sqlite3", gpu=False)
    said: list = []
    pool._loop, pool._on_event = asyncio.get_running_loop(), said.append
    worker = pool._workers[0] = ray_pool._Worker(Slot(0, "cpu"))
    pool.slots.append(worker.slot)
    started, warnings = [], []
    for _ in range(4):
        started.append(await asyncio.to_thread(pool._start_actor, fake, fake.actor_class, worker))
        await asyncio.sleep(0)  # what the thread handed the event loop
        warnings.append(pool.status()["warnings"])
    assert [actor is not None for actor in started] == [False, False, False, True] and fake.killed == 3
    other_code = (f"worker 0: node-b runs other dreamtty code (build 0ld0ld0ld0ld) than this service (build "
                  f"{versions.build()}); install the same dreamtty on every node, then restart the service")
    lost = "worker 0: cannot start on the cluster: node lost"
    assert [(e.message, e.level) for e in said[:-1]] == [(other_code, "error"), (lost, "error")]
    assert isinstance(said[-1], WorkerReady) and worker.ready
    assert warnings == [[other_code], [other_code], [lost], []]


def test_cli_cluster_errors_are_one_line(tmp_path):
    with socket.socket() as probe:  # a port where no Ray head listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cluster, expected, code in (  # a head down may come up: exit 3, that a script may try again
            (f"127.0.0.1:{port}", f"cluster: cannot reach the Ray head at 127.0.0.1:{port}: ", 3),
            ("nohead", "cluster: 'nohead' is not allowed; use auto, ray://HEAD:10001", 2)):
        out = subprocess.run([sys.executable, "-m", "tui.cli", "--cluster", cluster, "generate", "x", "--demo",
                              "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
        if importlib.util.find_spec("ray") is None and "reach" in expected:
            expected, code = "cluster: running workers on a Ray cluster needs Ray; pip install 'dreamtty[cluster]'", 2
        assert out.returncode == code and out.stderr.startswith(f"dreamtty: {expected}"), out.stderr
        assert out.stderr.count("\n") == 1



def test_an_address_that_is_no_ray_head_is_refused_at_once():
    """A host name the resolver refuses, and a port where something else (an HTTP server) listens:
    ray.init would wait minutes for the latter."""
    from backend.ray_pool import _check_head

    with pytest.raises(DreamttyError, match=r"^cluster: 'a\.\.b' in a\.\.b:6379 is not a valid host name$"):
        _check_head("a..b:6379", "a..b", 6379, "cluster")
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        http.listen()
        port = http.getsockname()[1]

        def answer() -> None:
            conn, _ = http.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"HTTP/1.0 400 Bad request\r\n\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(DreamttyError, match=rf"^workers: 127.0.0.1:{port} is not a Ray head \(it does not answer gRPC\)"):
            _check_head(f"127.0.0.1:{port}", "127.0.0.1", port, "workers")
        thread.join()


# -- a local Ray runtime, two CPU actors -------------------------------------------------------
@pytest.fixture(scope="module")
def ray_runtime(demo_dirs):
    """Ray on this machine with 2 CPUs; its workers inherit this process's environment (DREAMTTY_HOME)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="dreamtty-tests")
    yield ray
    ray.shutdown()


@pytest.fixture
async def cluster(ray_runtime, tmp_path):
    """A service whose workers are two CPU actors; both ready."""
    from backend.ray_pool import RayPool

    service = Service(db_path=tmp_path / "queue.sqlite3", pool=RayPool("auto", tmp_path / "queue.sqlite3",
                                                                       gpu=False, actors=2))
    events = service.subscribe()
    await service.start()
    ready = set()
    while len(ready) < 2:
        event = await asyncio.wait_for(events.get(), TIMEOUT)
        if isinstance(event, WorkerReady):
            ready.add(event.worker)
    yield service, events
    await service.close()


async def _finish(service, job, events) -> list:
    seen = []
    async for event in service.wait(job, events):
        seen.append(event)
    return seen


def _local_files(payload: dict, job: int, out: Path, store: QueueStore) -> list[str]:
    """The files the local worker's code makes for ``payload`` (in this process)."""
    import torch

    from backend.engine.loader import PipelineCache
    from backend.worker import JobRun, LocalOutput, run_jobs

    run_jobs([JobRun(0, {"job": job, "kind": "generate", **payload, "out": str(out)}, PipelineCache(torch.device("cpu")),
                     lambda event: None, lambda: False, LocalOutput(store))])
    return store.get(job).outputs


@ray_installed
async def test_jobs_from_two_clients_spread_over_both_actors_as_local_files(cluster, tmp_path):
    from backend.client import LocalClient

    service, _ = cluster
    clients = [LocalClient(service), LocalClient(service)]
    requests = [GenerateRequest(prompt=f"a red fox {n}", seed=7 + n, count=2, steps=3, width=64, height=64)
                for n in range(2)]
    events = [client.subscribe() for client in clients]
    jobs = [await client.submit(req, tmp_path / "ray") for client, req in zip(clients, requests)]
    seen = await asyncio.wait_for(asyncio.gather(*(_finish(service, j, e) for j, e in zip(jobs, events))), TIMEOUT)
    assert {next(e.worker for e in s if isinstance(e, Started)) for s in seen} == {0, 1}  # one job on each actor
    assert all(isinstance(s[-1], Done) and any(isinstance(e, Step) for e in s) for s in seen)
    store = QueueStore(tmp_path / "queue.sqlite3")
    for job, events_of_job in zip(jobs, seen):
        paths = [e.path for e in events_of_job if isinstance(e, ImageSaved)]
        assert events_of_job[-1].paths == paths == store.get(job).outputs and len(paths) == 2
        local = _local_files(store.get(job).payload, store.add("generate", store.get(job).payload, "local"), tmp_path / "local", store)
        assert [Path(p).read_bytes() for p in paths] == [Path(p).read_bytes() for p in local]  # pixels and metadata
    status = service.pool.status()
    assert [w["models"] for w in status["workers"]] == [["demo"], ["demo"]]
    assert status["nodes"][0]["alive"] and status["workers"][0]["node"] == socket.gethostname()
    from backend.service_status import checked_status
    from tui.cli_serve import format_status

    text = format_status(checked_status({**service.status(), "socket": "s", "dreamtty": "x", "streams": 0}))
    host = socket.gethostname()
    assert status["head"] and f"cluster   auto (head {status['head']}): 1 node(s), 0 GPU(s)" in text  # what it found
    assert f"node      {host} (" in text and "0 GPU(s), alive" in text
    assert f"worker 0  cpu ({host}), idle" in text and f"worker 1  cpu ({host}), idle" in text  # device (node)
    assert [w["node"] for w in service.status()["workers"]] == [host, host]


@ray_installed
async def test_a_job_goes_to_the_actor_holding_its_model(cluster, tmp_path):
    service, events = cluster

    async def worker_of(model: str) -> int:
        job = service.submit(GenerateRequest(prompt="x", model=model, steps=1, width=64, height=64), tmp_path)
        seen = await asyncio.wait_for(_finish(service, job, events), TIMEOUT)
        assert isinstance(seen[-1], Done)
        return next(e.worker for e in seen if isinstance(e, Started))

    first = await worker_of("demo")
    other = await worker_of("demo-xl")
    assert other != first  # the empty actor loads the new model
    assert [await worker_of(m) for m in ("demo", "demo-xl", "demo")] == [first, other, first]


@ray_installed
async def test_a_killed_actor_costs_no_image_and_no_duplicate(cluster, ray_runtime, tmp_path):
    service, events = cluster
    job = service.submit(GenerateRequest(prompt="x", seed=11, count=3, steps=20, width=64, height=64, max_batch=1),
                         tmp_path)  # the images in turn
    seen = []

    async def kill_mid_job() -> None:
        async for event in service.wait(job, events):
            seen.append(event)
            if isinstance(event, Step) and event.image == 1 and not any(isinstance(e, Retrying) for e in seen):
                ray_runtime.kill(service.pool._workers[event.worker].actor)  # mid image 2, image 1 saved

    await asyncio.wait_for(kill_mid_job(), TIMEOUT)
    retry = next(e for e in seen if isinstance(e, Retrying))
    assert "worker actor died" in retry.error and retry.first_image == 1
    assert isinstance(seen[-1], Done)
    saved = [e.path for e in seen if isinstance(e, ImageSaved)]
    assert len(saved) == 3 and seen[-1].paths == saved  # image 1 was not made twice
    assert [metadata.read(p)["request"]["seed"] for p in saved] == [11, 12, 13]
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(Path(p).name for p in saved)
    assert QueueStore(tmp_path / "queue.sqlite3").get(job).attempts == 1
    started = [e for e in seen if isinstance(e, Started)]
    assert len(started) == 2 and started[1].first_image == 1 and started[1].worker != started[0].worker


@ray_installed
async def test_a_model_missing_on_a_node_fails_the_job_naming_the_node(cluster, tmp_path):
    service, events = cluster
    request = GenerateRequest(prompt="x", model=str(tmp_path / "gone"), steps=1).resolved("demo").to_dict()
    job = service.enqueue(Prepared("generate", {"request": request, "out": str(tmp_path), "family": "demo"}))
    failed = (await asyncio.wait_for(_finish(service, job, events), TIMEOUT))[-1]
    assert isinstance(failed, Failed) and failed.error.startswith("model: ")
    assert failed.error.endswith(f"(on {socket.gethostname()})")


@ray_installed
async def test_an_image_the_service_cannot_save_fails_its_job_and_the_actor_goes_on(cluster, tmp_path, monkeypatch):
    from backend import ray_pool

    service, events = cluster
    monkeypatch.setattr(ray_pool, "save_output", lambda *args: (_ for _ in ()).throw(DreamttyError("out: disk full")))
    doomed = service.submit(GenerateRequest(prompt="x", count=2, steps=2, width=64, height=64), tmp_path)
    failed = (await asyncio.wait_for(_finish(service, doomed, events), TIMEOUT))[-1]
    assert isinstance(failed, Failed) and failed.error == "out: disk full"
    monkeypatch.undo()
    jobs = [service.submit(GenerateRequest(prompt="y", steps=2, width=64, height=64), tmp_path) for _ in range(2)]
    finals = [(await asyncio.wait_for(_finish(service, job, events), TIMEOUT))[-1] for job in jobs]
    assert all(isinstance(f, Done) and len(f.paths) == 1 for f in finals)
    assert QueueStore(tmp_path / "queue.sqlite3").get(doomed).outputs == []


@ray_installed
def test_a_cluster_without_gpus_is_refused_in_one_line(tmp_path):
    from backend.ray_pool import RayPool

    class NoGpus:
        @staticmethod
        def cluster_resources():
            return {"CPU": 8.0}

    with pytest.raises(DreamttyError, match=r"^cluster: the Ray cluster at auto has no GPU; .*--device cpu"):
        RayPool("auto", tmp_path / "q.sqlite3")._count(NoGpus)



@ray_installed
def test_the_head_check_passes_a_real_ray_head(ray_runtime):
    from backend.ray_pool import _check_head

    host, port = ray_runtime.get_runtime_context().gcs_address.rsplit(":", 1)
    _check_head(f"{host}:{port}", host, int(port), "cluster")


def test_auto_checks_the_head_ray_address_names(monkeypatch):
    """``auto`` with RAY_ADDRESS naming no head waited silently, without end, as Ray tried to join it."""
    from backend import ray_pool

    class Joining:
        def is_initialized(self) -> bool:
            return False

        def init(self, **options) -> None:
            raise AssertionError("not reached")

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(DreamttyError, match=r"^cluster: cannot reach the Ray head at 127.0.0.1:1: "):
        ray_pool._connect(Joining(), "auto", "cluster")
    for unreadable in ("[/]:1", "h\x1b[31mx:1"):  # not an address: not checked, so Ray waited minutes on it
        monkeypatch.setenv("RAY_ADDRESS", unreadable)
        for check in (lambda: ray_pool.check_cluster("auto"), lambda: ray_pool._connect(Joining(), "auto", "cluster")):
            with pytest.raises(RequestError) as refused:
                check()
            assert str(refused.value) == (f"RAY_ADDRESS: {unreadable!r} is not allowed; use HOST:PORT or "
                                          "ray://HOST:PORT, or unset it")


def test_the_lines_ray_prints_in_the_service_log_have_no_colour_codes(monkeypatch):
    """Its raylet's messages (a worker died, a node was lost) reached serve.log with ESC[33m ... ESC[0m."""
    from backend import ray_pool

    class Joins:
        def is_initialized(self) -> bool:
            return False

        def init(self, **options) -> None:
            pass

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    assert ray_pool._connect(Joins(), "auto", "cluster") and os.environ["RAY_COLOR_PREFIX"] == "0"


@pytest.mark.parametrize("log, why", [
    (b"[W gcs_client.cc:210] Failed to get cluster ID: Unauthenticated: InvalidAuthToken: token is incorrect\n",
     r"it refused this machine.s token \(give it the head.s token .*set RAY_AUTH_MODE=token: Ray sets it itself only "
     r"for a cluster it finds\)"),
    (b"[W rpc_client.h:153] Failed to connect to GCS\n", "Failed to connect to Ray cluster at 192.0.2.2:6379$"),
    (b"", r"none runs on this machine \(`ray start --head` starts one\); or name one: RAY_ADDRESS, or --cluster "),
])
def test_a_failed_join_is_one_line_without_rays_own_log(monkeypatch, capfd, log, why):
    """Ray's core writes each failed try to descriptor 2, about twenty lines before it gives up."""
    from backend import ray_pool

    class Refusing:
        def is_initialized(self) -> bool:
            return False

        def init(self, address: str, **options) -> None:
            os.write(2, log * 20)
            raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                                  "setting `--address` flag or `RAY_ADDRESS` environment variable." if address == "auto"
                                  else "Failed to connect to Ray cluster at 192.0.2.2:6379")

    monkeypatch.setattr(ray_pool, "_check_head", lambda *args: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = "auto" if not log else "h:6379"  # auto, with none on this machine: Ray's text named a flag of its own
    with pytest.raises(DreamttyError, match=rf"^cluster: cannot join the Ray cluster at {address}: {why}"):
        ray_pool._connect(Refusing(), address, "cluster")
    assert capfd.readouterr().err == ""


def test_an_actor_lost_with_the_head_costs_its_jobs_no_attempt(tmp_path):
    """A head outage killed every actor and used up each running job's one retry: one more death then failed
    it, though the jobs were never at fault."""
    pytest.importorskip("ray")
    from backend import ray_pool

    pool = ray_pool.RayPool("auto", tmp_path / "q.sqlite3", gpu=False)
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        pool.head = f"127.0.0.1:{gone.getsockname()[1]}"  # nothing listens there once closed
    why, counts = pool._death(RuntimeError("actor died"))
    assert not counts and why == (f"worker actor died (actor died); the Ray head at {pool.head} does not answer (Ray "
                                  "ends this service when it stays down for 60 s; its queue is kept for the next)")

    with socket.socket() as head:  # a gRPC server's first frame: SETTINGS
        head.bind(("127.0.0.1", 0))
        head.listen(1)
        pool.head = f"127.0.0.1:{head.getsockname()[1]}"
        answer = threading.Thread(target=lambda: head.accept()[0].sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])))
        answer.start()
        assert pool._death(RuntimeError("actor died")) == ("worker actor died (actor died)", True)
        answer.join()


async def test_a_queue_an_actors_thread_cannot_open_is_said_once_and_it_stops_with_the_pool(tmp_path, monkeypatch):
    """A damaged queue file: the thread that keeps an actor died with a traceback, silently for the service."""
    from backend import ray_pool
    from backend.queue_store import REPAIR

    monkeypatch.setattr(ray_pool, "RESTART_DELAY", 0.01)
    db = tmp_path / "q.sqlite3"
    db.write_bytes(b"not a database" * 512)
    pool = ray_pool.RayPool("auto", db, gpu=False)
    said: list = []
    pool._loop, pool._on_event = asyncio.get_running_loop(), said.append
    worker = pool._workers[0] = ray_pool._Worker(Slot(0, "cpu"))
    opening = asyncio.create_task(asyncio.to_thread(pool._queue, worker))
    while not said:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # tried again a few times: said once
    pool._stop.set()
    assert await opening is None
    assert [(e.message, e.level) for e in said] == [(f"worker 0: queue: {db} is damaged (file is not a database); "
                                                    f"{REPAIR}", "error")]
