"""bench/sweep.py runs a case file in process and prints its table: n/a memory on CPU, one row
per pair, and the reference cache shared by the backends of a case. No speed is asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sweep_main():
    spec = importlib.util.spec_from_file_location("bench_sweep", REPO / "bench" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_sweep_prints_a_row_per_pair_and_the_totals(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "sweeps:\n  - stage: quantize\n    tokens: [1, 33]\n"
        "  - stage: shared_expert\n    tokens: [5]\n    scale_ratios: [1]\n"
    )
    assert _sweep_main()([str(path), "-b", "reference", "-b", "tests.planted:Raises"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("quantize_", "shared_expert_"))]
    assert len(rows) == 6 and all(line.split()[-1] == "n/a" for line in rows)
    assert "shared_expert_t5_h256_i128_L10_normal_r1_s0" in out
    assert "total: 6 pairs" in out and "process peak n/a GiB" in out
    assert "reference cache 1 hits, 1 misses" in out  # the layer case, shared by both backends
    assert "2 error" in out  # a raising kernel is a row of the table, not a crash of the bench
