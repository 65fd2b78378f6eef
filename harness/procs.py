"""Process plumbing shared by the sweep's isolated workers and the expert-parallel rank groups.

Both start child processes that must never outlive the process that started them: a sweep
killed with SIGKILL must not leave a worker or a rank computing (or holding a GPU).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process die when the sweep that started it does (kill -9 included)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:  # no prctl: a watchdog thread polls the parent pid

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


__all__ = ["die_with_parent"]
