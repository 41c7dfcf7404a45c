"""Trainer process entry: ``python -m backend.training.trainer_process RUN_DIR``.

Reads the settings from ``RUN_DIR/run.json`` (written by ``launch.prepare_run``) and trains.
Works under ``accelerate launch -m backend.training.trainer_process RUN_DIR`` for several GPUs.
SIGTERM or SIGINT (or a STOP file) stops after the current step with a checkpoint.
Exit status: 0 done, 1 failed, 3 stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from backend.errors import DreamttyError, RequestError
from backend.events import TrainError
from backend.safetext import first_line
from backend.training import runs
from backend.training.config import TrainRequest


def fail(run_dir: Path, events: runs.EventWriter, message: str, kind: str = "error") -> None:
    """Record the failure; ``kind`` "input" marks a bad setting (the CLI exits 2)."""
    events(TrainError(message=message))
    print(f"dreamtty train: {message}", file=sys.stderr)
    if events.enabled and runs.is_run_dir(run_dir):
        try:
            runs.update_run_json(run_dir, state="failed", error=message, error_kind=kind)
        except OSError as exc:  # a full disk: whoever started the trainer records that it ended
            print(f"dreamtty train: cannot record the failure in {run_dir / runs.RUN_JSON}: {exc.strerror}",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m backend.training.trainer_process RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(os.path.expanduser(args[0])).resolve()
    events = runs.EventWriter(run_dir, enabled=os.environ.get("RANK", "0") == "0")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(run_dir, events, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(run_dir: Path, events: runs.EventWriter, stop: threading.Event) -> int:
    try:
        data = runs.read_run_json(run_dir)
        if not data.get("settings"):
            raise RequestError("run_dir", f"{run_dir} has no run.json with settings; start runs with dreamtty train")
        request = TrainRequest.from_dict(data["settings"]).validate()
        from backend.training.trainer import train

        state = train(request, run_dir, events, stop.is_set)
    except DreamttyError as exc:
        fail(run_dir, events, str(exc), "input" if isinstance(exc, RequestError) else "error")
        return 1
    except Exception as exc:  # an unexpected bug: full traceback in trainer.log, one line in events
        traceback.print_exc()
        first = first_line(exc, empty="")
        fail(run_dir, events, f"{type(exc).__name__}: {first} (details in {run_dir / runs.LOG_FILE})")
        return 1
    return 0 if state == "done" else 3


if __name__ == "__main__":
    sys.exit(main())
