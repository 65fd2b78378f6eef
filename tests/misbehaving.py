"""Adapters that misbehave as processes and leave evidence a test can check from outside.

Beside tests/planted.py's Raises / Hangs / Dies, for the isolation tests of
test_harness_processes.py: `SpawnsAndHangs` starts a grandchild process, writes its own pid and
the grandchild's to $DSV4_TEST_PID_DIR, then hangs (so a timeout or a killed sweep must take both
down); `Segfaults` dies by a real SIGSEGV (so faulthandler's traceback must reach the crashed
row's stderr tail). Then the helpers those tests watch processes with. Test fixtures only:
nothing of the harness imports this.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

from harness.backends.reference import ReferenceAdapter

PID_DIR_ENV = "DSV4_TEST_PID_DIR"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)  # a reader never sees half a pid


class SpawnsAndHangs(ReferenceAdapter):
    """A kernel wrapper that starts a helper process (a compiler, a server) and then hangs."""

    name = "spawns-and-hangs"

    def quantize(self, x, global_scale, codes_out, scales_out):
        d = Path(os.environ[PID_DIR_ENV])
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        _write(d / "grandchild", str(child.pid))
        _write(d / "worker", str(os.getpid()))
        time.sleep(600)


class Segfaults(ReferenceAdapter):
    """A kernel that reads address 0: SIGSEGV, as a wild pointer in an extension does."""

    name = "segfaults"

    def quantize(self, x, global_scale, codes_out, scales_out):
        ctypes.string_at(0)


# --------------------------------------------------------------------------------------------
# helpers for the tests that watch these processes from outside


def alive(pid: int) -> bool:
    """Running, not a zombie (a killed process no one has reaped yet is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(pred, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def case_file(tmp_path: Path, *backends: str, tokens: int = 1) -> Path:
    """One quantize case per backend (tokens, tokens + 1, ...), in order."""
    f = tmp_path / "c.yaml"
    f.write_text(
        "sweeps:\n"
        + "".join(
            f'  - stage: quantize\n    tokens: [{tokens + i}]\n    backends: ["{b}"]\n'
            for i, b in enumerate(backends)
        )
    )
    return f
