"""Bisection over git history: which commit broke a case (docs/bisect.md).

`check(...)` runs case files on backends and maps the outcome to `git bisect run`'s exit codes:
0 good (every pair passed), 1 bad (a pair failed, errored, timed out or crashed), 125 untestable
(an adapter that does not import, a case file that does not load, or nothing runnable here, e.g.
every pair unsupported for want of a device). `python -m harness bisect-check` is that command.

`bisect(repo, good, bad, args)` drives `git bisect run` in a temporary worktree of `repo` (bisect
state is per worktree), so the user's checkout, branch and index are never touched; the worktree
is removed afterwards. The judge is the harness and reference of the checkout that runs `bisect`
(`--judge current`, the default: old commits are judged by today's oracle), put ahead of the
commit under test on `PYTHONPATH`; `--judge commit` uses each commit's own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import adapters, results

GOOD, BAD, UNTESTABLE = 0, 1, 125
_JUDGE = ("harness", "reference")  # the packages that decide a verdict


def check(
    case_paths: list[str],
    backends: tuple[str, ...] | None,
    case_filter: str | None = None,
    device: str | None = None,
    isolate: bool = False,
    say=print,
) -> int:
    """GOOD, BAD or UNTESTABLE for `git bisect run`; says why in one line."""
    from harness.cases import CaseError, load_many
    from harness.runner import SweepOptions, run_sweep

    try:
        cases = load_many(case_paths)
    except (CaseError, FileNotFoundError) as e:
        say(f"bisect-check: untestable: {e}")
        return UNTESTABLE
    if device:
        cases = [dataclasses.replace(c, device=device) for c in cases]
    for b in sorted(set(backends or {b for c in cases for b in c.backends})):
        try:
            adapters.load(b)
        except Exception as e:  # noqa: BLE001 - a build or import failure: this commit cannot tell
            say(f"bisect-check: untestable: adapter {b!r} does not load: {type(e).__name__}: {e}")
            return UNTESTABLE
    opts = SweepOptions(
        backends=backends, isolate=isolate, resume=False, progress=False, case_filter=case_filter
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_sweep(cases, tmp, opts, say=lambda line: None)
        finals = [r for r in results.latest(results.read_rows(tmp)) if r.final]
    bad = [r for r in finals if r.outcome.bad]
    ran = [r for r in finals if r.outcome.ran]
    if bad:
        r = bad[0]
        say(
            f"bisect-check: bad: {len(bad)} of {len(finals)} pairs, first {r.outcome} "
            f"{r.backend} {r.case_id}: {r.message[:200]}"
        )
        return BAD
    if not ran:
        say(f"bisect-check: untestable: none of {len(finals)} pairs could run here")
        return UNTESTABLE
    say(f"bisect-check: good: {len(ran)} pairs passed")
    return GOOD


@dataclass
class BisectResult:
    first_bad: str | None  # full sha, None when git bisect did not name one
    subject: str
    log: str  # everything git bisect printed


def _git(repo: Path, *args: str, check_rc: bool = True) -> str:
    p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check_rc and p.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip()


def _judge_path(tmp: Path) -> Path:
    """A folder holding only the judge packages of this checkout (links), for PYTHONPATH."""
    here = Path(__file__).resolve().parents[1]
    judge = tmp / "judge"
    judge.mkdir()
    for pkg in _JUDGE:
        (judge / pkg).symlink_to(here / pkg, target_is_directory=True)
    return judge


def bisect(
    repo: str | Path,
    good: str,
    bad: str,
    check_args: list[str],
    judge: str = "current",
    say=print,
) -> BisectResult:
    """Find the first bad commit between `good` and `bad` of `repo` with `bisect-check`."""
    repo = Path(_git(Path(repo), "rev-parse", "--show-toplevel"))
    good_sha, bad_sha = (
        _git(repo, "rev-parse", "--verify", f"{r}^{{commit}}") for r in (good, bad)
    )
    tmp = Path(tempfile.mkdtemp(prefix="harness-bisect-"))
    wt = tmp / "worktree"
    try:
        _git(repo, "worktree", "add", "--detach", str(wt), bad_sha)
        paths = [str(wt)] if judge == "commit" else [str(_judge_path(tmp)), str(wt)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
        }
        _git(wt, "bisect", "start", bad_sha, good_sha)
        cmd = [sys.executable, "-m", "harness", "bisect-check", *check_args]
        say(f"bisecting {good_sha[:10]}..{bad_sha[:10]} in {wt}: {' '.join(cmd[1:])}")
        p = subprocess.run(
            ["git", "-C", str(wt), "bisect", "run", *cmd],
            capture_output=True,
            text=True,
            env=env,
            cwd=wt,
        )
        log = p.stdout + p.stderr
        m = re.search(r"^([0-9a-f]{40}) is the first bad commit", log, re.M)
        sha = m.group(1) if m else None
        subject = _git(repo, "log", "-1", "--format=%s", sha) if sha else ""
        return BisectResult(sha, subject, log)
    finally:
        _git(repo, "worktree", "remove", "--force", str(wt), check_rc=False)
        _git(repo, "worktree", "prune", check_rc=False)
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["BAD", "GOOD", "UNTESTABLE", "BisectResult", "bisect", "check"]
