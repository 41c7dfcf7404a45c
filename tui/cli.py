"""The ``dreamtty`` command: the TUI when run without a subcommand, else a headless CLI.

Exit codes: 0 success, 1 a job failed, 2 bad input (one line on stderr).
Text from users, files and images is printed through ``backend.safetext.visible`` (control characters
written out); ``--json`` output is escaped by ``json.dumps``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from backend.errors import DreamttyError, RequestError
from backend.safetext import visible
from backend.samplers import SAMPLERS, SCHEDULES
from tui.cli_output import Parser, print_warnings


# Options taken before the subcommand or after it: (flags, add_argument keywords).
_GLOBAL_OPTIONS = (
    (("--demo",), {"action": "store_true", "default": False, "help": "use the built-in demo model (offline, tiny)"}),
    (("--model",), {"help": "demo, demo-xl, a diffusers folder or a Hugging Face id"}),
    (("--out",), {"help": "outputs directory"}),
    (("--device",), {"default": "auto", "help": "auto, cpu, cuda or cuda:N[,cuda:M...]"}),
    (("--cluster",), {"help": "run the workers on a Ray cluster: auto, ray://HEAD:10001 or HEAD:6379 "
                               "(local: on this machine; default: the config's workers)"}),
    (("--color",), {"choices": ["auto", "truecolor", "256"], "default": "auto", "help": "TUI colour depth"}),
    (("--config",), {"type": Path, "help": "config file (default: see `dreamtty config path`)"}),
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dreamtty", description="Stable Diffusion generation and DreamBooth training in the terminal")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", parser_class=_SubcommandParser)

    # Subcommand groups that live in their own modules.
    from tui import cli_jobs, cli_models, cli_queue, cli_serve, cli_styles, cli_train, cli_web

    cli_jobs.register(sub)
    sam = sub.add_parser("samplers", help="list samplers and schedules")
    sam.add_argument("--json", action="store_true")
    sam.set_defaults(func=cmd_samplers)

    for module in (cli_queue, cli_serve, cli_styles, cli_train, cli_web, cli_models):
        module.register(sub)
    return parser


def _check_global_options(args: argparse.Namespace) -> None:
    """Validate the global options in place: ``--out`` becomes a Path, ``--demo`` sets the model."""
    from backend.pool import check_devices

    _check_home()
    if args.model is not None and not args.model.strip():
        raise RequestError("model", "is empty; use demo, demo-xl, a diffusers folder or a Hugging Face id")
    if args.demo and args.model is not None:
        raise RequestError("model", f"--demo and --model {args.model} conflict; give one of them")
    if args.demo:
        args.model = "demo"
    if args.out is not None:
        if not args.out.strip():
            raise RequestError("out", "is empty; give a folder")
        args.out = Path(args.out)
    check_devices(args.device)
    if args.cluster is not None:
        from backend.ray_pool import check_cluster

        args.cluster = check_cluster(args.cluster)


def _check_home() -> None:
    """``DREAMTTY_HOME``, when set, must be a folder (created when missing)."""
    from backend.locations import make_folder

    home = os.environ.get("DREAMTTY_HOME")
    if home:
        make_folder(Path(home), "DREAMTTY_HOME")


def main(argv: list[str] | None = None) -> int:
    from tui.cli_models import apply_global_options

    args = build_parser().parse_args(argv)
    try:
        _check_global_options(args)
        apply_global_options(args)
        if args.command is None:
            from tui.app import run_app

            return run_app(args, print_warnings)
        return int(args.func(args) or 0)
    except DreamttyError as exc:
        print(f"dreamtty: {visible(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreamtty: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `dreamtty samplers | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
