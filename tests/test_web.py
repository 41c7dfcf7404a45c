"""``dreamtty web`` in headless Chromium (Debian's package, driven by Selenium with Debian's
chromedriver: nothing downloads a browser): the page shows the Generate screen, a prompt typed there
and ctrl+g make a PNG through the service, and the live preview arrives as half-block cells. The
page is refused without the service's token, and its WebSocket to pages of another origin."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from test_serve import ROOT, ServeProcess, _free_port, cli, dirs  # noqa: F401 (a fixture)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("selenium", "textual_serve")),
                       reason="needs selenium and textual-serve (pip install -e '.[test]')"),
]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900")
# Keeps what the page's WebSocket receives (the TUI's terminal output), to read what it shows:
# xterm.js draws on a canvas, so the screen is not in the DOM.
RECORD_FRAMES = """
window.frames_received = [];
const decoder = new TextDecoder();
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (event) => window.frames_received.push(
      typeof event.data === "string" ? event.data : decoder.decode(event.data, {stream: true})));
  }
};
"""
ESCAPES = re.compile(r"\x1b\[[0-9;?<>=]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")
HALF_BLOCK = "\u2584"  # the preview's cells (rich-pixels' lower half block)


def _wait(what: str, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.3)
    return found


def _browser(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


async def test_the_tui_in_a_browser_generates_a_png(dirs, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    service = ServeProcess(dirs).wait_ready()
    port = _free_port()
    with open(tmp_path / "web.err", "w") as err:
        web = subprocess.Popen([sys.executable, "-m", "tui.cli", "web", "--listen", f"127.0.0.1:{port}"],
                               env=dirs.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    browser = None
    try:
        line = web.stdout.readline()
        address = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
        assert address, line + (tmp_path / "web.err").read_text()
        token = (dirs.home / "state" / "serve.token").read_text().strip()
        assert address.group() == f"http://127.0.0.1:{port}/?token={token}"
        base = f"http://127.0.0.1:{port}"
        _wait("page", lambda: _status(base + "/") is not None, 30)
        assert _status(base + "/") == 401 and _status(base + "/static/js/textual.js") == 401
        assert _status(base + "/", {"Authorization": f"Bearer {token}"}) == 200
        assert _status(base + "/ws", {"Authorization": f"Bearer {token}"}) == 400  # not an upgrade
        from tui.web_front import cookie_value

        async with aiohttp.ClientSession(cookies={f"dreamtty_web_{port}": cookie_value(token)}) as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"ws://127.0.0.1:{port}/ws", headers={"Origin": "http://elsewhere.example"})
            assert refused.value.status == 403

        browser = _browser(tmp_path / "profile")
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_FRAMES})
        browser.get(address.group())
        assert browser.current_url == base + "/"  # the token went from the address into a cookie

        def screen() -> str:
            return ESCAPES.sub("", "".join(browser.execute_script("return window.frames_received")))

        _wait("Generate screen", lambda: "F1 Generate" in screen() and "Prompt" in screen(), 90)
        cells_before = screen().count(HALF_BLOCK)
        browser.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys("a red fox in the snow")
        _wait("typed prompt", lambda: "a red fox in the snow" in screen(), 30)
        ActionChains(browser).key_down(Keys.CONTROL).send_keys("g").key_up(Keys.CONTROL).perform()
        png = _wait("PNG", lambda: next(dirs.out.rglob("*.png"), None))
        _wait("job done on the page", lambda: re.search(r"Job #\d+ done: ", screen()), 60)
        assert screen().count(HALF_BLOCK) - cells_before > 500  # the preview, drawn in half-block cells
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        if browser is not None:
            browser.quit()
        web.terminate()
        web.wait(30)
        service.stop()
    (job,) = json.loads(cli(dirs, "jobs", "--json").stdout)
    assert job["state"] == "done" and job["outputs"] == [str(png)]
    assert job["payload"]["request"]["prompt"] == "a red fox in the snow"


def _status(url: str, headers: dict | None = None) -> int | None:
    """The HTTP status of a GET (None when nothing answers yet)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
