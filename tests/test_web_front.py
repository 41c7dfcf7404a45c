"""The token check in front of ``dreamtty web`` (tui/web_front.py), without a browser or a service:
what the address trades for, where it sends the browser, and what the cookie opens."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

pytestmark = pytest.mark.skipif(importlib.util.find_spec("textual_serve") is None,
                                reason="needs textual-serve (pip install -e '.[test]')")
TOKEN = "s3cret-token"
# A tab's process that never reads its input, ignores SIGTERM and writes big frames without end: only SIGKILL ends it.
STUCK_TAB = textwrap.dedent("""
    import signal, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out, frame = sys.stdout.buffer, b"x" * (1 << 20)
    out.write(b"__GANGLION__\\n")
    while True:
        out.write(b"D" + len(frame).to_bytes(4, "big") + frame)
        out.flush()
""")


@pytest.fixture
async def server():
    from tui.web_front import WebFront

    web_front = WebFront("true", "127.0.0.1", 0, TOKEN)
    test_server = TestServer(await web_front._make_app(), host="127.0.0.1")
    await test_server.start_server()
    test_server.web_front = web_front
    yield test_server
    await test_server.close()


@pytest.fixture
async def front(server):
    async with aiohttp.ClientSession(base_url=server.make_url("/")) as http:
        yield server.web_front, http


async def test_the_token_address_becomes_a_cookie_that_is_not_the_token(front):
    web_front, http = front
    async with http.get("/?token=" + TOKEN + "&a=1", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/?a=1"
        cookie = r.cookies[web_front.cookie_name]
    assert cookie.value == web_front.cookie != TOKEN and cookie["httponly"] and cookie["samesite"] == "Strict"
    assert not cookie["secure"]
    async with http.get("/", headers={"Cookie": f"{web_front.cookie_name}={web_front.cookie}"}) as r:
        assert r.status == 200 and TOKEN not in await r.text()
    for refused in ({"Cookie": f"{web_front.cookie_name}={TOKEN}"}, {"Authorization": f"Bearer {web_front.cookie}"},
                    {}):
        async with http.get("/", headers=refused) as r:
            assert r.status == 401, refused


def test_each_port_has_its_own_cookie():
    """Two users' dreamtty web on one host: a browser sends a host's cookies to every port, so one cookie name
    let the page opened last replace the other's cookie (its reload was then refused)."""
    from tui.web_front import WebFront

    mine, theirs = WebFront("true", "127.0.0.1", 8000, TOKEN), WebFront("true", "127.0.0.1", 8001, "an0ther-token")
    assert mine.cookie_name != theirs.cookie_name and mine.cookie != theirs.cookie


async def test_the_page_cannot_be_framed_and_loads_nothing_from_outside(front):
    from tui.web_front import HEADERS

    web_front, http = front
    auth = {"Cookie": f"{web_front.cookie_name}={web_front.cookie}"}
    async with http.get("/", headers=auth) as r:
        page = await r.text()
        assert r.status == 200 and {name: r.headers.get(name) for name in HEADERS} == HEADERS
    assert "xterm.css" in page and "https://" not in page  # textual-serve's page, without its online font
    async with http.get("/", headers={}) as r:  # refusals too
        assert r.status == 401 and r.headers["X-Frame-Options"] == "DENY"


async def test_a_tabs_terminal_stays_within_1000_cells(front):
    """A huge terminal makes the tab's dreamtty take memory without end: held to 1000 cells, from the first size
    on; a size that is no whole number is refused at first, ignored after."""
    from tui.web_front import WebFront

    web_front, http = front
    auth = {"Cookie": f"{web_front.cookie_name}={web_front.cookie}", "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "a" * 22 + "=="}
    for size in ("width=-1&height=24", "width=8e1&height=24"):
        async with http.get(f"/ws?{size}", headers=auth) as r:
            assert r.status == 400 and "width and height are whole numbers of cells" in await r.text(), size
    told = []
    sizes = [{"width": w, "height": h} for w, h in ((120, 40), (100000, 0), ("80", 24), (True, 24), (80.0, 24))]
    await WebFront._process_messages(web_front, Page(["resize", size] for size in sizes), Tab(told))
    assert told == [("size", 120, 40), ("size", 1000, 1)]


class Tab:
    """What a tab's process is told."""

    def __init__(self, told: list) -> None:
        self.told = told

    async def set_terminal_size(self, width, height):
        self.told.append(("size", width, height))

    async def send_bytes(self, data):
        self.told.append(("stdin", data))

    async def blur(self):
        self.told.append(("blur",))

    async def focus(self):
        self.told.append(("focus",))


class Page:
    """A WebSocket whose page sent ``messages`` (JSON unless text already)."""

    def __init__(self, messages) -> None:
        self.messages = [m if isinstance(m, str) else json.dumps(m) for m in messages]
        self.sent = []

    async def __aiter__(self):
        for text in self.messages:
            yield aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, text, None)
        yield aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, b"\xff\x00", None)

    async def send_json(self, data):
        self.sent.append(data)


async def test_messages_that_are_not_the_pages_are_dropped_without_a_traceback(front, caplog):
    """A script's WebSocket message that was no ``[type, data]`` list (not JSON, [], ["stdin"], a number for
    stdin, a lone surrogate) raised in textual-serve's loop: a traceback on web's stderr each time."""
    from tui.web_front import WebFront

    web_front, _ = front
    told, page = [], Page(["garbage", "[]", "{}", "null", "[1, 2]", ["stdin"], ["stdin", 5], ["resize"],
                           ["resize", [80, 24]], "[" * 100000, '["stdin", "\\ud800a"]', ["stdin", "ok"],
                           ["ping", 7], ["blur"], ["focus", None], ["paste", "x"]])
    await WebFront._process_messages(web_front, page, Tab(told))
    assert told == [("stdin", b"?a"), ("stdin", b"ok"), ("blur",), ("focus",)]
    assert page.sent == [["pong", 7]]


async def test_a_token_address_opened_again_still_drops_the_token(front):
    web_front, http = front
    async with http.get("/?token=" + TOKEN, allow_redirects=False,
                        headers={"Cookie": f"{web_front.cookie_name}={web_front.cookie}"}) as r:
        assert r.status == 302 and r.headers["Location"] == "/"


@pytest.mark.parametrize("path", ["//evil.example/", "/\\evil.example", "/\\/evil.example/x"])
async def test_the_trade_never_sends_the_browser_to_another_site(server, path):
    url = URL(f"http://{server.host}:{server.port}{path}?token={TOKEN}", encoded=True)  # the path as it is
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as r:
        location = r.headers["Location"]
    assert r.status == 302 and location.startswith("/") and location[1:2] not in ("/", "\\"), location


async def test_the_cookie_is_secure_behind_a_tls_proxy(front):
    web_front, http = front
    async with http.get("/?token=" + TOKEN, allow_redirects=False, headers={"X-Forwarded-Proto": "https"}) as r:
        assert r.cookies[web_front.cookie_name]["secure"]


async def test_a_malformed_request_writes_no_traceback(front, caplog, monkeypatch):
    web_front, http = front
    monkeypatch.setattr(logging.getLogger("aiohttp.server"), "filters", [])  # none left by another test
    monkeypatch.setattr("asyncio.run", lambda serving: serving.close())  # run() up to serving
    web_front.run()
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        async with http.get("/", headers={"Cookie": "x=" + "y" * 9000}) as r:  # past aiohttp's 8190-byte field
            assert r.status == 400
    assert "Traceback" not in caplog.text and not any(rec.exc_info for rec in caplog.records)



async def test_the_page_has_the_services_connection_cap_and_stops_on_sigterm(monkeypatch):
    from backend import http_server
    from tui.web_front import WebFront

    monkeypatch.setattr(http_server, "MAX_CONNECTIONS", 2)
    port = _free_port()
    said = []
    serving = asyncio.create_task(WebFront("true", "127.0.0.1", port, TOKEN)._serve(lambda: said.append("listening")))
    held = []
    for _ in range(100):  # until it listens
        try:
            held.append(await asyncio.open_connection("127.0.0.1", port))
            break
        except OSError:
            await asyncio.sleep(0.05)
    held.append(await asyncio.open_connection("127.0.0.1", port))
    await asyncio.sleep(0.1)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as one, aiohttp.ClientSession(headers=auth) as two:
        for http, stranger in ((one, held[0]), (two, held[1])):  # each token holder gets in past a stranger
            async with http.get(f"http://127.0.0.1:{port}/") as page:
                assert page.status == 200
            assert await asyncio.wait_for(stranger[0].read(), 5) == b""  # the oldest stranger made room
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # two authorised connections: the cap
        assert await asyncio.wait_for(reader.read(), 5) == http_server.BUSY
    for _, held_writer in [*held, (reader, writer)]:
        held_writer.close()
    os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or systemd sends: it stops serving, quietly
    await asyncio.wait_for(serving, 10)
    assert said == ["listening"]
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_closed_tab_ends_its_process_even_one_that_ignores_quit_and_sigterm(monkeypatch):
    """A 1000x1000 tab closed as it opened left its dreamtty attach blocked writing a frame to a pipe that
    nobody read any more, deaf to SIGTERM."""
    from tui import web_front

    monkeypatch.setattr(web_front, "END_GRACE", 0.5, raising=False)
    front = web_front.WebFront(shlex.join([sys.executable, "-c", STUCK_TAB]), "127.0.0.1", 0, TOKEN)
    server = TestServer(await front._make_app(), host="127.0.0.1")
    await server.start_server()
    before = _children()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for wait in (0, 0.5):
                websocket = await http.ws_connect(server.make_url("/ws?width=1000&height=1000"))
                await asyncio.sleep(wait)
                await websocket.close()
        deadline = time.monotonic() + 10
        while _children() - before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not _children() - before  # killed and reaped
    finally:
        for pid in _children() - before:
            os.kill(pid, signal.SIGKILL)
        await server.close()


async def test_a_tab_whose_process_fails_shows_why_and_web_says_it_in_one_line(capsys):
    """With no service running, a tab stayed on textual-serve's intro card, and web's stderr said only
    "Application failed to start": the reason was seen only by running the tab's command by hand."""
    from tui.web_front import WebFront

    reason = "dreamtty: service: none is running at /run/x.sock; start one with dreamtty serve --detach"
    front = WebFront(f"echo {shlex.quote(reason)} >&2; exit 3", "127.0.0.1", 0, TOKEN)
    server = TestServer(await front._make_app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            websocket = await http.ws_connect(server.make_url("/ws"))
            message = await asyncio.wait_for(websocket.receive(), 10)
            await websocket.close()
    finally:
        await server.close()
    shown = message.data.decode()
    assert reason in shown and "exit status 3; reload the page" in shown
    assert capsys.readouterr().err == ("dreamtty: web: a tab's dreamtty ended with exit status 3: service: none is "
                                       "running at /run/x.sock; start one with dreamtty serve --detach\n")


async def test_a_tabs_first_size_is_held_to_1000_cells_as_its_resizes_are():
    """A browser window of 3840x2160 at a small font asked for 1280 columns: the tab got a 400 and "Session ended"."""
    from tui.web_front import WebFront

    front = WebFront('echo "$COLUMNS x $ROWS" >&2; exit 1', "127.0.0.1", 0, TOKEN)  # what the tab's process is told
    server = TestServer(await front._make_app(), host="127.0.0.1")
    await server.start_server()
    shown = []
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for size in ("width=1280&height=288", "width=0&height=" + "9" * 5000, "width=00000000000081&height=24"):
                websocket = await http.ws_connect(server.make_url(f"/ws?{size}"))
                shown.append((await asyncio.wait_for(websocket.receive(), 10)).data.decode().splitlines()[0])
                await websocket.close()
    finally:
        await server.close()
    assert shown == ["\x1bc1000 x 288", "\x1bc1 x 1000", "\x1bc81 x 24"]


def _children() -> set[int]:
    """The pids of this process's children, zombies included."""
    tasks = Path(f"/proc/{os.getpid()}/task").glob("*/children")
    return {int(pid) for path in tasks for pid in path.read_text().split()}


def test_a_port_in_use_is_a_one_line_error():
    from backend.errors import DreamttyError
    from tui.web_front import WebFront

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = []  # dreamtty web prints the page's address once it listens: here never
        with pytest.raises(DreamttyError, match=f"^listen: cannot listen on 127.0.0.1:{port}: Address already in use; "):
            WebFront("true", "127.0.0.1", port, TOKEN).run(lambda: said.append("listening"))
        assert said == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_web_checks_the_token_before_starting_a_service_and_says_what_it_started(tmp_path, monkeypatch, capsys):
    """``dreamtty web`` started the service, then refused a token file others may read (leaving a service started
    for nothing); it started one without a word (it stays after web ends); a token short enough to guess was
    taken silently."""
    from tui.cli import main
    from tui.web_front import WebFront

    class Client:
        started = 4321

        async def start(self) -> None:
            starts.append(self)

        async def close(self) -> None:
            pass

    starts: list = []
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.delenv("DREAMTTY_LOCAL")
    monkeypatch.setattr("backend.client.connect", lambda *args, **kwargs: Client())
    monkeypatch.setattr(WebFront, "run", lambda self, listening, before: asyncio.run(before()) or listening())
    token = tmp_path / "state" / "serve.token"
    token.parent.mkdir()
    token.write_text("guess\n")
    token.chmod(0o644)
    assert main(["web"]) == 2
    assert starts == [] and "token: " in capsys.readouterr().err
    token.chmod(0o600)
    assert main(["web"]) == 0
    out, err = capsys.readouterr()
    assert len(starts) == 1 and "?token=guess " in out
    assert "dreamtty: started the service in the background (pid 4321)" in err
    assert f"dreamtty: warning: the token in {token} is 5 characters long, short enough to guess" in err


def test_web_warns_of_plain_http_only_once_it_serves(tmp_path, monkeypatch, capsys):
    """An address it cannot listen on got the plain-HTTP warning, then the error; and the service it started
    first stayed, for nothing."""
    from tui.cli import main

    class Client:
        started = None

        async def start(self) -> None:
            starts.append(self)

        async def close(self) -> None:
            pass

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    monkeypatch.delenv("DREAMTTY_LOCAL")
    starts: list = []
    monkeypatch.setattr("backend.client.connect", lambda *args, **kwargs: Client())
    assert main(["web", "--listen", "192.0.2.1:8000"]) == 2  # TEST-NET-1: no address of this machine
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("dreamtty: listen: cannot listen on 192.0.2.1:8000") and err.count("\n") == 1
    assert starts == []
