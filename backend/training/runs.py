"""Run directories: ``run.json``, ``events.jsonl``, checkpoints and outputs (no torch).

Layout of ``RUN_DIR``::

    run.json            settings + state (waiting/starting/running/done/failed/stopped), pid, output
    events.jsonl        one JSON object per line (see EVENT TYPES below)
    trainer.pid         pid of the process the launcher started
    trainer.log         stdout/stderr of a detached trainer
    STOP                present = stop after the current step (checkpoint, state "stopped")
    checkpoints/checkpoint-<step>/   accelerate save_state + dreamtty_state.json
    checkpoints/abandoned/<time>/checkpoint-<step>/   those past the step a resume went back to
    validation/step-<step, 6 digits>-<i>.png
    model/              full fine-tune result: a diffusers folder
    lora/pytorch_lora_weights.safetensors   LoRA result

``events.jsonl`` holds training events (``backend.events.TrainEvent``), one encoded record a line,
each with its ``time`` (Unix seconds).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from backend import locations, user_files
from backend.events import (EventError, TrainCheckpoint, TrainClassImages, TrainError, TrainEvent, TrainLog,
                            TrainResume, TrainState, TrainStep, TrainValidation, dumps, loads)
from backend.processes import exit_text, process_exists

RUN_JSON = "run.json"
EVENTS = "events.jsonl"
PID_FILE = "trainer.pid"
TRAINER_MODULE = "backend.training.trainer_process"  # run as ``-m TRAINER_MODULE RUN_DIR``
LOG_FILE = "trainer.log"
STOP_FILE = "STOP"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
ABANDONED = "abandoned"  # in CHECKPOINTS: a folder per resume, holding the checkpoints past its step
STATE_FILE = "dreamtty_state.json"  # in a checkpoint folder, written last: the checkpoint is complete
MODEL_DIR = "model"
LORA_FILE = "lora/pytorch_lora_weights.safetensors"
LIVE_STATES = ("starting", "running")
RESUME_HINT = "resume with --resume latest (ctrl+r on the Train screen)"  # words for the CLI and the TUI alike
WAITING = "waiting"  # queued by the service until its device is free (backend.run_schedule): no process yet
MAX_COUNT = 10**12  # steps and images: a count past this in events.jsonl is damage, not progress
_COMPACT_FROM = 1e6  # a number this large is shown in 3 significant digits (1e+300, not 300 digits)
_WRITE_FIXES = {errno.EACCES: "make it writable", errno.EPERM: "make it writable", errno.EROFS: "make it writable",
                errno.ENOTDIR: "put its folder back", errno.ENOENT: "put its folder back"}


def write_fix(exc: BaseException) -> str:
    """What lets a failed write succeed next time: by its errno; a full disk when nothing says otherwise."""
    return _WRITE_FIXES.get(getattr(exc, "errno", None), "free some space")


def stop_message(step: int, saved: int) -> str:
    """How a run stopped at ``step`` goes on, its newest checkpoint at step ``saved`` (the stop's own failed to be
    written when it is older)."""
    lost = f"its checkpoint at step {step} was not saved: a resume goes on from step {saved}; " if saved != step else ""
    return lost + RESUME_HINT


def runs_root() -> Path:
    """The default folder that holds (or links to) every run."""
    return locations.data_dir() / "runs"


# -- run.json ----------------------------------------------------------------
def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temp file + rename, so readers never see half a file.

    A failed write (disk full) raises and leaves ``path`` as it was, with no temp file; a ``path`` made read-only
    is not replaced (PermissionError).
    """
    user_files.write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


# The type of each field the code reads from run.json.
_FIELD_TYPES = {"state": str, "pid": int, "created": (int, float), "updated": (int, float), "settings": dict,
                "family": str, "error": str, "error_kind": str, "step": int, "saved": int, "output": dict}


def read_run_json(run_dir: Path) -> dict:
    """The run's run.json; {} when it is missing or not a JSON object. A field of the wrong type (a
    damaged or hand-edited file) reads as absent, so that each reader's default applies."""
    try:
        data = json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items()
            if key not in _FIELD_TYPES or (isinstance(value, _FIELD_TYPES[key]) and not isinstance(value, bool))}


def update_run_json(run_dir: Path, **changes) -> dict:
    """Merge ``changes`` into run.json (the trainer's main process, or the launcher when no trainer runs)."""
    data = read_run_json(run_dir)
    data.update(changes, updated=time.time())
    write_json_atomic(Path(run_dir) / RUN_JSON, data)
    return data


def record_trainer_gone(run_dir: Path, code: int | None) -> dict:
    """run.json once its trainer exited (``code``: its exit status, None when unknown). A run it left
    live or waiting did not finish: it is recorded failed, saying how the trainer ended, and so is
    the end of trainer.log, which a killed trainer could not write. A disk that cannot be written
    leaves the files as they were; the returned dict says it all the same, and that (a full disk
    also stops the trainer from recording why it failed)."""
    data = read_run_json(run_dir)
    if data.get("state") not in (*LIVE_STATES, WAITING):
        return data
    how = exit_text(code)
    failed = {"state": "failed", "error": f"the trainer {how} before finishing; see {Path(run_dir) / LOG_FILE}"}
    try:
        data = update_run_json(run_dir, **failed)
        with open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"dreamtty: the trainer {how} before finishing\n")
    except OSError as exc:
        why = exc.strerror or str(exc)
        data = {**data, **failed, "error": f"the trainer {how} before finishing, and nothing can be written in "
                                           f"{run_dir} ({why}): {write_fix(exc)}, then {RESUME_HINT}"}
    return data


def is_run_dir(path: str | Path) -> bool:
    return os.path.isfile(Path(path) / RUN_JSON)  # False for a name too long, where Path.is_file raises


def run_holding(path: Path) -> Path | None:
    """The run folder ``path`` lies in (a checkpoint's: ``checkpoints/checkpoint-N`` or
    ``checkpoints/abandoned/TIME/checkpoint-N``), else None."""
    return next((p for p in path.resolve().parents if is_run_dir(p)), None)


def run_output(path: str | Path) -> tuple[str, Path] | None:
    """What a run produced: ("model", diffusers folder) or ("lora", .safetensors), else None.

    Accepts the run dir itself; lets ``--model RUN_DIR`` and ``--lora RUN_DIR`` find the result.
    """
    path = Path(os.path.expanduser(path))
    if (path / MODEL_DIR / "model_index.json").is_file():
        return "model", path / MODEL_DIR
    if (path / LORA_FILE).is_file():
        return "lora", path / LORA_FILE
    return None


def new_folder(parent: Path, name: str) -> Path:
    """A folder made here, no other's: ``parent/name``, else ``name-2``, ``name-3``, ... (two made in the same
    second under a time-stamped name never share one)."""
    parent.mkdir(parents=True, exist_ok=True)
    path, n = parent / name, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = parent / f"{name}-{n}"


# -- checkpoints --------------------------------------------------------------
def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-<step>`` folder (step, folder), complete or not, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            step = entry.name.removeprefix(CHECKPOINT_PREFIX)
            if entry.name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
                found.append((int(step), entry))
    return sorted(found)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, folder), oldest first.

    Complete: the trainer writes :data:`STATE_FILE` last. Temp folders and
    folders without it (a copy cut short, a removal cut short) are ignored.
    """
    return [(step, entry) for step, entry in checkpoint_folders(run_dir) if (entry / STATE_FILE).is_file()]


# -- liveness -----------------------------------------------------------------
PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread (its cmdline is empty, as a process's mid-exec)


def pid_alive(pid: int | None, run_dir: str | Path) -> bool:
    """True when ``pid`` runs ``run_dir``'s trainer (or its launcher): its command line ends with the
    trainer module and that folder. A process that took an ended trainer's pid (another accelerate job,
    another run's trainer, a kernel thread) is not."""
    if not process_exists(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")[:-1]
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        fields = stat.rsplit(")", 1)[-1].split()  # from the state on: state, ppid, pgrp, session, tty, tpgid, flags
        if fields[0] == "Z" or int(fields[6]) & PF_KTHREAD:  # exited, not yet reaped; a kernel thread took the pid
            return False
        if not args:  # empty for a moment while the process execs: count it as alive
            return True
        return (len(args) >= 2 and args[-2] == TRAINER_MODULE.encode()
                and os.path.realpath(os.fsdecode(args[-1])) == os.path.realpath(run_dir))
    return True


def recorded_pids(run_dir: Path, data: dict) -> list[int]:
    pids = [data.get("pid")]
    try:
        pids.append(int((Path(run_dir) / PID_FILE).read_text().strip()))
    except (OSError, ValueError):
        pass
    return [p for p in pids if p]


def effective_state(run_dir: Path, data: dict | None = None) -> tuple[str, str | None]:
    """(state, error): a live state whose process is gone reads as "failed", and so does a run whose
    folder or run.json is gone."""
    data = read_run_json(run_dir) if data is None else data
    if not data and not (Path(run_dir) / RUN_JSON).is_file():
        missing = Path(run_dir) / RUN_JSON if Path(run_dir).is_dir() else run_dir
        return "failed", f"{missing} is gone (removed or moved?)"
    state = data.get("state", "failed")
    if state in LIVE_STATES and not any(pid_alive(p, run_dir) for p in recorded_pids(run_dir, data)):
        started = data.get("created", 0)
        if state == "starting" and time.time() - started < 30 and not (Path(run_dir) / PID_FILE).exists():
            return state, None
        return "failed", f"the trainer process ended without finishing (killed?); {RESUME_HINT}"
    return state, data.get("error")


@dataclass
class RunInfo:
    path: Path
    name: str
    state: str
    error: str | None
    settings: dict
    updated: float


def read_run(path: Path) -> RunInfo | None:
    """The run in ``path``; one whose run.json does not read is listed failed, saying so (its checkpoints are
    there still), None when it has none."""
    data = read_run_json(path)
    if not data:
        try:
            written = (Path(path) / RUN_JSON).stat().st_mtime
        except OSError:
            return None
        return RunInfo(Path(path), Path(path).name, "failed", f"{RUN_JSON} is damaged (not a JSON object with the "
                       f"run's settings); its checkpoints are in {Path(path) / CHECKPOINTS}", {}, written)
    state, error = effective_state(path, data)
    return RunInfo(Path(path), Path(path).name, state, error, data.get("settings", {}), data.get("updated", 0.0))


def list_runs(root: Path | None = None, extra: list[Path] | tuple[Path, ...] = ()) -> list[RunInfo]:
    """Runs in ``root`` (folders, or links to run dirs elsewhere) plus ``extra`` dirs, newest first. An entry
    that cannot be read (a symlink loop, a folder without permission) is left out."""
    root = runs_root() if root is None else Path(root)
    candidates = list(extra)
    with contextlib.suppress(OSError):  # no runs folder (yet), or a file in its place
        candidates += [p for p in root.iterdir() if not p.name.startswith(".")]
    seen, runs = set(), []
    for path in candidates:
        try:
            real = Path(path).resolve()
            if real in seen or not is_run_dir(real):
                continue
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (before Python 3.13)
            continue
        seen.add(real)
        info = read_run(real)
        if info is not None:  # named by its link: two runs in folders of the same name are run1 and run1-1
            runs.append(replace(info, name=Path(path).name))
    return sorted(runs, key=lambda r: r.updated, reverse=True)


def link_into_root(run_dir: Path, root: Path | None = None) -> None:
    """Make a run created outside the runs folder show up there (a symlink)."""
    root = runs_root() if root is None else Path(root)
    run_dir = Path(run_dir).resolve()
    if run_dir.parent == root.resolve():
        return
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        link = root / (run_dir.name if n == 0 else f"{run_dir.name}-{n}")
        if link.is_symlink() and link.resolve() == run_dir:
            return
        if not link.exists() and not link.is_symlink():
            link.symlink_to(run_dir, target_is_directory=True)
            return


# -- events -------------------------------------------------------------------
class EventWriter:
    """Appends events to ``events.jsonl``; a no-op on non-main processes. An event the disk cannot take
    (it is full) is left out whole, never torn, and training goes on; the next one written says how many
    were left out."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / EVENTS
        self.enabled = enabled
        self.left_out = 0

    def __call__(self, event: TrainEvent) -> None:
        if not self.enabled or not self.path.parent.is_dir():
            return
        lines = [replace(event, time=round(time.time(), 3))]
        if self.left_out:
            lines.insert(0, TrainLog(level="warning", message=f"{self.left_out} events were not written here (the "
                                                              "disk was full)", time=lines[0].time))
        try:
            _append(self.path, "".join(dumps(e) + "\n" for e in lines).encode())
        except OSError:
            self.left_out += 1
        else:
            self.left_out = 0


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` whole or, when the disk takes only part of it, not at all."""
    with open(path, "ab", buffering=0) as fh:
        start = fh.seek(0, os.SEEK_END)
        try:
            if fh.write(data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            with contextlib.suppress(OSError):
                fh.truncate(start)
            raise


class EventTail:
    """Reads new complete lines of ``events.jsonl`` each call (incremental, like ``tail -f``)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / EVENTS
        self.offset = 0
        self._partial = b""

    def read(self) -> list[TrainEvent]:
        try:
            size = self.path.stat().st_size
            if size < self.offset:  # truncated or replaced: start again
                self.offset, self._partial = 0, b""
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = loads(line, run_file=True)
            except EventError:
                continue
            if isinstance(event, TrainEvent):
                events.append(event)
        return events


# -- progress (what the dashboard and the CLI show) ---------------------------
@dataclass
class RunProgress:
    """Folds events into the numbers a dashboard shows. A resume drops the superseded steps."""

    max_steps: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    lr: float | None = None
    its: float | None = None
    mem_gib: float | None = None
    validation: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    state: str | None = None
    error: str | None = None
    class_images: tuple[int, int] | None = None

    @property
    def step(self) -> int:
        return max(self.losses, default=0)

    def apply(self, event: TrainEvent) -> str | None:
        """Fold one event in; return a log line for it, if it has one. A number that is out of range (a damaged
        or hand-edited file: a negative count, a NaN speed) reads as unknown; a step out of range is left out."""
        if isinstance(event, TrainStep):
            if _count(event.step) is not None:
                self.losses[event.step] = _finite(event.loss, math.nan)
                self.max_steps = _count(event.max_steps) or self.max_steps
                self.lr, self.its, self.mem_gib = _finite(event.lr), _speed(event.its), _finite(event.mem_gib)
            return None
        line = None
        if isinstance(event, TrainResume):
            self.losses = {s: v for s, v in self.losses.items() if s <= event.step}
            line = (f"resumed from step {_shown_count(event.step)} ({event.checkpoint})" if event.checkpoint
                    else "no checkpoint yet: starting over")
        elif isinstance(event, TrainState):
            self.state = event.state
            self.max_steps = _count(event.max_steps) or self.max_steps
            line = f"state: {self.state}" + (f" ({event.message})" if event.message else "")
        elif isinstance(event, TrainCheckpoint):
            line = f"checkpoint saved at step {_shown_count(event.step)}: {event.path}"
        elif isinstance(event, TrainValidation):
            self.validation = list(event.images)
            line = f"validation images at step {_shown_count(event.step)}: {len(self.validation)}"
        elif isinstance(event, TrainClassImages):
            done, total = _count(event.done), _count(event.total)
            self.class_images = (done, total) if done is not None and total is not None else None
            line = f"class images: {_shown_count(event.done)}/{_shown_count(event.total)}"
        elif isinstance(event, TrainError):
            self.error = event.message
            line = f"error: {self.error}"
        elif isinstance(event, TrainLog):
            line = f"{event.level}: {event.message}" if event.level != "info" else event.message
        if line:
            self.logs.append(line)
        return line

    @classmethod
    def of_run(cls, run_dir: Path) -> "RunProgress":
        """A progress for the run in ``run_dir``: its planned steps known before its trainer says them (a run
        that waits for its device reads "step 0/400", not "step 0/?")."""
        planned = (read_run_json(run_dir).get("settings") or {}).get("max_steps")
        return cls(max_steps=_count(planned) or 0) if type(planned) is int else cls()

    def eta_s(self) -> float | None:
        if not self.its or not self.max_steps:
            return None
        return max(0, self.max_steps - self.step) / self.its

    def summary(self) -> str:
        """One line: step/max, loss, lr, it/s, ETA, GPU memory."""
        parts = [f"step {self.step}/{self.max_steps or '?'}"]
        if self.losses:
            parts.append(f"loss {_compact(self.losses[self.step], 4)}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        if self.its:
            parts.append(f"{_compact(self.its, 2)} it/s")
        eta = self.eta_s()
        if eta is not None and self.state in (None, *LIVE_STATES):
            parts.append(f"ETA {format_duration(eta)}")
        if self.mem_gib is not None:
            parts.append(f"GPU {_compact(self.mem_gib, 1)} GiB")
        return "  ".join(parts)


def _count(value: int | None) -> int | None:
    """``value`` as a step or image count; None when it is unknown, negative or past :data:`MAX_COUNT`."""
    return value if value is not None and 0 <= value <= MAX_COUNT else None


def _shown_count(value: int) -> str:
    """A count as a log line says it: ``?`` when it is out of range (see :func:`_count`)."""
    return "?" if _count(value) is None else str(value)


def _finite(value: float | None, default: float | None = None) -> float | None:
    """``value`` as a float when it is a finite number, else ``default`` (a NaN, an infinity, an int too large
    for a float)."""
    try:
        number = float(value)
    except (TypeError, OverflowError):
        return default
    return number if math.isfinite(number) else default


def _speed(value: float | None) -> float | None:
    """``value`` as it/s: a finite number above 0, else None (unknown)."""
    its = _finite(value)
    return its if its and its > 0 else None


def _compact(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals; a very large one in 3 significant digits (``1e+300``)."""
    return f"{value:.{digits}f}" if abs(value) < _COMPACT_FROM else f"{value:.3g}"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour); ``?`` for a negative or endless one, hours in 3 significant digits
    for a very long one."""
    if not 0 <= seconds < math.inf:
        return "?"
    if seconds >= _COMPACT_FROM * 3600:
        return f"{seconds / 3600:.3g} hours"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's "smoothing")."""
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out
