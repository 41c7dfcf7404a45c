"""Process liveness, for jobs and training runs whose owner may have died."""

from __future__ import annotations

import os


def process_exists(pid: int | None) -> bool:
    """True when a process with this pid exists (it may belong to another user)."""
    if not pid or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True
