"""pytest plugin: case files collected as test items, one per (case, backend).

`pytest cases/smoke.yaml` (or a directory of case files) runs each case through the same runner
as the CLI; ids are readable (`quantize_t129_h256_normal_rdyn_s0[reference]`). A failure prints
the metric table of every failing comparison; `unsupported` and cases needing hardware this
machine lacks are clean skips with the reason (never passes). Options:
  --case-filter S      only case ids containing S (comma = or)
  --harness-backend B  test this adapter instead of the cases' backends (repeatable)
  --harness-results D  also append rows to results directory D (resume-compatible)
With pytest-xdist (`-n 4`) items spread over workers like any test, each worker with its share
of the cores as torch threads (`harness.runner.thread_budget`; 2 workers on 2 cores each with
2 threads ran 56 s instead of 6 s).
Under xdist on a CUDA host, worker gwN is pinned to GPU N mod the GPU count (`xdist_device`),
so `-n 8` on 8 GPUs runs one worker per GPU.
Only YAML files with a top-level `sweeps:` list are collected, so other YAML is left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from harness.cases import Case, CaseError, load_cases
from harness.records import Outcome, Row, key_metrics


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("harness", "dsv4-nvfp4 case files")
    g.addoption("--case-filter", default=None, help="only case ids containing this (comma = or)")
    g.addoption(
        "--harness-backend",
        action="append",
        default=None,
        help="adapter name or module:attr to test instead of the cases' backends",
    )
    g.addoption("--harness-results", default=None, help="append result rows to this directory")


def xdist_device(worker: str | None, cuda_count: int) -> int | None:
    """The GPU an xdist worker (`PYTEST_XDIST_WORKER` = gwN) is pinned to: N mod the count;
    None outside xdist or without GPUs."""
    if not worker or not worker.startswith("gw") or not worker[2:].isdigit() or cuda_count < 1:
        return None
    return int(worker[2:]) % cuda_count


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: the case runs on a CUDA device")
    config.addinivalue_line("markers", "stage(name): the stage or layer a case exercises")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")  # set in xdist workers only
    if workers:
        import torch

        from harness.runner import thread_budget

        torch.set_num_threads(thread_budget(int(workers)))
        gpu = xdist_device(os.environ.get("PYTEST_XDIST_WORKER"), torch.cuda.device_count())
        if gpu is not None:  # "cuda" cases then run on this worker's GPU
            torch.cuda.set_device(gpu)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix in (".yaml", ".yml") and "sweeps:" in file_path.read_text(errors="ignore"):
        return CaseFile.from_parent(parent, path=file_path)
    return None


class CaseFile(pytest.File):
    def collect(self):
        try:
            _, cases = load_cases(self.path)
        except CaseError as e:
            raise self.CollectError(str(e)) from None
        opt = self.config.getoption
        keys = [k for k in (opt("case_filter") or "").split(",") if k]
        for case in cases:
            if keys and not any(k in case.id for k in keys):
                continue
            for backend in opt("harness_backend") or case.backends:
                item = CaseItem.from_parent(
                    self, name=f"{case.id}[{backend}]", case=case, backend=backend
                )
                item.add_marker(pytest.mark.stage(case.stage.value))
                if case.device.startswith("cuda"):
                    item.add_marker(pytest.mark.cuda)
                yield item


class CaseFailed(Exception):
    """A case outcome other than pass/unsupported/skipped; carries its rows."""

    def __init__(self, rows: list[Row]):
        super().__init__(rows[-1].message)
        self.rows = rows


class CaseItem(pytest.Item):
    def __init__(self, *, case: Case, backend: str, **kw: Any):
        super().__init__(**kw)
        self.case, self.backend = case, backend

    def runtest(self) -> None:
        from harness.runner import run_one  # imported here: collecting never initialises CUDA

        rows = run_one(self.case, self.backend)  # a device this machine lacks: unsupported
        out = self.config.getoption("harness_results")
        if out:
            from harness.results import ResultWriter

            with ResultWriter(out) as w:
                w.write(rows)
        outcome = rows[-1].outcome
        if not outcome.ran:
            pytest.skip(f"{outcome}: {rows[-1].message}")
        if outcome is not Outcome.PASS:
            raise CaseFailed(rows)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if not isinstance(excinfo.value, CaseFailed):
            return super().repr_failure(excinfo)
        return metric_table(excinfo.value.rows)

    def reportinfo(self):
        return self.path, None, f"{self.case.id} [{self.backend}]"


def metric_table(rows: list[Row]) -> str:
    """The failing comparisons of a case with their key metrics (harness.records
    `key_metrics`: by how the output is judged), one block per comparison."""
    last = rows[-1]
    lines = [f"case {last.case_id} on {last.backend}: {last.outcome}"]
    for r in rows:
        if r.outcome is Outcome.PASS or (r.compare == "case" and len(rows) > 1):
            continue
        lines.append(f"  {r.compare}: {r.outcome}  {r.message}")
        for k in key_metrics(r):
            v = r.metrics.get(k)
            if v is not None:
                text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                lines.append(f"      {k:<22} {text[:300]}")
    return "\n".join(lines)
