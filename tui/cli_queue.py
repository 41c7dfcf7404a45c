"""The queue of the service, from the command line: ``jobs``, ``cancel``, ``wait`` and ``attach``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from backend.errors import DreamttyError, RequestError, ServiceUnavailable
from backend.safetext import one_line, summary, visible
from tui.cli_output import id_number, integer, print_warnings

if TYPE_CHECKING:
    from backend.client import Client

PROMPT_WIDTH = 48  # characters of a prompt shown in the ``jobs`` table
SETTLE_PATIENCE = 15.0  # seconds a service that holds its lock without answering (starting, stopping) is waited for
CANCEL_WAIT = 30.0  # seconds cancelled running jobs are waited for (each stops after its current step)
T = TypeVar("T")


def register(subparsers) -> None:
    jobs = subparsers.add_parser("jobs", help="list the queue's jobs, newest first")
    jobs.add_argument("--limit", type=integer, default=20, help="how many (default 20)")
    jobs.add_argument("--json", action="store_true", help="one JSON array on stdout")
    jobs.add_argument("--forget", type=integer, metavar="DAYS",
                      help="forget the jobs that ended more than DAYS days ago (0: every ended job); their images "
                           "stay on disk")
    jobs.set_defaults(func=cmd_jobs)
    cancel = subparsers.add_parser("cancel", help="cancel queued or running jobs")
    cancel.add_argument("ids", metavar="ID", type=id_number, nargs="*")
    cancel.add_argument("--all", action="store_true", help="every queued and running job")
    cancel.set_defaults(func=cmd_cancel)
    wait = subparsers.add_parser("wait", help="follow jobs until they end; prints their images")
    wait.add_argument("ids", metavar="ID", type=id_number, nargs="+")
    wait.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    wait.set_defaults(func=cmd_wait)
    attach = subparsers.add_parser("attach", help="the TUI on the running service")
    attach.set_defaults(func=cmd_attach)


def _running() -> bool:
    from backend.client import SERVICE_ENV
    from backend.service_files import ServiceFiles

    return bool(os.environ.get(SERVICE_ENV)) or ServiceFiles.default().locked()


def _client(args):
    """The running service's client; with none running, the queue read in this process (nothing is
    started just to list or cancel jobs: a service would adopt and run orphaned jobs too)."""
    from backend.client import connect, is_local

    local = is_local(args.local)  # DREAMTTY_LOCAL read (and a bad value said) whether or not a service runs
    return connect(args.device, local=local or not _running(), start=False, cluster=args.cluster)


def _service_only(args, command: str) -> None:
    """``wait`` and ``attach`` follow the service's jobs: an in-process service has none to follow."""
    from backend.client import LOCAL_ENV, is_local

    if is_local(args.local):
        raise DreamttyError(f"{command}: follows the jobs of dreamtty serve; drop --local / {LOCAL_ENV}")


async def _close(client) -> None:
    """Close a listing or cancelling client and print its warnings (a damaged queue file moved aside)."""
    await client.close()
    print_warnings(client.warnings)


async def _with_queue(args, use: Callable[[Client], Awaitable[T]]) -> T:
    """``use`` the queue's client (:func:`_client`), closed after. A service of this machine that holds its
    lock but does not answer (starting, or stopping while its workers end) is waited for: up to
    SETTLE_PATIENCE seconds, until it answers or is gone and the queue is read here."""
    from backend.client import SERVICE_ENV
    from backend.remote_client import ServiceUnreachable

    deadline = time.monotonic() + SETTLE_PATIENCE
    while True:
        client = _client(args)
        try:
            return await use(client)
        except ServiceUnreachable:
            if os.environ.get(SERVICE_ENV) or time.monotonic() > deadline:
                raise
        finally:
            await _close(client)
        await asyncio.sleep(0.2)


async def _jobs(args) -> list:
    return await _with_queue(args, lambda client: client.jobs(args.limit))


def cmd_jobs(args: argparse.Namespace) -> int:
    from backend import jobkinds
    from backend.queue_store import check_limit

    check_limit(args.limit, "job")
    if args.forget is not None:
        return _forget(args)
    jobs = asyncio.run(_jobs(args))
    if args.json:
        print(json.dumps([job.to_dict() for job in jobs]))
        return 0
    print(f"{'id':>6}  {'state':<10}{'kind':<10}{'queued':<17}{'images':>6}  prompt")
    for job in jobs:
        prompt = summary(job.request.get("prompt", ""), PROMPT_WIDTH)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))
        count = "text" if jobkinds.makes_text(job.kind) else f"{len(job.outputs)}/{job.request.get('count', 1)}"
        print(visible(f"{job.id:>6}  {job.state:<10}{job.kind:<10}{when:<17}{count:>6}  {prompt}"))
        if job.error:
            print(f"{'':>8}{one_line(job.error)}")
        if job.orphaned:
            print(f"{'':>8}no running process holds it (its service stopped, or was killed): a running dreamtty serve "
                  f"or TUI takes it, else the next (dreamtty cancel {job.id} drops it)")
    return 0


def _forget(args: argparse.Namespace) -> int:
    if args.forget < 0:
        raise RequestError("forget", f"{args.forget} is negative; give a number of days (0 or more)")
    forgotten = asyncio.run(_with_queue(args, lambda client: client.forget_ended(args.forget)))
    said = f"{forgotten} ended job{'s' * (forgotten != 1)} forgotten"
    print(json.dumps({"forgotten": forgotten}) if args.json else said)
    return 0


async def _cancel(args) -> int:
    """Cancel each job named; one that is not there or has ended is said, and the rest are still cancelled.
    Exit 2 when a job is not there, else 1 when one had ended."""
    code, left, asked = 0, list(dict.fromkeys(args.ids)), []  # an id given twice is cancelled once

    async def cancel_each(client: Client) -> dict[int, str]:
        nonlocal code
        while left:  # a job said is not tried again on another client (the service stopped meanwhile)
            job_id = left[0]
            if await client.job(job_id) is None:
                print(f"dreamtty: job {job_id}: no such job", file=sys.stderr)
                code = 2
            elif await client.cancel(job_id):
                asked.append(job_id)
            else:
                print(f"dreamtty: job {job_id} is not queued or running", file=sys.stderr)
                code = max(code, 1)
            left.pop(0)
        return await _ends(client, asked)

    said = _said_cancelled(await _with_queue(args, cancel_each))
    return max(code, said)


async def _cancel_all(args) -> int:
    """Cancel every queued and running job; exit 1 when there was none (nothing to do)."""
    cancelled: list[int] | None = None

    async def cancel_all(client: Client) -> dict[int, str]:
        nonlocal cancelled
        if cancelled is None:  # once: on another client (the service stopped meanwhile) they are only waited for
            cancelled = await client.cancel_all()
        return await _ends(client, cancelled)

    ends = await _with_queue(args, cancel_all)
    if not ends:
        print("dreamtty: no job is queued or running", file=sys.stderr)
        return 1
    return _said_cancelled(ends, count=True)


async def _ends(client: Client, cancelled: list[int]) -> dict[int, str]:
    """How each of the ``cancelled`` jobs ended. A running one stops after its current step: the running
    ones are waited for together, CANCEL_WAIT seconds in all. "running" for one not seen to stop by then,
    "done" (or "failed") for one that ended before the cancel reached it."""
    from backend.events import FINAL_EVENTS

    ends = dict.fromkeys(cancelled, "cancelled")
    if not ends:
        return ends
    running = [job_id for job_id, state in (await client.active_states()).items()
               if state == "running" and job_id in ends]

    async def end(job_id: int) -> str:
        async for event in client.wait(job_id):
            if isinstance(event, FINAL_EVENTS):
                return event.type
        return "cancelled"

    waits = {job_id: asyncio.ensure_future(end(job_id)) for job_id in running}
    done, pending = await asyncio.wait(waits.values(), timeout=CANCEL_WAIT) if waits else (set(), set())
    for wait in pending:
        wait.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for job_id, wait in waits.items():  # one not seen to stop (or whose service was lost meanwhile): "running"
        ends[job_id] = wait.result() if wait in done and wait.exception() is None else "running"
    return ends


def _said_cancelled(ends: dict[int, str], count: bool = False) -> int:
    """Print how the cancelled jobs ended (:func:`_ends`): each, or how many (``count``), and each that did
    not end as cancelled. 1 when one ended (done or failed) or moved before the cancel reached it."""
    stopped = [job_id for job_id, state in ends.items() if state == "cancelled"]
    if count and stopped:
        print(f"{len(stopped)} job{'s' * (len(stopped) != 1)} cancelled")
    for job_id, state in ends.items():
        if state == "cancelled" and not count:
            print(f"job {job_id} cancelled")
        elif state == "running":
            print(f"job {job_id}: cancel asked; not seen to stop within {CANCEL_WAIT:g} s (a running job stops "
                  "after its current step)")
        elif state == "moved":  # another service took it over from the one asked (see backend.events.Moved)
            print(f"dreamtty: job {job_id} moved to another dreamtty service before the cancel reached it; cancel "
                  f"it again (dreamtty cancel {job_id})", file=sys.stderr)
        elif state != "cancelled":
            print(f"dreamtty: job {job_id} ended {state} before the cancel reached it", file=sys.stderr)
    return int(any(state not in ("cancelled", "running") for state in ends.values()))


def cmd_cancel(args: argparse.Namespace) -> int:
    if args.ids and args.all:
        raise RequestError("cancel", "give the ids of the jobs to cancel or --all (every queued and running job), "
                                     "not both")
    if not args.ids and not args.all:
        raise RequestError("cancel", "give the ids of the jobs to cancel, or --all (every queued and running job)")
    return asyncio.run(_cancel_all(args) if args.all else _cancel(args))


async def _wait(args) -> int:
    from tui.cli_jobs import follow

    client = _client(args)
    events = client.subscribe()
    try:
        ids = list(dict.fromkeys(args.ids))  # an id given twice: its images are printed once
        for job_id in ids:
            if await client.job(job_id) is None:
                raise DreamttyError(f"job {job_id}: no such job")
        code, _ = await follow(client, ids, events, args.json)
    finally:
        await client.close()  # an interrupted wait leaves the jobs running
    return code


def cmd_wait(args: argparse.Namespace) -> int:
    _service_only(args, "wait")
    if not _running():
        raise ServiceUnavailable("wait: no dreamtty serve is running, so no job runs "
                                 "(start it: dreamtty serve --detach)")
    return asyncio.run(_wait(args))


async def _check_service(args) -> None:
    """Connect once (versions compared) without starting a service: a one-line error before the TUI draws."""
    from backend.client import connect

    client = connect(args.device, start=False)
    try:
        await client.start()
    finally:
        await client.close()


def cmd_attach(args: argparse.Namespace) -> int:
    from tui.app import run_app

    _service_only(args, "attach")
    asyncio.run(_check_service(args))
    return run_app(args, print_warnings, attach=True)
