"""End to end in a real terminal: tmux runs ``dreamtty --demo --out DIR``; type a prompt, ctrl+g, ctrl+q.

tmux runs on its own socket (``-L``) so it inherits this test's environment.
Textual draws on stderr, so the app's output is never redirected.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
TIMEOUT = 120


class Tmux:
    def __init__(self, env: dict) -> None:
        self.socket = f"dreamtty-test-{uuid.uuid4().hex[:10]}"
        self.env = env

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], env=self.env, capture_output=True, text=True,
                              timeout=30)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "app").stdout

    def wait(self, condition, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")
            time.sleep(0.2)


def _command(out: Path) -> str:
    script = Path(sys.executable).with_name("dreamtty")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "tui.cli"]
    return shlex.join([*argv, "--demo", "--device", "cpu", "--out", str(out)])


def test_tmux_generate_with_preview_then_quit(tmp_path, demo_dirs):
    home = tmp_path / "home"  # its own queue; the demo models are shared with the session
    (home / "data").mkdir(parents=True)
    (home / "data" / "demo-models").symlink_to(demo_dirs["demo"].parent)
    out = tmp_path / "out"
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "DREAMTTY_HOME": str(home), "TERM": "xterm-256color"}
    env.pop("DREAMTTY_OUTPUTS", None)
    tmux = Tmux(env)
    try:
        started = tmux("new-session", "-d", "-s", "app", "-x", "120", "-y", "40", _command(out))
        assert started.returncode == 0, started.stderr
        tmux("set-option", "-t", "app", "remain-on-exit", "on")
        tmux.wait(lambda: "Prompt" in tmux.screen() and "Generate" in tmux.screen(), "the app to draw", 60)

        tmux("send-keys", "-t", "app", "-l", "a red fox in the snow")
        tmux.wait(lambda: "a red fox in the snow" in tmux.screen(), "the typed prompt", 30)
        tmux("send-keys", "-t", "app", "C-g")
        tmux.wait(lambda: list(out.rglob("*.png")), "the PNG")
        tmux.wait(lambda: "done" in tmux.screen(), "the job to show as done", 30)
        screen = tmux.screen()
        assert "▄" in screen or "▀" in screen, f"no half-block preview on screen:\n{screen}"
        assert "Traceback" not in screen

        tmux("send-keys", "-t", "app", "C-q")
        tmux.wait(lambda: tmux("display", "-p", "-t", "app", "#{pane_dead}").stdout.strip() == "1"
                  or "Quit anyway" in tmux.screen(), "the app to quit or ask", 30)
        if "Quit anyway" in tmux.screen():
            tmux("send-keys", "-t", "app", "y")
        tmux.wait(lambda: tmux("display", "-p", "-t", "app", "#{pane_dead}").stdout.strip() == "1", "exit", 30)
        status = tmux("display", "-p", "-t", "app", "#{pane_dead_status}/#{pane_dead_signal}").stdout.strip()
        after = tmux("capture-pane", "-p", "-S", "-200", "-t", "app").stdout
        assert status == "0/" and "Traceback" not in after, f"exit status/signal {status!r}:\n{after.strip()}"
        tmux("kill-session", "-t", "app")
        assert tmux("has-session", "-t", "app").returncode != 0
    finally:
        tmux("kill-server")
