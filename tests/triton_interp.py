"""Running a test module's checks under the Triton interpreter (TRITON_INTERPRET=1).

Triton reads the variable when it is imported, so the checks run in a child process:
`run_interpreted("tests.test_x", "_main", "x passed")` runs tests.test_x._main() there and asserts
it exited 0 and printed the marker. `needs_interpreter` skips where Triton is missing or older
than 3.7, whose interpreter cannot run a loop whose range bounds are tensors (seen with 3.6 on
the H200 host: 'only 0-dimensional arrays can be converted'); the compiled kernels are checked
there by the GPU tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _triton_version() -> tuple[int, ...]:
    if importlib.util.find_spec("triton") is None:
        return (0,)
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


needs_interpreter = pytest.mark.skipif(
    _triton_version() < (3, 7),
    reason="needs triton >= 3.7: an older interpreter cannot run a loop whose range bounds are "
    "tensors (the compiled kernels are checked by the GPU tests)",
)


def run_interpreted(module: str, func: str, marker: str, timeout: int = 300) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = f"import {module} as m; m.{func}()"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker in res.stdout, res.stdout[-2000:]
