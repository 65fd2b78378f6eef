"""Time the HTML report on N result rows (issue: 1,000 rows in under 10 s on CPU, under 5 MB).

    python bench/report_render.py [--rows 1000 2000 5000]

Runs the smoke sweep once on the default backend plus a planted GEMM defect (so every section
has content), replicates its rows to each size with distinct case ids, renders, and prints a
table: rows, render seconds (median of 3), HTML size. Timing lives here, never in a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import results  # noqa: E402
from harness.cases import load_cases  # noqa: E402
from harness.report import render  # noqa: E402
from harness.runner import SweepOptions, run_sweep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 2000, 5000])
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    _, cases = load_cases(REPO / "cases" / "smoke.yaml")
    run_sweep(
        cases,
        tmp / "src",
        SweepOptions(("dsv4-torch", "tests.planted:SkipLastKBlock"), progress=False),
    )
    base = results.read_rows(tmp / "src")
    print(f"{'rows':>6} {'render s (median of 3)':>24} {'size MB':>8}")
    for n in a.rows:
        rows = [
            base[j % len(base)].replace(case_id=f"{base[j % len(base)].case_id}_x{j // len(base)}")
            for j in range(n)
        ]
        d = tmp / f"n{n}"
        with results.ResultWriter(d) as w:
            w.write(rows)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            html = render(d, d / "index.html")
            times.append(time.perf_counter() - t0)
        print(f"{n:>6} {statistics.median(times):>24.2f} {html.stat().st_size / 2**20:>8.2f}")


if __name__ == "__main__":
    main()
