"""End to end in a real terminal: tmux runs ``dreamtty --demo --out DIR``; type a prompt, ctrl+g, watch a live
preview frame while the (long) job runs, then the final image; ctrl+q.

tmux runs on its own socket (``-L``) so it inherits this test's environment.
Textual draws on stderr, so the app's output is never redirected.
"""

from __future__ import annotations

import os
import re
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
LONG_STEPS = 300  # a user preset makes the demo job long enough to be watched while it runs


class Tmux:
    def __init__(self, env: dict) -> None:
        self.socket = f"dreamtty-test-{uuid.uuid4().hex[:10]}"
        self.env = env

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, *args], env=self.env, capture_output=True, text=True,
                              timeout=30)

    def screen(self, session: str = "app") -> str:
        return self("capture-pane", "-p", "-t", session).stdout

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


def _half_blocks(screen: str) -> int:
    """Half-block cells right of the preview panel's border "▊" (the form's scrollbar, left of it, has some too)."""
    right = [line.rsplit("▊", 1)[-1] for line in screen.splitlines()]
    return sum(part.count("▄") + part.count("▀") for part in right)


def _full_width(screen: str) -> bool:
    """Whether the footer reaches the right edge of a 200-column pane (its last key is the palette's)."""
    return any("palette" in line and len(line.rstrip()) > 190 for line in screen.splitlines())


def _running_step(screen: str) -> int | None:
    """The step the progress line shows, while the job is not finished."""
    match = re.search(rf"step (\d+)/{LONG_STEPS}\b", screen)
    return int(match.group(1)) if match and int(match.group(1)) < LONG_STEPS else None


def test_tmux_generate_with_preview_then_quit(tmp_path, demo_dirs):
    home = tmp_path / "home"  # its own queue; the demo models are shared with the session
    (home / "data").mkdir(parents=True)
    (home / "data" / "demo-models").symlink_to(demo_dirs["demo"].parent)
    (home / "config" / "presets").mkdir(parents=True)
    (home / "config" / "presets" / "long.yaml").write_text(f"description: a long demo job\nsteps: {LONG_STEPS}\n")
    out = tmp_path / "out"
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "DREAMTTY_HOME": str(home), "TERM": "xterm-256color",
           "DREAMTTY_DEFAULT_PRESET": "long"}
    env.pop("DREAMTTY_OUTPUTS", None)
    tmux = Tmux(env)
    try:
        # tmux runs the command with sh -c; the echo records the app's exit code in the pane (under pytest-xdist
        # tmux leaves #{pane_dead_status} empty)
        started = tmux("new-session", "-d", "-s", "app", "-x", "200", "-y", "60", f"{_command(out)}; echo exit=$?")
        assert started.returncode == 0, started.stderr
        tmux("set-option", "-t", "app", "remain-on-exit", "on")
        tmux.wait(lambda: "Prompt" in tmux.screen() and "Generate" in tmux.screen(), "the app to draw", 60)
        tmux.wait(lambda: _full_width(tmux.screen()), "the app drawn at the pane's 200 columns", 30)

        tmux("send-keys", "-t", "app", "-l", "a red fox in the snow")

        def typed_and_no_preview() -> bool:  # one capture: a capture taken mid-repaint may hold anything
            screen = tmux.screen()
            return "a red fox in the snow" in screen and _half_blocks(screen) == 0

        tmux.wait(typed_and_no_preview, "the typed prompt with nothing drawn in the preview yet", 30)
        tmux("send-keys", "-t", "app", "C-g")
        live: list[str] = []

        def live_frame() -> bool:
            saved = bool(list(out.rglob("*.png")))  # before the capture: then it cannot show the final image
            screen = tmux.screen()
            if not saved and _running_step(screen) is not None and _half_blocks(screen) > 100:
                live.append(screen)  # a frame of at least 100 cells drawn while the progress line shows a step
                return True
            assert not saved, f"the image was saved before any live preview frame was seen; screen:\n{screen}"
            return False

        tmux.wait(live_frame, "a live preview frame while the job runs")
        tmux.wait(lambda: list(out.rglob("*.png")), "the PNG")
        tmux.wait(lambda: "done" in tmux.screen(), "the job to show as done", 30)
        # live frames are capped at 48x24 cells; the final image fills the larger preview
        tmux.wait(lambda: _half_blocks(tmux.screen()) > _half_blocks(live[0]), "the final image drawn full size", 30)
        assert "Traceback" not in tmux.screen()

        tmux("send-keys", "-t", "app", "C-q")
        tmux.wait(lambda: tmux("display", "-p", "-t", "app", "#{pane_dead}").stdout.strip() == "1"
                  or "Quit anyway" in tmux.screen(), "the app to quit or ask", 30)
        if "Quit anyway" in tmux.screen():
            tmux("send-keys", "-t", "app", "y")
        tmux.wait(lambda: tmux("display", "-p", "-t", "app", "#{pane_dead}").stdout.strip() == "1", "exit", 30)
        after = tmux("capture-pane", "-p", "-S", "-200", "-t", "app").stdout
        assert "exit=0" in after and "Traceback" not in after, after.strip()
        tmux("kill-session", "-t", "app")
        assert tmux("has-session", "-t", "app").returncode != 0
    finally:
        tmux("kill-server")
