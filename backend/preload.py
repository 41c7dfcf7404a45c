"""What the workers' fork server imports once (see ``backend.pool``): torch, diffusers and transformers with the
pipelines a worker runs. A worker forked from it starts in well under a second instead of importing them again
(~6 s of CPU each time one starts or is restarted after a crash), and the workers share those pages.

Of dreamtty's own code only what finds and writes its log is imported here: the rest is read by each worker from
disk, so a worker still notices code changed under a running service (``backend.versions``). The fork server's output goes to a
log, never to the terminal a TUI draws on; a library that fails to import here fails again, with its traceback,
in the worker's own log.
"""

from __future__ import annotations

import importlib
import os
import traceback
from pathlib import Path

from backend import service_log

MODULES = (
    "torch",
    "transformers",
    "diffusers",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
)


def _log_output() -> None:
    """Point stdout and stderr at ``logs/preload.log`` (import warnings land there), else at nothing."""
    try:
        service_log.output_to(service_log.log_file("preload.log"))
    except OSError:
        service_log.output_to(Path(os.devnull))


def _preload() -> None:
    _log_output()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # the fork server starts regardless; a worker importing it fails in its own log
            traceback.print_exc()
            return


_preload()
