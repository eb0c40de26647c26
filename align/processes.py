"""Processes on this machine: whether the one that left something behind (a run marked running, a half-built
model folder) is still alive. Imports nothing of align, so every layer can use it."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this ID exists on this machine (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
