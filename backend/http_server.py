"""The HTTP servers of the service and of ``dreamtty web`` (aiohttp): how long a connection may wait,
and how many TCP ones they hold.

aiohttp keeps a connection that has not sent a whole request for an hour by default, and accepts
connections until the process runs out of file descriptors. Anyone who reaches a ``--listen``
port could then hold enough half-sent requests, with no token, that the owner's Unix socket,
the queue file and the workers' pipes can no longer be opened. Here a connection has
:data:`KEEPALIVE` seconds to send its first request (aiohttp counts from the connection, not from
its last byte, so sending slowly does not extend it) and to idle between requests. Past
:data:`MAX_CONNECTIONS` open TCP connections, a new one takes the place of the oldest that has not
yet made an authorised request (:func:`trust`), so that idle connections opened without the token
cannot shut the owner out; when every one has, the listener answers ``503``. The Unix socket's
connections (this user's processes) are neither counted nor closed.

A request that is not HTTP aiohttp can read (a header line over its limit, a Content-Length that is not a
number, a Content-Encoding it cannot decode) is answered before any route or middleware sees it: here in one
line of JSON like every other error (:class:`_JsonErrorHandler`), not aiohttp's text of several lines that echoes the
request's bytes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import Awaitable, Callable

from aiohttp import http_exceptions, web

from backend.errors import DreamttyError, Transient
from backend.safetext import error_line

KEEPALIVE = 60.0  # seconds; the CLI and the TUI send a request as soon as they connect
MAX_CONNECTIONS = 256  # TCP connections open at once (event streams included), well under 1024 descriptors
_BUSY_BODY = b'{"error": "busy: too many open connections"}\n'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class TcpConnections:
    """An app's open TCP connections (aiohttp's request handlers), oldest first, and those authorised."""

    def __init__(self) -> None:
        self.open: dict[object, _Counted] = {}
        self.trusted: set = set()

    def add(self, handler) -> _Counted:
        self.open[handler] = counted = _Counted(handler, self.gone)
        return counted

    def gone(self, handler) -> None:
        self.open.pop(handler, None)
        self.trusted.discard(handler)

    def trust(self, handler) -> None:
        if handler in self.open:
            self.trusted.add(handler)

    def evict_stranger(self) -> bool:
        """Close the oldest connection not authorised; False when every one is."""
        stranger = next((handler for handler in self.open if handler not in self.trusted), None)
        if stranger is None:
            return False
        self.open.pop(stranger).evict()
        return True


CONNECTIONS = web.AppKey("tcp_connections", TcpConnections)


def trust(request: web.Request) -> None:
    """Mark ``request``'s connection as authorised: it is never closed to make room for another."""
    connections = request.app.get(CONNECTIONS)
    if connections is not None and request.protocol is not None:
        connections.trust(request.protocol)


class _Runner(web.AppRunner):
    """An AppRunner whose connections answer a request they cannot read in one line of JSON."""

    @property
    def server(self):
        server = super().server
        return None if server is None else _JsonErrorServer(server)


class _JsonErrorServer:
    """aiohttp's Server (its attributes are this one's) making connections of :class:`_JsonErrorHandler`."""

    def __init__(self, server) -> None:
        self._server = server

    def __getattr__(self, name: str):
        return getattr(self._server, name)

    def __call__(self) -> web.RequestHandler:
        handler = self._server()
        handler.__class__ = _JsonErrorHandler  # the Server takes no class to make
        return handler


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner of the service's ``app``: no signal handlers of its own, no access log."""
    app[CONNECTIONS] = TcpConnections()
    return _Runner(app, handle_signals=False, shutdown_timeout=2.0, access_log=None, keepalive_timeout=KEEPALIVE)


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's protocol for one connection, answering a request it cannot read, or a failure outside the app's
    middlewares, as ``{"error": LINE}`` (see :func:`_protocol_error`)."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises when part of a response was sent
        response = web.json_response(_protocol_error(status, exc, message), status=status)
        response.force_close()
        return response


def _protocol_error(status: int, exc: BaseException | None, message: str | None) -> dict:
    """The JSON of an error aiohttp answers itself: a 400 names its field (``body`` or ``request``) as the API's do."""
    if status >= 500:
        return {"error": f"internal error ({status}); see the service log"}
    if isinstance(exc, http_exceptions.ContentEncodingError):
        field, why = "body", "cannot be decoded (a Content-Encoding other than gzip or deflate); send plain JSON"
    elif isinstance(exc, http_exceptions.LineTooLong):
        field, why = "request", "a line of it (the URL or a header) is too long"
    else:
        lines = (message or str(exc or "")).strip().splitlines()
        field, why = "request", error_line(f"not HTTP this server can read ({lines[0] if lines else status})")
    return {"error": f"{field}: {why}", "field": field, "message": why}


async def listen_tcp(runner: web.AppRunner, host: str, port: int, limit: int = MAX_CONNECTIONS,
                     serving: bool = True) -> asyncio.Server:
    """``runner``'s app on ``host:port``; past ``limit`` open connections, a new one takes the place of the
    oldest not authorised, or is answered 503 and closed. The caller closes the listener before
    ``runner.cleanup()`` (which ends the connections). DreamttyError when it cannot listen there. Without
    ``serving`` it takes connections once the caller awaits its ``start_serving()``."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    connections = runner.app.get(CONNECTIONS) or TcpConnections()  # an app not run by make_runner: none trusted

    def connection() -> asyncio.BaseProtocol:
        if len(connections.open) >= limit and not connections.evict_stranger():
            return _Busy()
        return connections.add(server())

    try:
        return await asyncio.get_running_loop().create_server(connection, host, port, start_serving=serving)
    except OSError as exc:  # in use, not this machine's address, a privileged port
        shown = f"[{host}]" if ":" in host else host
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)  # not the tuple
        said = f"listen: cannot listen on {shown}:{port}: {why}"  # asyncio writes in its text
        raise (Transient(f"{said}; try again once it is free, or another port") if exc.errno == errno.EADDRINUSE
               else DreamttyError(said)) from None


async def serve_tcp(app: web.Application, host: str, port: int, listening: Callable[[], None] = lambda: None,
                    before: Callable[[], Awaitable[None]] | None = None) -> None:
    """``app`` on ``host:port``, with the limits above, until SIGINT or SIGTERM; ``listening`` is called once
    it listens. ``before`` runs once the address is taken, before a connection is: an address that cannot be
    had is said before it starts anything (the service a page needs)."""
    runner = make_runner(app)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        listener = await listen_tcp(runner, host, port, MAX_CONNECTIONS, serving=False)
        try:
            if before is not None:
                await before()  # Ctrl-C meanwhile interrupts it, as the command's own
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await listener.start_serving()
            listening()
            await stop.wait()
        finally:
            listener.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await runner.cleanup()


class _Counted(asyncio.Protocol):
    """A TCP connection's aiohttp handler, which says when the connection ends: the listener counts open
    connections as they are accepted, before aiohttp's own list has them."""

    def __init__(self, handler, gone: Callable[[object], None]) -> None:
        self.handler, self._gone, self._evicted = handler, gone, False

    def evict(self) -> None:
        """Close the connection: now, or as soon as it is made (a burst is accepted before any is)."""
        self._evicted = True
        self.handler.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)
        if self._evicted:
            self.handler.force_close()

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(self.handler)
        self.handler.connection_lost(exc)


class _Busy(asyncio.Protocol):
    """Says 503 and hangs up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BUSY)
        transport.close()
