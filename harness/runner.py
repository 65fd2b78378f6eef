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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from harness import adapters, results, timing
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
    time: bool = False  # also time each pair (CUDA only): a `timing` row beside its error rows
    baselines: tuple[str, ...] | None = None  # override the cases' timing baselines
    time_budget_s: float = 1.0  # per measurement (harness.timing.Protocol.budget_s)

    def timing_args(self) -> list[str]:
        """The worker flags that carry these timing options into an isolated child."""
        if not self.time:
            return []
        args = ["--time", "--time-budget", str(self.time_budget_s)]
        for b in self.baselines or ():
            args += ["--baseline", b]
        return args


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


_BASELINE_CACHE: dict[tuple[str, str, str], dict[str, Any]] = {}


def _baseline(case: Case, name: str, proto: timing.Protocol) -> dict[str, Any]:
    """One baseline's timing on this case, measured once per process and reused by backends."""
    key = (case.id, case.device, name)
    if key not in _BASELINE_CACHE:
        try:
            m = timing.time_case(case, adapters.load(name), proto)
            _BASELINE_CACHE[key] = {
                k: m[k] for k in ("latency_us", "latency_p10_us", "latency_p90_us", "mode")
            }
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is said, not fatal
            _BASELINE_CACHE[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return _BASELINE_CACHE[key]


def timing_row(
    case: Case,
    adapter: Any,
    verdict: str,
    baselines: tuple[str, ...],
    proto: timing.Protocol | None = None,
) -> tuple[str, str, dict[str, Any]]:
    """(outcome, message, metrics) of a pair's `timing` row; never raises.

    outcome is `timed`, `skipped` (no CUDA, nothing to time) or `error`; metrics always carry
    the correctness `verdict` of the same pair, so no speed figure travels without it.
    """
    if verdict in ("error", "unsupported", "skipped"):
        return "skipped", f"not timed: the case is {verdict}", {"verdict": verdict}
    try:
        dev = torch.device(case.device)
        roof = timing.measured_roofline(dev) if dev.type == "cuda" else None
        m = timing.time_case(case, adapter, proto or timing.Protocol(), roof)
    except timing.TimingUnavailable as e:
        return "skipped", str(e), {"verdict": verdict}
    except Exception as e:  # noqa: BLE001 - a kernel that fails under timing is a row too
        tb = traceback.format_exc(limit=6)
        return "error", f"{type(e).__name__}: {e}"[:2000], {"verdict": verdict, "traceback": tb}
    m["verdict"] = verdict
    m["baselines"] = {b: _baseline(case, b, proto or timing.Protocol()) for b in baselines}
    for b, bm in m["baselines"].items():
        if "latency_us" in bm:
            bm["speedup"] = bm["latency_us"] / m["latency_us"]
            if "baseline" not in m:  # the first baseline that ran is the headline ratio
                m["baseline"], m["ratio_vs_baseline"] = b, bm["speedup"]
    message = "" if verdict == "pass" else f"speed of a case that is {verdict}: not a valid figure"
    return "timed", message, m


def run_one(
    case: Case,
    backend: str,
    run_id: str = "",
    time_it: bool = False,
    baselines: tuple[str, ...] | None = None,
    time_budget_s: float = 1.0,
) -> list[dict[str, Any]]:
    """Run one pair in this process; never raises (errors become rows). With `time_it`, a
    `timing` row (harness.timing) comes before the pair's final row."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {"backend": backend}
    adapter = None
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
    if time_it:
        verdict = rows[-1]["outcome"]
        bl = case.baselines if baselines is None else baselines
        proto = timing.Protocol(budget_s=time_budget_s)
        outcome, message, m = timing_row(case, adapter, verdict, bl, proto)
        base = {k: v for k, v in rows[-1].items() if k not in _OWN_FIELDS}
        rows.insert(
            -1,
            {
                **base,
                "compare": results.TIMING,
                "outcome": outcome,
                "message": message,
                "metrics": m,
                "final": False,
            },
        )
    return rows


_OWN_FIELDS = ("compare", "outcome", "message", "metrics", "final", "duration_s")


def run_isolated(
    case: Case, backend: str, run_id: str, timeout: float, time_args: Sequence[str] = ()
) -> list[dict[str, Any]]:
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
            *time_args,
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
    done = results.done_keys(out_dir, timed=opts.time) if opts.resume else set()
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
                rows = run_isolated(
                    case, backend, run_id, opts.timeout_s or case.timeout_s, opts.timing_args()
                )
            else:
                rows = run_one(case, backend, run_id, opts.time, opts.baselines, opts.time_budget_s)
            writer.write(rows)
            counts[rows[-1]["outcome"]] += 1
    counts["resumed"] = len(pairs) - len(todo)
    results.write_parquet(out_dir)
    return counts
