"""Key press -> repaint latency of the dreamtty TUI while a job runs on the demo model.

Runs ``dreamtty --demo`` in a pseudo-terminal (as a real terminal would),
starts a long generation (a user preset with many steps and images), then
types into the prompt field one key at a time and times each key from the
write to the pty until the app's output contains the typed text: that is, key
press to repaint, including Textual's rendering and the ANSI output.

Each measured key completes a 3-letter window that occurs nowhere else (a de
Bruijn sequence over letters absent from the rest of the screen), so the
output that shows it can only be the repaint of that key.

    python benchmarks/tui_latency.py [--presses 200] [--size 120x40]
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ALPHABET = "QXZKWVBY"  # not in the app's labels, status lines or half blocks
LINE = 24  # keys per line of the prompt; Enter (not measured) keeps lines from wrapping
ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def de_bruijn(alphabet: str, n: int) -> str:
    """Every length-n word over ``alphabet`` exactly once (cyclic), by the standard Lyndon-word construction."""
    k = len(alphabet)
    a, out = [0] * k * n, []

    def db(t: int, p: int) -> None:
        if t > n:
            if n % p == 0:
                out.extend(a[1:p + 1])
        else:
            a[t] = a[t - p]
            db(t + 1, p)
            for j in range(a[t - p] + 1, k):
                a[t] = j
                db(t + 1, t)

    db(1, 1)
    return "".join(alphabet[i] for i in out)


class Terminal:
    """The app in a pty; a thread collects everything it writes, with timestamps."""

    def __init__(self, argv: list[str], env: dict, cols: int, rows: int) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.buffer = bytearray()
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if not ready:
                if self.proc.poll() is not None:
                    return
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self.cond:
                self.buffer += data
                self.cond.notify_all()

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for(self, needle: bytes, start: int, timeout: float) -> float | None:
        """Wait until ``needle`` shows in the output after byte ``start`` (escape codes removed)."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                if needle in ANSI.sub(b"", bytes(self.buffer[start:])):
                    return time.perf_counter()
                left = deadline - time.perf_counter()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def text_since(self, start: int) -> str:
        with self.cond:
            return ANSI.sub(b"", bytes(self.buffer[start:])).decode("utf-8", "replace")

    @property
    def size(self) -> int:
        with self.cond:
            return len(self.buffer)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        os.close(self.master)


def setup_home(home: Path, steps: int, images: int) -> None:
    """A user preset with a long job, chosen as the default preset."""
    presets = home / "config" / "presets"
    presets.mkdir(parents=True)
    (presets / "bench.yaml").write_text(f"model: demo\nsteps: {steps}\ncount: {images}\nsampler: euler\n")
    (home / "config" / "config.yaml").write_text("default_preset: bench\n")


def app_command() -> list[str]:
    """How to start ``dreamtty`` with this Python."""
    script = Path(sys.executable).with_name("dreamtty")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tui.cli"]


@contextmanager
def app_home() -> Iterator[tuple[Path, dict]]:
    """A temporary folder for a benchmarked app, and the app's environment: its own home (``home`` in the
    folder) and config, service runtime folder, a UTF-8 truecolor terminal, offline. The service the app
    starts there is stopped at the end: it would outlive the benchmark."""
    with tempfile.TemporaryDirectory(prefix="dreamtty-bench-") as tmp:
        run = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))  # short: a socket path has at most ~104 bytes
        home = Path(tmp) / "home"
        env = {**os.environ, "DREAMTTY_HOME": str(home), "DREAMTTY_CONFIG": str(home / "config" / "config.yaml"),
               "XDG_RUNTIME_DIR": str(run), "TERM": "xterm-256color", "COLORTERM": "truecolor",
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HF_HUB_OFFLINE": "1"}
        env.pop("DREAMTTY_LOCAL", None)
        try:
            yield Path(tmp), env
        finally:
            subprocess.run([*app_command(), "serve", "--stop"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120)
            shutil.rmtree(run, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def steps_seen(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"step (\d+)/\d+", text)]


def run(presses: int, cols: int, rows: int, steps: int, images: int, job: bool = True, gap: float = 0.03) -> dict:
    with app_home() as (tmp, env):
        setup_home(tmp / "home", steps, images)
        term = Terminal([*app_command(), "--demo", "--device", "cpu", "--out", str(tmp / "out")], env, cols, rows)
        try:
            if term.wait_for(b"Prompt", 0, 60) is None:
                raise SystemExit(f"the app did not draw; output:\n{term.text_since(0)[-2000:]}")
            time.sleep(1.0)
            term.send("bench")
            if job:
                term.send("\x07")  # ctrl+g
                mark = term.size
                if term.wait_for(b"step ", mark, 180) is None:
                    raise SystemExit(f"the job did not start; output:\n{term.text_since(mark)[-2000:]}")
            term.send("\r")
            time.sleep(0.5)
            sequence = de_bruijn(ALPHABET, 3)
            rng = random.Random(0)
            latencies: list[float] = []
            start_bytes, start_time, start_cpu = term.size, time.perf_counter(), cpu_seconds(term.proc.pid)
            for line in itertools.count():
                chunk = sequence[line * LINE:(line + 1) * LINE]
                if len(chunk) < 3 or len(latencies) >= presses:
                    break
                for i, ch in enumerate(chunk):
                    before = term.size
                    sent = time.perf_counter()
                    term.send(ch)
                    if i < 2:  # the first two keys of a line complete no unique window
                        time.sleep(0.05)
                        continue
                    shown = term.wait_for(chunk[i - 2:i + 1].encode(), before, 5)
                    if shown is None:
                        raise SystemExit(f"key {ch!r} never painted; output:\n{term.text_since(before)[-2000:]}")
                    latencies.append((shown - sent) * 1000)
                    time.sleep(rng.uniform(0.5 * gap, 1.5 * gap))  # irregular, as people type
                    if len(latencies) >= presses:
                        break
                term.send("\r")
                time.sleep(0.05)
            elapsed = time.perf_counter() - start_time
            tui_cpu = (cpu_seconds(term.proc.pid) - start_cpu) / elapsed
            during = term.text_since(start_bytes)
            seen = steps_seen(during)
            output_rate = (term.size - start_bytes) / elapsed
            term.send("\x11")  # ctrl+q; a job runs, so the app asks
            if term.wait_for(b"Quit anyway", term.size - 1, 10) is not None:
                term.send("y")
            term.proc.wait(30)
        finally:
            term.close()
    return {
        "presses": len(latencies),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies), 1),
        "mean_ms": round(statistics.fmean(latencies), 1),
        "job_steps_during_measurement": f"{min(seen)}..{max(seen)}" if seen else "none seen",
        "output_kib_per_s": round(output_rate / 1024, 1),
        "tui_process_cpu_percent": round(100 * tui_cpu),
        "terminal": f"{cols}x{rows}",
        "gap_s": gap,
        "exit_code": term.proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--size", default="120x40", help="terminal COLSxROWS")
    parser.add_argument("--steps", type=int, default=500, help="steps of the background job")
    parser.add_argument("--images", type=int, default=4, help="images of the background job")
    parser.add_argument("--no-job", action="store_true", help="baseline: measure with no job running")
    parser.add_argument("--gap", type=float, default=0.03,
                        help="mean seconds between keys, varied +-50%% (0.03: fast typing, which defers live "
                             "previews; 0.5: slow keys, previews drawn between them)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cols, rows = (int(v) for v in args.size.lower().split("x"))
    result = run(args.presses, cols, rows, args.steps, args.images, job=not args.no_job, gap=args.gap)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>30}: {value}")


if __name__ == "__main__":
    main()
