"""The docs a user's clone holds are true (issue 16, points 11-13).

The complete minimal adapter of docs/cases.md is read from the markdown itself, so page and test
cannot drift apart: saved as my_adapter.py in an empty directory and run with the page's own
command on the smoke sweep, its quantize and swiglu_requant cases pass (a from-scratch quantizer:
bit-exact codes and scale bytes, ties, NaN/Inf, zero blocks, static scales) and every other stage
is unsupported. Code and docs cite docs/design.md (in the repo), never a file outside it, and
every section they cite exists; the README lists only harness names that resolve.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from harness import adapters, cli, results

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cases.md"


def example_code() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### A complete minimal adapter", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"{DOC}: no python block under 'A complete minimal adapter'"
    return match.group(1)


def test_the_documented_adapter_passes_its_stages(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_adapter.py").write_text(example_code())
    assert "import harness" not in example_code() and "reference" not in example_code()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_adapter", raising=False)
    out = tmp_path / "out"
    rc = cli.main(
        [
            "run",
            str(REPO / "cases" / "smoke.yaml"),
            "-b",
            "my_adapter:MyAdapter",
            "-o",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().out
    finals = [r for r in results.read_rows(out) if r.final]
    mine = [r for r in finals if r.stage in ("quantize", "swiglu_requant")]
    assert len(mine) == 46 and {r.outcome for r in mine} == {"pass"}
    others = [r for r in finals if r.stage not in ("quantize", "swiglu_requant")]
    assert others and {r.outcome for r in others} == {"unsupported"}
    assert all("newcomer has no" in r.message for r in others)


def tracked_text_files() -> list[Path]:
    """The repo's own text files: what git tracks or would add (never a venv, an unpacked bundle
    or anything else .gitignore / .git/info/exclude leave out)."""
    ls = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
        capture_output=True,
        text=True,
    )
    if ls.returncode:  # not a git checkout (an sdist): every file below the repo
        files = [p for p in REPO.rglob("*") if ".git" not in p.parts and "reports" not in p.parts]
    else:
        files = [REPO / line for line in ls.stdout.splitlines()]
    return [p for p in files if p.suffix in (".py", ".md", ".yaml", ".toml", ".j2") and p.is_file()]


def test_code_and_docs_cite_the_design_in_the_repo():
    sections = set(re.findall(r"^## (\d+)\.", (REPO / "docs" / "design.md").read_text(), re.M))
    assert sections >= {"1", "2", "3", "4", "5"}
    cited = 0
    for p in tracked_text_files():
        text = p.read_text(encoding="utf-8", errors="replace")
        if p.name == "test_docs.py":
            continue
        assert "../shared" not in text and "DESIGN.md" not in text, p
        for sec in re.findall(r"docs/design\.md §(\d+)", text):
            assert sec in sections, f"{p} cites docs/design.md §{sec}, which does not exist"
            cited += 1
    assert cited > 10


def test_readme_lists_only_backends_that_exist():
    text = (REPO / "README.md").read_text()
    table = text.split("## What each backend needs", 1)[1].split("\nPlanned", 1)[0]
    names = re.findall(r"^\| `([^`]+)`", table, re.M)
    assert names and set(names) <= set(adapters.available()), names
