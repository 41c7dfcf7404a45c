"""The queue of the service, from the command line: ``jobs``, ``cancel``, ``wait`` and ``attach``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from backend.errors import DreamttyError
from backend.safetext import one_line, summary, visible
from tui.cli_output import integer, print_warnings

PROMPT_WIDTH = 48  # characters of a prompt shown in the ``jobs`` table


def register(subparsers) -> None:
    jobs = subparsers.add_parser("jobs", help="list the queue's jobs, newest first")
    jobs.add_argument("--limit", type=integer, default=20, help="how many (default 20)")
    jobs.add_argument("--json", action="store_true", help="one JSON array on stdout")
    jobs.set_defaults(func=cmd_jobs)
    cancel = subparsers.add_parser("cancel", help="cancel queued or running jobs")
    cancel.add_argument("ids", metavar="ID", type=integer, nargs="+")
    cancel.set_defaults(func=cmd_cancel)
    wait = subparsers.add_parser("wait", help="follow jobs until they end; prints their images")
    wait.add_argument("ids", metavar="ID", type=integer, nargs="+")
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
    from backend.client import connect

    return connect(args.device, local=args.local or not _running(), start=False, cluster=args.cluster)


def _service_only(args, command: str) -> None:
    """``wait`` and ``attach`` follow the service's jobs: an in-process service has none to follow."""
    from backend.client import LOCAL_ENV, is_local

    if is_local(args.local):
        raise DreamttyError(f"{command}: follows the jobs of dreamtty serve; drop --local / {LOCAL_ENV}")


async def _close(client) -> None:
    """Close a listing or cancelling client and print its warnings (a damaged queue file moved aside)."""
    await client.close()
    print_warnings(client.warnings)


async def _jobs(args) -> list:
    client = _client(args)
    try:
        return await client.jobs(args.limit)
    finally:
        await _close(client)


def cmd_jobs(args: argparse.Namespace) -> int:
    from backend.queue_store import check_limit

    check_limit(args.limit, "job")
    jobs = asyncio.run(_jobs(args))
    if args.json:
        print(json.dumps([job.to_dict() for job in jobs]))
        return 0
    print(f"{'id':>6}  {'state':<10}{'kind':<10}{'queued':<17}{'images':>6}  prompt")
    for job in jobs:
        prompt = summary(job.request.get("prompt", ""), PROMPT_WIDTH)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))
        count = f"{len(job.outputs)}/{job.request.get('count', 1)}"
        print(visible(f"{job.id:>6}  {job.state:<10}{job.kind:<10}{when:<17}{count:>6}  {prompt}"))
        if job.error:
            print(f"{'':>8}{one_line(job.error)}")
    return 0


async def _cancel(args) -> int:
    """Cancel each job named; one that is not there or has ended is said, and the rest are still cancelled.
    Exit 2 when a job is not there, else 1 when one had ended."""
    client = _client(args)
    code = 0
    try:
        for job_id in dict.fromkeys(args.ids):  # an id given twice is cancelled once
            if await client.job(job_id) is None:
                print(f"dreamtty: job {job_id}: no such job", file=sys.stderr)
                code = 2
            elif await client.cancel(job_id):
                print(f"job {job_id} cancelled")
            else:
                print(f"dreamtty: job {job_id} is not queued or running", file=sys.stderr)
                code = max(code, 1)
    finally:
        await _close(client)
    return code


def cmd_cancel(args: argparse.Namespace) -> int:
    return asyncio.run(_cancel(args))


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
        raise DreamttyError("wait: no dreamtty serve is running, so no job runs (start it: dreamtty serve --detach)")
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
