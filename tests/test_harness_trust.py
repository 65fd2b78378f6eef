"""No result lost or stale, and errors a newcomer meets in one line (issue 16).

Every data-loss check runs on real directories: a filtered `--fresh` drops only the pairs it
reruns; resume retries an earlier error and reruns a case whose budget changed or whose adapter
changed, and says so; the default output directory is per (case files, backends); a truncated
meta.json is reported in one line and rebuilt from the rows; writes are atomic. Then the CLI's
one-line errors (seed out of range, `-o` naming a file, Ctrl-C), YAML's `1e-4`, a 10^5-case
sweep loading in linear time, `--device cuda` without CUDA, `show` and the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli, results
from harness.backends.reference import ReferenceAdapter
from harness.cases import Budget, load_cases
from harness.records import Row
from tests import planted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # adapters.load imports tests.* from the cwd, like the CLI


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def finals(out: Path) -> dict[tuple[str, str], dict]:
    return {(r.case_id, r.backend): r for r in results.read_rows(out) if r.final}


TWO = "sweeps:\n  - stage: quantize\n    tokens: [1, 2]\n"


class Versioned(ReferenceAdapter):
    """The reference with a build version read from $T16_VERSION (a rebuilt kernel)."""

    name = "versioned"

    @property
    def version(self) -> str:
        return os.environ.get("T16_VERSION", "1")


class Unquantized(ReferenceAdapter):
    """The reference's fp32 twin: layer outputs off by calc_diff ~7e-3 (a budget to tighten)."""

    name = "unquantized"

    def __init__(self):
        super().__init__(quantized=False)


class InterruptsSecond(ReferenceAdapter):
    """Ctrl-C arrives during the second quantize call of the process."""

    name = "interrupts-second"
    calls = 0

    def quantize(self, *args):
        InterruptsSecond.calls += 1
        if InterruptsSecond.calls == 2:
            raise KeyboardInterrupt
        return super().quantize(*args)


class Announces(ReferenceAdapter):
    name = "announces"

    def quantize(self, *args):
        print("KERNEL RUNNING", file=sys.stderr)
        return super().quantize(*args)


# --------------------------------------------------------------------------------------------
# 1. --fresh drops only what it reruns


def test_filtered_fresh_keeps_other_backends_and_cases(tmp_path, capsys):
    f = write(tmp_path / "c.yaml", TWO)
    out = tmp_path / "out"
    ids = [c.id for c in load_cases(f)[1]]
    other = "tests.planted:RoundHalfAway"
    assert (
        cli.main(["run", str(f), "-o", str(out), "-b", "reference", "-b", other, "--no-progress"])
        == 0
    )
    before = finals(out)
    assert len(before) == 4
    capsys.readouterr()
    assert (
        cli.main(
            [
                "run",
                str(f),
                "-o",
                str(out),
                "-b",
                "reference",
                "-k",
                "t1_",
                "--fresh",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "fresh: dropped 4 earlier rows of the 1 pairs to run; kept 12 rows" in (
        capsys.readouterr().err
    )
    after = finals(out)
    assert set(after) == set(before)  # nothing lost
    rerun = (ids[0], "reference")
    assert after[rerun].run_id != before[rerun].run_id
    for k in set(before) - {rerun}:
        assert after[k].run_id == before[k].run_id, k
    assert (
        sum(r.case_id == ids[0] and r.backend == "reference" for r in results.read_rows(out)) == 4
    )  # its old rows are gone, not duplicated


# --------------------------------------------------------------------------------------------
# 2. resume: errors retried, changed cases and adapters rerun, and said


def test_resume_retries_an_error_after_the_fix(tmp_path, monkeypatch, capsys):
    f = write(tmp_path / "c.yaml", TWO)
    out = tmp_path / "out"
    args = ["run", str(f), "-o", str(out), "-b", "tests.planted:kernel_build", "--no-progress"]
    monkeypatch.setenv(planted.BUILD_ENV, "Raises")  # an import error, say
    assert cli.main(args) == 1
    first = finals(out)
    assert {r.outcome for r in first.values()} == {"error"}
    monkeypatch.delenv(planted.BUILD_ENV)  # fixed
    assert cli.main([*args, "--keep-errors"]) == 1  # asked to keep them: kept
    assert finals(out) == first
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "rerunning 2: 2 earlier error (--keep-errors keeps them)" in err
    assert {r.outcome for r in finals(out).values()} == {"pass"}


def test_resume_reruns_a_case_whose_budget_changed(tmp_path, capsys):
    spec = "sweeps:\n  - stage: grouped_linear\n    tokens: [1]\n    budget: {calc_diff: %s}\n"
    f = write(tmp_path / "c.yaml", spec % "1e-1")
    out = tmp_path / "out"
    args = [
        "run",
        str(f),
        "-o",
        str(out),
        "-b",
        "tests.test_harness_trust:Unquantized",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 0  # unchanged: reused
    assert "resume: reusing 1 finished pairs" in capsys.readouterr().err
    write(f, spec % "1e-3")  # tightened: the old pass no longer answers it
    assert cli.main(args) == 1
    assert "rerunning 1: 1 case definition changed" in capsys.readouterr().err
    (row,) = finals(out).values()
    assert row.outcome == "fail" and "budget 0.001" in row.message


def test_resume_reruns_when_the_adapter_changed(tmp_path, monkeypatch, capsys):
    f = write(tmp_path / "c.yaml", TWO)
    out = tmp_path / "out"
    args = [
        "run",
        str(f),
        "-o",
        str(out),
        "-b",
        "tests.test_harness_trust:Versioned",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    first = finals(out)
    monkeypatch.setenv("T16_VERSION", "2")
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "rerunning 2: 2 adapter changed" in capsys.readouterr().err
    assert not {r.run_id for r in finals(out).values()} & {r.run_id for r in first.values()}


# --------------------------------------------------------------------------------------------
# 3. default output directory per (case files, backends)


def test_default_output_directory_is_per_case_file_and_backends(tmp_path, monkeypatch):
    f = write(tmp_path / "mine.yaml", TWO)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(f), "--no-progress"]) == 0
    assert cli.main(["run", str(f), "-b", "tests.planted:Raises", "--no-progress"]) == 1
    main_job = finals(tmp_path / "reports" / "mine")
    other = finals(tmp_path / "reports" / "mine-tests.planted_Raises")
    assert {b for _, b in main_job} == {"reference"}
    assert {b for _, b in other} == {"tests.planted:Raises"}
    assert cli.default_out(["cases/smoke.yaml"], None, "cuda") == Path("reports/smoke-cuda")


# --------------------------------------------------------------------------------------------
# 4. meta.json: atomic, and a damaged one recovered


def test_truncated_meta_is_reported_in_one_line_and_rebuilt(tmp_path, capsys):
    f = write(tmp_path / "c.yaml", TWO)
    out = tmp_path / "out"
    assert cli.main(["run", str(f), "-o", str(out), "--no-progress"]) == 0
    meta = out / results.META
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])  # killed mid-write by an older version
    results._reported.clear()
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {meta} is damaged (JSONDecodeError")
    assert "rebuilt 1 runs" in err[0]
    results._reported.clear()
    assert cli.main(["run", str(f), "-o", str(out), "--no-progress"]) == 0
    runs = json.loads(meta.read_text())["runs"]  # whole again: the recovered run and the new one
    assert [r.get("recovered", False) for r in runs] == [True, False]
    assert (out / (results.META + ".damaged")).read_text() == text[: len(text) // 2]


def test_a_write_that_dies_leaves_the_old_file_whole(tmp_path, monkeypatch):
    p = tmp_path / results.META
    results.atomic_write(p, '{"runs": []}')

    def dies(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(OSError, match="disk full"):
        results.atomic_write(p, '{"runs": [{"run_id": "x"}]}')
    assert p.read_text() == '{"runs": []}'
    assert sorted(x.name for x in tmp_path.iterdir()) == [results.META]  # no temp file left


def test_a_held_directory_is_refused_naming_the_holder(tmp_path, capsys):
    f = write(tmp_path / "c.yaml", TWO)
    out = tmp_path / "out"
    with results.locked(out, "python -m harness run other.yaml"):
        assert cli.main(["run", str(f), "-o", str(out), "--no-progress"]) == 2
        assert cli.main(["merge", str(out), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by pid {os.getpid()}" in err and "(python -m harness run other.yaml)" in err
    assert not (out / results.JSONL).exists()


# --------------------------------------------------------------------------------------------
# 7. one line instead of a traceback


def test_seed_beyond_int64_is_one_line(tmp_path, capsys):
    big = "sweeps:\n  - stage: quantize\n    seeds: [18446744073709551616]\n"
    f = write(tmp_path / "c.yaml", big)
    assert cli.main(["run", str(f), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {f}: sweeps[0].seeds: 18446744073709551616 out of range (0 <= seed < 2**32)"
    )


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    f = write(tmp_path / "c.yaml", TWO)
    target = write(tmp_path / "notes.txt", "mine")
    assert cli.main(["run", str(f), "-o", str(target), "--no-progress"]) == 2
    assert cli.main(["merge", str(tmp_path), "-o", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: -o {target}: is a file; give a results directory"] * 2
    assert target.read_text() == "mine"


def test_ctrl_c_keeps_what_finished_and_says_how_to_resume(tmp_path, capsys):
    f = write(tmp_path / "c.yaml", "sweeps:\n  - stage: quantize\n    tokens: [1, 2, 3]\n")
    out = tmp_path / "out"
    args = ["run", str(f), "-o", str(out), "--no-progress"]
    InterruptsSecond.calls = 0
    assert cli.main([*args, "-b", "tests.test_harness_trust:InterruptsSecond"]) == 130
    err = capsys.readouterr().err
    assert (
        "interrupted: 1 pairs finished in this run are kept in "
        f"{out / results.JSONL}; 2 not run: run the same command again"
    ) in err
    assert len(finals(out)) == 1 and (out / results.PARQUET).exists()
    assert cli.main([*args, "-b", "tests.test_harness_trust:InterruptsSecond"]) == 0
    assert "resume: reusing 1 finished pairs" in capsys.readouterr().err
    assert len(finals(out)) == 3


# --------------------------------------------------------------------------------------------
# 8. YAML 1.1's 1e-4, a huge sweep


def test_docs_default_budget_parses_as_a_number(tmp_path):
    f = write(
        tmp_path / "c.yaml",
        "sweeps:\n  - stage: shared_expert\n"
        "    budget: {calc_diff: 1e-4, atol: 5E-3, rtol: 1e-2}\n",
    )
    (case,) = load_cases(f)[1]
    assert case.budget == Budget(calc_diff=1e-4, atol=5e-3, rtol=1e-2)


def test_a_hundred_thousand_cases_load_and_the_count_comes_first(tmp_path, capsys):
    seeds = ", ".join(str(s) for s in range(100))
    tokens = ", ".join(str(t) for t in range(1, 1001))
    f = write(
        tmp_path / "big.yaml",
        f"sweeps:\n  - stage: quantize\n    tokens: [{tokens}]\n    seeds: [{seeds}]\n",
    )
    # quadratic duplicate check: 10^10 string compares (minutes); linear: about a second
    one = "quantize_t999_h256_normal_rdyn_s99"
    assert (
        cli.main(
            [
                "run",
                str(f),
                "-o",
                str(tmp_path / "o"),
                "-k",
                one,
                "-b",
                "tests.test_harness_trust:Announces",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.index("100000 cases, 1 (case, backend) pairs ->") < err.index("KERNEL RUNNING")


# --------------------------------------------------------------------------------------------
# 9. quiet failures made loud


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_case_without_cuda_is_unsupported_with_the_reason(tmp_path, capsys):
    f = write(tmp_path / "c.yaml", TWO)
    assert (
        cli.main(["run", str(f), "-o", str(tmp_path / "o"), "--device", "cuda", "--no-progress"])
        == 0
    )
    rows = finals(tmp_path / "o").values()
    assert {r.outcome for r in rows} == {"unsupported"}
    assert {r.message for r in rows} == {
        "case needs cuda; torch.cuda.is_available() is False on this machine"
    }
    out = capsys.readouterr().out
    assert "unsupported reference                2 cases: case needs cuda" in out
    assert "this run: 2 unsupported; reused from earlier runs: 0" in out  # no raw dict


def test_usage_hides_the_worker_and_show_prints_whole_tracebacks(tmp_path, capsys):
    usage = cli._parser().format_help()
    assert cli.COMMANDS_SHOWN in usage and "worker" not in usage
    assert set(cli.COMMANDS_SHOWN.strip("{}").split(",")) == set(cli.COMMANDS) - {"worker"}
    f = write(tmp_path / "c.yaml", TWO)
    out = tmp_path / "out"
    cli.main(["run", str(f), "-o", str(out), "-b", "tests.planted:Raises", "--no-progress"])
    tb = finals(out)[(load_cases(f)[1][0].id, "tests.planted:Raises")].metrics["traceback"]
    assert len(tb) > 400
    capsys.readouterr()
    assert cli.main(["show", str(out), load_cases(f)[1][0].id]) == 0
    shown = capsys.readouterr().out
    for line in tb.strip().splitlines():
        assert line in shown


def test_summary_lists_failures_before_grouped_unsupported():
    rows = [
        Row(
            outcome="unsupported",
            backend="b",
            case_id=f"c{i}",
            compare="case",
            message="needs sm_100",
            final=True,
        )
        for i in range(60)
    ]
    rows.append(
        Row(
            outcome="fail",
            backend="b",
            case_id="bad",
            compare="case",
            message="real mismatch",
            final=True,
        )
    )
    lines = cli.summary_table(rows).splitlines()
    assert lines[0] == "outcome counts: fail=1, unsupported=60"
    assert lines[1].startswith("  fail") and "bad: real mismatch" in lines[1]
    assert lines[2:] == ["  unsupported b                        60 cases: needs sm_100"]


# --------------------------------------------------------------------------------------------
# 10. threads


def test_xdist_workers_share_the_cores(tmp_path):
    f = write(tmp_path / "c.yaml", "sweeps:\n  - stage: quantize\n    tokens: [1, 2, 3, 4]\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "2",
            str(f),
            "--harness-results",
            str(tmp_path / "res"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    threads = {r.threads for r in results.read_rows(tmp_path / "res") if r.final}
    cores = len(os.sched_getaffinity(0))
    assert threads == {max(1, cores // 2)}
