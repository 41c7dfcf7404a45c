"""Checkpoints: accelerate ``save_state`` into a temp folder, then rename; prune old ones.

A failed save (disk full) removes the temp folder and leaves the previous checkpoint as it was.
Only trainable weights are stored (LoRA: the adapters; full: the UNet/text encoders), through
accelerate's save/load state hooks, the way diffusers' DreamBooth scripts do.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from backend.errors import DreamttyError
from backend.training import runs

STATE_FILE = "dreamtty_state.json"


class CheckpointError(DreamttyError):
    """A checkpoint could not be written; the previous one is still valid."""


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
            state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            result = accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise CheckpointError(f"resume: {input_dir} does not match this model ({result.unexpected_keys[0]})")
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` atomically and prune to the newest ``keep``."""
    root = Path(run_dir) / runs.CHECKPOINTS
    final = root / f"{runs.CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{runs.CHECKPOINT_PREFIX}{step}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except OSError as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = runs.list_checkpoints(run_dir)
        kept = f"{previous[-1][1].name} is kept" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint at step {step} not saved: {exc.strerror or exc}; {kept}") from None
    if main:
        for _, old in runs.list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Restore weights, optimizer, scaler and RNG state; return our state (step, micro-batch, seed)."""
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        accelerator.load_state(str(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        reason = str(exc).splitlines()[0][:200]
        if "parameter group" in reason:  # torch's Optimizer.load_state_dict
            reason += "; was --use-8bit-adam, --method or --train-text-encoder changed?"
        raise CheckpointError(f"resume: cannot load {folder}: {reason}") from None
    return state
