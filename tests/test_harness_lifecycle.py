"""A sweep's life as a process: a worker dies when its sweep is killed with SIGKILL; a second
run into a directory another run holds is refused, naming the holder; SIGTERM ends a sweep as
Ctrl-C does (exit 130, the case in flight killed with its group, rows kept, a resume hint)
(issue 16, points 5, 6 and 7).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli, results
from tests.misbehaving import PID_DIR_ENV, alive, case_file, wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # workers import tests.misbehaving from the cwd, like the CLI


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_killed_sweep_takes_its_worker_down_and_holds_its_lock_meanwhile(tmp_path, capsys):
    f = case_file(tmp_path, "tests.misbehaving:SpawnsAndHangs")
    out = tmp_path / "out"
    env = {**os.environ, PID_DIR_ENV: str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        str(f),
        "-o",
        str(out),
        "--isolate",
        "--no-progress",
    ]
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    worker_file = tmp_path / "worker"
    try:
        assert wait_for(worker_file.exists), "the worker never reached the kernel"
        worker = int(worker_file.read_text())
        capsys.readouterr()
        assert cli.main(cmd[3:]) == 2  # a second run, here, while the first runs there
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {out} is in use by pid {first.pid} on "), err
        first.kill()  # SIGKILL: the sweep can do nothing, the kernel must kill its worker
        first.wait(30)
        assert wait_for(lambda: not alive(worker), 10), "worker outlived its sweep"
    finally:
        first.kill()
        if worker_file.exists():  # the grandchild of a SIGKILLed sweep is orphaned (docs/cli.md)
            try:
                os.killpg(int(worker_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not results.read_rows(out)  # nothing finished, nothing half-written


def test_sigterm_ends_a_sweep_like_ctrl_c_kills_its_case_and_keeps_its_rows(tmp_path):
    f = case_file(tmp_path, "reference", "tests.misbehaving:SpawnsAndHangs")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        str(f),
        "-o",
        str(out),
        "--no-progress",
        "--isolate",
        "--threads",
        "1",
    ]
    p = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, PID_DIR_ENV: str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for((tmp_path / "grandchild").exists), "the second case never started"
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert "interrupted: 1 pairs finished in this run are kept in" in stderr
    assert "1 not run: run the same command again to resume" in stderr
    for name in ("worker", "grandchild"):  # the case in flight went down with its group
        pid = int((tmp_path / name).read_text())
        assert wait_for(lambda pid=pid: not alive(pid), 10), f"{name} outlived the sweep"
    finals = [r for r in results.read_rows(out) if r.final]
    assert [(r.outcome, r.threads) for r in finals] == [("pass", 1)]  # --threads reached
    assert (out / results.PARQUET).exists()  # the isolated child
