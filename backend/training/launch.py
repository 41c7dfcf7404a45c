"""Prepare a run directory and start, or stop, its trainer process (no torch).

The trainer is its own process (``python -m backend.training.trainer_process RUN_DIR``) in its own
session, so closing the TUI or the SSH connection does not stop it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from backend.errors import RequestError
from backend.events import TrainLog
from backend.models import absolute_model, resolve_model
from backend.safetext import CONTROL
from backend.training import runs
from backend.training.config import TrainRequest, check_precision
from backend.training.images import scan_images
from backend.training.words import unique_token_warning
from backend.values import check_text


@dataclass
class RunFolder:
    """A checked training run and its folder, made, with run.json (state "starting") in it."""

    run_dir: Path
    request: TrainRequest
    warnings: list[str] = field(default_factory=list)


NAME_CHARS = 40  # of the prompt in a run folder's name: 40 CJK characters are 120 of a file name's 255 bytes


def _default_name(request: TrainRequest) -> str:
    words = [w for w in request.instance_prompt.lower().split() if w.isalnum()][-2:] or ["run"]
    return time.strftime("%Y%m%d-%H%M%S-") + "-".join(words)[:NAME_CHARS]


def resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder ``resume`` names ("latest" -> newest complete one; None -> None)."""
    if resume is None:
        return None
    if resume == "latest":
        found = runs.list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(os.path.expanduser(resume))  # os.path's checks: False for a name too long, where Path's raise
    if not path.is_absolute() and not os.path.exists(path):
        path = Path(run_dir) / runs.CHECKPOINTS / resume
    if not (os.path.isdir(path) and os.path.isfile(path / runs.STATE_FILE)):
        raise RequestError("resume", f"{resume} is not a checkpoint folder; use latest or {run_dir}/checkpoints/checkpoint-N")
    return path


def resume_settings(run_dir: Path) -> dict:
    """The settings to continue ``run_dir`` with: those in its run.json, resuming from its newest checkpoint."""
    return {**runs.read_run_json(run_dir).get("settings", {}), "output": str(run_dir), "resume": "latest"}


def _check_optional_packages(request: TrainRequest) -> None:
    if request.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise RequestError("use_8bit_adam", "needs bitsandbytes: pip install bitsandbytes")
    if request.report_to == "tensorboard" and not any(map(importlib.util.find_spec, ("tensorboard", "tensorboardX"))):
        raise RequestError("report_to", "needs tensorboard or tensorboardX (pip install tensorboard); or use none")


# Settings that shape a checkpoint's weights and optimizer state: a resume must keep them.
CHECKPOINT_SHAPE = ("method", "rank", "train_text_encoder", "use_8bit_adam")


def _previous_run(run_dir: Path, req: TrainRequest) -> dict:
    """run.json of the run already in ``run_dir`` ({} for a new or empty folder), if it may be (re)started."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RequestError("output", f"{run_dir} is a file; give a folder for the run")
    if not runs.is_run_dir(run_dir):
        if run_dir.is_dir() and any(run_dir.iterdir()):  # never write a run among someone's files
            raise RequestError("output", f"{run_dir} is not empty and holds no run; choose a new or empty folder")
        return {}
    previous = runs.read_run_json(run_dir)
    state, _ = runs.effective_state(run_dir, previous)
    if state in runs.LIVE_STATES:
        raise RequestError("output", f"{run_dir} is already running; stop it first")
    if state == runs.WAITING:
        raise RequestError("output", f"{run_dir} is already waiting for its device; stop it first")
    if req.resume is None:
        raise RequestError("output", f"{run_dir} already holds a run; {runs.RESUME_HINT}, or choose another "
                                     "folder")
    return {**previous, "state": state}


def _checkpoint_step(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / runs.STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_belongs(checkpoint: Path, run_dir: Path) -> None:
    """Refuse a checkpoint that is not ``run_dir``'s own (in its ``checkpoints``, or in ``checkpoints/abandoned``):
    resuming from another run's would put that run's weights in this one and move this one's checkpoints aside."""
    if checkpoint.resolve().is_relative_to((run_dir / runs.CHECKPOINTS).resolve()):
        return
    owner = runs.run_holding(checkpoint)
    whose = f"a checkpoint of {owner}, not of {run_dir}" if owner else f"not a checkpoint of {run_dir}"
    raise RequestError("resume", f"{checkpoint} is {whose}; give one in {run_dir / runs.CHECKPOINTS}, or latest")


def _check_resume(req: TrainRequest, run_dir: Path, previous: dict, family: str) -> tuple[Path | None, list[str]]:
    """Refuse a resume that would overwrite a result or cannot load its checkpoint; the checkpoint it
    continues from (None: from step 0) and its warnings."""
    if req.resume is None:
        return None, []
    checkpoint = resume_checkpoint(run_dir, req.resume)
    if checkpoint is None:
        if previous.get("state") == "done":
            raise RequestError("resume", f"{run_dir} finished without a checkpoint to continue from; "
                                         "train a new run in another folder")
        if not previous:  # a first launch of a script that always resumes (preemptible jobs), or a typo
            return None, [f"resume: {run_dir} holds no run yet; a new run starts there from step 0 (check its "
                          "name if you meant to continue one)"]
        return None, [f"resume: {run_dir} has no checkpoint yet; starting from step 0"]
    _check_belongs(checkpoint, run_dir)
    step = _checkpoint_step(checkpoint)
    if step is not None and step > req.max_steps:
        raise RequestError("max_steps", f"{req.max_steps} is below the checkpoint's step {step}")
    if step == req.max_steps and previous.get("state") == "done":  # stopped at its last step: only the export is left
        raise RequestError("max_steps", f"{req.max_steps} must be above the checkpoint's step {step} to train on")
    if previous.get("family") not in (None, family):
        raise RequestError("model", f"the checkpoint was trained on a {previous['family']} model, not {family}")
    settings = previous.get("settings", {})
    for name in CHECKPOINT_SHAPE:
        if name == "rank" and req.method != "lora":
            continue
        if name in settings and settings[name] != getattr(req, name):
            raise RequestError(name, f"the checkpoint was trained with {settings[name]}, not {getattr(req, name)}; "
                                     "a resume must keep it (or train a new run in another folder)")
    return checkpoint, []


def _check_target(request: TrainRequest) -> None:
    """Check the folder a run goes to before its settings, so that a resume of no run says so (not that its model
    is missing); the folder is checked again as the run is made."""
    if request.resume is not None and not request.output:
        raise RequestError("resume", "needs the run to continue: --output RUN_DIR (output: RUN_DIR)")
    if not request.output:
        return
    run_dir = Path(os.path.expanduser(request.output))
    try:
        with _PREPARING:  # not while another request writes its run.json there (its temp file is not a run)
            previous = _previous_run(run_dir, request)
    except OSError:  # said as the run is made
        return
    if request.resume is not None and not previous and not str(request.instance_dir or "").strip():
        raise RequestError("resume", f"{run_dir} holds no run to continue; give --output the folder of a run, or "
                                     "--model, --instance-dir and --instance-prompt to start one there")


def prepare_run(request: TrainRequest, runs_root: Path | None = None, devices: list[str] | None = None) -> RunFolder:
    """Validate everything that needs no torch, then create RUN_DIR with run.json (state "starting").

    Without ``output`` the run gets a new folder in ``runs_root`` (default ``runs.runs_root()``);
    a run elsewhere is linked there, so the dashboard lists it. ``devices``: what it will train on
    (``["cpu"]``, ``["cuda:0"]``, ...), None when not known yet.
    """
    runs_root = runs.runs_root() if runs_root is None else Path(runs_root)
    _check_target(request)
    ref = resolve_model(request.model)
    req = request.resolved(ref.family)
    if devices is not None:
        check_precision(req.method, req.mixed_precision, devices == ["cpu"])
    _check_optional_packages(req)
    scan = scan_images(req.instance_dir, req.resolution)
    warnings = [*req.unused(), *scan.warnings]
    if req.batch_size > len(scan.files):
        warnings.append(f"batch_size: {req.batch_size} is more than the {len(scan.files)} usable instance images; "
                        "each step shows some of them more than once")
    token = unique_token_warning(req.instance_prompt, req.class_prompt if req.prior else None)
    if token:
        warnings.append(token)
    run_dir = Path(os.path.expanduser(req.output)) if req.output else None
    try:
        with _PREPARING:  # check to run.json: two requests to this process (the service) never take one folder
            return _make_run_dir(req, ref.family, run_dir, runs_root, warnings)
    except OSError as exc:
        if run_dir is None:  # none given: the runs folder takes no new one
            why = "it is not a folder" if runs_root.is_file() else exc.strerror or exc
            raise RequestError("output", f"cannot make a run folder in {runs_root}: {why}; give the run a "
                                         "folder") from None
        raise RequestError("output", f"cannot write the run to {run_dir}: {exc.strerror or exc}") from None


_PREPARING = threading.Lock()


def _make_run_dir(req: TrainRequest, family: str, run_dir: Path | None, runs_root: Path,
                  warnings: list[str]) -> RunFolder:
    """Check ``run_dir`` (None: a new folder in ``runs_root``) may take the run, then write its run.json."""
    if run_dir is None:
        run_dir, previous, checkpoint = runs.new_folder(runs_root, _default_name(req)), {}, None
    else:
        previous = _previous_run(run_dir, req)
        checkpoint, resume_warnings = _check_resume(req, run_dir, previous, family)
        warnings += resume_warnings
    named = checkpoint is not None and req.resume != "latest"  # a path: absolute, as the trainer runs in run_dir
    req = replace(req, output=str(run_dir.resolve()), model=absolute_model(req.model),
                  instance_dir=str(Path(os.path.expanduser(req.instance_dir)).resolve()),
                  resume=str(checkpoint.resolve()) if named else req.resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runs.STOP_FILE).unlink(missing_ok=True)
    (run_dir / runs.PID_FILE).unlink(missing_ok=True)
    now = time.time()
    runs.write_json_atomic(
        run_dir / runs.RUN_JSON,
        {**previous, "version": 1, "settings": req.to_dict(), "family": family, "state": "starting",
         "pid": None, "error": None, "error_kind": None, "created": previous.get("created", now), "updated": now},
    )
    try:
        runs.link_into_root(run_dir, runs_root)
    except OSError as exc:  # a read-only runs folder: the run goes on, unlisted
        warnings.append(f"runs: cannot list the run in {runs_root} ({exc.strerror or exc}); the Train screen "
                        f"does not show it, `dreamtty train --output {run_dir} --resume latest` still works")
    for warning in warnings:
        runs.EventWriter(run_dir)(TrainLog(level="warning", message=warning))
    return RunFolder(run_dir.resolve(), req, warnings)


def trainer_command(run_dir: Path, launcher: str | None = None) -> list[str]:
    """``python -m backend.training.trainer_process RUN_DIR``, or the same through e.g. ``accelerate launch``."""
    if launcher:
        check_text("launcher", launcher)  # a NUL (Popen's ValueError) or a lone surrogate (SQLite's)
        if CONTROL.search(launcher):
            raise RequestError("launcher", f"{launcher[:200]!r} holds a control character; give a command line "
                                           "such as 'accelerate launch --num_processes 2'")
        try:
            words = shlex.split(launcher)
        except ValueError as exc:  # e.g. an unbalanced quote
            raise RequestError("launcher", f"{launcher!r}: {exc}") from None
        if not words or shutil.which(words[0]) is None:  # said before a run folder is made for it
            raise RequestError("launcher", f"{words[0] if words else launcher!r}: no such program; give a command "
                                           "line such as 'accelerate launch --num_processes 2'")
        return [*words, "-m", runs.TRAINER_MODULE, str(run_dir)]
    return [sys.executable, "-m", runs.TRAINER_MODULE, str(run_dir)]


def start_trainer(run_dir: Path, launcher: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the trainer in its own session (it survives the TUI and SSH closing), its output in the run's
    log; ``env``: more environment for it (the service names its devices with ``CUDA_VISIBLE_DEVICES``).

    When it cannot start, the run is marked failed (not left "starting") and RequestError is raised.
    """
    run_dir = Path(run_dir)
    if not os.path.isdir(run_dir):  # removed while the run waited for its devices
        raise RequestError("output", f"the run folder {run_dir} is gone; nothing was started")
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        with open(run_dir / runs.LOG_FILE, "ab") as log:
            proc = subprocess.Popen(trainer_command(run_dir, launcher), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True, env=env, cwd=run_dir)
    except (OSError, RequestError) as exc:  # a run queued with a launcher refused now fails here, as it starts
        error = exc if isinstance(exc, RequestError) else RequestError("launcher", f"cannot start the trainer: {exc}")
        with contextlib.suppress(OSError):  # a folder that cannot be written: the error is still said
            runs.update_run_json(run_dir, state="failed", error=str(error), error_kind="input")
        raise error from None
    with contextlib.suppress(OSError):  # without it the run is still watched through its process
        (run_dir / runs.PID_FILE).write_text(str(proc.pid))
    return proc


def request_stop(run_dir: Path) -> None:
    """Ask a running trainer to save a checkpoint and stop (it checks for STOP after each step); RequestError
    when the run folder takes no file (read-only, another user's, removed)."""
    stop_file = Path(run_dir) / runs.STOP_FILE
    try:
        stop_file.touch()
    except OSError as exc:
        raise RequestError("output", f"cannot ask the trainer to stop: {stop_file}: {exc.strerror or exc}; send it "
                                     "SIGTERM instead (it stops as asked)") from None


def withdraw_stop(run_dir: Path) -> bool:
    """Take back a stop request; False when the trainer took it already (it removes STOP as it stops)."""
    try:
        (Path(run_dir) / runs.STOP_FILE).unlink()
    except FileNotFoundError:
        return False
    return True
