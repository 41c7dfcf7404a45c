"""The service's HTTP server (backend/http_server.py): a cap on open TCP connections, and a time
limit on a connection that does not send its request, on a small app in this process."""

from __future__ import annotations

import asyncio
import json
import time
from importlib.util import find_spec

import aiohttp
import pytest
from aiohttp import web

from backend import http_server


async def _hello(request: web.Request) -> web.Response:
    http_server.trust(request)  # as the service's guard does for a request with the token
    return web.json_response({"hello": 1})


@pytest.fixture
async def runner(monkeypatch):
    monkeypatch.setattr(http_server, "KEEPALIVE", 1.0)
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = http_server.make_runner(app)
    await runner.setup()
    yield runner
    await runner.cleanup()


async def _get(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as r:
        return r.status


async def _kept(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that made one authorised request, answered 200, and stays open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    await reader.readexactly(len(b'{"hello": 1}'))
    return reader, writer


def _refused(field: str, message: str) -> dict:
    return {"error": f"{field}: {message}", "field": field, "message": message}


@pytest.mark.parametrize("sent, answer", [
    (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
     _refused("request", "not HTTP this server can read (Invalid character in Content-Length:)")),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
                 _refused("body", "cannot be decoded (a Content-Encoding other than gzip or deflate); send plain JSON"),
                 marks=pytest.mark.skipif(any(find_spec(m) for m in ("brotli", "brotlicffi")),
                                          reason="aiohttp decodes br where Brotli is installed")),
    (b"GET /" + b"1" * 9000 + b" HTTP/1.1\r\n\r\n",
     _refused("request", "a line of it (the URL or a header) is too long")),
    (b"GET / HTTP/1.1\r\nX-A: \x1b[31m\r\n\r\n",
     _refused("request", "not HTTP this server can read (Invalid header value char:)")),
])
async def test_a_request_aiohttp_cannot_read_is_answered_in_one_line_of_json(runner, sent, answer):
    """aiohttp answered these itself: text of several lines, echoing the request's bytes."""
    tcp = await http_server.listen_tcp(runner, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp.sockets[0].getsockname()[1])
        writer.write(sent)
        head, _, body = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")
        writer.close()
    finally:
        tcp.close()
    assert head.startswith(b"HTTP/1.0 400 ") and b"Content-Type: application/json" in head
    assert json.loads(body) == answer


async def test_past_the_cap_a_stranger_makes_room_and_authorised_connections_are_told_busy(runner):
    tcp = await http_server.listen_tcp(runner, "127.0.0.1", 0, limit=3)
    port = tcp.sockets[0].getsockname()[1]
    held = []
    try:
        strangers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]  # silent: no request
        held += strangers
        await asyncio.sleep(0.1)
        held += [await _kept(port) for _ in range(3)]  # each takes the place of the oldest stranger
        assert [await asyncio.wait_for(reader.read(), 5) for reader, _ in strangers] == [b""] * 3
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)  # all three authorised: the server says so, closes it
        writer.close()
        assert answer == http_server.BUSY and answer.startswith(b"HTTP/1.1 503 ")
        assert answer.endswith(b"\r\n\r\n" + b'{"error": "busy: too many open connections"}\n')
        held.pop()[1].close()
        await asyncio.sleep(0.1)
        assert await _get(port) == 200  # a place came free
    finally:
        for _, writer in held:
            writer.close()
        tcp.close()


async def test_a_burst_of_strangers_past_the_cap_leaves_no_more_than_the_cap_open(runner):
    """A burst is accepted before aiohttp lists any of it: each stranger evicted is closed all the same."""
    tcp = await http_server.listen_tcp(runner, "127.0.0.1", 0, limit=8)
    port = tcp.sockets[0].getsockname()[1]
    held = []
    try:
        for _ in range(3):
            held += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(50)))
            await asyncio.sleep(0.2)
        assert len(runner.server.connections) <= 8 and len(runner.app[http_server.CONNECTIONS].open) <= 8
        assert await _get(port) == 200  # a newcomer gets in, in place of a stranger
    finally:
        for _, writer in held:
            writer.close()
        tcp.close()


async def test_a_connection_that_trickles_its_request_is_closed_after_the_keepalive(runner):
    tcp = await http_server.listen_tcp(runner, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        hung_up = asyncio.create_task(reader.read())  # b"" once the server closes the connection
        began = time.monotonic()
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100:  # a byte at a time, never the end
            if hung_up.done() or time.monotonic() - began > 10:
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        assert hung_up.done() and await hung_up == b""
        assert 0.9 < time.monotonic() - began < 3  # KEEPALIVE is 1 s here
        writer.close()
        assert await _get(port) == 200
    finally:
        tcp.close()
