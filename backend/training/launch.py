"""Prepare a run directory and start, or stop, its trainer process (no torch).

The trainer is its own process (``python -m backend.training.run RUN_DIR``) in its own
session, so closing the TUI or the SSH connection does not stop it.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from backend.errors import RequestError
from backend.models import resolve_model
from backend.training import runs
from backend.training.config import TrainRequest
from backend.training.images import scan_images
from backend.training.words import unique_token_warning


@dataclass
class PreparedRun:
    run_dir: Path
    request: TrainRequest
    warnings: list[str] = field(default_factory=list)


def _default_name(request: TrainRequest) -> str:
    words = [w for w in request.instance_prompt.lower().split() if w.isalnum()][-2:] or ["run"]
    return time.strftime("%Y%m%d-%H%M%S-") + "-".join(words)


def resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder ``resume`` names ("latest" -> newest complete one; None -> None)."""
    if resume is None:
        return None
    if resume == "latest":
        found = runs.list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists():
        path = Path(run_dir) / runs.CHECKPOINTS / resume
    if not (path.is_dir() and (path / "dreamtty_state.json").is_file()):
        raise RequestError("resume", f"{resume} is not a checkpoint folder; use latest or {run_dir}/checkpoints/checkpoint-N")
    return path


def resume_settings(run_dir: Path) -> dict:
    """The settings to continue ``run_dir`` with: the recorded ones, from its newest checkpoint."""
    settings = dict(runs.read_run_json(run_dir).get("settings", {}))
    return {**settings, "output": str(run_dir), "resume": "latest"}


def _check_optional_packages(request: TrainRequest) -> None:
    if request.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise RequestError("use_8bit_adam", "needs bitsandbytes: pip install bitsandbytes")
    if request.report_to == "tensorboard" and not any(map(importlib.util.find_spec, ("tensorboard", "tensorboardX"))):
        raise RequestError("report_to", "needs tensorboard or tensorboardX (pip install tensorboard); or use none")


def prepare_run(request: TrainRequest, runs_root: Path | None = None) -> PreparedRun:
    """Validate everything that needs no torch, then create RUN_DIR with run.json (state "starting").

    Without ``output`` the run gets a new folder in ``runs_root`` (default ``runs.runs_root()``);
    a run elsewhere is linked there, so the dashboard lists it.
    """
    runs_root = runs.runs_root() if runs_root is None else Path(runs_root)
    ref = resolve_model(request.model)
    req = request.resolved(ref.family)
    _check_optional_packages(req)
    scan = scan_images(req.instance_dir, req.resolution)
    warnings = list(scan.warnings)
    token = unique_token_warning(req.instance_prompt, req.class_prompt if req.prior else None)
    if token:
        warnings.append(token)
    run_dir = Path(req.output).expanduser() if req.output else runs_root / _default_name(req)
    previous = runs.read_run_json(run_dir) if runs.is_run_dir(run_dir) else {}
    if previous:
        state, _ = runs.effective_state(run_dir, previous)
        if state in runs.LIVE_STATES:
            raise RequestError("output", f"{run_dir} is already running; stop it first")
        if req.resume is None:
            raise RequestError("output", f"{run_dir} already holds a run; resume it (--resume latest, or ctrl+r "
                                         "on the Train screen) or choose another folder")
    if req.resume is not None and resume_checkpoint(run_dir, req.resume) is None:
        warnings.append(f"resume: {run_dir} has no checkpoint yet; starting from step 0")
    req = replace(req, output=str(run_dir.resolve()), instance_dir=str(Path(req.instance_dir).expanduser().resolve()))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runs.STOP_FILE).unlink(missing_ok=True)
    (run_dir / runs.PID_FILE).unlink(missing_ok=True)
    now = time.time()
    runs.write_json_atomic(
        run_dir / runs.RUN_JSON,
        {**previous, "version": 1, "settings": req.to_dict(), "family": ref.family, "state": "starting",
         "pid": None, "error": None, "error_kind": None, "created": previous.get("created", now), "updated": now},
    )
    runs.link_into_root(run_dir, runs_root)
    for warning in warnings:
        runs.EventWriter(run_dir)("log", level="warning", message=warning)
    return PreparedRun(run_dir.resolve(), req, warnings)


def trainer_command(run_dir: Path, launcher: str | None = None) -> list[str]:
    """``python -m backend.training.run RUN_DIR``, or the same through e.g. ``accelerate launch``."""
    if launcher:
        return [*shlex.split(launcher), "-m", "backend.training.run", str(run_dir)]
    return [sys.executable, "-m", "backend.training.run", str(run_dir)]


def start_trainer(run_dir: Path, launcher: str | None = None, log_to_file: bool = True) -> subprocess.Popen:
    """Start the trainer in its own session (it survives the TUI and SSH closing)."""
    run_dir = Path(run_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log = open(run_dir / runs.LOG_FILE, "ab") if log_to_file else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            trainer_command(run_dir, launcher), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, env=env, cwd=run_dir,
        )
    except OSError as exc:
        raise RequestError("launcher", f"cannot start the trainer: {exc}") from None
    finally:
        if log_to_file:
            log.close()
    (run_dir / runs.PID_FILE).write_text(str(proc.pid))
    return proc


def request_stop(run_dir: Path) -> None:
    """Ask a running trainer to save a checkpoint and stop (it checks for STOP after each step)."""
    (Path(run_dir) / runs.STOP_FILE).touch()
