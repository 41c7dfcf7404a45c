"""backend/http_client.py against a real aiohttp server (what ``dreamtty serve`` runs) on a Unix socket:
kept connections, a connection the server dropped, bodies and statuses, and the event WebSocket's pings."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from aiohttp import web

from backend.http_client import HTTPClient, Rejected, Unreachable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def socket_path():
    folder = Path(tempfile.mkdtemp(prefix="dt-http-", dir="/tmp"))  # a socket path has at most ~104 bytes
    yield folder / "api.sock"
    shutil.rmtree(folder, ignore_errors=True)


async def _serve(app: web.Application, path: Path, **runner_options) -> web.AppRunner:
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


def _echo_app(connections: list) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        connections.append(id(request.transport))
        body = await request.json() if request.can_read_body else None
        status = int(request.query.get("status", "200"))
        return web.json_response({"method": request.method, "query": dict(request.query), "body": body,
                                  "auth": request.headers.get("Authorization")}, status=status)

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/text", lambda request: web.Response(text="not json"))
    return app


async def test_requests_send_json_and_read_the_status_and_answer(socket_path):
    connections: list = []
    runner = await _serve(_echo_app(connections), socket_path)
    http = HTTPClient(socket=str(socket_path), headers={"Authorization": "Bearer t0k"})
    try:
        status, data = await http.request("POST", "/echo", {"prompt": "a fox ☃ [/]"}, {"a": "1 2", "status": "404"})
        assert status == 404
        assert data == {"method": "POST", "query": {"a": "1 2", "status": "404"}, "body": {"prompt": "a fox ☃ [/]"},
                        "auth": "Bearer t0k"}
        assert await http.request("GET", "/text") == (200, None)
        assert (await http.request("GET", "/missing"))[0] == 404
        with pytest.raises(ValueError, match="cannot send this request"):
            await HTTPClient(socket=str(socket_path), headers={"Authorization": "Bearer a\nb"}).request("GET", "/echo")
    finally:
        http.close()
        await runner.cleanup()


async def test_a_connection_is_kept_and_one_the_server_dropped_is_replaced(socket_path):
    connections: list = []
    runner = await _serve(_echo_app(connections), socket_path, keepalive_timeout=0.3)
    http = HTTPClient(socket=str(socket_path))
    try:
        for _ in range(3):
            assert (await http.request("GET", "/echo"))[0] == 200
        assert len(set(connections)) == 1  # one connection for the three
        await asyncio.sleep(1.0)  # the server closes the idle connection
        assert (await http.request("POST", "/echo", {"n": 1}))[1]["body"] == {"n": 1}
        assert len(set(connections)) == 2 and len(connections) == 4  # sent once, on a new connection
        both = await asyncio.gather(http.request("GET", "/echo"), http.request("GET", "/echo"))
        assert [status for status, _ in both] == [200, 200]
    finally:
        http.close()
        await runner.cleanup()


async def test_no_server_is_unreachable_and_a_server_gone_mid_answer_is_a_reset(socket_path):
    with pytest.raises(Unreachable):
        await HTTPClient(socket=str(socket_path)).request("GET", "/v1/version")

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut")
        writer.close()

    server = await asyncio.start_unix_server(half, str(socket_path))
    try:
        with pytest.raises(ConnectionResetError, match="broke off"):
            await HTTPClient(socket=str(socket_path)).request("GET", "/v1/version")
    finally:
        server.close()


async def test_a_ping_read_together_with_the_close_is_not_answered():
    """A heartbeat ping and the server's close in one read: by the time the ping is handled the stream is
    closing, and a pong then is a protocol error (it failed the test below on a loaded machine)."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Ping, Request

    from backend.http_client import WebSocket

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/v1/events")))
    list(server.events())  # the handshake request
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    client.receive_data(server.send(Ping()) + server.send(CloseConnection(code=1013, reason="fell behind")))
    written = []
    writer = type("Writer", (), {"write": lambda self, data: written.append(data), "close": lambda self: None})()
    ws = WebSocket(asyncio.StreamReader(), writer, client, list(client.events()))
    assert await ws.receive(idle=1) is None and ws.close_reason == "fell behind"
    server.receive_data(b"".join(written))
    assert [type(event).__name__ for event in server.events()] == ["CloseConnection"]  # the close answered, no pong


async def test_the_websocket_answers_the_servers_pings_and_reads_every_message(socket_path):
    """aiohttp's server closes a WebSocket whose pings go unanswered for half its heartbeat."""

    async def events(request: web.Request) -> web.WebSocketResponse:
        if request.headers.get("Authorization") != "Bearer ok":
            return web.json_response({"error": "unauthorized"}, status=401)
        ws = web.WebSocketResponse(heartbeat=2.0)  # a pong may take 1 s on a loaded machine (0.5 s was missed)
        await ws.prepare(request)
        await ws.send_str(request.query["n"])
        await asyncio.sleep(4.5)  # two heartbeats
        await ws.send_str("x" * 300_000)  # more than one read
        await ws.close(code=1013, message=b"events: fell behind\x1b[2J")
        return ws

    app = web.Application()
    app.router.add_get("/events", events)
    runner = await _serve(app, socket_path)
    try:
        ws = await HTTPClient(socket=str(socket_path), headers={"Authorization": "Bearer ok"}).websocket(
            "/events", {"n": "1"})
        assert await ws.receive(idle=5) == "1"
        assert await ws.receive(idle=5) == "x" * 300_000
        assert ws.close_reason is None
        assert await ws.receive(idle=5) is None  # closed, with the reason the server gave (shown escaped)
        assert ws.close_reason == "events: fell behind\x1b[2J"
        with pytest.raises(Rejected) as refused:
            await HTTPClient(socket=str(socket_path)).websocket("/events")
        assert refused.value.status == 401
    finally:
        await runner.cleanup()


async def test_a_quiet_websocket_times_out(socket_path):
    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()  # no heartbeat: nothing comes
        await ws.prepare(request)
        async for _ in ws:  # until the client goes
            pass
        return ws

    app = web.Application()
    app.router.add_get("/events", silent)
    runner = await _serve(app, socket_path)
    try:
        ws = await HTTPClient(socket=str(socket_path)).websocket("/events")
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(idle=0.3)
        ws.close()
    finally:
        await runner.cleanup()


def test_a_cli_client_never_imports_aiohttp():
    """A ``dreamtty generate`` against the service loads the client, not aiohttp's 0.13 s of imports."""
    code = ("import sys, tui.cli, tui.cli_jobs, backend.remote_client, backend.client\n"
            "tui.cli.parse_args(['generate', 'a fox'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_a_request_the_service_may_have_read_is_not_sent_twice(socket_path):
    """A kept connection closed after the request went: a GET goes again on a new connection, a POST
    (which may have queued a job) fails instead of queueing it twice."""
    seen: list[bytes] = []

    async def answer_one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for number in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                await reader.readexactly(length)
                seen.append(head.split(b" ", 2)[1])
                if number == 1:
                    break  # read and acted on, but never answered
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        finally:
            writer.close()

    server = await asyncio.start_unix_server(answer_one_per_connection, str(socket_path))
    http = HTTPClient(socket=str(socket_path))
    try:
        assert await http.request("GET", "/a") == (200, {})
        with pytest.raises(ConnectionResetError, match="closed the connection without answering"):
            await http.request("POST", "/jobs", {"prompt": "a fox"})
        assert await http.request("GET", "/c") == (200, {})
        assert await http.request("GET", "/d") == (200, {})  # its kept connection closes unanswered: again
        assert seen == [b"/a", b"/jobs", b"/c", b"/d", b"/d"]
    finally:
        http.close()
        server.close()


async def test_an_ipv6_service_gets_a_bracketed_host_header():
    seen: list[str] = []

    async def host(request: web.Request) -> web.Response:
        seen.append(f"{request.headers['Host']} {request.url}")
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/version", host)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "::1", 0)
        await site.start()
    except OSError:
        await runner.cleanup()
        pytest.skip("no IPv6 loopback here")
    port = site._server.sockets[0].getsockname()[1]
    try:
        assert await HTTPClient(host="::1", port=port).request("GET", "/v1/version") == (200, {})
        assert seen == [f"[::1]:{port} http://[::1]:{port}/v1/version"]
    finally:
        await runner.cleanup()


async def test_a_service_of_another_make_is_one_line_not_a_traceback(socket_path, monkeypatch):
    """Answers that pass the version check but not as this version's: a job without its fields, a flood."""
    from backend import config, http_client
    from backend.errors import DreamttyError
    from backend.remote_client import Address, RemoteClient
    from backend.service_status import checked_status
    from backend.versions import versions

    app = web.Application()
    app.router.add_get("/v1/version", lambda request: web.json_response({**versions(),
                                                                         "settings": config.service_settings()}))
    answers = [{"jobs": [{"id": 1, "state": "done"}]}]  # the last one is sent
    app.router.add_get("/v1/jobs", lambda request: web.json_response(answers[-1]))
    app.router.add_post("/v1/jobs/1/cancel", lambda request: web.json_response({"cancelled": True, "pad": "x" * 2**21}))
    worker = {"id": 0, "device": "cpu", "pid": 7, "ready": True, "jobs": [], "models": [], "loads": 0}
    status = {"pid": 7, "uptime": 1.0, "queued": 0, "running": 0, "workers": [worker], "dreamtty": "1", "streams": 1}
    statuses = [status]
    app.router.add_get("/v1/status", lambda request: web.json_response(statuses[-1]))
    runner = await _serve(app, socket_path)
    client = RemoteClient(Address(socket=socket_path), start=None)
    try:
        with pytest.raises(DreamttyError, match=r"^service: .*api.sock: its answer does not read \(TypeError: "):
            await client.jobs()
        job = {"id": 1, "kind": "generate", "payload": {"request": {}}, "state": "done", "created": 1.0, "updated": 1.0,
               "error": None, "outputs": [], "owner": "x"}
        for odd in ({"payload": None}, {"created": "yesterday"}, {"outputs": "abc"}, {"id": "1"}):
            answers.append({"jobs": [{**job, **odd}]})
            with pytest.raises(DreamttyError, match=r"its answer does not read \(ValueError: has "):
                await client.jobs()
        assert await client.status() == status
        for odd, field in (({"workers": None}, "workers"),
                           ({"workers": [{**worker, "ready": "yes"}]}, "workers[0].ready"),
                           ({"workers": [{**worker, "models": [{"model": "m"}]}]}, "workers[0].models[0].dtype"),
                           ({"nodes": [{"host": "h"}]}, "nodes[0].address"), ({"pid": True}, "pid"),
                           ({"dreamtty": None}, "dreamtty")):
            statuses.append({**status, **odd})
            with pytest.raises(DreamttyError, match=rf"\(ValueError: status field '{re.escape(field)}' is missing"):
                await client.status()
        with pytest.raises(ValueError, match="^the status is not a JSON object$"):  # the client refuses it before
            checked_status([status])
        monkeypatch.setattr(http_client, "MAX_ANSWER", 2**20)
        with pytest.raises(DreamttyError, match=r"^service: .*api.sock: its answer is over 1 MiB$"):
            await client.cancel(1)
    finally:
        await client.close()
        await runner.cleanup()


async def test_a_server_that_is_no_dreamtty_is_not_called_an_older_one(socket_path):
    """Any HTTP server answering {} at the address: restarting it as a dreamtty service would not help."""
    from backend.errors import ServiceUnavailable
    from backend.remote_client import Address, RemoteClient

    app = web.Application()
    app.router.add_get("/v1/version", lambda request: web.json_response({}))
    runner = await _serve(app, socket_path)
    client = RemoteClient(Address(socket=socket_path), start=None)
    try:
        with pytest.raises(ServiceUnavailable) as refused:
            await client.jobs()
    finally:
        await client.close()
        await runner.cleanup()
    assert str(refused.value) == ("service: it does not answer as a dreamtty service (its GET /v1/version names no "
                                  "API version)")
