"""Git bisection (`bisect-check` exit codes, `bisect` in a throwaway worktree) and repro bundles
(round trip, replay, a tensor file that would run code is refused). docs/bisect.md."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from harness import bisect, cli, repro
from harness.cases import load_cases

MIDPOINTS = textwrap.dedent(
    """\
    name: ties
    sweeps:
      - stage: quantize
        tokens: [5]
        distributions: [midpoints]
    """
)
LAYER = textwrap.dedent(
    """\
    name: layer
    sweeps:
      - stage: shared_expert
        tokens: [3]
        scale_ratios: [1.0]
    """
)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_check_says_good_bad_and_untestable(tmp_path):
    f = str(_write(tmp_path / "ties.yaml", MIDPOINTS))
    quiet = lambda line: None  # noqa: E731
    assert bisect.check([f], ("reference",), say=quiet) == bisect.GOOD
    assert bisect.check([f], ("tests.planted:RoundHalfAway",), say=quiet) == bisect.BAD
    said = []
    assert bisect.check([f], ("nosuch.module:Kernel",), say=said.append) == bisect.UNTESTABLE
    assert "does not load" in said[-1]
    assert bisect.check([f], ("reference",), device="cuda:7", say=said.append) == 125
    assert "could run here" in said[-1]  # every pair unsupported for want of the device
    assert bisect.check([str(tmp_path / "missing.yaml")], None, say=quiet) == 125


KERNEL = """\
from harness.backends.reference import ReferenceAdapter
from tests.planted import RoundHalfAway

BUG = {bug}


class Kernel(RoundHalfAway if BUG else ReferenceAdapter):
    name = "kern"
"""


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def test_bisect_names_the_planted_regression_among_ten_commits(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _write(repo / "cases.yaml", MIDPOINTS)
    tests_pkg = Path(__file__).resolve().parent  # the planted defects the kernel builds on
    (repo / "tests").symlink_to(tests_pkg, target_is_directory=True)
    shas = []
    for i in range(10):
        _write(repo / "kern.py", KERNEL.format(bug=i >= 6))
        _write(repo / "notes.txt", f"commit {i}\n")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"commit {i}")
        shas.append(_git(repo, "rev-parse", "HEAD"))
    before = (_git(repo, "status", "--porcelain"), _git(repo, "rev-parse", "HEAD"))
    r = bisect.bisect(repo, shas[0], shas[-1], ["cases.yaml", "-b", "kern:Kernel"], say=print)
    assert r.first_bad == shas[6], r.log[-2000:]
    assert r.subject == "commit 6"
    # the user's checkout is untouched: same HEAD, clean, no bisect state, no extra worktree
    assert (_git(repo, "status", "--porcelain"), _git(repo, "rev-parse", "HEAD")) == before
    assert "refs/bisect" not in _git(repo, "for-each-ref")
    assert len(_git(repo, "worktree", "list").splitlines()) == 1


def test_a_bundle_round_trips_and_replays_to_the_same_verdict(tmp_path, capsys):
    f = _write(tmp_path / "layer.yaml", LAYER)
    case = load_cases(f)[1][0]
    out = tmp_path / "bundle"
    assert cli.main(["bundle", str(f), case.id, "-b", "reference", "-o", str(out)]) == 0
    loaded, meta, tensors = repro.load(out)
    assert loaded.id == case.id and meta["backend"] == "reference" and "env" in meta
    assert set(tensors) >= {"x", "w13", "w2"} and tensors["x"].shape == (3, case.shape.hidden)
    assert load_cases(out / repro.CASE_FILE)[1][0].id == case.id  # a runnable case file
    capsys.readouterr()
    assert cli.main(["repro", str(out)]) == 0
    assert "[reference] case: pass" in capsys.readouterr().out
    # the bundle's tensors are what runs, not the seed's: a NaN planted in x is traced
    x = tensors["x"].clone()
    x[1, 7] = float("nan")
    torch.save({**tensors, "x": x}, out / repro.TENSORS_FILE)
    out_row = next(r for r in repro.replay(out) if r.compare == "out")
    assert out_row.metrics["nan_ref"] > 0


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_bundle_that_would_run_code_is_refused(tmp_path):
    f = _write(tmp_path / "layer.yaml", LAYER)
    case = load_cases(f)[1][0]
    out = repro.save(tmp_path / "b", case, "reference", {"x": torch.zeros(3, case.shape.hidden)})
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    torch.save({"x": evil}, out / repro.TENSORS_FILE)
    with pytest.raises(repro.BundleError, match="refused: it holds more than tensors"):
        repro.load(out)
    assert not marker.exists()
    assert cli.main(["repro", str(out)]) == 2
    assert not marker.exists()


def test_a_malformed_bundle_is_one_line(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    assert cli.main(["repro", str(tmp_path / "b")]) == 2
    assert "not a repro bundle" in capsys.readouterr().err
