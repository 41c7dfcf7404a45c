"""A stand-in trainer for scheduling tests, given to ``start_trainer`` as the launcher: it is run as
``python tests/fake_trainer.py -m backend.training.trainer_process RUN_DIR``.

It records itself as running (with the ``CUDA_VISIBLE_DEVICES`` it was given, in ``env.json``), then
waits until ``RUN_DIR/GO`` exists (it ends done, with a LoRA output) or ``RUN_DIR/STOP`` does
(stopped), the way the real trainer checks for STOP after each step. A test that failed before
either leaves it waiting ``PATIENCE`` seconds at most.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from backend.events import TrainState, TrainStep
from backend.training import runs

PATIENCE = 300.0  # seconds


def main(run_dir: Path) -> int:
    (run_dir / "env.json").write_text(json.dumps({"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    write = runs.EventWriter(run_dir)
    runs.update_run_json(run_dir, state="running", pid=os.getpid())
    write(TrainState(state="running", max_steps=2))
    write(TrainStep(step=1, max_steps=2, loss=0.5, lr=1e-4, its=2.0))
    deadline = time.monotonic() + PATIENCE
    while not (run_dir / "GO").exists():
        if (run_dir / runs.STOP_FILE).exists() or time.monotonic() > deadline:
            runs.update_run_json(run_dir, state="stopped", step=1)
            write(TrainState(state="stopped", step=1))
            return 3
        time.sleep(0.05)
    write(TrainStep(step=2, max_steps=2, loss=0.25, lr=1e-4, its=2.0))
    runs.update_run_json(run_dir, state="done", step=2, output={"kind": "lora", "path": str(run_dir / runs.LORA_FILE)})
    write(TrainState(state="done", step=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[-1])))
