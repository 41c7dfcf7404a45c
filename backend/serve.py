"""``dreamtty serve``: one long-lived service (queue, workers, loaded models) behind the API.

:func:`serve` runs it in this process until ``POST /v1/shutdown``, SIGTERM, SIGINT or the idle
limit; :func:`start_detached` starts it in the background like tmux starts its server: its own
session (no terminal, so an SSH drop or a Ctrl-C never reaches it), output to a log under the state
dir. ``python -m backend.serve OPTIONS_JSON`` is that background process's entry point.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from backend import locations, service_log
from backend.errors import DreamttyError, RequestError, ServiceUnavailable, Transient
from backend.queue_store import QueueUnavailable
from backend.safetext import visible
from backend.service_files import (AlreadyRunning, QueueHeld, ServiceFiles, hold_queue, make_token, token_file,
                                   token_warnings)
from backend.versions import build

WORKER_NICE = 10  # the service's workers yield the CPU to interactive programs: a TUI paints keys while a job runs
START_TIMEOUT = 60.0  # seconds a detached service may take to answer on its socket
IDLE_CHECK = 5.0  # seconds between checks of the idle limit
REFUSED_EXIT = 2  # a detached service that refused what it was given (an address not this machine's): bad input
PASSING_EXIT = 5  # one that met a fault that passes (a port in use): exit 3, as in the foreground
LOG_CHECK = 10.0  # seconds between checks of the log's size


@dataclass(frozen=True)
class ServeOptions:
    devices: str = "auto"
    cluster: str | None = None  # Ray cluster for the workers (None: the config's ``workers``)
    listen: str | None = None  # HOST:PORT for TCP clients (with the token)
    idle_exit: float | None = None  # minutes without jobs, requests or attached clients before exiting


def parse_listen(text: str, field: str = "listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); RequestError naming ``field`` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise RequestError(field, f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:7860)")
    if not 0 < int(port) < 65536:
        raise RequestError(field, f"{text!r}: port {port} is out of range; allowed 1..65535")
    if not host.isprintable():  # a control character: no bracket it lacks
        raise RequestError(field, f"{text!r}: {host!r} is not a host name or address")
    if "[" in host or "]" in host or (":" in host and not bracketed):  # ::1:7860 reads as no address in a URL
        raise RequestError(field, f"{text!r}: an IPv6 address goes in brackets, as in [::1]:7860")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of ``HOST:PORT``) is this machine's loopback: only its own users reach it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_path() -> Path:
    return service_log.log_file("serve.log")


async def serve(options: ServeOptions, announce: Callable[[str], None] = print) -> None:
    """Run the service until it is stopped; raises AlreadyRunning when another one runs."""
    from aiohttp import web

    from backend.api import Api
    from backend.http_server import listen_tcp, make_runner
    from backend.service import Service

    build()  # the code this service runs, fingerprinted before an upgrade may change it on disk
    files = ServiceFiles.default()
    files.make_folder()
    lock = files.acquire()
    service_log.quiet_client_faults()
    stop = asyncio.Event()
    service: Service | None = None
    runner: web.AppRunner | None = None
    tcp: asyncio.Server | None = None
    queue_lock: int | None = None
    try:
        queue_lock = hold_queue(locations.state_dir(), {"pid": os.getpid(), "socket": str(files.socket)})
        address = parse_listen(options.listen) if options.listen else None
        token = make_token() if address else None
        service = Service(devices=options.devices, recover=True, nice=WORKER_NICE, cluster=options.cluster)
        warnings = [*service.store.warnings, *token_warnings(token)]  # a damaged queue file moved aside
        for warning in warnings:
            announce(visible(f"dreamtty: warning: {warning}"))
        info = {"pid": os.getpid(), "socket": str(files.socket), "listen": options.listen,
                "idle_exit": options.idle_exit, "log": str(log_path()),
                "warnings": warnings}  # said to the client that started it and by --status
        api = Api(service, token, stop.set, lambda: info)
        runner = make_runner(api.app)
        await runner.setup()
        if address:  # before the workers start: a port in use is said at once
            tcp = await listen_tcp(runner, *address, serving=False)
        await service.start()
        umask = os.umask(0o177)  # the socket is born 0600: no moment when others may connect
        try:
            await web.UnixSite(runner, str(files.socket)).start()
        finally:
            os.umask(umask)
        if tcp is not None:
            await tcp.start_serving()
        files.write_pid_file({**info, "started": service.started})
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        announce(f"dreamtty: service running (pid {os.getpid()}) on {files.socket}")
        if address:
            announce(f"dreamtty: and on http://{options.listen} (bearer token in {token_file()})")
        tasks = [asyncio.create_task(_log_events(service, announce)), asyncio.create_task(_rotate_log(log_path()))]
        if options.idle_exit:
            tasks.append(asyncio.create_task(_exit_when_idle(service, api, options.idle_exit * 60, stop, announce)))
        await stop.wait()
        for task in tasks:
            task.cancel()
        announce("dreamtty: service stopping; queued and running jobs stay queued for the next start")
    finally:
        if tcp is not None:
            tcp.close()
        if runner is not None:
            await runner.cleanup()
        if service is not None and service.started is not None:
            await service.close()
        files.remove()
        for fd in (lock, queue_lock):
            if fd is not None:
                os.close(fd)


async def _log_events(service, announce) -> None:
    """One line per job queued or ended and per worker ready (what the log is read for)."""
    from backend.events import FINAL_EVENTS, Queued, Retrying, WorkerReady

    events = service.subscribe()
    while True:
        event = await events.get()
        if isinstance(event, (Queued, Retrying, WorkerReady, *FINAL_EVENTS)):
            detail = getattr(event, "error", None) or getattr(event, "message", None) or getattr(event, "device", "")
            who = f"job {event.job}" if hasattr(event, "job") else f"worker {event.worker}"
            announce(visible(f"dreamtty: {who} {event.type}" + (f": {detail}" if detail else "")))


async def _rotate_log(path: Path) -> None:
    """Move the log aside once it is past its limit, whatever wrote to it (an idle service too)."""
    while True:
        await asyncio.sleep(LOG_CHECK)
        service_log.rotate_own(path)


async def _exit_when_idle(service, api, seconds: float, stop: asyncio.Event, announce) -> None:
    """Stop after ``seconds`` with no job queued or running, no training run waiting or training, no request and no
    attached client."""
    quiet_since = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(min(IDLE_CHECK, seconds))
        now = time.monotonic()
        try:
            busy = (any(service.store.counts(service.owner).values()) or bool(api.streams)
                    or service.training.busy())
        except QueueUnavailable:  # locked for a while (a backup): not known to be idle
            busy = True
        if busy:
            quiet_since = now
        if now - max(quiet_since, api.last_request) >= seconds:
            announce(f"dreamtty: idle for {seconds / 60:g} minutes; exiting to free the workers")
            stop.set()


def is_running(files: ServiceFiles | None = None) -> bool:
    """True when a service answers on the socket (a connect; no request)."""
    files = files or ServiceFiles.default()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(files.socket))
        except OSError:
            return False
    return True


def start_detached(options: ServeOptions) -> dict:
    """Start a service in the background and wait until it answers; returns its pid file, and ``started``:
    whether it is the one started here.

    When another process starts one at the same moment, exactly one runs (the lock) and this
    returns that one's pid file (``started`` False).
    """
    files = ServiceFiles.default()
    files.make_folder()
    log_file = log_path()
    locations.make_folder(log_file.parent, "state dir")
    service_log.rotate(log_file)
    process = _spawn(options, log_file)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        info = files.read_pid_file()
        if info is not None and is_running(files):
            return {**info, "started": info.get("pid") == process.pid}
        code = process.poll()
        if code == QueueHeld.EXIT_CODE:  # one of another runtime dir runs the queue (hold_queue)
            raise QueueHeld(_last_line(log_file))
        if code in (REFUSED_EXIT, PASSING_EXIT):
            said = _last_line(log_file).removeprefix("dreamtty: ")
            raise Transient(said) if code == PASSING_EXIT else DreamttyError(said)
        if code not in (None, 0, AlreadyRunning.EXIT_CODE):
            raise ServiceUnavailable(f"service: did not start ({_last_line(log_file).removeprefix('dreamtty: ')}); "
                                     f"see {log_file}")
        if code == AlreadyRunning.EXIT_CODE and not files.locked():  # the one that held the lock was stopping
            process = _spawn(options, log_file)
        time.sleep(0.05)
    if process.poll() == AlreadyRunning.EXIT_CODE:  # the one that holds the lock does not answer
        raise ServiceUnavailable(f"{files.running_message()}; it does not answer on its socket")
    raise ServiceUnavailable(f"service: not answering on {files.socket} after {START_TIMEOUT:g} s; see {log_file}")


def _spawn(options: ServeOptions, log_file: Path) -> subprocess.Popen:
    """A detached service process (its own session), writing to ``log_file``."""
    try:
        out = open(log_file, "ab")
    except OSError as exc:  # a read-only or full state folder, where the queue lives too
        raise DreamttyError(f"service: cannot write its log {log_file}: {exc.strerror or exc}; the state folder "
                            "must be writable") from None
    with out:
        process = subprocess.Popen([sys.executable, "-m", "backend.serve", json.dumps(asdict(options))],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    threading.Thread(target=process.wait, name="dreamtty-reap", daemon=True).start()  # no zombie when it ends
    return process


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def main(argv: list[str]) -> int:
    """The detached service's entry point: ``python -m backend.serve OPTIONS_JSON``."""
    service_log.configure()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    options = ServeOptions(**json.loads(argv[0]))
    try:
        asyncio.run(serve(options, announce=lambda line: print(time.strftime("%F %T"), line, flush=True)))
    except AlreadyRunning as exc:
        print(exc, flush=True)
        return exc.EXIT_CODE
    except DreamttyError as exc:
        print(f"dreamtty: {exc}", flush=True)
        return PASSING_EXIT if isinstance(exc, Transient) else REFUSED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
