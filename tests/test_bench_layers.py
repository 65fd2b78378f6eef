"""bench/layers.py on CPU: the layers are judged (every pair a verdict row), and with no CUDA the
timing rows say why nothing was timed: the table never shows a speed without its verdict."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from harness import results

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_layers", REPO / "bench" / "layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_layers_judges_every_layer_and_times_nothing_without_cuda(tmp_path, capsys):
    bench = _bench()
    rc = bench.main(
        ["--preset", "tiny", "--tokens", "3,17", "--device", "cpu", "--backends", "dsv4-torch",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    rows = bench.table(tmp_path)
    assert [(r[0], r[1]) for r in rows] == [
        (layer, t) for layer in bench.LAYERS for t in ("3", "17")
    ]
    assert {r[3] for r in rows} == {"pass"}  # each layer's verdict, from the same run
    assert all("timing needs CUDA" in r[4] and r[5] == r[6] == "" for r in rows)
    finals = [r for r in results.read_rows(tmp_path) if r.final]
    assert len(finals) == 6 and all(r.outcome.value == "pass" for r in finals)
    assert "layer | tokens | backend | verdict" in capsys.readouterr().out
