"""The HTTP servers of the service and of ``dreamtty web`` (aiohttp): how long a connection may wait,
and how many TCP ones they hold.

aiohttp keeps a connection that has not sent a whole request for an hour by default, and accepts
connections until the process runs out of file descriptors. Anyone who reaches a ``--listen``
port could then hold enough half-sent requests, with no token, that the owner's Unix socket,
the queue file and the workers' pipes can no longer be opened. Here a connection has
:data:`KEEPALIVE` seconds to send its first request (aiohttp counts from the connection, not from
its last byte, so sending slowly does not extend it) and to idle between requests. Past
:data:`MAX_CONNECTIONS` open connections, a new TCP one takes the place of the oldest connection
that has not yet made an authorised request (:func:`trust`), so that idle connections opened without
the token cannot shut the owner out; when every one has, the listener answers ``503``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from aiohttp import web

from backend.errors import DreamttyError

KEEPALIVE = 60.0  # seconds; the CLI and the TUI send a request as soon as they connect
MAX_CONNECTIONS = 256  # open at once (the Unix socket's and event streams included), well under 1024 descriptors
_BUSY_BODY = b'{"error": "busy: too many open connections"}\n'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


# An app's connections (aiohttp's request handlers, which take no weak references) that were authorised;
# those closed since are dropped at the next connection.
TRUSTED = web.AppKey("trusted", set)


def trust(request: web.Request) -> None:
    """Mark ``request``'s connection as authorised: it is never closed to make room for another."""
    trusted = request.app.get(TRUSTED)
    if trusted is not None and request.protocol is not None:
        trusted.add(request.protocol)


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner of the service's ``app``: no signal handlers of its own, no access log."""
    app[TRUSTED] = set()
    return web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0, access_log=None,
                         keepalive_timeout=KEEPALIVE)


async def listen_tcp(runner: web.AppRunner, host: str, port: int, limit: int = MAX_CONNECTIONS) -> asyncio.Server:
    """``runner``'s app on ``host:port``; a connection past ``limit`` open ones is answered 503 and closed.
    The caller closes the listener before ``runner.cleanup()`` (which ends the connections). DreamttyError
    when it cannot listen there."""
    server, trusted = runner.server, runner.app.get(TRUSTED)
    assert server is not None, "runner.setup() first"
    trusted = set() if trusted is None else trusted  # an app not run by make_runner: none known

    def connection() -> asyncio.BaseProtocol:
        open_now = server.connections
        trusted.intersection_update(open_now)
        if len(open_now) < limit:
            return server()
        stranger = next((handler for handler in open_now if handler not in trusted), None)
        if stranger is None:
            return _Busy()
        stranger.force_close()  # the oldest first: connections are listed in the order they came
        return server()

    try:
        return await asyncio.get_running_loop().create_server(connection, host, port)
    except OSError as exc:  # in use, not this machine's address, a privileged port
        shown = f"[{host}]" if ":" in host else host
        raise DreamttyError(f"listen: cannot listen on {shown}:{port}: {exc.strerror or exc}") from None


async def serve_tcp(app: web.Application, host: str, port: int, listening: Callable[[], None] = lambda: None) -> None:
    """``app`` on ``host:port``, with the limits above, until SIGINT or SIGTERM; ``listening`` is called once
    it listens."""
    runner = make_runner(app)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        listener = await listen_tcp(runner, host, port, MAX_CONNECTIONS)
        listening()
        try:
            await stop.wait()
        finally:
            listener.close()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


class _Busy(asyncio.Protocol):
    """Says 503 and hangs up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BUSY)
        transport.close()
