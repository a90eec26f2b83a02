"""The reward worker processes this test process has started, found through the OS (not through
the Scorer under test), so a test can tell that workers were killed, replaced or left behind."""
from __future__ import annotations

import psutil


def reward_workers() -> list[psutil.Process]:
    """Live reward workers: the children of this process's multiprocessing forkserver."""
    out = []
    for child in psutil.Process().children():
        try:
            if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                out += [w for w in child.children() if w.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            pass
    return out
