"""The files that keep one service per user per machine, and the token of its TCP clients.

In the user's private runtime dir (:func:`backend.locations.runtime_dir`, mode 0700): ``serve.lock``,
held with ``flock`` by the running service for its whole life (the kernel drops it when the process
dies, however it dies); ``serve.json``, where it runs (pid, socket, TCP address); ``serve.sock``, its
Unix socket (0600). Whoever holds the lock owns the other two: a socket or pid file left by a
crashed service is stale, and the next service to take the lock removes it.

The token for ``--listen HOST:PORT`` lives in the state dir (0600) and is sent as a bearer header.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from backend import locations, user_files
from backend.errors import DreamttyError, Transient

MAX_SOCKET_PATH = 103  # bytes: sun_path holds 108 on Linux and 104 on macOS, with the closing NUL
LOCK_PATIENCE = 0.5  # seconds a starting service retries the lock (another process may be probing it)
QUEUE_LOCK = "serve.lock"  # in the state dir, beside the queue: held by the service that runs it


class AlreadyRunning(DreamttyError):
    """Another service holds the lock."""

    EXIT_CODE = 3  # of a detached service that found another one running


class QueueHeld(AlreadyRunning, Transient):
    """A service of another runtime dir runs the queue (a command that needed a service here exits 3)."""

    EXIT_CODE = 4


@dataclass(frozen=True)
class ServiceFiles:
    folder: Path

    @classmethod
    def default(cls) -> "ServiceFiles":
        return cls(locations.runtime_dir())

    @property
    def socket(self) -> Path:
        return self.folder / "serve.sock"

    @property
    def pid_file(self) -> Path:
        return self.folder / "serve.json"

    @property
    def lock_file(self) -> Path:
        return self.folder / "serve.lock"

    def make_folder(self) -> None:
        """Create the folder (0700) under an existing runtime dir; refuse one that is not private."""
        base = self.folder.parent if self.folder.name.startswith(locations.HOME_PREFIX) else self.folder
        if not base.parent.is_dir():
            raise DreamttyError(f"runtime dir: {base.parent} does not exist; create it (mkdir -m 700) "
                                "or set XDG_RUNTIME_DIR to a folder of yours")
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise DreamttyError(f"runtime dir: the socket path {self.socket} is longer than {MAX_SOCKET_PATH} "
                                "bytes; set XDG_RUNTIME_DIR to a shorter folder")
        for folder in dict.fromkeys((base, self.folder)):
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise DreamttyError(f"runtime dir: cannot create {folder}: {exc.strerror}") from None
            check_private(folder, "runtime dir")

    def acquire(self) -> int:
        """Take the lock (retrying ``LOCK_PATIENCE`` seconds); returns its file descriptor, to keep
        open while the service runs. Leftover socket and pid files are removed: they are stale.
        Raises AlreadyRunning saying where the running service is."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _lock(fd, self.lock_file):
            os.close(fd)
            raise AlreadyRunning(self.running_message())
        for stale in (self.socket, self.pid_file):
            stale.unlink(missing_ok=True)
        return fd

    def locked(self) -> bool:
        """True while a service holds the lock (it runs, or is starting or stopping). The probe holds
        a shared lock for a moment, which a starting service outwaits (``LOCK_PATIENCE``)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def running_message(self) -> str:
        info = self.read_pid_file()
        if info is None:
            if not self.locked():
                return (f"service: something that is not a dreamtty service listens on {self.socket} (nothing holds "
                        f"{self.lock_file}); stop it, or remove {self.socket}")
            return f"service: another one is starting (it holds {self.lock_file})"
        where = f"socket {info.get('socket')}" + (f", http://{info['listen']}" if info.get("listen") else "")
        return f"service: one is already running (pid {info.get('pid')}, {where}); stop it with dreamtty serve --stop"

    def write_pid_file(self, info: dict) -> None:
        """Write ``info`` atomically (0600): readers never see half a file."""
        with user_files.replacing(self.pid_file) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)

    def read_pid_file(self) -> dict | None:
        try:
            info = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def remove(self) -> None:
        """Remove the socket and pid files (the lock holder, at exit)."""
        for path in (self.socket, self.pid_file):
            path.unlink(missing_ok=True)


def _lock(fd: int, path: Path) -> bool:
    """Take ``fd``'s exclusive flock, retrying ``LOCK_PATIENCE`` seconds (another process may be probing it);
    DreamttyError where the file system of ``path`` takes no locks (NFS without lockd): two services could
    then run one queue."""
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        except OSError as exc:
            os.close(fd)
            raise DreamttyError(f"lock: cannot lock {path}: {exc.strerror or exc} (a file system without locks, "
                                "as NFS without lockd); put dreamtty's folders on a local disk (DREAMTTY_HOME)") from None


def hold_queue(state: Path, info: dict) -> int | None:
    """Lock the state dir's queue for this service's life, with ``info`` (pid, socket) in the lock file: a
    second service started under another runtime dir (XDG_RUNTIME_DIR, which logind removes at the last
    logout, or set apart in two shells) must not run the same queue. The file descriptor to keep open;
    None when the folder takes no file (read-only: the queue says why). Raises AlreadyRunning."""
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(state / QUEUE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    if not _lock(fd, state / QUEUE_LOCK):
        held = _held_by(_holder(fd), state)
        os.close(fd)
        raise QueueHeld(held)
    written = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, written, 0)
    return fd


def queue_holder(state: Path) -> str | None:
    """The line naming the service (another process) that runs the state dir's queue when one does (under
    another runtime dir: this one's has none answering), else None."""
    try:
        fd = os.open(state / QUEUE_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _holder(fd)
        return None if other.get("pid") == os.getpid() else _held_by(other, state)
    except OSError:  # a file system without locks (NFS without lockd): none can be told
        return None
    finally:
        os.close(fd)  # a lock taken goes with it
    return None


def _holder(fd: int) -> dict:
    """The details (pid, socket) of the service that holds the queue lock ``fd`` ({} when it wrote none)."""
    try:
        other = json.loads(os.pread(fd, 4096, 0))
    except ValueError:
        return {}
    return other if isinstance(other, dict) else {}


def _held_by(other: dict, state: Path) -> str:
    """The line naming the service of ``other`` (its details) that holds the state dir's queue."""
    return (f"service: another one (pid {other.get('pid')}, socket {other.get('socket')}) runs the queue in "
            f"{state}, started with another runtime dir (XDG_RUNTIME_DIR); stop it, or run dreamtty with its "
            "XDG_RUNTIME_DIR")


def check_private(path: Path, what: str) -> None:
    """``path`` must be this user's and closed to group and others (no symlink followed)."""
    info = path.lstat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077 or stat.S_ISLNK(info.st_mode):
        raise DreamttyError(f"{what}: {path} is not private (owner uid {info.st_uid}, mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); remove it, or chmod go= it if it is yours")


MIN_TOKEN = 16  # characters of a token below which it is said to be guessable (a generated one has 43)


def token_file() -> Path:
    return locations.state_dir() / "serve.token"


def read_token() -> str | None:
    """The TCP token, or None when none was made; refuses a token file others may read."""
    path = token_file()
    if not path.exists():
        return None
    check_private(path, "token")
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        why = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or exc
        raise DreamttyError(f"token: cannot read {path}: {why}; delete it and a new token is made") from None


def token_warnings(token: str | None) -> list[str]:
    """A warning when ``token`` (its file is the user's to write) is short enough to guess; none without one."""
    if token is None or len(token) >= MIN_TOKEN:
        return []
    return [f"the token in {token_file()} is {len(token)} characters long, short enough to guess; delete the file "
            f"and a new one is made, or write one of {MIN_TOKEN} or more"]


def make_token() -> str:
    """The TCP token, generated (and stored 0600) on first use."""
    token = read_token()
    if token:
        return token
    path = locations.make_folder(token_file().parent, "state dir") / token_file().name
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def token_matches(given: str | None, token: str | None) -> bool:
    """Whether ``given`` is ``token`` (compared in constant time); never without a token. A header's
    undecodable bytes (lone surrogates) are compared as they are, never an error."""
    return given is not None and token is not None and hmac.compare_digest(
        given.encode(errors="surrogatepass"), token.encode(errors="surrogatepass"))


def bearer_ok(header: str, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer token."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and token_matches(given.strip(), token)
