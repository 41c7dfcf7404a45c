"""``dreamtty web``: the TUI in a browser, served with textual-serve (``tui.web_front``); each
browser tab runs its own ``dreamtty attach``, a client of the running service (started first when
none runs). Every request must carry the service's token: the address this prints holds it.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from pathlib import Path

from backend.errors import DreamttyError
from backend.safetext import visible
from tui.cli_output import print_warnings, say_started, warn_plain_http

DEFAULT_LISTEN = "127.0.0.1:8000"


def register(subparsers) -> None:
    p = subparsers.add_parser("web", help="the TUI in a browser; each tab is a client of the service")
    p.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN,
                   help=f"where to serve the page (default {DEFAULT_LISTEN}); plain HTTP: on anything but "
                        "loopback, put TLS in front (an SSH tunnel or a reverse proxy)")
    p.set_defaults(func=cmd_web)


def cmd_web(args: argparse.Namespace) -> int:
    from backend.serve import parse_listen
    from backend.service_files import make_token, token_warnings
    from tui.cli_queue import _service_only

    try:
        from tui.web_front import WebFront
    except ImportError as exc:  # an install without its dependencies
        raise DreamttyError(f"web: needs textual-serve ({exc}); pip install 'textual-serve>=1.1.3,<1.2'") from None
    _service_only(args, "web")
    host, port = parse_listen(args.listen)
    token = make_token()  # a token file that cannot be used is said before a service is started
    print_warnings(token_warnings(token))
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown

    def listening() -> None:  # said once it serves (not before a failed listen); a script may open the address at once
        warn_plain_http(host, args.listen)
        print(visible(f"dreamtty: the TUI in a browser at http://{shown}:{port}/?token={token} (each tab is a "
                      "client of the service; Ctrl-C stops serving the page, not the service)"), flush=True)

    # the service each tab attaches to (attach never starts one): started once the address is had
    WebFront(tab_command(args), host, port, token).run(listening, lambda: _start_service(args))
    return 0


async def _start_service(args: argparse.Namespace) -> None:
    from backend.client import connect

    client = connect(args.device, cluster=args.cluster)
    try:
        await client.start()
        say_started(client)
    finally:
        await client.close()


def tab_command(args: argparse.Namespace) -> str:
    """The shell command of one browser tab: ``dreamtty attach`` with this command's global options, which the
    shell becomes (``exec``): ending the tab signals dreamtty, not a shell."""
    words = [sys.executable, "-m", "tui.cli"]
    for flag, value in (("--model", args.model), ("--out", args.out), ("--config", args.config)):
        if value is not None:
            words += [flag, str(Path(value).absolute()) if isinstance(value, Path) else str(value)]
    return "exec " + shlex.join([*words, "attach"])
