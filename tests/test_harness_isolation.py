"""Isolated cases with real processes: a timed-out case takes its grandchildren down with it
(one process group per case, killed as a group) and its row's stderr tail shows where it hung
(faulthandler on SIGUSR1); a segfaulting case's row carries faulthandler's traceback; the
thread budget divides the cores (issue 16, points 6 and 10).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from harness import cli, results
from harness.runner import thread_budget
from tests.misbehaving import PID_DIR_ENV, alive, case_file, wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # workers import tests.misbehaving from the cwd, like the CLI


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_timeout_kills_the_grandchild_and_a_segfault_keeps_its_traceback(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(PID_DIR_ENV, str(tmp_path))
    f = case_file(tmp_path, "tests.misbehaving:SpawnsAndHangs", "tests.misbehaving:Segfaults")
    out = tmp_path / "out"
    # --timeout without --isolate: said, and enforced (an in-process case could not be stopped).
    # 20 s: the worker imports torch (~4-5 s alone, 12+ s on a loaded 2-core machine) first.
    rc = cli.main(["run", str(f), "-o", str(out), "--timeout", "20", "--no-progress"])
    assert rc == 1
    assert "--timeout runs each case in its own process" in capsys.readouterr().err
    finals = {r.backend: r for r in results.read_rows(out) if r.final}
    hung = finals["tests.misbehaving:SpawnsAndHangs"]
    assert hung.outcome == "timeout"
    assert "in quantize" in hung.metrics["stderr_tail"]  # faulthandler: where it hung
    grandchild = int((tmp_path / "grandchild").read_text())
    assert wait_for(lambda: not alive(grandchild), 10), "grandchild outlived its case"
    crashed = finals["tests.misbehaving:Segfaults"]
    assert crashed.outcome == "crashed"
    assert crashed.message == "process killed by signal 11"
    tail = crashed.metrics["stderr_tail"]
    assert "Segmentation fault" in tail and "misbehaving.py" in tail
    with results.locked(out):  # the sweep released its directory
        pass


def test_thread_budget_divides_the_affinity_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [thread_budget(w) for w in (1, 2, 3, 32)] == [16, 8, 5, 1]
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")  # default: pytest -n 4's share
    assert thread_budget() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert thread_budget(2) == 3
