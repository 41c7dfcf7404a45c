"""What every ``dreamtty`` command prints: one-line errors and warnings, a progress line, parsers
that report bad usage in one line. Text from users, files and images goes through ``backend.safetext``
(control characters written out; an error or a warning on one line)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from backend.events import PUBLISHED, Event, Step
from backend.safetext import error_line
from backend.values import plain_float, to_int


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (exit 2), never a usage dump.

    A value that starts with a minus and a digit, or is ``-inf`` or ``-nan``, is a value, never an option:
    ``--adm-scale -1,1,0.5`` (Python 3.13's argparse reads it so; 3.11 took only a plain negative number), and
    ``--cfg -inf`` is refused as a number out of range, not as "expected one argument" (nor ``--seed -nan`` as
    ``-n an``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)

    def _parse_optional(self, arg_string: str):
        # argparse matches "-nan" as -n (a short option) with "an" attached before it asks the matcher
        if self._negative_number_matcher.match(arg_string) and not self._has_negative_number_optionals:
            return None
        return super()._parse_optional(arg_string)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {error_line(message)}\n")


def integer(text: str) -> int:
    """argparse's ``type`` for a whole number in ASCII, as a preset or train.yaml takes it ("1e3" is 1000;
    ``int()`` also reads "٣" as 3, "1_0" as 10)."""
    return to_int("", text)  # its RequestError is a ValueError: argparse says "invalid integer value: 'TEXT'"


def id_number(text: str) -> int:
    """argparse's ``type`` for a job's id: a whole number of ASCII digits, 1 or more."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id; give a number 1 or more")
    return int(text)


def number(text: str) -> float:
    """argparse's ``type`` for a number in ASCII (``float()`` also reads other scripts' digits, and "1_0" as 10)."""
    return plain_float(text)


def given(text: str) -> str:
    """argparse's ``type`` for text that must not be empty (an empty value would quietly mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a value or leave the option out")
    return text


def add_list_show(subparsers, name: str, about: str, list_about: str, show_about: str,
                  cmd_list: Callable, cmd_show: Callable) -> argparse.ArgumentParser:
    """``dreamtty NAME list|show [--json]``: a library's items, and one of them by name; the list's parser."""
    parser = subparsers.add_parser(name, help=about)
    sub = parser.add_subparsers(dest=f"{name}_command", metavar="list|show", required=True, parser_class=type(parser))
    listing = sub.add_parser("list", help=list_about)
    listing.add_argument("--json", action="store_true", help="one JSON array on stdout")
    listing.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help=show_about)
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    return listing


def file_path(text: str) -> Path:
    """argparse's ``type`` for a file's path; empty text is refused (``Path("")`` is the working folder)."""
    return Path(given(text))


def say_started(client) -> None:
    """Say so when ``client`` started the background service: it outlives the command, holding what it loaded
    (a GPU's memory)."""
    if client.started:
        print(f"dreamtty: started the service in the background (pid {client.started}); it stays, keeping models "
              "loaded for the next command: dreamtty serve --stop ends it", file=sys.stderr)


def print_warnings(warnings: list[str]) -> None:
    """Each warning as a ``dreamtty: warning:`` line on stderr."""
    for warning in warnings:
        print(f"dreamtty: warning: {error_line(warning)}", file=sys.stderr)


class LastResort(logging.Handler):
    """``logging.lastResort`` of a command: a warning or an error logged where no handler is set (by the service a
    ``--local`` command runs in-process) as one ``dreamtty: warning:`` line on stderr, not Python's bare message
    (and traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, PUBLISHED, False):  # also a Log event, printed as the command follows its jobs
            return
        print(f"dreamtty: {record.levelname.lower()}: {error_line(record.getMessage())}", file=sys.stderr)


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def update(self, event: Event) -> None:
        if not self.enabled or not isinstance(event, Step):
            return
        width = 24
        filled = int(width * event.step / event.total)
        sys.stderr.write(
            f"\r[{'#' * filled}{'-' * (width - filled)}] image {event.image + 1}/{event.count} "
            f"step {event.step}/{event.total} {event.its:.1f} it/s ETA {event.eta:.0f}s  "
        )
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def warn_plain_http(host: str, listen: str) -> None:
    """Say on stderr that ``listen`` (beyond loopback) serves plain HTTP, the token included."""
    from backend.serve import is_loopback

    if not is_loopback(host):
        print(error_line(f"dreamtty: serving plain HTTP on {listen}, the token in clear; put TLS in front of it "
                         "(an SSH tunnel or a reverse proxy)"), file=sys.stderr)
