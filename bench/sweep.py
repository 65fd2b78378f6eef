"""Run a case file on a backend and device; print wall time and peak GPU memory per case.

    python bench/sweep.py cases/dsv4_pro.yaml [-b dsv4-torch] [--device cuda] [--filter STR]
                          [--shard I/N]

Every (case, backend) pair runs in this process, case-major as `harness.runner.plan` orders them
(so the reference side of a case is computed once for its backends: harness.refcache), through
`harness.runner.run_one`, which records a raising kernel as an error row and goes on. Per pair:
the outcome, the wall time (CUDA synchronized at both ends) and the peak GPU memory allocated by
torch in this process while it ran (`torch.cuda.max_memory_allocated`, reset before each pair;
"n/a" on CPU). Then one line per stage and a total: pairs, wall time, the process's peak, the
outcomes and the reference cache's hits. The goal of docs/design.md §5 (dsv4_pro.yaml with
dsv4-torch on one H200 in < 3 min, < 24 GB per process) is read off the total line.
Nothing is written to disk; `python -m harness run` is the sweep that records results.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from harness import refcache  # noqa: E402
from harness.cases import load_many  # noqa: E402
from harness.runner import SweepOptions, plan, run_one  # noqa: E402

GIB = 2.0**30


def _shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()) or not 0 <= int(i) < int(n):
        raise argparse.ArgumentTypeError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="case files")
    ap.add_argument("-b", "--backend", action="append", help="backend(s); default: the cases'")
    ap.add_argument("--device", help="run every case on this device (cpu, cuda, cuda:N)")
    ap.add_argument("--filter", help="substring(s) of case ids, comma-separated")
    ap.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: every N-th pair from I")
    a = ap.parse_args(argv)
    cases = load_many(a.files)
    if a.device:
        cases = [dataclasses.replace(c, device=a.device) for c in cases]
    opts = SweepOptions(
        backends=tuple(a.backend) if a.backend else None, case_filter=a.filter, shard=a.shard
    )
    pairs = plan(cases, opts)
    devices = {torch.device(c.device) for c, _ in pairs}
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda and not torch.cuda.is_available():
        print("cases need CUDA; torch.cuda.is_available() is False on this machine")
        return 2
    name = ", ".join(sorted(str(d) for d in devices))
    if cuda:
        name += f" ({torch.cuda.get_device_name(cuda[0])})"
    print(f"{len(pairs)} pairs of {', '.join(a.files)} on {name}; torch {torch.__version__}")
    print(f"{'case':<72} {'backend':<14} {'outcome':<11} {'wall s':>8} {'peak GiB':>9}")
    outcomes: Counter = Counter()
    by_stage: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # n, wall, peak
    peak_all = 0
    t_all = time.perf_counter()
    for case, backend in pairs:
        dev = torch.device(case.device)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        t0 = time.perf_counter()
        rows = run_one(case, backend)
        _sync(dev)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        peak_all = max(peak_all, peak or 0)
        outcome = rows[-1].outcome.value
        outcomes[outcome] += 1
        st = by_stage[case.stage.value]
        st[0], st[1], st[2] = st[0] + 1, st[1] + wall, max(st[2], peak or 0)
        print(f"{case.id:<72} {backend:<14} {outcome:<11} {wall:8.2f} {_gib(peak):>9}")
    total = time.perf_counter() - t_all
    print(f"\n{'stage':<16} {'pairs':>6} {'wall s':>9} {'peak GiB':>9}")
    for stage, (n, wall, peak) in by_stage.items():
        print(f"{stage:<16} {n:>6} {wall:9.2f} {_gib(peak if cuda else None):>9}")
    c = refcache.CACHE
    print(
        f"\ntotal: {len(pairs)} pairs, {total:.1f} s wall, process peak "
        f"{_gib(peak_all if cuda else None)} GiB; "
        + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
        + f"; reference cache {c.hits} hits, {c.misses} misses"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
