"""The ``dreamtty`` command. Ctrl-C while its modules load ends it as quietly as Ctrl-C later does."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from tui import cli
    except KeyboardInterrupt:
        print("dreamtty: interrupted", file=sys.stderr)
        return 130
    return cli.main()
