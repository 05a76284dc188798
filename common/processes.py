"""Is a process still running? Answers which pid-named leftovers (temporary files, folders) are stale."""
from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (this process is, whatever the OS says)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
