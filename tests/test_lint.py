"""The tree passes ruff (STYLE.md rule 12: ruff at 100 columns), lint and format, so CI holds it.

`ruff check` and `ruff format --check` of the project's own folders (not of whatever else lies in
a working copy, such as an unpacked wheel), with the settings of pyproject.toml; a failure prints
ruff's own report (file, line, rule). Skipped where ruff is not installed (it is in the dev extra,
pinned: another ruff may format otherwise).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAS_RUFF = importlib.util.find_spec("ruff") is not None
PATHS = ["dsv4", "reference", "harness", "bench", "tests", "docs", "conftest.py"]


@pytest.mark.skipif(not HAS_RUFF, reason="needs ruff (pip install -e '.[dev]')")
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_passes(args):
    res = subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"ruff {' '.join(args)}:\n{res.stdout[-4000:]}{res.stderr[-2000:]}"
