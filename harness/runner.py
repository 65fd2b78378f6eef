"""The sweep runner: every (case, backend) pair ends as rows on disk, whatever the kernel does.

In process, an exception (OOM included) becomes an `error` row and the sweep goes on. With
`isolate=True` each pair runs in a child process (`python -m harness worker ...`) under a timeout,
so a hang becomes `timeout` and a dead process (segfault, illegal address poisoning the CUDA
context, os._exit) becomes `crashed`, and the parent carries on. Rows are appended to JSONL as
each pair finishes; a pair's last row (`compare == "case"`, `final`) marks it done, so a killed
sweep resumes where it stopped. `shard=(i, n)` takes every n-th pair, so n processes, GPUs or
machines split one sweep and `harness merge` joins them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import adapters, results
from harness.cases import Case
from harness.stages import Comparison, Outcome, run_case

_SEVERITY = [
    Outcome.PASS,
    Outcome.SKIPPED,
    Outcome.UNSUPPORTED,
    Outcome.FAIL,
    Outcome.ERROR,
    Outcome.TIMEOUT,
    Outcome.CRASHED,
]


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (not what: that is the cases)."""

    backends: tuple[str, ...] | None = None  # override the cases' backends
    isolate: bool = False  # one child process per (case, backend)
    timeout_s: float | None = None  # override the cases' timeouts (isolated runs only)
    shard: tuple[int, int] = (0, 1)
    resume: bool = True
    progress: bool = True
    case_filter: str | None = None  # substring (or comma-separated substrings) of case ids


def worst(outcomes: list[Outcome]) -> Outcome:
    return max(outcomes, key=_SEVERITY.index) if outcomes else Outcome.SKIPPED


def plan(cases: list[Case], opts: SweepOptions) -> list[tuple[Case, str]]:
    """The (case, backend) pairs this process runs, in a stable order."""
    pairs = [(c, b) for c in cases for b in (opts.backends or c.backends)]
    if opts.case_filter:
        keys = [k.strip() for k in opts.case_filter.split(",") if k.strip()]
        pairs = [(c, b) for c, b in pairs if any(k in c.id for k in keys)]
    i, n = opts.shard
    return [p for j, p in enumerate(pairs) if j % n == i]


def _rows(
    case: Case, adapter_info: dict[str, Any], comps: list[Comparison], run_id: str, duration: float
) -> list[dict[str, Any]]:
    base = {"run_id": run_id, **case.row(), **adapter_info}
    rows = [
        {
            **base,
            "compare": c.name,
            "outcome": c.outcome.value,
            "message": c.message,
            "metrics": c.metrics,
            "final": False,
        }
        for c in comps
    ]
    overall = worst([c.outcome for c in comps])
    failing = [c for c in comps if c.outcome is overall and c.message]
    rows.append(
        {
            **base,
            "compare": "case",
            "outcome": overall.value,
            "message": failing[0].message if failing and overall is not Outcome.PASS else "",
            "metrics": {"n_compared": len(comps)},
            "duration_s": duration,
            "final": True,
        }
    )
    return rows


def run_one(case: Case, backend: str, run_id: str = "") -> list[dict[str, Any]]:
    """Run one pair in this process; never raises (errors become rows)."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {"backend": backend}
    try:
        adapter = adapters.load(backend)
        info = adapters.describe(adapter)
        info["backend"] = backend  # keep the name the user gave (import paths included)
        ok, why = adapters.check(adapter, case)
        if not ok:
            comps = [Comparison("case", Outcome.UNSUPPORTED, why)]
        else:
            comps = run_case(case, adapter)
    except Exception as e:  # noqa: BLE001 - every failure of a kernel is a recorded outcome
        kind = "out of memory" if "out of memory" in str(e).lower() else type(e).__name__
        tb = traceback.format_exc(limit=6)
        comps = [
            Comparison("case", Outcome.ERROR, f"{kind}: {e}".strip()[:2000], {"traceback": tb})
        ]
    rows = _rows(case, info, comps, run_id, time.perf_counter() - t0)
    if comps and comps[0].name == "case":  # the pair ended before any comparison: one row only
        rows = rows[-1:]
        rows[0]["metrics"] = {**comps[0].metrics, "n_compared": 0}
    return rows


def run_isolated(case: Case, backend: str, run_id: str, timeout: float) -> list[dict[str, Any]]:
    """Run one pair in a child process under `timeout`; a hang or a death is a row too."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        cmd = [
            sys.executable,
            "-m",
            "harness",
            "worker",
            "--file",
            case.source,
            "--case-id",
            case.id,
            "--backend",
            backend,
            "--run-id",
            run_id,
            "--device",
            case.device,
            "--rows-out",
            str(rows_path),
        ]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-1000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return _rows(
                case,
                {"backend": backend},
                [
                    Comparison(
                        "case",
                        Outcome.TIMEOUT,
                        f"killed after {timeout:g} s",
                        {"stderr_tail": tail},
                    )
                ],
                run_id,
                time.perf_counter() - t0,
            )[-1:]
        if rows_path.exists():
            return json.loads(rows_path.read_text())
        msg = f"process died with exit code {proc.returncode}"
        if proc.returncode < 0:
            msg = f"process killed by signal {-proc.returncode}"
        return _rows(
            case,
            {"backend": backend},
            [Comparison("case", Outcome.CRASHED, msg, {"stderr_tail": proc.stderr[-2000:]})],
            run_id,
            time.perf_counter() - t0,
        )[-1:]


def run_sweep(
    cases: list[Case], out_dir: str | Path, opts: SweepOptions = SweepOptions(), label: str = ""
) -> Counter:
    """Run the sweep into `out_dir`; returns counts of case outcomes (this run's and resumed)."""
    out_dir = Path(out_dir)
    run_id = uuid.uuid4().hex[:12]
    pairs = plan(cases, opts)
    done = results.done_keys(out_dir) if opts.resume else set()
    if not opts.resume:
        (out_dir / results.JSONL).unlink(missing_ok=True)
    todo = [(c, b) for c, b in pairs if (c.id, b) not in done]
    out_dir.mkdir(parents=True, exist_ok=True)
    results.append_meta(
        out_dir,
        {
            "run_id": run_id,
            "label": label,
            "shard": list(opts.shard),
            "pairs": len(pairs),
            "resumed": len(pairs) - len(todo),
            "env": results.fingerprint(),
        },
    )
    counts: Counter = Counter()
    bar = tqdm(
        todo,
        desc=label or "sweep",
        unit="case",
        disable=not opts.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    with results.ResultWriter(out_dir) as writer:
        for case, backend in bar:
            bar.set_postfix_str(case.id[:48], refresh=False)
            if opts.isolate:
                rows = run_isolated(case, backend, run_id, opts.timeout_s or case.timeout_s)
            else:
                rows = run_one(case, backend, run_id)
            writer.write(rows)
            counts[rows[-1]["outcome"]] += 1
    counts["resumed"] = len(pairs) - len(todo)
    results.write_parquet(out_dir)
    return counts
