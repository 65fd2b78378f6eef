"""HTML accuracy report from results files: one self-contained page, plots embedded as PNG.

Data first, rendering later (STYLE.md rule 10): this module reads result rows and meta.json
and never runs a kernel. Sections: summary (outcome counts, worst cases first, counts by stage),
baseline comparison when given, error against tokens / clamp limit / scale ratio (matplotlib),
quantize mismatch classes, NaN traces (first stage with NaN, first divergent stage) and the
environment fingerprint. Every user-supplied string goes through Jinja2's autoescape.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from harness import results

OUTCOMES = ("pass", "fail", "error", "timeout", "crashed", "unsupported", "skipped")
_ORDER = {"crashed": 0, "timeout": 1, "error": 2, "fail": 3, "unsupported": 4, "skipped": 5}
MAX_WORST = 50
# The error measure per kind of output: how far outside the derived bound for summed stage
# outputs, calc_diff for layer outputs (both 0 when identical).
_ERROR_OF = {"grouped_gemm.out": "worst_ratio", "out": "calc_diff"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _error_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    recs = []
    for r in rows:
        key = _ERROR_OF.get(r.get("compare"))
        if key is None:
            continue
        v = (r.get("metrics") or {}).get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        recs.append(
            {
                "stage": r["stage"],
                "backend": r["backend"],
                "tokens": r["tokens"],
                "limit": r.get("limit"),
                "scale_ratio": r.get("scale_ratio"),
                "measure": key,
                "error": v,
                "outcome": r["outcome"],
            }
        )
    return pd.DataFrame(recs)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FLOOR = 1e-12  # where an error of exactly 0 (bit-identical) is drawn on a log axis
MAX_HEATMAP_ROWS = 60  # keep the page readable and small; the worst cases come first


def _plots(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    df = _error_frame(rows)
    out: list[dict[str, str]] = []
    if df.empty:
        return out
    plt = _plt()
    for axis in ("tokens", "limit", "scale_ratio"):
        d = df.dropna(subset=[axis])
        stages = [st for st, g in d.groupby("stage") if g[axis].nunique() >= 2]
        if not stages:
            continue
        fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
        for ax, stage in zip(axes[0], stages, strict=True):
            s = d[d["stage"] == stage]
            for backend, b in s.groupby("backend"):
                g = b.groupby(axis)["error"].max().sort_index()
                line = ax.plot(
                    g.index, g.values.clip(min=FLOOR), marker="o", label=str(backend)[:30]
                )
                zero = g[g <= 0]
                ax.plot(
                    zero.index,
                    [FLOOR] * len(zero),
                    marker="o",
                    ls="none",
                    mfc="white",
                    color=line[0].get_color(),
                )
            measure = s["measure"].iloc[0]
            note = " (<1 passes)" if measure == "worst_ratio" else ""
            ax.set_title(f"{stage}: {measure}{note}", fontsize=10)
            ax.set_xlabel(axis)
            ax.set_yscale("log")
            if axis == "tokens":
                ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        fig.tight_layout()
        title = (
            f"worst error vs {axis}, per stage and backend; hollow markers at {FLOOR:g} "
            f"are exactly 0 (bit-identical)"
        )
        out.append({"title": title, "png": _png(fig)})
        plt.close(fig)
    return out


def _bins(m: Any) -> list[Any]:
    return m["bins"] if isinstance(m, dict) else m


def _heatmap(rows: list[dict[str, Any]], key: str, value, xlabel: str, title: str):
    """One image row per (case, backend) holding metric `key` (a list, or a dict with bins)."""
    import numpy as np

    data = [[value(v) for v in _bins(r["metrics"][key])] for r in rows]
    if not data:
        return None
    labels = [f"{r['case_id'][:48]} [{r['backend'][:16]}]" for r in rows]
    grid = np.full((len(data), max(len(v) for v in data)), np.nan)
    for i, v in enumerate(data):
        grid[i, : len(v)] = v
    grid = np.log10(np.clip(grid, FLOOR, None))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.22 * len(data)))
    lo = np.log10(FLOOR)
    hi = max(float(np.nanmax(grid)) if np.isfinite(grid).any() else lo, lo + 1)
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=lo, vmax=hi, interpolation="none")
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel(xlabel)
    fig.colorbar(im, ax=ax, label=f"log10 error (floor {FLOOR:g} = exact)")
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return {"title": title, "png": png}


def _heatmaps(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Per-expert maps, one per stage (each with its own measure), then per-token."""

    def worst_first(have: list[dict[str, Any]], key: str, value) -> list[dict[str, Any]]:
        have = sorted(
            have, reverse=True, key=lambda r: max(map(value, _bins(r["metrics"][key])), default=0)
        )
        return have[:MAX_HEATMAP_ROWS]

    maps = []
    grouped = [r for r in rows if (r.get("metrics") or {}).get("per_group")]
    for stage in sorted({r["stage"] for r in grouped}):
        have = [r for r in grouped if r["stage"] == stage]
        bounded = all("worst_ratio" in g for r in have for g in r["metrics"]["per_group"])
        measure = "worst_ratio" if bounded else "calc_diff"
        value = lambda g, k=measure: float(g.get(k) or 0.0)  # noqa: E731
        note = (
            "|err| / derived bound, worst per expert: < 1 passes"
            if bounded
            else ("calc_diff of each expert's L2 rows")
        )
        maps.append(
            _heatmap(
                worst_first(have, "per_group", value),
                "per_group",
                value,
                "expert",
                f"{stage}: per-expert error ({note})",
            )
        )
    tokens = [r for r in rows if (r.get("metrics") or {}).get("per_token")]
    maps.append(
        _heatmap(
            worst_first(tokens, "per_token", float),
            "per_token",
            float,
            "token bin",
            "per-token error of layer outputs (max |err| / max |ref| per bin of tokens)",
        )
    )
    return [h for h in maps if h]


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _speed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Speed section: every timing row with the verdict of its own case and backend.

    The headline table and the plots hold only pairs whose case passed; the detail table holds
    every timed pair, a failing one marked so its figure is never read as valid.
    """
    timed, untimed = [], []
    for r in rows:
        if r.get("compare") != results.TIMING:
            continue
        m = r.get("metrics") or {}
        if r.get("outcome", "timed") != "timed" or "latency_us" not in m:
            untimed.append({**r, "verdict": m.get("verdict", "-")})
            continue
        timed.append(
            {
                "case_id": r["case_id"],
                "backend": r["backend"],
                "stage": r.get("stage"),
                "tokens": r.get("tokens"),
                "verdict": m.get("verdict", "-"),
                "valid": m.get("verdict") == "pass",
                "median": m["latency_us"],
                "latency": _latency(r),
                "mode": m.get("mode", "-") + (" (graph failed)" if m.get("graph_error") else ""),
                "eager": _fmt(m.get("eager_us"), ".1f"),
                "spread": _fmt(100 * m["rel_spread"], ".1f") if "rel_spread" in m else "-",
                "stop": f"{m.get('stop_reason', '-')}, n={m.get('n_samples', '-')}",
                "tflops": _fmt(m.get("tflops")),
                "gbps": _fmt(m.get("gbps")),
                "roofline_pct": m.get("roofline_pct"),
                "roof": _fmt(m.get("roofline_pct"), ".2g"),
                "baseline": m.get("baseline") or "-",
                "ratio": _fmt(m.get("ratio_vs_baseline"), ".2f"),
            }
        )
    return {
        "headline": [t for t in timed if t["valid"]],
        "detail": timed,
        "untimed": untimed,
        "plots": _speed_plots([t for t in timed if t["valid"]]),
    }


def _speed_plots(timed: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Per stage: median latency vs tokens, and percent of the roofline vs tokens."""
    df = pd.DataFrame(timed)
    out: list[dict[str, str]] = []
    if df.empty:
        return out
    plt = _plt()
    for stage, s in df.groupby("stage"):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
        for backend, b in s.groupby("backend"):
            g = b.groupby("tokens")
            line = ax1.plot(
                g["median"].min().index, g["median"].min().values, marker="o", label=backend
            )
            eager = b[~b["mode"].str.startswith("graph")]
            ax1.plot(eager["tokens"], eager["median"], "o", mfc="white", color=line[0].get_color())
            roof = g["roofline_pct"].max().dropna()
            if len(roof):
                ax2.plot(roof.index, roof.values, marker="o", label=backend)
        ax1.set(xscale="log", yscale="log", xlabel="tokens", ylabel="median us per call")
        ax2.set(xscale="log", xlabel="tokens", ylabel="% of roofline", ylim=(0, None))
        for ax in (ax1, ax2):
            ax.legend(fontsize=7)
        fig.suptitle(f"{stage}: speed of passing cases", fontsize=10)
        fig.tight_layout()
        title = f"{stage}: latency and roofline fraction vs tokens (hollow: eager, graph failed)"
        out.append({"title": title, "png": _png(fig)})
        plt.close(fig)
    return out


def _classes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        cls = (r.get("metrics") or {}).get("classes")
        if cls and any(v for k, v in cls.items() if k != "exact"):
            nonzero = {k: v for k, v in cls.items() if v and k != "exact"}
            out.append({**r, "classes": json.dumps(nonzero)})
    return out


def _nan_traces(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        m = r.get("metrics") or {}
        if r.get("compare") == "out" and m.get("nan_first_stage"):
            out.append(
                {
                    **r,
                    "nan_first_stage": m["nan_first_stage"],
                    "first_divergent_stage": m.get("first_divergent_stage"),
                }
            )
    return out


def _baseline(rows: list[dict[str, Any]], baseline: str | Path) -> dict[str, Any]:
    base = results.read_rows(baseline)
    d = results.compare_sets(base, rows)
    sections = []
    for name in ("regressions", "new_failures", "improvements", "missing"):
        items = [
            {
                "case_id": k[0],
                "backend": k[1],
                "was": o["outcome"] if o else "-",
                "now": n["outcome"] if n else "-",
                "message": (n or {}).get("message", ""),
            }
            for k, o, n in d[name]
        ]
        sections.append((name.replace("_", " "), items))
    t = results.compare_timings(base, rows)
    for name, items in t.items():
        note = "95% CI of the median ratio straddles a SAME boundary: noise, no verdict"
        sections.append(
            (
                f"timing {name}",
                [
                    {
                        "case_id": k[0],
                        "backend": k[1],
                        "was": _latency(o),
                        "now": _latency(n),
                        "message": f"x{v['ratio']:.3f} [{v['ratio_lo']:.3f}, {v['ratio_hi']:.3f}]"
                        + (f"; {note}" if name == "ambiguous" else ""),
                    }
                    for k, o, n, v in items
                ],
            )
        )
    return {"source": str(baseline), "sections": sections}


def _latency(r: dict[str, Any]) -> str:
    m = r["metrics"]
    lo, hi = m.get("latency_p10_us", m["latency_us"]), m.get("latency_p90_us", m["latency_us"])
    return f"{m['latency_us']:.1f} us ({lo:.1f}..{hi:.1f})"


def render(
    results_path: str | Path,
    out: str | Path,
    baseline: str | Path | None = None,
    title: str | None = None,
) -> Path:
    """Write the report for a results directory (or file) to `out`; returns its path."""
    rows = results.latest(results.read_rows(results_path))
    finals = [r for r in rows if r.get("final")]
    counts = Counter(r["outcome"] for r in finals)
    worst = sorted(
        (r for r in finals if r["outcome"] != "pass"),
        key=lambda r: (_ORDER.get(r["outcome"], 9), r["case_id"]),
    )
    by_stage: dict[str, Counter] = {}
    for r in finals:
        by_stage.setdefault(r["stage"], Counter())[r["outcome"]] += 1
    meta_dir = Path(results_path) if Path(results_path).is_dir() else Path(results_path).parent
    env = [
        sorted(
            {**run.get("env", {}), "run_id": run.get("run_id"), "shard": run.get("shard")}.items()
        )
        for run in results.read_meta(meta_dir)["runs"][-3:]
    ]
    template = jinja2.Environment(
        loader=jinja2.PackageLoader("harness", "templates"),
        autoescape=True,  # case names and messages are user input: <script> renders as text
        undefined=jinja2.StrictUndefined,
    ).get_template("report.html.j2")
    html = template.render(
        title=title or f"dsv4-nvfp4 accuracy report: {meta_dir.name}",
        source=str(results_path),
        n_rows=len(rows),
        n_cases=len(finals),
        counts=[(o, counts[o]) for o in OUTCOMES if counts[o]],
        worst=worst[:MAX_WORST],
        n_worst_more=max(0, len(worst) - MAX_WORST),
        outcome_names=OUTCOMES,
        by_stage=sorted((k, dict(v)) for k, v in by_stage.items()),
        baseline=_baseline(rows, baseline) if baseline else None,
        plots=_plots(rows),
        heatmaps=_heatmaps(rows),
        speed=_speed(rows),
        classes=_classes(rows),
        nan_traces=_nan_traces(rows),
        env=env,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
