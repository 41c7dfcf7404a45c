"""The web server of ``dreamtty web``: textual-serve's, which runs a command (``dreamtty attach``) per
browser tab, behind the service's token.

textual-serve has no authentication of its own, and whoever reaches the page runs dreamtty as you.
So every request must carry the token (``<state dir>/serve.token``, as for ``dreamtty serve
--listen``): the address ``dreamtty web`` prints holds it as ``?token=``, which the page trades for
a cookie (HttpOnly, SameSite=Strict, Secure behind TLS) while the address bar drops it; scripts may
send it as a bearer header. The cookie holds a key derived from the token, not the token: browsers
send a host's cookies to each of its ports, and the key opens this page, not the service's API.
WebSocket upgrades must come from a page of the same origin. The check sits in front of every
route, on loopback too: other users of the machine reach loopback as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import sys
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from textual_serve.app_service import AppService
from textual_serve.server import Server

from backend.http_server import serve_tcp, trust
from backend.safetext import error_line, visible
from backend.service_files import bearer_ok, token_matches
from backend.service_log import quiet_client_faults
from backend.values import is_whole

UNAUTHORIZED = "unauthorized: open the address that dreamtty web printed (it carries ?token=...)\n"
MAX_CELLS = 1000  # columns or rows a tab's terminal may have (textual-serve takes any number; a huge one eats memory)
END_GRACE = 5.0  # seconds a closed tab's process has to quit before it is killed
FAILED_LINES = 20  # last lines of a failed tab process's stderr that the tab shows
STDERR_KEPT = 1 << 16  # last bytes of a tab process's stderr kept for that (it may write there without end)
# Sent with every answer: no other page may frame this one (its keys would be typed into dreamtty), no sniffing.
HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# textual-serve's page links a font stylesheet on fonts.googleapis.com; this tool works offline, and tells no
# one when a page is opened: the link is left out (the page falls back to a local monospace font).
_ONLINE_FONT = re.compile(r"<link\b[^>]*\bhref=\"https://fonts\.googleapis\.com/[^>]*>\s*")


class WebFront(Server):
    """textual-serve's server running ``command`` per browser tab, on ``host:port``, for ``token`` holders."""

    def __init__(self, command: str, host: str, port: int, token: str) -> None:
        super().__init__(command, host=host, port=port, title="dreamtty")
        self.token = token
        self.cookie = cookie_value(token)
        # Named for its port: a browser sends a host's cookies to every port, and another user's dreamtty web
        # on this host (another token) would replace a cookie of one name, locking the other page out
        self.cookie_name = f"dreamtty_web_{port}"
        self._endings: set[asyncio.Task] = set()  # see _end

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        app.middlewares.append(self._guard)
        app.on_response_prepare.append(_add_headers)
        app.on_cleanup.append(self._tabs_ended)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if token_matches(request.query.get("token"), self.token):
            return self._trade(request)
        if not (bearer_ok(request.headers.get("Authorization", ""), self.token)
                or token_matches(request.cookies.get(self.cookie_name), self.cookie)):
            return web.Response(status=401, text=UNAUTHORIZED)
        trust(request)
        if request.path == "/ws" and not web.WebSocketResponse().can_prepare(request).ok:
            return web.Response(status=400, text="bad request: /ws is the page's WebSocket; open the page instead\n")
        if request.path == "/ws" and not all(_cells(request.query.get(name)) for name in ("width", "height")):
            return web.Response(status=400, text="bad request: width and height are whole numbers of cells\n")
        origin = request.headers.get("Origin")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and origin and urlsplit(origin).netloc != request.host:
            return web.Response(status=403, text="forbidden: the page is not from this server\n")
        return await handler(request)

    def _trade(self, request: web.Request) -> web.Response:
        """The cookie for a ``?token=`` address, and the same address without the token. The path
        keeps one leading slash: ``//host`` or ``/\\host`` would send the browser to another site."""
        kept = {key: value for key, value in request.query.items() if key != "token"}
        response = web.HTTPFound("/" + str(request.rel_url.with_query(kept)).lstrip("/\\"))
        response.set_cookie(self.cookie_name, self.cookie, httponly=True, samesite="Strict", path="/",
                            secure=_scheme(request) == "https")
        return response

    async def handle_index(self, request: web.Request) -> web.Response:
        # The page names the address the browser used: textual-serve writes ``public_url`` into it,
        # with nothing awaited between setting and reading it.
        self.public_url = f"{_scheme(request)}://{request.host}"
        page = await super().handle_index(request)
        page.text = _ONLINE_FONT.sub("", page.text)
        return page

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """A tab: textual-serve's, whose process is ended when the tab closes, killed if it does not quit."""
        websocket = web.WebSocketResponse(heartbeat=15)
        await websocket.prepare(request)
        tab = _Tab(self.command, websocket, self.download_manager)
        try:
            await tab.start(_first_cells(request.query.get("width"), 80), _first_cells(request.query.get("height"), 24))
            await self._process_messages(websocket, tab)
        finally:
            await self._end(tab)
        return websocket

    async def _end(self, tab: _Tab) -> None:
        """``tab.end()``, carried on when the tab's handler is cancelled (its connection lost, or the server
        stopping: its cleanup waits for the tabs to end)."""
        ending = asyncio.create_task(tab.end())
        self._endings.add(ending)
        ending.add_done_callback(self._endings.discard)
        await asyncio.shield(ending)

    async def _tabs_ended(self, app: web.Application) -> None:
        await asyncio.gather(*self._endings)

    async def _process_messages(self, websocket: web.WebSocketResponse, tab: AppService) -> None:
        """The page's messages to its tab, JSON ``[type, data]`` as textual-serve's page sends them. One that is
        not (a script's) is dropped, not a traceback on web's stderr; resizes are held to 1..MAX_CELLS."""
        async for message in websocket:
            kind, data = _envelope(message.data) if message.type == WSMsgType.TEXT else (None, None)
            if kind == "stdin" and isinstance(data, str):
                await tab.send_bytes(data.encode(errors="replace"))  # a lone surrogate is no UTF-8
            elif kind == "resize" and (size := _size(data)):
                await tab.set_terminal_size(*size)
            elif kind == "ping":
                await websocket.send_json(["pong", data])
            elif kind == "blur":
                await tab.blur()
            elif kind == "focus":
                await tab.focus()

    async def on_startup(self, app: web.Application) -> None:
        """Quiet: ``dreamtty web`` already said where the page is."""

    def run(self, listening: Callable[[], None] = lambda: None,
            before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve until Ctrl-C (or SIGTERM), with the service's limits on slow and excess connections;
        a client's malformed request is not a traceback on stderr. ``listening``: called once it listens;
        ``before``: run once its address is taken (``serve_tcp``)."""
        quiet_client_faults()
        asyncio.run(self._serve(listening, before))

    async def _serve(self, listening: Callable[[], None] = lambda: None,
                     before: Callable[[], Awaitable[None]] | None = None) -> None:
        await serve_tcp(await self._make_app(), self.host, self.port, listening, before)


def cookie_value(token: str) -> str:
    """The page's cookie for ``token``: a key derived from it, which is not a bearer token for the API."""
    return hmac.new(token.encode(), b"dreamtty web cookie", hashlib.sha256).hexdigest()


def _scheme(request: web.Request) -> str:
    """``https`` behind a TLS proxy (``X-Forwarded-Proto``), else the connection's own."""
    return "https" if request.headers.get("X-Forwarded-Proto") == "https" else request.scheme


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(HEADERS)


async def _tail(stream: asyncio.StreamReader) -> bytes:
    """The last STDERR_KEPT bytes that ``stream`` holds until its end."""
    kept = b""
    while chunk := await stream.read(STDERR_KEPT):
        kept = (kept + chunk)[-STDERR_KEPT:]
    return kept


def _cells(text: str | None) -> bool:
    """Whether a tab's ``width`` or ``height`` is absent (textual-serve's default) or a whole number."""
    return text is None or (text.isascii() and text.isdigit())


def _first_cells(text: str | None, default: int) -> int:
    """A tab's first ``width`` or ``height`` (checked by ``_cells``; ``default`` when absent), held to 1..MAX_CELLS
    as its resizes are."""
    if text is None:
        return default
    digits = text.lstrip("0")
    return _held(int(digits or "0") if len(digits) <= len(str(MAX_CELLS)) else MAX_CELLS)


def _held(cells: int) -> int:
    return min(max(cells, 1), MAX_CELLS)


def _size(data: object) -> tuple[int, int] | None:
    """A resize's ``{"width": W, "height": H}`` held to 1..MAX_CELLS (None when they are no whole numbers)."""
    if isinstance(data, dict) and is_whole(data.get("width")) and is_whole(data.get("height")):
        return _held(data["width"]), _held(data["height"])
    return None


def _envelope(text: str) -> tuple[str | None, object]:
    """A page message's type and data (None, None when it is no JSON list starting with a type)."""
    try:
        envelope = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(envelope, list) or not envelope or not isinstance(envelope[0], str):
        return None, None
    return envelope[0], envelope[1] if len(envelope) > 1 else None


class _Tab(AppService):
    """A browser tab's process. What it writes once the tab is closed is dropped, so that it is not left blocked
    writing to a pipe nobody reads; :meth:`end` ends it whatever it does. When it fails by itself (no service
    runs, say), the tab shows why (its stderr), and web's stderr says so in one line."""

    def __init__(self, command: str, websocket: web.WebSocketResponse, download_manager) -> None:
        super().__init__(command, write_bytes=self._send, write_str=websocket.send_str, close=websocket.close,
                         download_manager=download_manager)
        self._websocket = websocket
        self._ending = False

    async def run(self) -> None:
        """textual-serve's: relays the process's output to the tab; its stderr is kept, not written to web's
        stdout, to say why it failed."""
        process = self._process
        stderr = asyncio.create_task(_tail(process.stderr))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await self._relay(process.stdout)
        why = await stderr
        if await process.wait() and not self._ending:
            await self._failed(process.returncode, why)

    async def _relay(self, stdout: asyncio.StreamReader) -> None:
        """textual-serve's protocol: up to 10 lines until ``__GANGLION__``, then packets of a type (D: data, M: meta,
        P: packed), a 4-byte size and the payload."""
        for _ in range(10):
            if await stdout.readline() in (b"", b"__GANGLION__\n"):
                break
        handlers = {b"D": self.on_data, b"M": self.on_meta, b"P": self.on_packed}
        while True:
            kind = await stdout.readexactly(1)
            payload = await stdout.readexactly(int.from_bytes(await stdout.readexactly(4), "big"))
            if handler := handlers.get(kind):
                await handler(payload)

    async def _failed(self, status: int, stderr: bytes) -> None:
        """The tab's terminal shows the last lines of the failed process's stderr; web's stderr its last one."""
        lines = [visible(line) for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1].removeprefix("dreamtty: ") if lines else "it said nothing on stderr"
        print(error_line(f"dreamtty: web: a tab's dreamtty ended with exit status {status}: {reason}"),
              file=sys.stderr, flush=True)
        note = f"(this tab's dreamtty ended with exit status {status}; reload the page to start it again)"
        await self._send(("\x1bc" + "\r\n".join([*lines[-FAILED_LINES:], note]) + "\r\n").encode())

    async def _send(self, data: bytes) -> None:
        """``data`` to the tab's terminal, or nowhere once the tab is closed."""
        if not self._websocket.closed:
            with contextlib.suppress(ConnectionError):
                await self._websocket.send_bytes(data)

    async def end(self) -> None:
        """Ask the process to quit; past END_GRACE s, kill it (it may ignore SIGTERM) and close our ends of its
        pipes; then reap it."""
        self._ending = True
        if self._task is None:  # it never started
            return
        await self._download_manager.cancel_app_downloads(app_service_id=self.app_service_id)
        await self.send_meta({"type": "quit"})
        try:
            await asyncio.wait_for(self._ended(), END_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            self._process._transport.close()  # asyncio's Process has no public way to close its stdout and stderr
            await self._ended()

    async def _ended(self) -> None:
        """Once the process has ended and its output is read."""
        await asyncio.shield(self._task)
        await self._process.wait()
