"""The client side of the service's HTTP API: JSON requests on kept-alive connections and the event
WebSocket, over a Unix socket or TCP, on asyncio streams.

The protocols are h11's (HTTP/1.1) and wsproto's (WebSocket): sans-I/O libraries that parse and frame,
while this module only moves the bytes. The service itself runs on aiohttp, whose client would cost
every CLI call 0.13 s of imports (its connector builds two TLS contexts when it is imported), against
0.02 s for these two (benchmarks/cli_warm.py counts a call's start-up).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from urllib.parse import urlencode

import h11
from wsproto import ConnectionState, ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request, TextMessage
from wsproto.utilities import RemoteProtocolError

READ_SIZE = 1 << 16
MAX_ANSWER = 1 << 28  # bytes of one answer (256 MiB: a listing of a million jobs); past it the service is not ours
IDEMPOTENT = ("GET", "HEAD")  # sent again on a new connection when a kept one closed before answering


class Unreachable(ConnectionError):
    """Nothing accepts a connection at the address."""


class Rejected(ConnectionError):
    """The service answered the WebSocket handshake with an HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the event stream was refused (HTTP {status})")
        self.status = status


def authority(host: str, port: int) -> str:
    """``host:port`` as a URL or Host header writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HTTPClient:
    """Requests and WebSockets to one address; a connection is kept for the next request when the
    service keeps it open, and requests made at once each get their own."""

    def __init__(self, socket: str | None = None, host: str | None = None, port: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self._socket, self._host, self._port = socket, host, port
        self._authority = "dreamtty" if socket is not None else authority(host, port)
        self._headers = list((headers or {}).items())
        self._idle: list[_Connection] = []
        self._closed = False

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self._socket is not None:
                return await asyncio.open_unix_connection(self._socket)
            return await asyncio.open_connection(self._host, self._port)
        except OSError as exc:
            raise Unreachable(exc.strerror or str(exc)) from None

    async def request(self, method: str, path: str, body: object = None,
                      params: dict[str, str] | None = None) -> tuple[int, object]:
        """Send ``body`` as JSON; the answer's status and its JSON (None when it has none)."""
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", self._authority), *self._headers, ("Content-Length", str(len(payload)))]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        try:
            request = h11.Request(method=method, target=_target(path, params), headers=headers)
        except h11.LocalProtocolError as exc:  # a token with a line break, say
            raise ValueError(f"cannot send this request: {exc}") from None
        while True:
            connection = self._kept()
            kept = connection is not None
            connection = connection or _Connection(*await self._open())
            try:
                status, answer = await connection.exchange(request, payload)
            except _Closed as closed:
                connection.close()
                # A kept connection the service closed as the request went (idle, or it restarted): again on a
                # new one, unless the service may have read and acted on it.
                if kept and (closed.unsent or method in IDEMPOTENT):
                    continue
                raise ConnectionResetError("the service closed the connection without answering") from None
            except BaseException:
                connection.close()
                raise
            if connection.reusable() and not self._closed:
                self._idle.append(connection)
            else:
                connection.close()
            try:
                return status, json.loads(answer) if answer else None
            except ValueError:
                return status, None

    def _kept(self) -> _Connection | None:
        """An idle connection that the service has not closed meanwhile."""
        while self._idle:
            connection = self._idle.pop()
            if connection.open():
                return connection
            connection.close()
        return None

    async def websocket(self, path: str, params: dict[str, str] | None = None) -> WebSocket:
        """A WebSocket opened at ``path``; :class:`Rejected` when the service answers with a status."""
        reader, writer = await self._open()
        protocol = WSConnection(ConnectionType.CLIENT)
        try:
            try:
                handshake = protocol.send(Request(host=self._authority, target=_target(path, params),
                                                  extra_headers=[(k.encode(), v.encode()) for k, v in self._headers]))
            except h11.LocalProtocolError as exc:
                raise ValueError(f"cannot open the event stream: {exc}") from None
            writer.write(handshake)
            await writer.drain()
            while True:
                events = await _read_events(reader, protocol)
                for i, event in enumerate(events):
                    if isinstance(event, AcceptConnection):
                        return WebSocket(reader, writer, protocol, events[i + 1:])
                    if isinstance(event, RejectConnection):
                        raise Rejected(event.status_code)
        except BaseException:
            writer.close()
            raise

    def close(self) -> None:
        """Close the idle connections, and the others as their requests end."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class WebSocket:
    """The text messages of an open WebSocket; pings are answered as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: WSConnection,
                 pending: list) -> None:
        self._reader, self._writer, self._protocol = reader, writer, protocol
        self._pending = deque(pending)
        self._parts: list[str] = []
        self.close_reason: str | None = None  # what the server said as it closed the stream, if anything

    async def receive(self, idle: float) -> str | None:
        """The next text message; None once the stream is closed. ``asyncio.TimeoutError`` when nothing
        (not even the service's heartbeat ping) came for ``idle`` seconds."""
        while True:
            while self._pending:
                event = self._pending.popleft()
                if isinstance(event, TextMessage):
                    self._parts.append(event.data)
                    if event.message_finished:
                        text, self._parts = "".join(self._parts), []
                        return text
                elif isinstance(event, Ping) and self._protocol.state is ConnectionState.OPEN:  # not once it closes
                    self._writer.write(self._protocol.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.close_reason = event.reason or None
                    self._writer.write(self._protocol.send(event.response()))
                    self.close()
                    return None
            try:
                self._pending.extend(await asyncio.wait_for(_read_events(self._reader, self._protocol), idle))
            except _Closed:
                self.close()
                return None

    def close(self) -> None:
        self._writer.close()


class _Closed(ConnectionError):
    """The peer closed the connection (an HTTP one: before any of the answer came; ``unsent``: before the
    request could be sent)."""

    def __init__(self, unsent: bool = False) -> None:
        super().__init__()
        self.unsent = unsent


class _Connection:
    """One HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._protocol = h11.Connection(h11.CLIENT)

    async def exchange(self, request: h11.Request, payload: bytes) -> tuple[int, bytes]:
        """Send the request; the answer's status and body. :class:`_Closed` when the connection
        closed before any of the answer came."""
        p = self._protocol
        try:
            self._writer.write(p.send(request) + (p.send(h11.Data(data=payload)) if payload else b"")
                               + p.send(h11.EndOfMessage()))
            await self._writer.drain()
        except ConnectionError:
            raise _Closed(unsent=True) from None
        status, body, received, size = 0, [], False, 0
        while True:
            try:
                event = p.next_event()
            except h11.RemoteProtocolError as exc:
                raise ConnectionResetError(f"the service's answer broke off: {exc}") from None
            if event is h11.NEED_DATA:
                data = await _read(self._reader)
                if not data and not received:
                    raise _Closed()
                received = True
                p.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_ANSWER:
                    raise ValueError(f"its answer is over {MAX_ANSWER >> 20} MiB")
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(body)

    def open(self) -> bool:
        """False once the service closed the connection (seen by the event loop)."""
        return not (self._reader.at_eof() or self._writer.is_closing())

    def reusable(self) -> bool:
        if self._protocol.our_state is h11.DONE and self._protocol.their_state is h11.DONE:
            self._protocol.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self._writer.close()


def _target(path: str, params: dict[str, str] | None) -> str:
    return f"{path}?{urlencode(params)}" if params else path


async def _read_events(reader: asyncio.StreamReader, protocol: WSConnection) -> list:
    """The WebSocket events the next bytes complete; :class:`_Closed` at the end of the stream."""
    data = await _read(reader)
    if not data:
        raise _Closed()
    try:
        protocol.receive_data(data)
    except RemoteProtocolError as exc:
        raise ConnectionResetError(f"the event stream broke: {exc}") from None
    return list(protocol.events())


async def _read(reader: asyncio.StreamReader) -> bytes:
    """The next bytes; b"" at the end of the stream, a reset one included."""
    try:
        return await reader.read(READ_SIZE)
    except ConnectionError:
        return b""
