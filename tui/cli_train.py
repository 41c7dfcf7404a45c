"""``dreamtty train``: DreamBooth fine-tuning from the command line.

Settings: ``TrainRequest`` defaults < the resumed run's settings (``--resume``) < ``--config
train.yaml`` < flags. The service schedules the run: it waits until no generation job runs on its
device (``--device``), then the trainer runs as its own process; this command follows its events
and prints progress on stderr, or returns at once with ``--detach``.
Exit codes: 0 done, 1 the run failed or was stopped, 2 bad input (one line on stderr), 3 no service answers,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backend.errors import DreamttyError, RequestError
from backend.events import RunState, TrainStep
from backend.families import MODEL_NAMES
from backend.safetext import error_line, one_line
from backend.training import runs
from backend.training.config import (DEFAULT_LR, LR_SCHEDULES, METHODS, PRECISIONS, REPORT_TO, TrainRequest,
                                     load_yaml)
from tui.cli_output import file_path, given, print_warnings, say_started

if TYPE_CHECKING:  # the scheduler and launcher are imported by the train command only, not by every CLI start
    from backend.run_schedule import ScheduledRun

RECHECK = 5.0  # seconds between readings of a waiting run's place in the schedule (besides its events)

_D = TrainRequest()  # the defaults the help says
# (flag, TrainRequest field, metavar or None for an on/off switch, help)
_OPTIONS = (
    ("--model", "model", "M", f"base model: {MODEL_NAMES}"),
    ("--instance-dir", "instance_dir", "DIR", "folder with 3-20 photos of the subject"),
    ("--instance-prompt", "instance_prompt", "TEXT", "prompt with the unique token, e.g. 'a photo of sks dog'"),
    ("--class-prompt", "class_prompt", "TEXT", "the class without the token, e.g. 'a photo of dog'"),
    ("--method", "method", "|".join(METHODS), f"full fine-tune or LoRA (default {_D.method})"),
    ("--rank", "rank", "R", f"LoRA rank (default {_D.rank})"),
    ("--max-steps", "max_steps", "N", f"optimizer steps (default {_D.max_steps})"),
    ("--lr", "lr", "X", f"learning rate (default {DEFAULT_LR['lora']:.0e} LoRA, {DEFAULT_LR['full']:.0e} full)".replace("e-0", "e-")),
    ("--lr-scheduler", "lr_scheduler", "|".join(LR_SCHEDULES), f"learning-rate schedule (default {_D.lr_scheduler})"),
    ("--lr-warmup-steps", "lr_warmup_steps", "N", f"steps of linear warmup from 0 (default {_D.lr_warmup_steps})"),
    ("--batch-size", "batch_size", "B", f"instance images per step (default {_D.batch_size})"),
    ("--grad-accum", "grad_accum", "K", f"gradient accumulation steps (default {_D.grad_accum})"),
    ("--resolution", "resolution", "PX", "training size, a multiple of 8 (default: the model's)"),
    ("--num-class-images", "num_class_images", "N",
     f"class images for prior preservation (default {_D.num_class_images})"),
    ("--prior-preservation", "prior_preservation", None, "class-prior preservation (on with --class-prompt)"),
    ("--prior-loss-weight", "prior_loss_weight", "W", f"weight of the prior loss (default {_D.prior_loss_weight:g})"),
    ("--train-text-encoder", "train_text_encoder", None, "train the text encoder(s) too"),
    ("--mixed-precision", "mixed_precision", "|".join(PRECISIONS), "default: accelerate's config, else no"),
    ("--gradient-checkpointing", "gradient_checkpointing", None, "less memory, slower steps"),
    ("--use-8bit-adam", "use_8bit_adam", None, "8-bit AdamW (bitsandbytes; on the CPU >= 0.45)"),
    ("--cache-latents", "cache_latents", None, "encode images once (each keeps one crop)"),
    ("--snr-gamma", "snr_gamma", "G", "Min-SNR loss weighting gamma (5 is usual)"),
    ("--offset-noise", "offset_noise", "X", "offset noise strength (e.g. 0.05)"),
    ("--center-crop", "center_crop", None, "center crop instead of random crops"),
    ("--random-flip", "random_flip", None, "flip images horizontally at random"),
    ("--checkpoint-every", "checkpoint_every", "N", f"save a checkpoint every N steps (default {_D.checkpoint_every})"),
    ("--keep-checkpoints", "keep_checkpoints", "K", f"checkpoints kept (default {_D.keep_checkpoints})"),
    ("--validation-prompt", "validation_prompt", "P", "draw images with this prompt while training"),
    ("--validation-every", "validation_every", "N", f"steps between validation images (default {_D.validation_every})"),
    ("--seed", "seed", "S", "seed (default random, recorded in run.json)"),
    ("--report-to", "report_to", "|".join(REPORT_TO), "also log to TensorBoard (RUN_DIR/logs)"),
    ("--output", "output", "RUN_DIR", "run folder (default: a new folder in the runs folder)"),
    ("--resume", "resume", "latest|PATH", "continue RUN_DIR from its newest (or a given) checkpoint"),
)


_CLEARABLE = ("class_prompt", "validation_prompt", "output", "resume")  # text whose "" means none


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="DreamBooth fine-tuning (full or LoRA)",
                              description="DreamBooth fine-tuning. Every flag but --config, --detach, --launcher and the "
                                          "global --device is also a train.yaml key (with _).")
    # Its own dest: the global --config (the app's config file) must survive.
    p.add_argument("--config", dest="train_config", type=file_path, metavar="FILE",
                   help="train.yaml with the same keys; flags override")
    for flag, dest, metavar, help_text in _OPTIONS:
        if metavar is None:
            p.add_argument(flag, dest=f"train_{dest}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            # empty is refused, as generate's (`--lr "$LR"` with LR unset would quietly mean the default), but
            # where it clears what train.yaml or the resumed run set (no validation images, no class prompt)
            p.add_argument(flag, dest=f"train_{dest}", metavar=metavar, type=str if dest in _CLEARABLE else given,
                           default=None, help=help_text)
    p.add_argument("--detach", action="store_true", help="start the run in the background and return")
    p.add_argument("--launcher", metavar="CMD", type=given,
                   help="e.g. 'accelerate launch --num_processes 2' for several GPUs "
                        "(with --device cuda:0,cuda:1: the GPUs the run waits for)")
    p.set_defaults(func=cmd_train)


def request_from_args(args: argparse.Namespace) -> TrainRequest:
    """Defaults < resumed run < config file < flags (``--model`` before the subcommand counts too)."""
    flags = {dest: getattr(args, f"train_{dest}") for _, dest, _, _ in _OPTIONS}
    flags = {k: v for k, v in flags.items() if v is not None}
    if "model" not in flags and getattr(args, "model", None):
        flags["model"] = args.model
    data: dict = {}
    config = load_yaml(args.train_config) if args.train_config else {}
    resume = flags.get("resume", config.get("resume"))
    output = flags.get("output", config.get("output"))
    if resume and output and runs.is_run_dir(run_dir := Path(os.path.expanduser(output))):
        from backend.training.launch import resume_settings

        data.update(resume_settings(run_dir))
        if "instance_dir" not in {**data, **config, **flags}:  # a --model (--demo) alone starts no run either
            raise RequestError("resume", f"{run_dir / runs.RUN_JSON} holds no settings to resume with (it is damaged); "
                                         "give --model, --instance-dir and --instance-prompt too")
    data.update(config)
    data.update(flags)
    return TrainRequest.from_dict(data)


@dataclass
class Trainer:
    """A trainer the service started, followed from this process: like ``Popen.poll``, ``poll()`` is
    None while it runs, but only the service knows its exit code."""

    pid: int | None
    run_dir: Path
    returncode: int | None = None

    def poll(self) -> bool | None:
        return None if runs.pid_alive(self.pid, self.run_dir) else True


def cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "out", None) is not None:  # --out (images) is easily taken for --output (the run)
        raise RequestError("out", "is where generated images go; give the run folder with --output RUN_DIR")
    from backend.client import is_local
    from backend.run_schedule import TRAINING

    run = asyncio.run(_schedule(args, request_from_args(args)))
    run_dir = Path(run.path)
    if args.detach:
        where = (f"training in the background (pid {run.pid})" if run.state == TRAINING
                 else f"queued: it starts when {_devices(run)} {'is' if len(run.devices) == 1 else 'are'} free")
        if run.state != TRAINING and is_local(args.local):  # this process, its service, ends now
            where += " and a dreamtty service runs (dreamtty serve --detach, or the TUI)"
        _say(f"dreamtty: {where}; follow it in the TUI (F3) or {run_dir / runs.EVENTS}; stop it there (ctrl+t) or "
             f"with: touch {shlex.quote(str(run_dir / runs.STOP_FILE))}")
        print(one_line(run_dir))
        return 0
    return follow(run_dir, Trainer(run.pid if run.state == TRAINING else None, run_dir))


async def _schedule(args: argparse.Namespace, request: TrainRequest) -> ScheduledRun:
    """Give the run to the service and, unless ``--detach``, wait until it trains (or ended before:
    stopped from the TUI, or its trainer could not start). Interrupted while it waits, the run is
    taken off the queue."""
    from backend.client import connect
    from backend.run_schedule import WAITING

    client = connect(args.device, local=args.local, cluster=args.cluster, jobs=False)
    events = client.subscribe()
    run, settled = None, False
    try:
        await client.start()
        say_started(client)
        run, warnings = await client.start_run(request, args.device, args.launcher)
        print_warnings(warnings)
        if run.state == WAITING and not args.detach:
            run = await _until_it_trains(client, run, events)
        settled = True
    finally:
        if run is not None and not settled:
            try:
                if await client.stop_run(run.id):
                    _say(f"dreamtty: took {run.path} off the queue before it started")
            except DreamttyError:
                pass  # the service is gone: the run waits for the next one
        await client.close()
    return run


async def _until_it_trains(client, run: ScheduledRun, events: asyncio.Queue) -> ScheduledRun:
    """Say why the run waits (again when that changes) until it leaves the queue."""
    from backend.run_schedule import TRAINING, WAITING

    said = None
    while run.state == WAITING:
        if run.waiting_for != said:
            said = run.waiting_for
            why = said or f"{_devices(run)} to be free"
            _say(f"dreamtty: waiting for {why}; the run starts when it is free (Ctrl-C takes it off the queue)")
        try:
            while not isinstance(event := await asyncio.wait_for(events.get(), RECHECK), RunState) or event.run != run.id:
                pass
        except asyncio.TimeoutError:
            pass
        run = next((r for r in await client.runs() if r.id == run.id), run)
    if run.state == TRAINING:
        print(f"dreamtty: training on {_devices(run)} (pid {run.pid})", file=sys.stderr)
    return run


def _say(text: str) -> None:
    """``text`` on stderr as one line: a run folder's path in it may hold a newline."""
    print(one_line(text), file=sys.stderr)


def _devices(run: ScheduledRun) -> str:
    from backend.run_schedule import device_label

    return ", ".join(map(device_label, run.devices))


def follow(run_dir: Path, proc) -> int:
    """Print the run's progress on stderr until the trainer exits; Ctrl-C asks it to stop."""
    from backend.training.launch import request_stop, withdraw_stop

    tail, progress, shown = runs.EventTail(run_dir), runs.RunProgress(), 0.0
    events = Path(run_dir) / runs.EVENTS
    tail.offset = events.stat().st_size if events.exists() else 0  # warnings were printed already
    interrupts = 0
    while True:
        try:
            done = proc.poll() is not None
            for event in tail.read():
                line = progress.apply(event)
                if line:
                    print(f"dreamtty: {one_line(line)}", file=sys.stderr)
                elif isinstance(event, TrainStep) and (time.monotonic() - shown > 2 or progress.step == progress.max_steps):
                    print(f"dreamtty: {progress.summary()}", file=sys.stderr)
                    shown = time.monotonic()
            if done:
                break
            time.sleep(0.5)
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                request_stop(run_dir)
                print("dreamtty: stopping after this step with a checkpoint (Ctrl-C again to leave it running)",
                      file=sys.stderr)
            elif proc.poll() is not None:
                break  # it stopped already, as the first Ctrl-C asked: say how it ended
            elif interrupts == 2 and not withdraw_stop(run_dir):  # taken: the trainer is saving its checkpoint
                print("dreamtty: the trainer is stopping already, after its checkpoint (Ctrl-C again to stop waiting)",
                      file=sys.stderr)
            else:
                how = "running" if interrupts == 2 else "to stop after its checkpoint"
                print(f"dreamtty: leaving the trainer {how} in the background (pid {proc.pid})", file=sys.stderr)
                return 130
    data = runs.record_trainer_gone(run_dir, proc.returncode)  # one that died before it could record why
    state, error = runs.effective_state(run_dir, data)
    if state == "done":
        output = data.get("output", {})
        print(one_line(output.get("path", run_dir)))
        return 0
    if state == "stopped":
        step = data.get("step", progress.step)
        lost = f" (not saved: a resume goes on from step {data['saved']})" if data.get("saved", step) != step else ""
        _say(f"dreamtty: stopped at step {step}{lost}; continue with "
             f"dreamtty train --output {shlex.quote(str(run_dir))} --resume latest")
        return 1
    if error is None or error != progress.error:  # the trainer's own error was printed as it came
        print(f"dreamtty: training failed: {error_line(error or 'see ' + str(run_dir / runs.LOG_FILE))}",
              file=sys.stderr)
    return 2 if data.get("error_kind") == "input" else 1
