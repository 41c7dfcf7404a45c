"""Checkpoints: accelerate ``save_state`` into a temp folder, then rename; prune old ones.

A failed save (disk full) removes the temp folder and leaves the previous checkpoint as it was.
Pruning keeps the newest ``keep`` that load; a resume moves the checkpoints past its step aside.
A load first checks that no file is cut short (DamagedCheckpointError), then restores the state.
Only trainable weights are stored (LoRA: the adapters; full: the UNet/text encoders), through
accelerate's save/load state hooks, the way diffusers' DreamBooth scripts do.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from backend.errors import DreamttyError
from backend.outputs import umask
from backend.safetext import first_line
from backend.training import runs

STATE_FILE = runs.STATE_FILE
_TORCH_WRITE_FAILED = ("inline_container.cc", "iostream error")  # torch.save's zip writer, its C++ stream
# torch's words for a checkpoint of another layout -> the flags that change that layout
_CHANGED_FLAGS = {
    "size mismatch": "--rank, --method or --train-text-encoder",
    "parameter group": "--use-8bit-adam, --method or --train-text-encoder",
    "do not match this model": "--method or --train-text-encoder",
}


class CheckpointError(DreamttyError):
    """A checkpoint could not be written or loaded; the message says which and why."""


class DamagedCheckpointError(CheckpointError):
    """A file of the checkpoint is cut short or unreadable (a power cut, a full disk)."""


def any_process(accelerator, flag: bool) -> bool:
    """True when ``flag`` is true on any process. Every process must call it (it is a collective)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def register_hooks(accelerator) -> None:
    """Save/load only the parameters that train (``requires_grad``), one file per prepared model."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                params = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(model).named_parameters()
                          if v.requires_grad}
                save_file(params, os.path.join(output_dir, f"trainable_{i}.safetensors"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            path = os.path.join(input_dir, f"trainable_{i}.safetensors")
            if not os.path.isfile(path):  # this run trains more models than the checkpoint's did
                raise ValueError(f"the saved weights do not match this model (no {os.path.basename(path)})")
            result = accelerator.unwrap_model(model).load_state_dict(load_file(path), strict=False)
            if result.unexpected_keys:
                raise ValueError(f"the saved weights do not match this model ({result.unexpected_keys[0]})")
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# -- saving --------------------------------------------------------------------
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # what a failed write raises, among others


def write_failure(exc: Exception) -> str | None:
    """Why a write failed (disk full, I/O error), or None when ``exc`` is not a failed write."""
    text = str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or text
    if isinstance(exc, SafetensorError) and "I/O error: " in text:  # "...: I/O error: <strerror> (os error N)"
        return text.split("I/O error: ", 1)[1].split(" (os error", 1)[0]
    if isinstance(exc, RuntimeError) and any(words in text for words in _TORCH_WRITE_FAILED):
        return "torch could not write its file (disk full?)"  # torch's message drops the OS error
    return None


def try_write(write: Callable[[], object]) -> str | None:
    """Run ``write``; return why it failed when it failed to write, else None. Other errors propagate."""
    try:
        write()
    except WRITE_ERRORS as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        return reason
    return None


def follow_umask(folder: Path) -> None:
    """Give the weights under ``folder`` the mode the umask gives new files (safetensors writes them 0600), so that
    whoever may read the run's other files may read them too."""
    mode = 0o666 & ~umask()
    for path in Path(folder).rglob("*.safetensors"):
        os.chmod(path, mode)


def _complete(tmp: Path, final: Path, state: dict) -> None:
    """Write our state file last (it marks the checkpoint complete), put every file on the disk, then rename the
    folder into place: older checkpoints are pruned next, and a power cut must not leave this one's files empty."""
    follow_umask(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for path in [*tmp.rglob("*"), tmp]:  # its files and folders, itself last
        _fsync(path)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself


def _fsync(path: Path) -> None:
    """Flush the file or folder ``path`` to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` atomically and prune to the newest ``keep``.

    A failed write (disk full) removes the temp folder and raises CheckpointError; a write that
    fails in one process fails the save in all, so they go on in step.
    """
    root = Path(run_dir) / runs.CHECKPOINTS
    final = root / f"{runs.CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{runs.CHECKPOINT_PREFIX}{step}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(exist_ok=True)  # not the run folder: one removed mid-run is not made again (the trainer stops)
        for stale in root.glob(f".tmp-{runs.CHECKPOINT_PREFIX}*"):  # also those of a killed trainer
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    reason = try_write(lambda: accelerator.save_state(str(tmp)))
    if any_process(accelerator, reason is not None):
        reason = reason or "a write failed in another process"
    elif main:
        reason = try_write(lambda: _complete(tmp, final, state))
    if reason is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = runs.list_checkpoints(run_dir)
        kept = f"{previous[-1][1].name} is kept" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint at step {step} not saved: {reason}; {kept}")
    if main:
        _prune(run_dir, keep)
    return final


def _prune(run_dir: Path, keep: int) -> None:
    """Remove the checkpoints older than the newest ``keep`` that load: a damaged one does not count."""
    found = runs.list_checkpoints(run_dir)
    good = [step for step, folder in found if _damage(folder) is None]
    for step, folder in found:
        if len(good) > keep and step < good[-keep]:
            shutil.rmtree(folder, ignore_errors=True)


def abandon_past(run_dir: Path, step: int | None) -> tuple[list[str], Path | None]:
    """Move the checkpoint folders past ``step`` (None: all of them), the branch a resume from ``step`` leaves,
    into ``checkpoints/abandoned/<time>/``, out of the sight of ``--resume latest`` and pruning: (their names,
    where)."""
    past = [folder for n, folder in runs.checkpoint_folders(run_dir) if step is None or n > step]
    if not past:
        return [], None
    aside = runs.new_folder(Path(run_dir) / runs.CHECKPOINTS / runs.ABANDONED, time.strftime("%Y%m%d-%H%M%S"))
    for folder in past:
        os.replace(folder, aside / folder.name)
    return [folder.name for folder in past], aside


# -- loading -------------------------------------------------------------------
def _damage(folder: Path) -> str | None:
    """A quick look at every file for the usual damage, a file cut short: "<file> is damaged (<why>)", or None.

    safetensors checks its header against the file size; torch.save writes a zip whose directory is at the end.
    """
    try:
        paths = sorted(Path(folder).iterdir())
    except OSError as exc:  # gone (moved aside by another process) or unreadable
        return f"{Path(folder).name} cannot be read ({exc.strerror})"
    for path in paths:
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt"):
                    pass
            elif path.suffix in (".bin", ".pkl", ".pt"):
                zipfile.ZipFile(path).close()
            elif path.name == STATE_FILE:
                state = json.loads(path.read_text())
                step = state.get("step") if isinstance(state, dict) else None
                if type(step) is not int or step < 1:
                    raise ValueError(f"its step is {step!r}, not a whole number from 1")
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as exc:
            return f"{path.name} is damaged ({first_line(exc, 120)})"
    return None


def _load_error(folder: Path, exc: Exception) -> CheckpointError:
    """One line for a checkpoint that does not load; a layout mismatch names the flags that change it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    # torch's load_state_dict puts the reason under a header line ("Error(s) in loading state_dict for ...:")
    reason = next((line for line in lines if "size mismatch" in line), lines[0])[:300].rstrip(".")
    flags = next((flags for words, flags in _CHANGED_FLAGS.items() if words in reason), None)
    if flags:
        reason += f"; was {flags} changed?"
    return CheckpointError(f"resume: cannot load {folder}: {reason}")


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Restore weights, optimizer, scaler and RNG state; return our state (its step, and the settings that decide
    which images each step sees: ``DreamBoothTrainer._stepping``).

    Raises DamagedCheckpointError (before loading anything) for a file cut short, else CheckpointError.
    """
    damage = _damage(folder)
    if damage:
        raise DamagedCheckpointError(f"resume: cannot load {folder}: {damage}")
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        accelerator.load_state(str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _load_error(folder, exc) from None
    return state


def load_newest(accelerator, folders: list[Path], warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """Load the newest of ``folders`` (oldest first) that is not damaged; ``warn`` about each one passed over.
    None when every one is damaged; CheckpointError for any other failure."""
    for folder in reversed(folders):
        try:
            return folder, load_checkpoint(accelerator, folder)
        except DamagedCheckpointError as exc:
            warn(f"{exc}; passed over")
    return None
