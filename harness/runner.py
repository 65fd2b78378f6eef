"""The sweep runner: every (case, backend) pair ends as rows on disk, whatever the kernel does.

In process, an exception (OOM included) becomes an `error` row and the sweep goes on. With
`isolate=True` each pair runs in a child process (`python -m harness worker ...`) in its own
process group under a timeout: a hang becomes `timeout` (its Python stack dumped by faulthandler,
then the whole group killed, grandchildren included), a dead process (segfault, illegal address
poisoning the CUDA context, os._exit) becomes `crashed` with its output's tail, and the parent
carries on; a worker dies with its parent (PR_SET_PDEATHSIG on Linux, a watchdog elsewhere).
Rows are appended to JSONL as each pair finishes; a pair's last row (`compare == "case"`,
`final`) carries the digests of its case definition and adapter identity. Resume reuses a final
row only while both digests are unchanged and its outcome is a verdict (`error`, `timeout`,
`crashed`, `skipped` are retried unless `keep_errors`), and says what it reused; `fresh` drops
only the rows of the pairs it reruns. `shard=(i, n)` takes every n-th pair, so n processes, GPUs
or machines split one sweep and `harness merge` joins them. Each case gets its share of the
cores as torch intra-op threads (`thread_budget`): oversubscribed threads slow a run 10-20x.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import adapters, results, timing
from harness.cases import Case
from harness.procs import die_with_parent
from harness.records import Outcome, Row
from harness.stages import Comparison, run_case


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
    keep_errors: bool = False  # resume: keep error/timeout/crashed/skipped rows, do not retry
    threads: int | None = None  # torch intra-op threads per case (None: thread_budget())
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


def thread_budget(workers: int | None = None) -> int:
    """torch intra-op threads for one of `workers` processes sharing this machine (default: the
    pytest-xdist worker count, else 1): the cores this process may use (its CPU affinity)
    divided among them, at least 1. $OMP_NUM_THREADS, when set, is the user's choice and wins."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    if workers is None:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


def _command_line() -> str:
    """This process's command, as a person typed it (names a lock's holder)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("harness", "__main__.py")):
        argv[0:1] = ["python", "-m", "harness"]
    return " ".join(argv)


def device_missing(device: str) -> str:
    """Why this machine cannot run a case on `device` ("" when it can)."""
    if not device.startswith("cuda"):
        return ""
    import torch

    if not torch.cuda.is_available():
        return f"case needs {device}; torch.cuda.is_available() is False on this machine"
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        return f"case needs {device}; this machine has {torch.cuda.device_count()} CUDA devices"
    return ""


def adapter_digest(adapter: Any) -> str:
    """Identity of an adapter for resume: its name, conventions and optional `version`."""
    ident = {**adapters.describe(adapter), "version": str(getattr(adapter, "version", ""))}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def plan(cases: list[Case], opts: SweepOptions) -> list[tuple[Case, str]]:
    """The (case, backend) pairs this process runs, in a stable order."""
    pairs = [(c, b) for c in cases for b in (opts.backends or c.backends)]
    if opts.case_filter:
        keys = [k.strip() for k in opts.case_filter.split(",") if k.strip()]
        pairs = [(c, b) for c, b in pairs if any(k in c.id for k in keys)]
    i, n = opts.shard
    return [p for j, p in enumerate(pairs) if j % n == i]


def _row(
    case: Case,
    adapter_info: dict[str, Any],
    run_id: str,
    compare: str,
    outcome: Outcome,
    message: str = "",
    metrics: dict[str, Any] | None = None,
    **kw: Any,
) -> Row:
    """A row of a pair: which run, which case, which adapter (every row of the pair shares
    these), then what this row compared."""
    desc = case.row()
    info = dict(adapter_info)
    return Row(
        case_id=desc.pop("case_id"),
        stage=desc.pop("stage"),
        backend=info.pop("backend"),
        adapter_digest=info.pop("adapter_digest", ""),
        case_digest=case.digest,
        run_id=run_id,
        compare=compare,
        outcome=outcome,
        message=message,
        metrics=metrics or {},
        fields={**desc, **info},
        **kw,
    )


def _rows(
    case: Case, adapter_info: dict[str, Any], comps: list[Comparison], run_id: str, duration: float
) -> list[Row]:
    rows = [
        _row(case, adapter_info, run_id, c.name, c.outcome, c.message, c.metrics) for c in comps
    ]
    overall = Outcome.worst(c.outcome for c in comps)
    failing = [c for c in comps if c.outcome is overall and c.message]
    message = failing[0].message if failing and overall is not Outcome.PASS else ""
    rows.append(
        _row(
            case,
            adapter_info,
            run_id,
            "case",
            overall,
            message,
            {"n_compared": len(comps)},
            duration_s=duration,
            final=True,
        )
    )
    return rows


def _ended(case: Case, info: dict[str, Any], comp: Comparison, run_id: str, t0: float) -> list[Row]:
    """The one final row of a pair that ended before any comparison (unsupported, raised,
    timed out, crashed), keeping the comparison's metrics (traceback, stderr tail)."""
    row = _rows(case, info, [comp], run_id, time.perf_counter() - t0)[-1]
    return [row.replace(metrics={**comp.metrics, "n_compared": 0})]


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
    verdict: Outcome,
    baselines: tuple[str, ...],
    proto: timing.Protocol | None = None,
) -> tuple[Outcome, str, dict[str, Any]]:
    """(outcome, message, metrics) of a pair's `timing` row; never raises.

    outcome is `timed`, `skipped` (no CUDA, nothing to time) or `error`; metrics always carry
    the correctness `verdict` of the same pair, so no speed figure travels without it.
    """
    proto = proto or timing.Protocol()
    verdict = Outcome.parse(verdict, "verdict")
    if verdict in (Outcome.ERROR, Outcome.UNSUPPORTED, Outcome.SKIPPED):
        return Outcome.SKIPPED, f"not timed: the case is {verdict}", {"verdict": verdict}
    import torch

    try:
        dev = torch.device(case.device)
        roof = timing.measured_roofline(dev) if dev.type == "cuda" else None
        m = timing.time_case(case, adapter, proto, roof)
    except timing.TimingUnavailable as e:
        return Outcome.SKIPPED, str(e), {"verdict": verdict}
    except Exception as e:  # noqa: BLE001 - a kernel that fails under timing is a row too
        tb = traceback.format_exc(limit=6)
        msg = f"{type(e).__name__}: {e}"[:2000]
        return Outcome.ERROR, msg, {"verdict": verdict, "traceback": tb}
    m["verdict"] = verdict
    m["baselines"] = {b: _baseline(case, b, proto) for b in baselines}
    for b, bm in m["baselines"].items():
        if "latency_us" in bm:
            bm["speedup"] = bm["latency_us"] / m["latency_us"]
            if "baseline" not in m:  # the first baseline that ran is the headline ratio
                m["baseline"], m["ratio_vs_baseline"] = b, bm["speedup"]
    message = (
        "" if verdict is Outcome.PASS else f"speed of a case that is {verdict}: not a valid figure"
    )
    return Outcome.TIMED, message, m


def run_one(
    case: Case,
    backend: str,
    run_id: str = "",
    time_it: bool = False,
    baselines: tuple[str, ...] | None = None,
    time_budget_s: float = 1.0,
    inputs: dict[str, Any] | None = None,
) -> list[Row]:
    """Run one pair in this process; never raises (errors become rows). With `time_it`, a
    `timing` row (harness.timing) comes before the pair's final row; `inputs` replay a layer
    case on given tensors (harness.repro)."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {"backend": backend}
    adapter = None
    try:
        adapter = adapters.load(backend)
        info = {**adapters.describe(adapter), "adapter_digest": adapter_digest(adapter)}
        info["backend"] = backend  # keep the name the user gave (import paths included)
        missing = device_missing(case.device)
        ok, why = (False, missing) if missing else adapters.check(adapter, case)
        if not ok:
            comps = [Comparison("case", Outcome.UNSUPPORTED, why)]
        else:
            info["gemm_backend"] = adapters.gemm_backend(adapter, case)  # report: environment
            comps = run_case(case, adapter, inputs)
    except Exception as e:  # noqa: BLE001 - every failure of a kernel is a recorded outcome
        kind = "out of memory" if "out of memory" in str(e).lower() else type(e).__name__
        tb = traceback.format_exc(limit=6)
        comps = [
            Comparison("case", Outcome.ERROR, f"{kind}: {e}".strip()[:2000], {"traceback": tb})
        ]
    if comps and comps[0].name == "case":  # the pair ended before any comparison: one row only
        rows = _ended(case, info, comps[0], run_id, t0)
    else:
        rows = _rows(case, info, comps, run_id, time.perf_counter() - t0)
    import torch

    rows[-1] = rows[-1].replace(threads=torch.get_num_threads())  # oversubscribed: 10-20x slower
    if time_it:
        bl = case.baselines if baselines is None else baselines
        proto = timing.Protocol(budget_s=time_budget_s)
        outcome, message, m = timing_row(case, adapter, rows[-1].outcome, bl, proto)
        rows.insert(-1, _row(case, info, run_id, results.TIMING, outcome, message, m))
    return rows


def _worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", "worker", "--parent-pid", str(os.getpid()), *args]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group: the worker and every process it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    proc.wait()


def _tail(path: Path, n: int = 3000) -> str:
    """The end of a worker's output, without faulthandler's list of loaded extension modules
    (~3 KB with torch and pandas, which pushed the traceback itself out of the tail)."""
    text = path.read_bytes().decode(errors="replace") if path.exists() else ""
    text = re.sub(r"\n?Extension modules: [^\n]*\n?", "\n", text)
    return text[-n:]


def run_isolated(
    case: Case,
    backend: str,
    run_id: str,
    timeout: float,
    threads: int | None = None,
    time_args: Sequence[str] = (),
) -> list[Row]:
    """Run one pair in a child process group under `timeout`; a hang or a death is a row too."""
    threads = threads or thread_budget()
    with tempfile.TemporaryDirectory() as tmp:
        rows_path, log_path = Path(tmp) / "rows.json", Path(tmp) / "output.log"
        cmd = _worker_cmd(
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
            "--threads",
            str(threads),
            *time_args,
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:  # a file, not a pipe: no grandchild can hold it open
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # faulthandler: dump where every thread hangs
            time.sleep(0.5)
            _kill_group(proc)
            comp = Comparison(
                "case",
                Outcome.TIMEOUT,
                f"killed after {timeout:g} s",
                {"stderr_tail": _tail(log_path)},
            )
            return _ended(case, {"backend": backend}, comp, run_id, t0)
        finally:  # also on Ctrl-C: no case outlives the sweep, nor its grandchildren the case
            _kill_group(proc)
        if rows_path.exists():
            where = f"rows of worker for {case.id} on {backend}"
            return [Row.from_json(d, where) for d in json.loads(rows_path.read_text())]
        msg = f"process died with exit code {proc.returncode}"
        if proc.returncode < 0:
            msg = f"process killed by signal {-proc.returncode}"
        comp = Comparison("case", Outcome.CRASHED, msg, {"stderr_tail": _tail(log_path)})
        return _ended(case, {"backend": backend}, comp, run_id, t0)


def describe_isolated(backend: str, timeout: float = 120.0) -> str | None:
    """An adapter's digest, loaded in a child process (an isolated sweep never imports kernels
    itself); None where it does not load (its pairs then run and record why)."""
    try:
        p = subprocess.run(
            _worker_cmd("--describe", "--backend", backend),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


def prepare_worker(parent_pid: int, threads: int | None) -> None:
    """Worker set-up: die with the parent, tracebacks on fatal signals and on SIGUSR1 (the
    parent's timeout), torch threads as the parent assigned."""
    die_with_parent(parent_pid)
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass
class ResumePlan:
    """Which planned pairs a resumed sweep runs, and why; which it reuses, by outcome."""

    todo: list[tuple[Case, str]] = field(default_factory=list)
    reused: Counter = field(default_factory=Counter)  # outcome -> pairs reused
    rerun: Counter = field(default_factory=Counter)  # reason -> pairs rerun

    def summary(self, out_dir: Path) -> str:
        if not self.reused and not self.rerun:
            return ""
        parts = [f"resume: reusing {sum(self.reused.values())} finished pairs of {out_dir}"]
        if self.reused:
            parts[0] += " (" + ", ".join(f"{n} {o}" for o, n in sorted(self.reused.items())) + ")"
        if self.rerun:
            why = ", ".join(f"{n} {r}" for r, n in sorted(self.rerun.items()))
            parts.append(f"rerunning {sum(self.rerun.values())}: {why}")
        return "; ".join(parts)


def resume_plan(
    pairs: list[tuple[Case, str]],
    previous: dict[tuple[str, str], Row],
    identity: Callable[[str], str | None],
    keep_errors: bool = False,
    timed: set[tuple[str, str]] | None = None,
) -> ResumePlan:
    """Split `pairs` into reused (a final row whose case and adapter digests still match and
    whose outcome is a verdict) and to run. `identity(backend)` is the adapter's digest now.
    `timed`: the pairs with a timing row, for a timed sweep (a pair without one reruns)."""
    rp = ResumePlan()
    digests: dict[str, str | None] = {}
    for case, backend in pairs:
        prev = previous.get((case.id, backend))
        why = ""
        if prev is None:
            why = "new"
        elif prev.outcome.retried and not keep_errors:
            why = f"earlier {prev.outcome} (--keep-errors keeps them)"
        elif prev.case_digest != case.digest:
            why = "case definition changed"
        elif timed is not None and (case.id, backend) not in timed:
            why = "no timing row (--time)"
        elif not prev.outcome.retried:
            if backend not in digests:
                digests[backend] = identity(backend)
            if digests[backend] is None or prev.adapter_digest != digests[backend]:
                why = "adapter changed"
        if why:
            rp.todo.append((case, backend))
            if why != "new":
                rp.rerun[why] += 1
        else:
            rp.reused[prev.outcome] += 1
    return rp


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a sweep: what is on disk is kept; says how much is left."""

    def __init__(self, done: int, left: int, out_dir: Path):
        super().__init__(f"{done} pairs done this run, {left} left")
        self.done, self.left, self.out_dir = done, left, out_dir


def run_sweep(
    cases: list[Case],
    out_dir: str | Path,
    opts: SweepOptions = SweepOptions(),
    label: str = "",
    say: Callable[[str], None] | None = None,
) -> Counter:
    """Run the sweep into `out_dir`; returns counts of case outcomes (this run's and, under
    "resumed", the pairs reused). `say` receives one-line notes (what resume reused, what a
    fresh run dropped, how many pairs run). Raises results.DirectoryBusy if another run holds
    the directory, SweepInterrupted on Ctrl-C (rows written so far are kept)."""
    say = say or (lambda _: None)
    out_dir = Path(out_dir)
    run_id = uuid.uuid4().hex[:12]
    pairs = plan(cases, opts)
    with results.locked(out_dir, _command_line()):
        if opts.resume:
            identity = describe_isolated if opts.isolate else _describe_in_process
            timed = results.timed_pairs(out_dir) if opts.time else None
            rp = resume_plan(pairs, results.finished(out_dir), identity, opts.keep_errors, timed)
            todo = rp.todo
            if rp.summary(out_dir):
                say(rp.summary(out_dir))
        else:
            rp, todo = ResumePlan(), pairs
            dropped, kept = results.drop_pairs(out_dir, {(c.id, b) for c, b in pairs})
            if dropped or kept:
                say(
                    f"fresh: dropped {dropped} earlier rows of the {len(pairs)} pairs to run; "
                    f"kept {kept} rows of other pairs"
                )
        say(f"running {len(todo)} of {len(pairs)} pairs into {out_dir}")
        results.append_meta(
            out_dir,
            {
                "run_id": run_id,
                "label": label,
                "shard": list(opts.shard),
                "pairs": len(pairs),
                "resumed": len(pairs) - len(todo),
                "rerun": dict(rp.rerun),
                "fresh": not opts.resume,
                "command": _command_line(),
                "env": results.fingerprint(),
            },
        )
        counts = _run_pairs(todo, out_dir, opts, run_id, label)
        counts["resumed"] = len(pairs) - len(todo)
        results.write_parquet(out_dir)
    return counts


def _describe_in_process(backend: str) -> str | None:
    try:
        return adapter_digest(adapters.load(backend))
    except Exception:  # noqa: BLE001 - it fails again in run_one, which records why
        return None


def _run_pairs(
    todo: list[tuple[Case, str]], out_dir: Path, opts: SweepOptions, run_id: str, label: str
) -> Counter:
    counts: Counter = Counter()
    threads = opts.threads or thread_budget()
    if opts.threads and not opts.isolate:
        import torch

        torch.set_num_threads(opts.threads)
    bar = tqdm(
        todo,
        desc=label or "sweep",
        unit="case",
        disable=not opts.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    with results.ResultWriter(out_dir) as writer:
        try:
            for case, backend in bar:
                bar.set_postfix_str(case.id[:48], refresh=False)
                if opts.isolate:
                    timeout = opts.timeout_s or case.timeout_s
                    rows = run_isolated(case, backend, run_id, timeout, threads, opts.timing_args())
                else:
                    rows = run_one(
                        case, backend, run_id, opts.time, opts.baselines, opts.time_budget_s
                    )
                writer.write(rows)
                counts[rows[-1].outcome] += 1
        except KeyboardInterrupt:
            bar.close()
            results.write_parquet(out_dir)
            done = sum(counts.values())
            raise SweepInterrupted(done, len(todo) - done, out_dir) from None
    return counts


def parse_devices(text: str) -> list[str]:
    """`--devices cuda:0,cuda:1` (or `cpu,cpu`): one worker per entry; errors name the entry."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise ValueError(
            f"--devices: expected a comma-separated list such as cuda:0,cuda:1, got {text!r}"
        )
    for d in devices:
        kind, _, index = d.partition(":")
        if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or not (index or "0").isdigit():
            raise ValueError(f"--devices: {d!r} is not cpu, cuda or cuda:N")
    return devices


def device_worker_env(device: str, i: int) -> tuple[str, dict[str, str]]:
    """(the --device a worker runs its cases on, its extra environment): a GPU worker sees only
    its GPU (CUDA_VISIBLE_DEVICES) and runs on `cuda`, so case digests do not depend on which
    GPU a pair landed on; `cuda` without an index is the worker's position."""
    if device == "cpu":
        return "cpu", {}
    index = device.partition(":")[2] or str(i)
    return "cuda", {"CUDA_VISIBLE_DEVICES": index}


def run_on_devices(
    run_args: list[str], devices: list[str], out_dir: Path, threads: int | None = None
) -> tuple[list[Path], list[int]]:
    """`python -m harness run RUN_ARGS` once per device, worker i taking shard i/N of the pairs
    into OUT/shards/<i>; returns the shard directories and the workers' exit codes. Workers run
    at once (the sweep's results are merged by the caller); Ctrl-C kills every worker group."""
    n = len(devices)
    threads = threads or thread_budget(n)
    procs, dirs = [], []
    for i, dev in enumerate(devices):
        device, extra = device_worker_env(dev, i)
        shard_dir = out_dir / "shards" / str(i)
        cmd = [
            sys.executable, "-m", "harness", "run", *run_args, "--shard", f"{i}/{n}",
            "--device", device, "-o", str(shard_dir), "--no-progress", "--threads", str(threads),
        ]  # fmt: skip
        env = {**os.environ, **extra, "OMP_NUM_THREADS": str(threads)}
        shard_dir.mkdir(parents=True, exist_ok=True)
        log = open(shard_dir / "worker.log", "wb")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                ),
                log,
            )
        )
        dirs.append(shard_dir)
    try:
        codes = [p.wait() for p, _ in procs]
    finally:
        for p, log in procs:
            _kill_group(p)
            log.close()
    return dirs, codes
