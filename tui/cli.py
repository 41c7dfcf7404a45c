"""The ``dreamtty`` command: the TUI when run without a subcommand, else a headless CLI.

Exit codes: 0 success, 1 a job failed, 2 bad input, 3 no service answers (one line on stderr for 2 and 3),
130 interrupted.
Text from users, files and images is printed through ``backend.safetext.visible`` (control characters
written out; errors and warnings through ``one_line``, newlines too); ``--json`` output is escaped by
``json.dumps``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from backend.errors import DreamttyError, RequestError, Transient
from backend.families import MODEL_NAMES
from backend.safetext import error_line
from backend.samplers import SAMPLERS, SCHEDULES
from tui.cli_output import LastResort, Parser, file_path, print_warnings

if TYPE_CHECKING:
    from backend.config import Config


# Options taken before the subcommand or after it: (flags, add_argument keywords).
_GLOBAL_OPTIONS = (
    (("--demo",), {"action": "store_true", "default": False, "help": "use the built-in demo model (offline, tiny)"}),
    (("--model",), {"help": MODEL_NAMES}),
    (("--out",), {"help": "outputs directory"}),
    (("--device",), {"default": "auto", "help": "auto, cpu, cuda or cuda:N[,cuda:M...]"}),
    (("--cluster",), {"help": "run the workers on a Ray cluster: auto, ray://HEAD:10001 or HEAD:6379 "
                               "(local: on this machine; default: the config's workers)"}),
    (("--color",), {"choices": ["auto", "truecolor", "256"], "default": "auto", "help": "TUI colour depth"}),
    (("--config",), {"type": file_path, "help": "config file (default: see `dreamtty config path`)"}),
    (("--allow-pickle",), {"action": "store_true", "default": False,
                           "help": "allow pickled .ckpt/.pt/.bin weights (weights only)"}),
    (("--local",), {"action": "store_true", "default": False,
                    "help": "run jobs in this process, not in the background service (or DREAMTTY_LOCAL=1)"}),
)


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Add the global options; with ``suppress`` an option left out sets nothing (no default)."""
    group = parser.add_argument_group("global options")
    for flags, spec in _GLOBAL_OPTIONS:
        group.add_argument(*flags, **({**spec, "default": argparse.SUPPRESS} if suppress else spec))


class _SubcommandParser(Parser):
    """A subcommand's parser, which takes the global options too.

    Left out, they set nothing, so a value given before the subcommand stays. A subcommand's
    own option of the same name (``train --model``) replaces the global one ("resolve").
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(*args, **kwargs)
        _add_global_options(self, suppress=True)

    def parse_known_args(self, args=None, namespace=None):
        """Refuse what is left over here, naming the subcommand (``dreamtty cancel: error: ...``): the top
        parser, which would say it otherwise, names only ``dreamtty``."""
        namespace, rest = super().parse_known_args(args, namespace)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return namespace, rest


# -- commands ------------------------------------------------------------------
def cmd_samplers(args) -> int:
    if args.json:
        print(json.dumps({"samplers": {n: {"label": s.label, "class": s.cls, "schedules": list(s.schedules)}
                                       for n, s in SAMPLERS.items()}, "schedules": list(SCHEDULES)}))
        return 0
    print(f"{'sampler':<14}{'label':<14}{'diffusers class':<34}schedules")
    for name, s in SAMPLERS.items():
        print(f"{name:<14}{s.label:<14}{s.cls:<34}{', '.join(s.schedules)}")
    print(f"\nschedules: {', '.join(SCHEDULES)}")
    return 0


# The module that registers each subcommand: a command line that names one imports only that module (the
# others bring much of the backend). A command missing here still works, through the whole parser.
# None: ``samplers``, registered here. The whole parser registers the modules in this order (its --help's).
COMMAND_MODULES = {
    **dict.fromkeys(("generate", "vary", "upscale", "inpaint", "outpaint", "describe", "reproduce"), "cli_jobs"),
    "samplers": None,
    **dict.fromkeys(("jobs", "cancel", "wait", "attach"), "cli_queue"),
    "serve": "cli_serve", "styles": "cli_styles", "presets": "cli_presets", "train": "cli_train", "web": "cli_web",
    "models": "cli_models", "config": "cli_models",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line's parser, or with ``command`` (a key of COMMAND_MODULES) only the subcommands
    of the module that registers it."""
    parser = Parser(prog="dreamtty", description="Stable Diffusion generation and DreamBooth training in the terminal")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", parser_class=_SubcommandParser)
    for module in dict.fromkeys(COMMAND_MODULES.values()) if command is None else (COMMAND_MODULES[command],):
        if module is None:
            sam = sub.add_parser("samplers", help="list samplers and schedules")
            sam.add_argument("--json", action="store_true")
            sam.set_defaults(func=cmd_samplers)
        else:
            importlib.import_module(f"tui.{module}").register(sub)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line. Without a subcommand (the TUI) only the global options are parsed, and with one
    only its module's parsers are built: the subcommands' modules import much of the backend (a tenth of a
    second before the TUI's first frame or a ``generate``)."""
    top = Parser(prog="dreamtty", add_help=False)
    _add_global_options(top, suppress=False)
    args, rest = top.parse_known_args(argv)
    if not rest:
        args.command = None
        return args
    command = rest[0] if rest[0] in COMMAND_MODULES else None  # else --help or a mistake: the whole parser says
    return build_parser(command).parse_args(argv)


def _check_global_options(args: argparse.Namespace) -> None:
    """Validate the global options in place: ``--out`` becomes a Path, ``--demo`` sets the model."""
    _check_home()
    if args.model is not None and not args.model.strip():
        raise RequestError("model", f"is empty; use {MODEL_NAMES}")
    if args.demo and args.model is not None:
        raise RequestError("model", f"--demo and --model {args.model} conflict; give one of them")
    if args.demo:
        args.model = "demo"
    if args.out is not None:
        if not args.out.strip():
            raise RequestError("out", "is empty; give a folder")
        args.out = Path(args.out)
    if args.cluster is not None:
        from backend.ray_pool import check_cluster

        args.cluster = check_cluster(args.cluster)


def _check_home() -> None:
    """``DREAMTTY_HOME``, when set, must be a folder (created when missing)."""
    from backend.locations import make_folder

    home = os.environ.get("DREAMTTY_HOME")
    if home:
        make_folder(Path(home), "DREAMTTY_HOME")


def _check_device(args: argparse.Namespace, cfg: Config | None) -> None:
    """``--device`` names this machine's devices; with workers on a Ray cluster (``--cluster``, else the
    config's ``workers``; ``cfg``: the config read already, None when it was not) it is auto or cpu, but for a
    training run, which trains here."""
    from backend import config
    from backend.devices import check_cluster_devices, check_devices

    cluster = args.cluster if args.cluster is not None else (cfg or config.load()).cluster
    if cluster in (None, "local") or args.command == "train":
        check_devices(args.device)
    else:
        check_cluster_devices(args.device)


def apply_global_options(args: argparse.Namespace) -> Config | None:
    """Make ``--config`` and ``--allow-pickle`` reach this process and the workers it starts; the config a
    command reads (None for the TUI, which reads it itself)."""
    from backend import config

    if getattr(args, "config", None) is not None:
        config.set_config_path(args.config)
    if getattr(args, "allow_pickle", False):
        os.environ["DREAMTTY_ALLOW_PICKLE"] = "1"
    if args.command is None:
        return None  # the TUI shows config warnings itself (and saves settings to a --config it has yet to write)
    # a --config a command cannot use must not mean a run on the defaults (a typo)
    cfg = config.load()
    if getattr(args, "config", None) is not None and args.command != "config" and cfg.unread:
        raise RequestError("config", cfg.unread)
    warnings = list(cfg.warnings)
    if cfg.default_preset:  # said where the config's warnings are; the TUI's form says it as it loads the preset
        from backend.request_builder import config_preset

        warnings += [problem] if (problem := config_preset(cfg)[1]) else []
    for warning in warnings:
        print(f"dreamtty: {error_line(warning)}", file=sys.stderr)
    return cfg


class Interrupt:
    """SIGTERM's handler: KeyboardInterrupt, as Ctrl-C, once for a burst. `timeout` and `kill -- -PGID` signal
    the process and its group, so it gets SIGTERM twice at once: the second interrupted the first one's
    cleanup (a traceback, a cancelled job left "running"; ``train`` left its trainer running instead of
    stopping it). One DUPLICATE seconds later raises again."""

    DUPLICATE = 0.5

    def __init__(self) -> None:
        self.last = -math.inf

    def __call__(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if now - self.last < self.DUPLICATE:
            return  # the same burst
        self.last = now
        raise KeyboardInterrupt


_FULL = (errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT)  # a write to standard output that failed


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        _check_global_options(args)
        _check_device(args, apply_global_options(args))
        if args.command is None:
            from tui.app import run_app

            return run_app(args, print_warnings)
        logging.lastResort = LastResort()  # `serve` sets a handler of its own: this is never used there
        if args.command != "attach":  # the TUI restores the terminal on its own signals
            # `kill`, `timeout` or a job scheduler: a command stops as on Ctrl-C (its --local jobs are
            # cancelled, not left "running" for a later service to run); serve and web handle it themselves.
            # SIGINT keeps Python's handler: asyncio.run cancels its main task on it only while that is set
            signal.signal(signal.SIGTERM, Interrupt())
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a full disk is said here, not as a traceback at exit
        return code
    except DreamttyError as exc:
        print(f"dreamtty: {error_line(exc)}", file=sys.stderr)
        return 3 if isinstance(exc, Transient) else 2
    except KeyboardInterrupt:
        print("dreamtty: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dreamtty samplers | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # e.g. `dreamtty samplers > /dev/full`
        if exc.errno not in _FULL or exc.filename:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is left in the buffer goes nowhere
        print(f"dreamtty: stdout: cannot write ({exc.strerror})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
