"""`python -m harness`: run, list, show, compare, merge (docs/cli.md documents every flag).

Exit codes: 0 every case passed (or was unsupported/skipped); 1 a case failed, errored, timed
out or crashed (for `compare`: a regression or a new failure); 2 bad usage, a malformed case
file or a results directory in use by another run, reported in one line naming file and field,
without a traceback; 130 interrupted (Ctrl-C or SIGTERM), saying what was kept and how to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from harness import adapters, results
from harness.cases import CaseError, load_cases, load_many
from harness.records import Outcome, RecordError, Row
from harness.runner import (
    SweepInterrupted,
    SweepOptions,
    adapter_digest,
    parse_devices,
    plan,
    prepare_worker,
    run_on_devices,
    run_one,
    run_sweep,
    thread_budget,
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# `worker` is the runner's, not a user's
COMMANDS_SHOWN = (
    "{run,list,show,compare,report,merge,bisect,bisect-check,bundle,repro,trace,minimize,"
    "bisect-param}"
)


class UsageError(ValueError):
    """A bad argument; the message names it."""


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar=COMMANDS_SHOWN)

    r = sub.add_parser("run", help="run case files on backends, write results")
    r.add_argument("cases", nargs="+", help="case files or directories of *.yaml")
    r.add_argument(
        "-b",
        "--backend",
        action="append",
        help="adapter name or module:attr (repeatable; default: each case's backends)",
    )
    r.add_argument(
        "-o", "--out", help="results directory (default: reports/<case files>[-<backends>])"
    )
    r.add_argument("--device", help="run every case on this device (cpu, cuda, cuda:1)")
    r.add_argument("--isolate", action="store_true", help="one child process per case")
    r.add_argument(
        "--timeout", type=float, help="seconds per case (overrides cases; implies --isolate)"
    )
    r.add_argument("--shard", type=_shard, default=(0, 1), help="run shard i of n, as i/n")
    r.add_argument(
        "--devices",
        help="one worker process per device (cuda:0,cuda:1,... or cpu,cpu), results merged",
    )
    r.add_argument(
        "--fresh", action="store_true", help="rerun the selected pairs, dropping their old rows"
    )
    r.add_argument(
        "--keep-errors",
        action="store_true",
        help="resume: keep earlier error/timeout/crashed rows instead of retrying them",
    )
    r.add_argument("--threads", type=int, help="torch threads per case (default: cores)")
    r.add_argument("-k", "--filter", help="only case ids containing this (comma = or)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--report", action="store_true", help="write DIR/index.html at the end")
    r.add_argument(
        "--time", action="store_true", help="also time each pair (CUDA): timing rows beside errors"
    )
    r.add_argument(
        "--baseline",
        action="append",
        dest="baselines",
        help="adapter timed beside each backend with --time (repeatable; default: the cases')",
    )
    r.add_argument(
        "--time-budget", type=float, default=1.0, help="seconds per timing measurement (1.0)"
    )

    rp = sub.add_parser("report", help="HTML report from a results set (never reruns kernels)")
    rp.add_argument("results", help="results directory or .jsonl/.parquet file")
    rp.add_argument("-o", "--out", help="HTML file (default: RESULTS/index.html)")
    rp.add_argument("--baseline", help="another results set: regressions and improvements")
    rp.add_argument("--title")

    ls = sub.add_parser("list", help="list cases of case files, and adapters")
    ls.add_argument("cases", nargs="*", help="case files or directories")

    s = sub.add_parser("show", help="print one case's rows and metrics from a results set")
    s.add_argument("results")
    s.add_argument("case_id")
    s.add_argument("-b", "--backend")

    c = sub.add_parser("compare", help="regressions and improvements between two results sets")
    c.add_argument("baseline")
    c.add_argument("new")
    c.add_argument(
        "--same-within",
        type=float,
        default=0.03,
        help="timing: a median ratio whose 95%% CI lies within 1 +- this is SAME (0.03)",
    )

    m = sub.add_parser("merge", help="join results of shards into one set")
    m.add_argument("sources", nargs="+")
    m.add_argument("-o", "--out", required=True)

    bc = sub.add_parser(
        "bisect-check", help="one commit's verdict for git bisect run: 0 good, 1 bad, 125 skip"
    )
    _check_args(bc)

    bi = sub.add_parser("bisect", help="find the commit that broke cases (temporary worktree)")
    bi.add_argument("--good", required=True, help="a commit where the cases pass")
    bi.add_argument("--bad", required=True, help="a later commit where they fail")
    bi.add_argument("--repo", default=".", help="the git repository (default: this directory)")
    bi.add_argument(
        "--judge",
        choices=("current", "commit"),
        default="current",
        help="whose harness and reference judge each commit (default: this checkout's)",
    )
    _check_args(bi)

    rb = sub.add_parser("bundle", help="write a repro bundle of one case and backend")
    rb.add_argument("cases", help="the case file holding the case")
    rb.add_argument("case_id")
    rb.add_argument("-b", "--backend", required=True)
    rb.add_argument("-o", "--out", required=True, help="bundle directory")
    rb.add_argument("--device", help="the device to record the case for")

    rr = sub.add_parser("repro", help="replay a repro bundle and print its verdict")
    rr.add_argument("bundle")
    rr.add_argument("-b", "--backend", help="another adapter than the bundle's")

    tr = sub.add_parser("trace", help="NaN birth trace: per-stage stats, culprit, divergence")
    _nan_args(tr, one_case=False)
    mi = sub.add_parser("minimize", help="delta-debug a failing case to a minimal input")
    _nan_args(mi, one_case=True)
    mi.add_argument("-o", "--out", help="write the minimal input as a repro bundle (layer cases)")
    bp = sub.add_parser("bisect-param", help="the value of a case parameter where failing starts")
    _nan_args(bp, one_case=True)
    bp.add_argument("--param", required=True, help="scale_ratio, limit or tokens")
    bp.add_argument("--lo", type=float, required=True, help="one end (passes or fails)")
    bp.add_argument("--hi", type=float, required=True, help="the other end")
    bp.add_argument("--precision", type=float, default=0.01, help="relative (default 0.01)")
    bp.add_argument("--criterion", choices=("fail", "nan"), default="fail")

    w = sub.add_parser("worker")  # one isolated case (or --describe an adapter), for the runner
    w.add_argument("--parent-pid", type=int, required=True)
    w.add_argument("--backend", required=True)
    w.add_argument("--describe", action="store_true")
    w.add_argument("--file")
    w.add_argument("--case-id")
    w.add_argument("--run-id", default="")
    w.add_argument("--device")
    w.add_argument("--rows-out")
    w.add_argument("--threads", type=int)
    w.add_argument("--time", action="store_true")
    w.add_argument("--time-budget", type=float, default=1.0)
    w.add_argument("--baseline", action="append", dest="baselines")
    return p


def _check_args(p: argparse.ArgumentParser) -> None:
    """The arguments `bisect-check` takes (and `bisect` passes on to it)."""
    p.add_argument("cases", nargs="+", help="case files (paths relative to the repository root)")
    p.add_argument("-b", "--backend", action="append", help="adapter (repeatable)")
    p.add_argument("-k", "--filter", help="only case ids containing this (comma = or)")
    p.add_argument("--device", help="run every case on this device")
    p.add_argument("--isolate", action="store_true", help="one child process per case")


def _nan_args(p: argparse.ArgumentParser, one_case: bool) -> None:
    """The arguments of trace, minimize and bisect-param (harness/trace.py, minimize.py)."""
    p.add_argument("cases", nargs="+", help="case files or directories of *.yaml")
    p.add_argument("-b", "--backend", required=True, help="adapter name or module:attr")
    p.add_argument("--case", dest="case_id", required=one_case, help="the case id")
    if not one_case:
        p.add_argument("-k", "--filter", help="only case ids containing this (comma = or)")
    p.add_argument("--device", help="run on this device")


def _selected(a: argparse.Namespace) -> list[Any]:
    cases = _with_device(load_many(a.cases), a.device)
    if a.case_id:
        cases = [c for c in cases if c.id == a.case_id]
    keys = [k for k in (getattr(a, "filter", None) or "").split(",") if k]
    if keys:
        cases = [c for c in cases if any(k in c.id for k in keys)]
    if not cases:
        raise UsageError(f"{' '.join(a.cases)}: no case {a.case_id or a.filter or ''!r}".strip())
    return cases


def _check_argv(a: argparse.Namespace) -> list[str]:
    argv = list(a.cases)
    for b in a.backend or ():
        argv += ["-b", b]
    for flag, v in (("-k", a.filter), ("--device", a.device)):
        if v:
            argv += [flag, v]
    return argv + (["--isolate"] if a.isolate else [])


def _with_device(cases, device):
    return [dataclasses.replace(c, device=device) for c in cases] if device else cases


def default_out(case_paths: list[str], backends: list[str] | None, device: str | None) -> Path:
    """`reports/<case file stems>[-<backends>][-<device>]`: one directory per case files and
    backend set, so a run of another adapter never mixes its rows into the main job's."""
    name = "+".join(Path(p).stem or "cases" for p in case_paths)
    for extra in ("+".join(backends or []), device or ""):
        if extra:
            name += "-" + re.sub(r"[^A-Za-z0-9._+-]+", "_", extra)
    if len(name) > 100:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return Path("reports") / name


def _out_dir(path: Path, flag: str = "-o") -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file; give a results directory")
    return path


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a sweep as Ctrl-C does: groups killed, rows kept


def cmd_run(a: argparse.Namespace) -> int:
    if a.threads is not None and a.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {a.threads}")
    if a.timeout is not None and not a.isolate:
        print(
            "note: --timeout runs each case in its own process (--isolate): a case running in "
            "this process could not be stopped",
            file=sys.stderr,
        )
    if a.devices:
        return _run_on_devices(a)
    cases = _with_device(load_many(a.cases), a.device)
    out = _out_dir(Path(a.out) if a.out else default_out(a.cases, a.backend, a.device))
    opts = SweepOptions(
        tuple(a.backend) if a.backend else None,
        a.isolate or a.timeout is not None,
        a.timeout,
        a.shard,
        not a.fresh,
        not a.no_progress,
        a.filter,
        keep_errors=a.keep_errors,
        threads=a.threads or thread_budget(),
        time=a.time,
        baselines=tuple(a.baselines) if a.baselines else None,
        time_budget_s=a.time_budget,
    )
    planned = {(c.id, b) for c, b in plan(cases, opts)}
    if not planned:
        print(f"error: no case of {' '.join(a.cases)} matches filter {a.filter!r}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{len(cases)} cases, {len(planned)} (case, backend) pairs -> {out}", file=sys.stderr)
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        counts = run_sweep(cases, out, opts, label=Path(a.cases[0]).stem, say=say)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # judge only this invocation's pairs: the directory may hold other (filtered-out) results
    rows = [r for r in results.latest(results.read_rows(out)) if r.final and r.pair in planned]
    print(summary_table(rows))
    resumed = counts.pop("resumed", 0)
    ran = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    print(f"\nthis run: {ran}; reused from earlier runs: {resumed}")
    print(f"results: {out / results.JSONL}  ({out / results.PARQUET})")
    if a.report:
        from harness.report import render

        print(f"report: {render(out, out / 'index.html')}")
    return EXIT_FAIL if any(r.outcome.bad for r in rows) else EXIT_OK


def _run_on_devices(a: argparse.Namespace) -> int:
    """`run --devices D0,D1,...`: shard i of the pairs in a worker on Di, then one merged set."""
    if a.device or a.shard != (0, 1):
        raise UsageError("--devices picks each worker's device and shard: drop --device/--shard")
    try:
        devices = parse_devices(a.devices)
    except ValueError as e:
        raise UsageError(str(e)) from None
    load_many(a.cases)  # a malformed case file: one line here, not one per worker
    out = _out_dir(Path(a.out) if a.out else default_out(a.cases, a.backend, None))
    args = list(a.cases)
    for b in a.backend or ():
        args += ["-b", b]
    for flag, v in (("-k", a.filter), ("--timeout", a.timeout), ("--time-budget", a.time_budget)):
        if v is not None:
            args += [flag, str(v)]
    for flag, on in (
        ("--isolate", a.isolate),
        ("--fresh", a.fresh),
        ("--keep-errors", a.keep_errors),
        ("--time", a.time),
    ):
        args += [flag] if on else []
    for b in a.baselines or ():
        args += ["--baseline", b]
    print(f"{len(devices)} workers ({', '.join(devices)}) -> {out}", file=sys.stderr)
    dirs, codes = run_on_devices(args, devices, out, a.threads)
    for d, dev, code in zip(dirs, devices, codes, strict=True):
        if code not in (EXIT_OK, EXIT_FAIL):  # 1 is a failing case: its rows say which
            tail = (d / "worker.log").read_text(errors="replace")[-600:]
            print(f"worker on {dev} exited {code} ({d / 'worker.log'}):\n{tail}", file=sys.stderr)
    n = results.merge([d for d in dirs if (d / results.JSONL).exists()], out)
    rows = [r for r in results.latest(results.read_rows(out)) if r.final]
    print(summary_table(rows))
    print(f"\nmerged {len(dirs)} workers: {n} rows -> {out / results.JSONL}")
    if a.report:
        from harness.report import render

        print(f"report: {render(out, out / 'index.html')}")
    if any(c not in (EXIT_OK, EXIT_FAIL) for c in codes):
        return max(codes)
    return EXIT_FAIL if any(r.outcome.bad for r in rows) else EXIT_OK


def summary_table(rows: list[Row], limit: int = 40) -> str:
    """Counts by outcome; the failures worst first, one line each; then unsupported and skipped
    cases grouped by reason (they never crowd real failures out of the list)."""
    counts = Counter(r.outcome for r in rows)
    lines = ["outcome counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))]
    bad = sorted((r for r in rows if r.outcome.bad), key=lambda r: -r.outcome.severity)
    for r in bad[:limit]:
        lines.append(f"  {r.outcome:<11} {r.backend:<24} {r.case_id}: {r.message[:160]}")
    if len(bad) > limit:
        lines.append(f"  ... {len(bad) - limit} more failures (python -m harness report DIR)")
    groups = Counter(
        (r.outcome, r.backend, r.message[:160])
        for r in rows
        if not r.outcome.bad and r.outcome is not Outcome.PASS
    )
    for (outcome, backend, msg), n in sorted(groups.items(), key=lambda g: -g[1])[:10]:
        lines.append(f"  {outcome:<11} {backend:<24} {n} cases: {msg}")
    if len(groups) > 10:
        lines.append(f"  ... {len(groups) - 10} more reasons")
    return "\n".join(lines)


def cmd_list(a: argparse.Namespace) -> int:
    for path in a.cases:
        for f in sorted(Path(path).glob("*.yaml")) if Path(path).is_dir() else [Path(path)]:
            header, cases = load_cases(f)
            print(f"{f}: {header['name']} ({len(cases)} cases) {header['description']}".rstrip())
            for c in cases:
                print(f"  {c.id}  [{', '.join(c.backends)}]")
    print("adapters: " + ", ".join(adapters.available()))
    return EXIT_OK


def cmd_show(a: argparse.Namespace) -> int:
    rows = [r for r in results.latest(results.read_rows(a.results)) if r.case_id == a.case_id]
    if a.backend:
        rows = [r for r in rows if r.backend == a.backend]
    if not rows:
        print(f"{a.results}: no rows for case {a.case_id!r}", file=sys.stderr)
        return EXIT_USAGE
    for r in rows:
        print(f"[{r.backend}] {r.compare}: {r.outcome}  {r.message}")
        for k, v in sorted(r.metrics.items()):
            if isinstance(v, str) and "\n" in v.strip():  # tracebacks, stderr tails: in full
                print(f"    {k}:")
                print("\n".join("      " + line for line in v.rstrip().splitlines()))
                continue
            text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
            print(f"    {k:<22} {text if len(text) <= 200 else text[:200] + ' ...'}")
    return EXIT_OK


def cmd_compare(a: argparse.Namespace) -> int:
    base_rows, new_rows = results.read_rows(a.baseline), results.read_rows(a.new)
    d = results.compare_sets(base_rows, new_rows)
    for section in ("regressions", "new_failures", "improvements", "new_cases", "missing"):
        items = d[section]
        print(f"{section}: {len(items)}")
        for (case_id, backend), old, new in items[:50]:
            was = old.outcome if old else "-"
            now = new.outcome if new else "-"
            msg = new.message[:120] if new else ""
            print(f"  {backend:<20} {case_id}: {was} -> {now}  {msg}")
    print(f"unchanged: {len(d['unchanged'])}")
    t = results.compare_timings(base_rows, new_rows, a.same_within)
    if any(t.values()):
        print("timing (median ratio new/base, 95% bootstrap CI):")
        for verdict, items in t.items():
            print(f"  {verdict}: {len(items)}")
            for (case_id, backend), _, _, v in items[:50]:
                print(
                    f"    {backend:<20} {case_id}: x{v['ratio']:.3f} "
                    f"[{v['ratio_lo']:.3f}, {v['ratio_hi']:.3f}]"
                )
    return EXIT_FAIL if d["regressions"] or d["new_failures"] else EXIT_OK


def cmd_report(a: argparse.Namespace) -> int:
    from harness.report import render

    src = Path(a.results)
    out = Path(a.out) if a.out else (src if src.is_dir() else src.parent) / "index.html"
    print(f"report: {render(src, out, baseline=a.baseline, title=a.title)}")
    return EXIT_OK


def cmd_merge(a: argparse.Namespace) -> int:
    n = results.merge(a.sources, _out_dir(Path(a.out)))
    print(f"merged {len(a.sources)} result sets: {n} rows -> {Path(a.out) / results.JSONL}")
    return EXIT_OK


def cmd_bisect_check(a: argparse.Namespace) -> int:
    from harness import bisect

    backends = tuple(a.backend) if a.backend else None
    try:
        return bisect.check(a.cases, backends, a.filter, a.device, a.isolate)
    except Exception as e:  # noqa: BLE001 - whatever breaks at this commit, it cannot tell
        print(f"bisect-check: untestable: {type(e).__name__}: {e}")
        return bisect.UNTESTABLE


def cmd_bisect(a: argparse.Namespace) -> int:
    from harness import bisect

    try:
        r = bisect.bisect(a.repo, a.good, a.bad, _check_argv(a), a.judge)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if r.first_bad is None:
        print(r.log[-3000:])
        print("bisect: git bisect named no first bad commit (see its log above)", file=sys.stderr)
        return EXIT_FAIL
    print(f"first bad commit: {r.first_bad} {r.subject}")
    return EXIT_OK


def cmd_bundle(a: argparse.Namespace) -> int:
    from harness import repro
    from harness.stages.inputs import layer_inputs

    cases = [c for c in _with_device(load_cases(a.cases)[1], a.device) if c.id == a.case_id]
    if not cases:
        print(f"{a.cases}: no case {a.case_id!r}", file=sys.stderr)
        return EXIT_USAGE
    case = cases[0]
    inputs = None
    if case.stage.is_layer:  # the layer's own tensors: replays do not depend on the generator
        import torch

        inputs = layer_inputs(case, torch.device("cpu"))
    print(f"bundle: {repro.save(a.out, case, a.backend, inputs)}")
    return EXIT_OK


def cmd_repro(a: argparse.Namespace) -> int:
    from harness import repro

    try:
        rows = repro.replay(a.bundle, a.backend)
    except repro.BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for r in rows:
        print(f"[{r.backend}] {r.compare}: {r.outcome}  {r.message}")
    return EXIT_FAIL if rows[-1].outcome.bad else EXIT_OK


def cmd_trace(a: argparse.Namespace) -> int:
    from harness import trace

    adapter, rc = adapters.load(a.backend), EXIT_OK
    for case in _selected(a):
        ok, why = adapters.check(adapter, case)
        if case.stage.value == "scale_assembly":
            ok, why = False, "a layout stage: no numbers to trace (its bytes are compared exactly)"
        if case.stage.value == "routed_moe_ep":
            ok, why = False, "runs in rank processes: trace its ranks' layer as routed_moe cases"
        if not ok:
            print(f"trace {case.id} [{a.backend}]: unsupported: {why}\n")
            continue
        tr = trace.trace_case(case, adapter)
        print(trace.format_table(tr) + "\n")
        born_here = tr.culprit is not None and tr.culprit["stage"] != "input"
        rc = EXIT_FAIL if born_here or tr.first_divergent else rc
    return rc


def cmd_minimize(a: argparse.Namespace) -> int:
    from harness import minimize, repro

    (case,) = _selected(a)[:1]
    if case.stage.value == "scale_assembly":
        raise UsageError(f"--case {case.id}: a layout stage has no inputs to minimise")
    if case.stage.value == "routed_moe_ep":
        raise UsageError(f"--case {case.id}: minimise a routed_moe case (one rank) instead")
    if a.out and not case.stage.is_layer:
        raise UsageError(f"--out: {case.stage.value} cases replay from their seed, not tensors")
    try:
        m = minimize.minimize(case, adapters.load(a.backend), say=print)
    except ValueError as e:
        print(f"{e}", file=sys.stderr)
        return EXIT_FAIL
    print(m.summary())
    if a.out:
        small = dataclasses.replace(case, tokens=len(m.tokens))
        print(f"bundle: {repro.save(a.out, small, a.backend, m.inputs)}")
    return EXIT_OK


def cmd_bisect_param(a: argparse.Namespace) -> int:
    from harness import minimize

    (case,) = _selected(a)[:1]
    try:
        r = minimize.bisect_param(
            case, adapters.load(a.backend), a.param, a.lo, a.hi, a.precision, a.criterion, print
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(r.summary())
    return EXIT_OK


def cmd_worker(a: argparse.Namespace) -> int:
    prepare_worker(a.parent_pid, a.threads)
    if a.describe:
        print(adapter_digest(adapters.load(a.backend)))
        return EXIT_OK
    cases = [c for c in load_cases(a.file)[1] if c.id == a.case_id]
    if not cases:
        print(f"{a.file}: no case {a.case_id!r}", file=sys.stderr)
        return EXIT_USAGE
    case = _with_device(cases, a.device)[0]
    bl = tuple(a.baselines) if a.baselines else None
    rows = run_one(case, a.backend, a.run_id, a.time, bl, a.time_budget)
    Path(a.rows_out).write_text(json.dumps([r.to_json() for r in rows]))
    return EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "list": cmd_list,
    "show": cmd_show,
    "compare": cmd_compare,
    "merge": cmd_merge,
    "report": cmd_report,
    "bisect-check": cmd_bisect_check,
    "bisect": cmd_bisect,
    "bundle": cmd_bundle,
    "repro": cmd_repro,
    "trace": cmd_trace,
    "minimize": cmd_minimize,
    "bisect-param": cmd_bisect_param,
    "worker": cmd_worker,
}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a)
    except (
        CaseError,
        adapters.AdapterError,
        FileNotFoundError,
        UsageError,
        RecordError,
        results.DirectoryBusy,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SweepInterrupted as e:
        print(
            f"\ninterrupted: {e.done} pairs finished in this run are kept in "
            f"{e.out_dir / results.JSONL}; {e.left} not run: run the same command again to "
            f"resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted before any case ran", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `python -m harness list | head`
        sys.stderr.close()
        return EXIT_OK
