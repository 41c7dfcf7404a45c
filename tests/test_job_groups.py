"""Queued jobs alike in all but their prompts and seeds run as one group: their images share batches, each
job keeps its own prompts, seeds, outputs and end; a cancelled job leaves its group-mates running; a dead
worker's jobs are each retried; reproduce of a grouped image gives identical pixels."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from contextlib import closing

import numpy as np
import pytest
import torch
from PIL import Image

from backend import events as ev, metadata
from backend.engine.loader import PipelineCache
from backend.guidance_settings import GuidanceSettings
from backend.job_groups import group_key, group_of
from backend.models import resolve_model
from backend.pool import ProcessPool, Slot, _Process
from backend.queue_store import QueueStore
from backend.request import GenerateRequest
from backend.service import Service
from backend.worker import JobRun, LocalOutput, run_jobs
from job_helpers import worker_images

SMALL = dict(steps=4, width=64, height=64)
TIMEOUT = 120


def _request(**fields) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a red fox", "seed": 10, **SMALL, **fields}).resolved("demo")


def _payload(request: GenerateRequest, out) -> dict:
    return {"request": request.to_dict(), "out": str(out), "family": "sd1"}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=int)


# -- which jobs group ---------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    store = QueueStore(tmp_path / "queue.sqlite3")
    yield store
    store.close()


def _queued(store, kind: str = "generate", **fields):
    request = {"generate": _request, "img2img": lambda **f: _request(**f)}[kind](**fields).to_dict()
    if kind == "img2img":
        request["image"], request["strength"] = "in.png", 0.5
    return store.get(store.add(kind, {"request": request, "out": "/out", "family": "sd1"}, "me"))


def test_jobs_alike_but_for_prompts_and_seeds_group_and_others_do_not(store):
    first = _queued(store, prompt="a fox", seed=1)
    mates = [_queued(store, prompt="a cat", seed=2, styles=["Fooocus Photograph"]),
             _queued(store, prompt="a dog", negative_prompt="blurry", seed=3, count=2)]
    others = [_queued(store, steps=5), _queued(store, width=128), _queued(store, sampler="euler"), _queued(store, cfg=5),
              _queued(store, guidance=GuidanceSettings(sharpness=3.0)), _queued(store, loras=[("x", 1.0)]),
              _queued(store, speed="fast"), _queued(store, max_batch=2)]
    assert group_of(first, [first, *mates, *others]) == [first, *mates]
    assert all(group_key(job) != group_key(first) for job in others)


def test_prompt_lora_tags_retries_and_unreadable_jobs(store):
    plain, tagged = _queued(store, prompt="a fox"), _queued(store, prompt="a cat <lora:fox:0.5>")
    flagged = _queued(store, prompt="a dog", loras=[("fox", 0.5)])
    assert group_key(plain) != group_key(tagged) == group_key(flagged)  # a tag counts as the LoRA it names
    retried = store.get(_queued(store).id)
    store.retry(retried.id)
    assert group_key(store.get(retried.id)) is None  # a job that took its worker down runs alone
    broken = store.get(store.add("generate", {"request": {"prompt": "x", "no_such_field": 1}, "out": "/o"}, "me"))
    assert group_key(broken) is None and group_of(plain, [broken, tagged]) == [plain]  # its worker says why
    counts = [store.get(store.add("generate", {"request": {**plain.request, "count": count}, "out": "/o"}, "me"))
              for count in ("abc", None, [2])]  # a row edited by hand: no TypeError at each dispatch, for good
    assert [group_key(job) for job in counts] == [None] * 3 and group_of(plain, counts) == [plain]


def test_jobs_that_run_alone_and_the_room_of_a_group(store):
    alone = [_queued(store, guidance=GuidanceSettings(sag=0.5)), _queued(store, batch=(2, 1))]
    assert [group_key(job) for job in alone] == [None, None]
    assert group_of(alone[0], [_queued(store, guidance=GuidanceSettings(sag=0.5))]) == [alone[0]]
    first = _queued(store, count=5)  # room for 3 more images of the default 8
    big, small = _queued(store, count=4), _queued(store, count=3)
    assert group_of(first, [big, small]) == [first, small]  # one that does not fit waits for the next group
    capped, mates = _queued(store, max_batch=2), [_queued(store, max_batch=2), _queued(store, max_batch=2)]
    assert group_of(capped, mates) == [capped, mates[0]]  # --max-batch caps a group's images too


# -- the service hands groups out ------------------------------------------------------------------------------
class _Pool:
    """Slots that are always alive and record the groups and cancels they get."""

    def __init__(self, count: int) -> None:
        self.slots = [Slot(i, "cpu") for i in range(count)]
        self.given: list[tuple[int, list[int]]] = []
        self.cancelled: list[tuple[int, int]] = []

    def alive(self, slot) -> bool:
        return True

    def run(self, slot, jobs) -> None:
        slot.jobs = [job["job"] for job in jobs]
        self.given.append((slot.id, list(slot.jobs)))

    def cancel(self, slot, job) -> None:
        self.cancelled.append((slot.id, job))

    def log_of(self, slot) -> str:
        return f"/logs/worker-{slot.id}.log"

    def status(self) -> dict:
        return {"workers": []}

    def start_faults(self) -> list[str]:
        return []


class _StartedPool(_Pool):
    """A :class:`_Pool` a service can start and close."""

    def start(self, on_event, on_died) -> None:
        pass

    async def close(self) -> None:
        pass


def _submit(service: Service, **fields) -> int:
    return service.store.add("generate", _payload(_request(**fields), "/out"), service.owner)


def test_the_last_free_worker_takes_the_alike_queued_jobs_as_one_group(tmp_path):
    pool = _Pool(2)
    service = Service(db_path=tmp_path / "q.sqlite3", pool=pool)
    a, b, odd, c = _submit(service, seed=1), _submit(service, seed=2), _submit(service, steps=6), _submit(service, seed=3)
    service._dispatch()
    assert pool.given == [(0, [a]), (1, [b, c])]  # the first free worker takes one job, the last its alike ones
    assert service.store.get(odd).state == "queued"
    assert service.status()["workers"][1]["jobs"] == [b, c]
    from tui.cli_serve import format_status

    text = format_status({**service.status(), "socket": "s", "dreamtty": "x", "streams": 0})  # serve --status
    assert f"worker 0  cpu, job {a};" in text and f"worker 1  cpu, jobs {b}, {c};" in text  # no process: no pid
    assert "runs " not in text  # none scheduled
    lent = {**service.status(), "socket": "s", "dreamtty": "x", "streams": 0, "runs": {"training": 1, "waiting": 2}}
    lent["workers"][0] = {**lent["workers"][0], "jobs": [], "training": 6}  # it said "idle" while a run trained
    lines = format_status(lent).splitlines()
    assert "runs      1 training, 2 waiting for a device" in lines
    assert any(line.startswith("worker 0  cpu, lent to training run 6;") for line in lines), lines
    # each job of a group ends on its own; the worker stays busy until the last one
    service.cancel(c)
    assert pool.cancelled == [(1, c)]
    service._handle(ev.Done(job=b, worker=1))
    assert pool.slots[1].jobs == [c] and service.store.get(odd).state == "queued"
    service._handle(ev.Cancelled(job=c, worker=1))
    assert pool.given[-1] == (1, [odd]) and service.store.get(c).state == "cancelled"
    service.store.close()


def test_a_job_queued_while_no_worker_can_start_is_told_why(tmp_path):
    """Why a worker cannot start is said once, when it begins: a client that queued a job later heard
    nothing, and waited without end (a cluster whose actors all die at start)."""
    from backend.service import Prepared

    pool = _Pool(1)
    pool.start_faults = lambda: ["worker 0: cannot start on the cluster: The actor died unexpectedly"]
    service = Service(devices="cpu", db_path=tmp_path / "q.sqlite3", pool=pool)
    events = service.subscribe()

    def notes() -> list[str]:
        return [e.message for e in (events.get_nowait() for _ in range(events.qsize())) if isinstance(e, ev.Note)]

    service.enqueue(Prepared("generate", _payload(_request(), "/out")))
    assert notes() == ["waiting: worker 0: cannot start on the cluster: The actor died unexpectedly"]
    service._handle(ev.WorkerReady(worker=0, device="cpu", cuda_count=0))  # one runs: nothing to wait for
    service.enqueue(Prepared("generate", _payload(_request(), "/out")))
    assert notes() == []
    service.store.close()


def test_a_job_cancelled_between_its_read_and_its_start_is_not_run(tmp_path):
    pool = _Pool(1)
    service = Service(devices="cpu", db_path=tmp_path / "q.sqlite3", pool=pool)
    job = service.store.get(_submit(service))  # as the dispatch read it
    with closing(QueueStore(tmp_path / "q.sqlite3")) as other:  # `dreamtty cancel` through another service
        other.set_state(job.id, "cancelled")
    service._run_jobs(pool.slots[0], [job])  # it was written "running" over "cancelled", and run
    assert pool.given == [] and service.store.get(job.id).state == "cancelled"
    service.store.close()


def test_a_job_another_process_cancels_ends_cancelled_if_its_worker_dies_before_it_stops(tmp_path):
    pool = _StartedPool(1)
    service = Service(devices="cpu", db_path=tmp_path / "q.sqlite3", pool=pool)
    job = _submit(service)
    service._handle(ev.WorkerReady(worker=0, device="cpu", cuda_count=0))
    events = service.subscribe()
    with closing(QueueStore(tmp_path / "q.sqlite3")) as other:  # `dreamtty cancel` through another service
        other.set_state(job, "cancelled")
    service._notice_cancelled()
    assert pool.given == [(0, [job])] and pool.cancelled == [(0, job)]
    pool.slots[0].jobs = []
    service._worker_died(pool.slots[0], [job], "worker 0 died", True)  # before it stopped: it sent no Cancelled
    assert [type(e) for e in (events.get_nowait() for _ in range(events.qsize()))] == [ev.Cancelled]
    assert service.store.get(job).state == "cancelled" and job not in service._cancelling
    service.store.close()


async def test_a_job_asked_to_cancel_ends_cancelled_if_its_worker_dies_or_the_service_stops_first(tmp_path):
    """A running job stops after its current step; one whose worker dies before is not run again, and one
    still running when the service stops is not queued for the next start."""
    pool = _StartedPool(2)
    service = Service(devices="cpu", db_path=tmp_path / "q.sqlite3", pool=pool)
    a, b, c = _submit(service, seed=1), _submit(service, steps=6), _submit(service, steps=7)  # three groups
    await service.start()
    service._handle(ev.WorkerReady(worker=0, device="cpu", cuda_count=0))
    service._handle(ev.WorkerModels(worker=0, models=[{"model": "demo", "dtype": "float32", "bytes": 1}], loads=1))
    events = service.subscribe()
    assert pool.given == [(0, [a]), (1, [b])]
    assert service.cancel(a) and service.cancel(b) and pool.cancelled == [(0, a), (1, b)]
    pool.slots[0].jobs = []  # as the pool leaves a slot whose worker it restarted
    service._worker_died(pool.slots[0], [a], "worker 0 died", True)
    assert service.status()["workers"][0]["models"] == []  # its pipelines died with it
    assert not service.status()["workers"][0]["ready"]  # its replacement is starting
    assert service.store.get(a).state == "cancelled" and isinstance(events.get_nowait(), ev.Cancelled)
    assert pool.given[-1] == (0, [c])  # the restarted worker takes the next job
    await service.close()
    with closing(QueueStore(tmp_path / "q.sqlite3")) as store:
        assert [store.get(job).state for job in (b, c)] == ["cancelled", "queued"]


def test_jobs_a_worker_of_changed_code_refused_wait_queued_without_counting_an_attempt(tmp_path):
    """A job is handed to a worker as it starts; one whose code changed on disk (backend.versions) exits before it
    reads it, again at each restart: the job waits for the service's restart. Other deaths count an attempt."""
    pool = _Pool(1)
    service = Service(db_path=tmp_path / "q.sqlite3", pool=pool)
    events = service.subscribe()
    job = _submit(service)
    service._dispatch()
    for _ in range(3):  # three workers in a row refuse it
        pool.slots[0].jobs = []  # as the pool leaves a slot whose worker died
        service._worker_died(pool.slots[0], [job], "worker 0: dreamtty was changed on disk", False)
    assert len(pool.given) == 4 and service.store.get(job).attempts == 0 and events.empty()
    for attempt in (1, 2):  # one that crashed running it: retried once, then failed
        service._handle(ev.Started(job=job, worker=0))
        pool.slots[0].jobs = []
        service._worker_died(pool.slots[0], [job], "worker crashed (exit code -9)", True)
        assert [type(e) for e in _drain(events)] == [ev.Started, ev.Retrying if attempt == 1 else ev.Failed]
    assert service.store.get(job).error == ("worker crashed (exit code -9), 2 times; the queue goes on "
                                            "(see /logs/worker-0.log)")
    service._handle(ev.Started(job=job, worker=0))  # late, from a worker that died since: not set running again
    assert service.store.get(job).state == "failed" and events.empty()
    service.store.close()


def _drain(events) -> list:
    return [events.get_nowait() for _ in range(events.qsize())]


def test_a_long_queue_is_not_read_whole_at_each_dispatch(tmp_path, monkeypatch):
    """A group is made of the oldest GROUP_SCAN queued jobs; the status counts the queue in SQL."""
    from backend import service as service_module

    monkeypatch.setattr(service_module, "GROUP_SCAN", 3)
    pool = _Pool(1)
    service = Service(db_path=tmp_path / "q.sqlite3", pool=pool)
    jobs = [_submit(service, seed=n) for n in range(6)]
    read: list[int] = []
    listing = service.store.jobs
    monkeypatch.setattr(service.store, "jobs", lambda *a, **k: read.append(k.get("limit")) or listing(*a, **k))
    service._dispatch()
    assert pool.given == [(0, jobs[:3])] and read == [3]  # alike, but only the oldest three were looked at
    assert {k: service.status()[k] for k in ("queued", "running")} == {"queued": 3, "running": 3} and read == [3]
    service.store.close()


def test_a_dead_workers_group_is_retried_job_by_job(tmp_path):
    pool = _Pool(1)
    service = Service(db_path=tmp_path / "q.sqlite3", pool=pool)
    events = service.subscribe()
    a, b = _submit(service, seed=1), _submit(service, seed=2)
    service._dispatch()
    assert pool.given == [(0, [a, b])]
    pool.slots[0].jobs = []
    service._worker_died(pool.slots[0], [a, b], "worker crashed (exit code -9)", True)
    retried = []
    while not events.empty():
        event = events.get_nowait()
        if isinstance(event, ev.Retrying):
            retried.append(event.job)
    assert retried == [a, b]
    # retried, each runs alone: a job that took its worker down must not take its mates' tries too
    assert pool.given[-1] == (0, [a]) and [service.store.get(j).attempts for j in (a, b)] == [1, 1]
    service.store.close()


def test_a_process_pool_cancels_the_job_at_its_place_in_the_group(tmp_path):
    pool = ProcessPool("cpu", tmp_path / "q.sqlite3")
    slot = Slot(0, "cpu")
    pool.slots.append(slot)
    handed: list = []
    proc = pool._procs[0] = _Process(process=None, jobs=type("Q", (), {"put": handed.append})(), events=None,
                                     cancel=mp.get_context("spawn").Array("q", 8))
    pool.run(slot, [{"job": 7}, {"job": 8}, {"job": 9}])
    assert handed == [[{"job": 7}, {"job": 8}, {"job": 9}]] and slot.jobs == [7, 8, 9]
    slot.jobs.remove(7)  # the service drops a job that ended
    pool.cancel(slot, 9)
    pool.cancel(slot, 5)  # not one of its jobs: nothing
    assert list(proc.cancel)[:3] == [0, 0, 9]
    pool.run(slot, [{"job": 10}])
    assert list(proc.cancel)[:3] == [0, 0, 0]


# -- the worker runs a group -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(demo_dirs) -> PipelineCache:
    return PipelineCache(torch.device("cpu"))


def _run_group(cache, store, requests, tmp_path, cancel_after: dict[int, int] | None = None):
    """Run ``requests`` as one group in this process; ``cancel_after``: request index -> how many of its cancel
    checks (one a step) pass before its job is cancelled. Returns the job ids, the events sent and the UNet
    batch sizes seen."""
    jobs = [store.add("generate", _payload(r, tmp_path / f"out{k}"), "me") for k, r in enumerate(requests)]
    sent: list = []
    checks = {job: 0 for job in jobs}
    cancels = {jobs[k]: after for k, after in (cancel_after or {}).items()}

    def cancelled(job: int) -> bool:
        checks[job] += 1
        return job in cancels and checks[job] > cancels[job]

    runs = [JobRun(0, {"job": job, "kind": "generate", **_payload(r, tmp_path / f"out{k}")}, cache, sent.append,
                   lambda job=job: cancelled(job), LocalOutput(store)) for k, (job, r) in enumerate(zip(jobs, requests))]
    rows: list[int] = []
    pipe = cache.get(resolve_model("demo"), torch.float32)
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        run_jobs(runs)
    finally:
        hook.remove()
    return jobs, sent, rows


def _ends(sent) -> dict[int, str]:
    return {e.job: type(e).__name__ for e in sent if isinstance(e, ev.FINAL_EVENTS)}


def test_a_group_shares_batches_and_each_job_keeps_its_own(cache, store, tmp_path):
    requests = [_request(prompt="a red fox", seed=3), _request(prompt="a blue cat", seed=40, count=2, max_batch=3)]
    jobs, sent, rows = _run_group(cache, store, requests, tmp_path)
    assert set(rows) == {6}  # one UNet call per step for the three images: [uncond x3, cond x3]
    assert _ends(sent) == {jobs[0]: "Done", jobs[1]: "Done"}
    fox, cats = store.get(jobs[0]).outputs, store.get(jobs[1]).outputs
    assert len(fox) == 1 and len(cats) == 2
    assert all(str(tmp_path / "out0") in p for p in fox) and all(str(tmp_path / "out1") in p for p in cats)
    metas = [metadata.read(p) for p in fox + cats]
    assert [m["request"]["seed"] for m in metas] == [3, 40, 41]
    assert [m["prompt"]["positive"] for m in metas] == ["a red fox", "a blue cat", "a blue cat"]
    assert [m["request"]["batch"] for m in metas] == [[3, 0], [3, 1], [3, 2]]
    # reproduce of a grouped image: its recorded batch again (mates of its own job), identical pixels
    for k, path in enumerate(fox + cats):
        again, _ = worker_images(_payload(metadata.request_from_image(path), tmp_path / f"again{k}"), cache,
                                 tmp_path / "again.sqlite3")
        assert np.array_equal(_pixels(again[0]), _pixels(path))


def test_an_image_grouped_after_another_jobs_reproduces_at_seed_0(cache, store, tmp_path):
    """Seeds compared at a fixed seed: the cat (seed 0) was made beside the fox, at position 1 of 2; its reproduce
    was refused, its batch-mate's seed -1 out of range."""
    requests = [_request(prompt="a red fox", seed=9), _request(prompt="a blue cat", seed=0)]
    jobs, _, rows = _run_group(cache, store, requests, tmp_path)
    assert set(rows) == {4}
    [cat] = store.get(jobs[1]).outputs
    assert metadata.read(cat)["request"]["batch"] == [2, 1]
    request = metadata.request_from_image(cat).resolved("demo")  # as the service checks it before queueing
    again, _ = worker_images(_payload(request, tmp_path / "again"), cache, tmp_path / "again.sqlite3")
    assert np.array_equal(_pixels(again[0]), _pixels(cat))


def test_a_job_of_a_group_ends_as_its_last_image_is_saved(cache, store, tmp_path):
    requests = [_request(seed=1, max_batch=2), _request(seed=5, count=3, max_batch=2)]
    jobs, sent, rows = _run_group(cache, store, requests, tmp_path)
    assert rows == [4] * 4 + [4] * 4  # batches [job 1: image 0, job 2: image 0], [job 2: images 1, 2]
    order = [(type(e).__name__, e.job) for e in sent if isinstance(e, (ev.Done, ev.Step))]
    first_step_of_second_batch = next(k for k, e in enumerate(sent) if isinstance(e, ev.Step) and e.image == 1)
    done_first = next(k for k, e in enumerate(sent) if isinstance(e, ev.Done) and e.job == jobs[0])
    assert done_first < first_step_of_second_batch and order[-1] == ("Done", jobs[1])


def test_a_cancelled_job_leaves_its_group_mates_running(cache, store, tmp_path):
    requests = [_request(seed=1, count=2, max_batch=3), _request(prompt="a cat", seed=9, max_batch=3)]
    alone, _, _ = _run_group(cache, store, requests, tmp_path / "whole")
    jobs, sent, rows = _run_group(cache, store, requests, tmp_path / "cut", cancel_after={1: 2})
    assert _ends(sent) == {jobs[0]: "Done", jobs[1]: "Cancelled"}
    assert store.get(jobs[1]).outputs == [] and len(store.get(jobs[0]).outputs) == 2
    saved = [e.job for e in sent if isinstance(e, ev.ImageSaved)]
    assert saved == [jobs[0], jobs[0]]
    # the batch went on with the cancelled job's row: its mates' pixels are those of the whole group
    assert all(np.array_equal(_pixels(a), _pixels(b))
               for a, b in zip(store.get(alone[0]).outputs, store.get(jobs[0]).outputs))


def test_a_group_whose_jobs_are_all_cancelled_stops_and_the_rest_go_on(cache, store, tmp_path):
    requests = [_request(seed=1, max_batch=2), _request(seed=2, max_batch=2), _request(seed=3, count=2, max_batch=2)]
    jobs, sent, rows = _run_group(cache, store, requests, tmp_path, cancel_after={0: 1, 1: 1})
    assert _ends(sent) == {jobs[0]: "Cancelled", jobs[1]: "Cancelled", jobs[2]: "Done"}
    assert len(store.get(jobs[2]).outputs) == 2 and rows[-1] == 4  # the third job's two images, together


async def test_a_service_runs_the_jobs_queued_before_its_worker_was_ready_as_one_group(tmp_path, demo_dirs):
    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    events = service.subscribe()
    prompts = ["a red fox", "a green owl", "a blue whale"]
    jobs = [service.submit(GenerateRequest(prompt=p, seed=k, max_batch=4, **SMALL), tmp_path / f"out{k}")
            for k, p in enumerate(prompts)]
    await service.start()
    try:
        async def ends() -> set[int]:
            done = set()
            while len(done) < len(jobs):
                event = await events.get()
                if isinstance(event, ev.Done):
                    done.add(event.job)
            return done
        assert await asyncio.wait_for(ends(), TIMEOUT) == set(jobs)
    finally:
        await service.close()
    store = QueueStore(tmp_path / "queue.sqlite3")
    metas = [metadata.read(store.get(job).outputs[0]) for job in jobs]
    store.close()
    assert [m["request"]["batch"] for m in metas] == [[3, 0], [3, 1], [3, 2]]
    assert [m["prompt"]["positive"] for m in metas] == prompts and [m["request"]["seed"] for m in metas] == [0, 1, 2]


def test_a_job_waiting_for_a_later_batch_is_cancelled_at_once(cache, store, tmp_path):
    requests = [_request(seed=1, count=2, max_batch=2), _request(seed=7, max_batch=2)]
    jobs, sent, rows = _run_group(cache, store, requests, tmp_path, cancel_after={1: 1})
    order = [(type(e).__name__, e.job) for e in sent if isinstance(e, (ev.ImageSaved, *ev.FINAL_EVENTS))]
    assert order == [("Cancelled", jobs[1]), ("ImageSaved", jobs[0]), ("ImageSaved", jobs[0]), ("Done", jobs[0])]
    assert rows == [4] * 4  # the first job's batch only: the cancelled job's never ran


def test_a_batch_that_fails_ends_its_own_jobs_and_the_group_goes_on(cache, store, tmp_path):
    requests = [_request(seed=1, max_batch=1, styles=["no such style"]), _request(seed=2, max_batch=1)]
    jobs, sent, rows = _run_group(cache, store, requests, tmp_path)  # a style removed since it was queued
    ends = {e.job: e for e in sent if isinstance(e, ev.FINAL_EVENTS)}
    assert type(ends[jobs[0]]).__name__ == "Failed" and "no such style" in ends[jobs[0]].error
    assert type(ends[jobs[1]]).__name__ == "Done" and len(store.get(jobs[1]).outputs) == 1


def test_a_cancel_seen_after_the_last_step_saves_no_image_and_ends_the_job_cancelled(monkeypatch):
    """The user cancels while the batch decodes (past its last denoising step): its images are not saved and
    the job ends cancelled, as the cancel said, not done."""
    from backend import jobkinds, worker

    cancelled, saved, sent = [], [], []

    def plan(group, kind, request, pipe, make_image):
        def make(pipe, requests, on_step, should_cancel, device):
            cancelled.append(True)  # every step was made; the cancel comes now
            return [(Image.new("RGB", (8, 8)), {}, 0) for _ in requests]
        return make, 8

    class Output:
        def save(self, run, image, meta, index, seed):
            saved.append(index)

    monkeypatch.setattr(worker, "_batch_plan", plan)
    request = _request(count=2)
    cache = PipelineCache(torch.device("cpu"))
    run = JobRun(0, {"job": 1, "kind": "generate", "request": request.to_dict(), "out": "/nowhere"}, cache,
                 sent.append, lambda: bool(cancelled), Output())
    worker._image_loop(worker.JobGroup([run]), jobkinds.get("generate"), {1: request}, None, "sd1", None)
    assert saved == [] and [type(e) for e in sent] == [ev.Cancelled]


def test_a_service_whose_jobs_another_adopted_writes_nothing_over_them_and_tells_its_followers(tmp_path):
    """This service renewed no lease for a while (paused): another adopted its running jobs. An end its worker
    then sends, or its worker's death, leaves the adopter's state as it is, and a follower here is told where
    the job went (it was told Done, or Retrying, of a job running elsewhere)."""
    from backend.queue_store import JobTaken

    pool = _StartedPool(2)
    service = Service(devices="cpu", db_path=tmp_path / "q.sqlite3", pool=pool)
    first, second = _submit(service, seed=1), _submit(service, steps=6)  # not one group
    for worker in (0, 1):
        service._handle(ev.WorkerReady(worker=worker, device="cpu", cuda_count=0))
    assert pool.given == [(0, [first]), (1, [second])]
    events = service.subscribe()
    with closing(QueueStore(tmp_path / "q.sqlite3")) as other:
        other.renew_lease(service.owner, now=0.0)
        assert other.adopt_orphans("adopter") == [first, second]
    service._handle(ev.Done(job=first, worker=0))
    pool.slots[1].jobs = []
    service._worker_died(pool.slots[1], [second], "worker 1 died", True)
    seen = [events.get_nowait() for _ in range(events.qsize())]
    jobs = (first, second)
    assert [(type(e), e.job, e.message) for e in seen] == [(ev.Moved, job, str(JobTaken(job))) for job in jobs]
    assert [(service.store.get(j).state, service.store.get(j).owner) for j in jobs] == [("queued", "adopter")] * 2
    service.store.close()
