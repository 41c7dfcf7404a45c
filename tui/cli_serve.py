"""``dreamtty serve``: run the service (queue, workers, loaded models) for every client of this user.

``dreamtty serve`` runs it in the foreground, ``--detach`` in the background (as the CLI does by
itself when a command needs it and none runs), ``--stop`` stops it, ``--status`` tells what it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time

from backend.errors import DreamttyError, RequestError, ServiceUnavailable
from backend.safetext import one_line, visible
from tui.cli_output import number, warn_plain_http

STOP_TIMEOUT = 60.0  # seconds to wait for a stopped service to exit (its workers finish their step)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the service that every client uses (foreground, or --detach)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--detach", action="store_true", help="start it in the background and return")
    what.add_argument("--stop", action="store_true", help="stop the running service (its jobs stay queued)")
    what.add_argument("--status", action="store_true", help="pid, uptime, workers, loaded models, queue length")
    p.add_argument("--listen", metavar="HOST:PORT", help="also listen on TCP (clients send the token)")
    p.add_argument("--idle-exit", metavar="MINUTES", type=number,
                   help="exit after this many minutes with no job and no client (default: never)")
    p.add_argument("--json", action="store_true", help="with --status: one JSON object")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from backend.serve import ServeOptions, parse_listen, serve, start_detached
    from backend.service_files import AlreadyRunning

    if args.stop or args.status:  # options of a service being started: said, not ignored
        given = next((name for name in ("listen", "idle_exit") if getattr(args, name) is not None), None)
        if given is not None:
            flag = given.replace("_", "-")
            raise RequestError(flag, f"goes with starting a service (dreamtty serve [--detach] --{flag} ...), not "
                                     f"with --{'stop' if args.stop else 'status'}")
    if args.stop:
        return asyncio.run(_stop())
    if args.status:
        return asyncio.run(_status(args.json))
    if args.json:
        raise RequestError("json", "goes with --status (dreamtty serve --status --json)")
    if args.listen:
        warn_plain_http(parse_listen(args.listen)[0], args.listen)
    if args.idle_exit is not None and not 0 < args.idle_exit < math.inf:
        raise RequestError("idle-exit", f"{args.idle_exit:g} is not a finite number of minutes above 0 (leave "
                                        "--idle-exit out: it never exits)")
    options = ServeOptions(devices=args.device, cluster=args.cluster, listen=args.listen, idle_exit=args.idle_exit)
    try:
        if not args.detach:
            asyncio.run(serve(options, announce=lambda line: print(visible(line), flush=True)))
            return 0
        if _answers():
            raise AlreadyRunning(_files().running_message())
        info = start_detached(options)
        if not info["started"]:  # another command started one at the same moment
            raise AlreadyRunning(_files().running_message())
    except AlreadyRunning as exc:
        print(f"dreamtty: {one_line(exc)}", file=sys.stderr)
        return 1
    print(visible(f"dreamtty: service started in the background (pid {info['pid']}) on {info['socket']}; "
                  f"log: {info['log']}"))
    return 0


def _files():
    from backend.service_files import ServiceFiles

    return ServiceFiles.default()


def _answers() -> bool:
    from backend.serve import is_running

    return is_running(_files())


def _client():
    """A client of this machine's service that never starts one, and stops or reads one of any version
    or settings."""
    from backend.remote_client import Address, RemoteClient

    return RemoteClient(Address(socket=_files().socket), start=None, previews=False, manage=True)


def _not_running(as_json: bool = False) -> int:
    """Say that no service answers (on stderr; ``as_json``: also as JSON on stdout, which a script reads)."""
    files = _files()
    if files.locked():  # it holds the lock but does not answer: it starts or stops
        return _not_answering(as_json)
    from backend import locations
    from backend.service_files import queue_holder

    elsewhere = queue_holder(locations.state_dir())
    if as_json:
        print(json.dumps({"service": "not running" if elsewhere is None else "elsewhere", "pid": None}))
    if elsewhere is not None:
        print(f"dreamtty: {one_line(elsewhere)}", file=sys.stderr)
        return 1
    stale = " (a crashed one left its socket; the next start removes it)" if files.socket.exists() else ""
    print(f"dreamtty: no service is running{stale}", file=sys.stderr)
    return 1


def _not_answering(as_json: bool) -> int:
    """Say that the service holds its lock or takes connections, but answers none (with its pid, when known)."""
    from backend.serve import log_path

    pid = (_files().read_pid_file() or {}).get("pid")
    if as_json:
        print(json.dumps({"service": "not answering", "pid": pid}))
    print(f"dreamtty: the service{f' (pid {pid})' if pid else ''} does not answer: it is starting, stopping or "
          f"busy (its log: {log_path()})", file=sys.stderr)
    return 1


async def _stop() -> int:
    if not _answers():
        return _not_running()
    files = _files()
    pid = (files.read_pid_file() or {}).get("pid")
    client = _client()
    try:
        await client.shutdown()
    except ServiceUnavailable as exc:  # it takes connections but answers none: stuck (stopped, swapping, ...)
        hint = f"; if pid {pid} stays stuck, end it with: kill {pid}" if pid else ""
        raise ServiceUnavailable(f"{exc}{hint}") from None
    finally:
        await client.close()
    deadline = time.monotonic() + STOP_TIMEOUT
    while files.locked() and time.monotonic() < deadline:  # the lock goes with the process
        await asyncio.sleep(0.1)
    if files.locked():
        raise DreamttyError(f"service: pid {pid} still runs {STOP_TIMEOUT:g} s after it was asked to stop")
    print(f"dreamtty: service stopped (pid {pid}); its queued jobs run at the next start")
    return 0


async def _status(as_json: bool) -> int:
    if not _answers():
        return _not_running(as_json)
    client = _client()
    try:
        status = await client.status()
    except ServiceUnavailable:  # it takes connections but answers none: stuck (stopped, swapping, ...)
        return _not_answering(as_json)
    finally:
        await client.close()
    from backend.versions import versions_differ

    differ = versions_differ(status)  # a service left running by an upgrade, that still answers alike
    status = {**status, "warnings": [*(status.get("warnings") or []), *([differ] if differ else [])]}
    print(json.dumps({**status, "service": "running"}) if as_json else format_status(status))
    return 0


def format_status(status: dict) -> str:
    """The ``serve --status`` text (paths and model names with control characters and newlines made visible)."""
    where = str(status.get("socket")) + (f", http://{status['listen']}" if status.get("listen") else "")
    idle = f"exits after {status['idle_exit']:g} min idle" if status.get("idle_exit") else "never exits when idle"
    lines = [f"service   pid {status['pid']}, up {_duration(status['uptime'])}, dreamtty {status['dreamtty']}, {idle}",
             f"listens   {where}",
             f"queue     {status['queued']} queued, {status['running']} running; {status['streams']} client(s) attached",
             *_runs_line(status.get("runs")), *worker_lines(status), f"log       {status.get('log')}",
             *(f"warning   {warning}" for warning in status.get("warnings") or [])]
    return "\n".join(one_line(line) for line in lines)  # a newline in a name cannot forge a line


def _runs_line(runs: dict | None) -> list[str]:
    """The training runs the service schedules, when there are any."""
    if not runs or not (runs["training"] or runs["waiting"]):
        return []
    return [f"runs      {runs['training']} training, {runs['waiting']} waiting for a device"]


def worker_lines(status: dict) -> list[str]:
    """Where the service's workers run (a cluster's nodes too) and what each runs and holds, a line each
    (control characters and newlines in names written out): for ``serve --status`` and the Models screen."""
    from backend.downloads import human

    lines = []
    if status.get("cluster") is not None:
        nodes, cluster, head = status.get("nodes"), status["cluster"], status.get("head")
        counted = f"{len(nodes)} node(s), {sum(n['gpus'] for n in nodes)} GPU(s)" if nodes is not None else \
            "nodes unknown"
        lines.append(f"cluster   {cluster}{f' (head {head})' if head and head != cluster else ''}: {counted}")
        lines += [f"node      {n['host']} ({n['address']}), {n['gpus']} GPU(s), {'alive' if n['alive'] else 'lost'}"
                  for n in nodes or []]
    for worker in status["workers"]:
        jobs = worker["jobs"]
        training = worker.get("training")
        state = (f"job{'s' * (len(jobs) > 1)} {', '.join(map(str, jobs))}" if jobs
                 else f"lent to training run {training}" if training is not None
                 else "idle" if worker["ready"] else "starting")
        models = ", ".join(f"{m['model']} ({m['dtype']}, {human(m['bytes'])})" for m in worker["models"]) or "no model"
        pid = f" (pid {worker['pid']})" if worker["pid"] is not None else ""  # none: a Ray actor, or not started
        lines.append(f"worker {worker['id']}  {worker['device']}{pid}, {state}; {models}; "
                     f"{worker['loads']} load(s) since it started")
    return [one_line(line) for line in lines]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
