"""The sweep runner and the CLI around it: every pair ends as a row, whatever the kernel does.

Isolated runs turn a raising kernel into `error`, a hanging one into `timeout` and one that kills
its process into `crashed`, and the sweep goes on. A sweep killed midway (the whole process, by
os._exit in a planted adapter) resumes without redoing finished pairs; shards merge back into
the unsharded set; `compare` finds a regression between two builds of one backend; exit codes
are 0 / 1 / 2 as cli.py documents. Processes are spawned only where the process is the point
(kill, exit code); the rest calls `harness.cli.main` in process to keep the suite fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli, results
from harness.cases import load_cases
from harness.runner import SweepOptions, run_sweep
from tests import planted

REPO = Path(__file__).resolve().parents[1]


def harness_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m harness ...` from the repo root, so tests.planted:* import paths resolve."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # adapters.load imports tests.planted from the cwd, like the CLI


# --------------------------------------------------------------------------------------------
# isolation: error, timeout, crashed


ISOLATED = """\
name: misbehaving
sweeps:
  - stage: quantize
    tokens: [1]
    backends: ["tests.planted:Raises"]
  - stage: quantize
    tokens: [2]
    backends: ["tests.planted:Hangs"]
    timeout_s: 10   # the worker imports torch first (~3-5 s), then sleeps 600 s
  - stage: quantize
    tokens: [3]
    backends: ["tests.planted:Dies"]
"""


def test_isolated_sweep_records_error_timeout_and_crash(tmp_path):
    _, cases = load_cases(write(tmp_path / "bad.yaml", ISOLATED))
    out = tmp_path / "out"
    counts = run_sweep(cases, out, SweepOptions(isolate=True, progress=False))
    assert counts["error"] == counts["timeout"] == counts["crashed"] == 1
    finals = {r.backend.split(":")[1]: r for r in results.read_rows(out) if r.final}
    assert {k: r.outcome for k, r in finals.items()} == {
        "Raises": "error",
        "Hangs": "timeout",
        "Dies": "crashed",
    }
    assert finals["Raises"].message.startswith("RuntimeError: planted failure in quantize")
    assert "planted.py" in finals["Raises"].metrics["traceback"]
    assert finals["Hangs"].message == "killed after 10 s"
    assert finals["Dies"].message == "process killed by signal 9"
    assert {r.case_id for r in finals.values()} == {c.id for c in cases}
    assert (out / results.PARQUET).exists()


def test_in_process_error_becomes_a_row(tmp_path):
    _, cases = load_cases(
        write(tmp_path / "c.yaml", "sweeps:\n  - stage: quantize\n    tokens: [1, 2]\n")
    )
    counts = run_sweep(
        cases,
        tmp_path / "out",
        SweepOptions(
            backends=("tests.planted:Raises", "no_such_module_xyz:Adapter"), progress=False
        ),
    )
    assert counts["error"] == 4
    rows = results.read_rows(tmp_path / "out")
    assert len(rows) == 4 and all(r.final for r in rows)
    unknown = [r.message for r in rows if r.backend.startswith("no_such")]
    assert all("no module named 'no_such_module_xyz'" in m for m in unknown)


# --------------------------------------------------------------------------------------------
# resume


RESUMABLE = """\
sweeps:
  - stage: quantize
    tokens: [1, 2, 3, 4, 5]
    backends: ["tests.planted:ExitsAtNth"]
"""


def test_killed_sweep_resumes_without_redoing_finished_cases(tmp_path):
    f = write(tmp_path / "resumable.yaml", RESUMABLE)
    out = tmp_path / "out"
    ids = [c.id for c in load_cases(f)[1]]
    first = harness_cli(
        "run", str(f), "-o", str(out), "--no-progress", env={planted.EXIT_AT_ENV: "3"}
    )
    assert first.returncode == 3, first.stderr  # os._exit inside the third case
    rows = results.read_rows(out)
    assert [r.case_id for r in rows if r.final] == ids[:2]
    run1 = {r.run_id for r in rows}
    assert len(run1) == 1

    second = harness_cli("run", str(f), "-o", str(out), "--no-progress")
    assert second.returncode == 0, second.stdout + second.stderr
    rows = results.read_rows(out)
    finals = [r for r in rows if r.final]
    assert sorted(r.case_id for r in finals) == sorted(ids)  # each exactly once
    assert all(r.outcome == "pass" for r in finals)
    assert {r.run_id for r in finals if r.case_id in ids[:2]} == run1  # not redone
    assert not {r.run_id for r in finals if r.case_id in ids[2:]} & run1
    runs = results.read_meta(out)["runs"]
    assert [(r["pairs"], r["resumed"]) for r in runs] == [(5, 0), (5, 2)]


def test_resume_after_a_torn_last_line_keeps_every_row(tmp_path):
    f = write(tmp_path / "c.yaml", "sweeps:\n  - stage: quantize\n    tokens: [1, 2]\n")
    _, cases = load_cases(f)
    out = tmp_path / "out"
    run_sweep(cases[:1], out, SweepOptions(progress=False))
    with open(out / results.JSONL, "a") as fh:  # killed in the middle of writing a row
        fh.write('{"case_id": "' + cases[1].id + '", "compare": "quantize.co')
    run_sweep(cases, out, SweepOptions(progress=False))
    rows = [r for r in results.read_rows(out) if r.case_id == cases[1].id]
    assert {r.compare for r in rows} == {
        "quantize.codes",
        "quantize.scales",
        "quantize.global_scale",
        "case",
    }


# --------------------------------------------------------------------------------------------
# shards, merge, filter


SHARDABLE = """\
sweeps:
  - stage: quantize
    tokens: [1, 2, 3]
    distributions: [normal, fp4_grid]
  - stage: scale_assembly
    tokens: [1, 5]
"""


def test_shards_merge_to_the_unsharded_set(tmp_path):
    f = write(tmp_path / "s.yaml", SHARDABLE)
    _, cases = load_cases(f)
    ids = {c.id for c in cases}
    parts = []
    for i in range(2):
        d = tmp_path / f"shard{i}"
        assert cli.main(["run", str(f), "-o", str(d), "--shard", f"{i}/2", "--no-progress"]) == 0
        parts.append({r.case_id for r in results.read_rows(d) if r.final})
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    merged = tmp_path / "merged"
    assert (
        cli.main(["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "-o", str(merged)])
        == 0
    )
    rows = results.read_rows(merged)
    assert {r.case_id for r in rows if r.final} == ids
    assert len(results.read_meta(merged)["runs"]) == 2
    assert len(results.read_rows(merged / results.PARQUET)) == len(rows)


def test_case_filter_runs_only_matching_cases(tmp_path):
    f = write(tmp_path / "s.yaml", SHARDABLE)
    out = tmp_path / "out"
    assert (
        cli.main(
            ["run", str(f), "-o", str(out), "-k", "fp4_grid,scale_assembly_t5", "--no-progress"]
        )
        == 0
    )
    got = {r.case_id for r in results.read_rows(out) if r.final}
    want = {c.id for c in load_cases(f)[1] if "fp4_grid" in c.id or "scale_assembly_t5" in c.id}
    assert got == want and len(got) == 4


# --------------------------------------------------------------------------------------------
# CLI: exit codes, compare, show


TIES = """\
sweeps:
  - stage: quantize
    tokens: [5]
    distributions: [normal, midpoints]
"""


def test_cli_exit_codes_of_run(tmp_path):
    f = write(tmp_path / "ties.yaml", TIES)
    ok = harness_cli("run", str(f), "-o", str(tmp_path / "ok"), "--no-progress")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [r.outcome for r in results.read_rows(tmp_path / "ok") if r.final] == ["pass"] * 2
    bad = harness_cli(
        "run",
        str(f),
        "-o",
        str(tmp_path / "bad"),
        "--no-progress",
        "-b",
        "tests.planted:RoundHalfAway",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "quantize_t5_h256_midpoints_rdyn_s0" in bad.stdout  # the summary names the failure
    malformed = write(tmp_path / "malformed.yaml", "sweeps:\n  - stage: quantize\n    tokns: [1]\n")
    usage = harness_cli("run", str(malformed), "-o", str(tmp_path / "m"))
    assert usage.returncode == 2
    lines = usage.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{malformed}: sweeps[0].tokns: unknown field" in lines[0]
    assert not (tmp_path / "m").exists()


def test_compare_reports_a_regression_between_two_builds(tmp_path, monkeypatch, capsys):
    f = write(tmp_path / "ties.yaml", TIES)
    backend = "tests.planted:kernel_build"  # same backend name, two "commits"
    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.delenv(planted.BUILD_ENV, raising=False)
    assert cli.main(["run", str(f), "-o", str(old), "-b", backend, "--no-progress"]) == 0
    monkeypatch.setenv(planted.BUILD_ENV, "RoundHalfAway")
    assert cli.main(["run", str(f), "-o", str(new), "-b", backend, "--no-progress"]) == 1
    capsys.readouterr()

    tie = "quantize_t5_h256_midpoints_rdyn_s0"
    d = results.compare_sets(results.read_rows(old), results.read_rows(new))
    assert [k for k, _, _ in d["regressions"]] == [(tie, backend)]
    assert len(d["unchanged"]) == 1 and not d["new_failures"] and not d["missing"]
    assert cli.main(["compare", str(old), str(new)]) == 1
    assert tie in capsys.readouterr().out

    assert cli.main(["compare", str(new), str(old)]) == 0  # the fix: an improvement
    d = results.compare_sets(results.read_rows(new), results.read_rows(old))
    assert [k for k, _, _ in d["improvements"]] == [(tie, backend)] and not d["regressions"]


def test_compare_flags_failures_of_a_new_backend(tmp_path, capsys):
    f = write(tmp_path / "ties.yaml", TIES)
    ref, kern = tmp_path / "ref", tmp_path / "kern"
    assert cli.main(["run", str(f), "-o", str(ref), "--no-progress"]) == 0
    assert (
        cli.main(
            ["run", str(f), "-o", str(kern), "--no-progress", "-b", "tests.planted:RoundHalfAway"]
        )
        == 1
    )
    capsys.readouterr()
    assert cli.main(["compare", str(ref), str(kern)]) == 1
    d = results.compare_sets(results.read_rows(ref), results.read_rows(kern))
    assert len(d["new_failures"]) == 1 and len(d["missing"]) == 2 and not d["regressions"]


def test_show_prints_metrics(tmp_path, capsys):
    f = write(tmp_path / "ties.yaml", TIES)
    out = tmp_path / "out"
    cli.main(["run", str(f), "-o", str(out), "--no-progress", "-b", "tests.planted:RoundHalfAway"])
    capsys.readouterr()
    assert cli.main(["show", str(out), "quantize_t5_h256_midpoints_rdyn_s0"]) == 0
    text = capsys.readouterr().out
    assert "[tests.planted:RoundHalfAway] quantize.codes: fail" in text
    assert re.search(r"n_mismatch\s+[1-9]\d*", text) and "first_mismatch" in text
    assert "[tests.planted:RoundHalfAway] quantize.scales: pass" in text
    assert cli.main(["show", str(out), "no_such_case"]) == 2
    assert "no rows for case 'no_such_case'" in capsys.readouterr().err


def test_fingerprint_names_the_commit_or_nothing(tmp_path):
    from harness.results import _command, fingerprint

    sha = fingerprint()["git_sha"]
    assert sha is None or re.fullmatch(r"[0-9a-f]{40}", sha), sha
    # outside a repository git echoes its argument ("HEAD") and fails: that is no sha
    assert _command(["git", "rev-parse", "HEAD"], tmp_path) is None
