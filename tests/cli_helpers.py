"""The dreamtty command run in the test process, as a finished process: its exit status and what it printed.

Its jobs run on this process's worker fork server, warm after the first; a new ``python -m tui.cli`` spends
seconds importing torch and diffusers again for each."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from tui.cli import main


def dreamtty(capsys, *argv: str, stdin: str | None = None, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """``dreamtty ARGV`` with ``stdin`` as its standard input and ``env`` added to the environment."""
    capsys.readouterr()  # what the test printed before
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        if stdin is not None:
            patch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["dreamtty", *argv], code, out, err)
