"""HTML accuracy report from results files: one self-contained page, plots embedded as PNG.

Data first, rendering later (STYLE.md rule 10): this module reads result rows and meta.json
and never runs a kernel. Laid out as a kernel engineer reads it: the verdict matrix (stage x
backend: counts, worst case) first; then the failures, worst first, each with its diagnosis and
first bad element (unsupported pairs collapsed, grouped by reason); headroom (how much of the
pass line the outputs use); the baseline comparison when given; error against tokens / clamp
limit / scale ratio with the pass line drawn and failing points marked; per-expert heatmaps on
a pass/fail scale; the Speed section; the bit-exact stages (mismatch classes per case);
diagnoses (where a defect was born and what it matches: SwiGLU variant, alpha, rounding
direction, quantizer policy, misplaced scale rows, non-DSV4 conventions); NaN traces and the
environment (GEMM backend per adapter, command line, git sha and dirty flag). Which outputs are
plotted, with which measure, and which are discrete comes from harness.records STAGE_METRICS.
Every user-supplied string goes through Jinja2's autoescape.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from harness import results
from harness.cases import Budget, Stage
from harness.records import How, Outcome, Row, compared, measure_of

OUTCOMES = tuple(o for o in Outcome if o is not Outcome.TIMED)  # a final row's outcomes
MAX_WORST = 50
# The error measure of an output is the one harness.records.STAGE_METRICS names (`measure_of`):
# how far outside the derived bound for summed stage outputs (worst_ratio), calc_diff for layer
# outputs (both 0 when identical). Its pass line: the bound is 1 in worst_ratio units; calc_diff
# passes up to the case's budget (`_pass_line`).
_DEFAULT_BUDGET = Budget().calc_diff
# Diagnoses a failing output's metrics may carry (metric key -> what the report calls it).
_DIAGNOSES = {
    "first_divergent_stage": "first divergent stage",
    "nan_first_stage": "first stage with NaN/Inf",
    "matches_alpha": "matches alpha variant",
    "swiglu_convention": "SwiGLU convention",
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _pass_line(row: Row) -> float:
    """Where the row's error measure stops passing: the derived bound (1 in worst_ratio units),
    or the calc_diff budget the verdict used (derived per case and recorded in the metrics; else
    the case's own; rows written before budgets were recorded: the default)."""
    if measure_of(row) == "worst_ratio":
        return 1.0
    used = row.metrics.number("budget_calc_diff")
    return used or _float(row.value("budget_calc_diff")) or _DEFAULT_BUDGET


_AXES = ("tokens", "limit", "scale_ratio")  # case fields the error is plotted against


def _error_frame(rows: list[Row]) -> pd.DataFrame:
    recs = []
    for r in rows:
        key = measure_of(r)
        v = r.metrics.number(key) if key else None
        if v is None:
            continue
        recs.append(
            {
                "stage": r.stage,
                "backend": r.backend,
                "case_id": r.case_id,
                **{axis: r.value(axis) for axis in _AXES},
                "measure": key,
                "error": v,
                "pass_line": _pass_line(r),
                "outcome": r.outcome.value,
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


def _plots(rows: list[Row]) -> list[dict[str, Any]]:
    """Worst error per axis value, per stage and backend, with the pass line drawn (bound or
    budget) and the values of failing cases marked with a red cross. Each entry also carries
    `pass_lines` and `n_failing` per stage, the data behind what is drawn."""
    df = _error_frame(rows)
    out: list[dict[str, Any]] = []
    if df.empty:
        return out
    plt = _plt()
    for axis in _AXES:
        d = df.dropna(subset=[axis])
        stages = [st for st, g in d.groupby("stage") if g[axis].nunique() >= 2]
        if not stages:
            continue
        fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
        lines: dict[str, list[float]] = {}
        failing: dict[str, int] = {}
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
                bad = b[b["outcome"] != Outcome.PASS.value]
                ax.plot(
                    bad[axis],
                    bad["error"].clip(lower=FLOOR),
                    marker="x",
                    ms=9,
                    mew=2,
                    ls="none",
                    color="#c00000",
                )
                failing[stage] = failing.get(stage, 0) + len(bad)
            lines[stage] = sorted(set(s["pass_line"]))
            for y in lines[stage]:
                ax.axhline(y, color="#c00000", ls="--", lw=1)
            measure = s["measure"].iloc[0]
            line_name = "bound" if measure == "worst_ratio" else "budget"
            ax.set_title(f"{stage}: {measure} (dashed: {line_name})", fontsize=10)
            ax.set_xlabel(axis)
            ax.set_yscale("log")
            if axis == "tokens":
                ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
        fig.tight_layout()
        title = (
            f"worst error vs {axis}, per stage and backend; dashed red: the pass line (derived "
            f"bound or budget), red crosses: failing cases; hollow markers at {FLOOR:g} are "
            f"exactly 0 (bit-identical)"
        )
        out.append({"title": title, "png": _png(fig), "pass_lines": lines, "n_failing": failing})
        plt.close(fig)
    return out


def _bins(m: Any) -> list[Any]:
    return m["bins"] if isinstance(m, dict) else m


# Per-expert heatmap scale: log10(error / pass line) from -3 to +3. Below the line greens (dark:
# far below, exact is the darkest), above it reds, so "passes" and "fails" are different hues,
# not two shades of one; an expert that received no tokens is grey.
RATIO_DECADES = 3.0
NO_TOKENS = "#c8c8c8"


def _ratio_cmap():
    import numpy as np
    from matplotlib.colors import ListedColormap

    plt = _plt()
    greens = plt.get_cmap("Greens")(np.linspace(0.95, 0.35, 128))
    reds = plt.get_cmap("Reds")(np.linspace(0.5, 1.0, 128))
    return ListedColormap(np.vstack([greens, reds]), name="pass_fail").with_extremes(bad=NO_TOKENS)


def _label(r: Row) -> str:
    return f"{r.case_id} [{r.backend}]"


def expert_grid(rows: list[Row]) -> tuple[Any, list[str]]:
    """Rows (case, backend) x experts of log10(error / pass line), NaN where the expert got no
    tokens; clipped to +-RATIO_DECADES (an exact 0 sits at the bottom). Labels: full case ids."""
    import numpy as np

    width = max(len(r.metrics["per_group"]) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        line = _pass_line(r)
        for j, g in enumerate(r.metrics["per_group"]):
            if g.get("rows", 1) == 0:
                continue  # no tokens: NaN, drawn grey
            v = _float(g.get(measure_of(r) or "calc_diff")) or 0.0
            grid[i, j] = np.log10(max(v / line, 10**-RATIO_DECADES))
    grid = np.clip(grid, -RATIO_DECADES, RATIO_DECADES)
    return grid, [_label(r) for r in rows]


def _expert_heatmap(rows: list[Row], title: str) -> dict[str, str]:
    grid, labels = expert_grid(rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.2 * len(rows)))
    im = ax.imshow(
        grid,
        aspect="auto",
        cmap=_ratio_cmap(),
        vmin=-RATIO_DECADES,
        vmax=RATIO_DECADES,
        interpolation="none",
    )
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xlabel("local expert (grey: no tokens)")
    bar = fig.colorbar(im, ax=ax, label="log10(error / pass line): green passes, red fails")
    bar.ax.axhline(0, color="black", lw=1.5)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return {"title": title, "png": png}


def _heatmap(rows: list[Row], key: str, value, xlabel: str, title: str):
    """One image row per (case, backend) holding metric `key` (a list, or a dict with bins)."""
    import numpy as np

    data = [[value(v) for v in _bins(r.metrics[key])] for r in rows]
    if not data:
        return None
    labels = [_label(r) for r in rows]
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


def _heatmaps(rows: list[Row]) -> list[dict[str, str]]:
    """Per-expert maps, one per stage, on the pass/fail scale; then per-token."""
    maps = []
    grouped = [r for r in rows if measure_of(r) and r.metrics.get("per_group")]
    for stage in sorted({r.stage for r in grouped}):
        have = [r for r in grouped if r.stage == stage]
        have = sorted(have, key=lambda r: -_severity(r))[:MAX_HEATMAP_ROWS]
        measure = measure_of(have[0])
        line = "the derived bound" if measure == "worst_ratio" else "the case budget"
        maps.append(
            _expert_heatmap(
                have,
                f"{stage}: per-expert {measure} / {line} (worst per expert; worst cases "
                f"first; grey: the expert got no tokens)",
            )
        )

    def worst_first(have: list[Row], key: str, value) -> list[Row]:
        have = sorted(
            have, reverse=True, key=lambda r: max(map(value, _bins(r.metrics[key])), default=0)
        )
        return have[:MAX_HEATMAP_ROWS]

    tokens = [r for r in rows if r.metrics.get("per_token")]
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


def _severity(row: Row) -> float:
    """Error over pass line of an output row (0 without a measure); > 1 fails."""
    key = measure_of(row)
    v = row.metrics.number(key) if key else None
    return 0.0 if v is None else v / _pass_line(row)


# --------------------------------------------------------------------------------------------
# the answer first: verdicts, failures, headroom, bit-exact stages


def _stage_order(stage: str) -> int:
    names = [s.value for s in Stage]
    return names.index(stage) if stage in names else len(names)


def _by_pair(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if not r.final and r.compare != results.TIMING:
            out.setdefault(r.pair, []).append(r)
    return out


def _worst_key(final: Row, outputs: list[Row]) -> tuple[int, float]:
    """Sort key, worst first: outcome severity, then the largest error over pass line."""
    return (-final.outcome.severity, -max(map(_severity, outputs), default=0.0))


def _verdicts(finals: list[Row], outputs) -> dict[str, Any]:
    """Stage x backend: outcome counts, the cell's verdict (its worst outcome) and worst case."""
    backends = sorted({r.backend for r in finals})
    stages = sorted({r.stage for r in finals}, key=_stage_order)
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in finals:
        c = cells.setdefault((r.stage, r.backend), {"counts": Counter(), "rows": []})
        c["counts"][r.outcome] += 1
        c["rows"].append(r)
    grid = []
    for st in stages:
        line = []
        for b in backends:
            c = cells.get((st, b))
            if c is None:
                line.append(None)
                continue
            ran = [r for r in c["rows"] if r.outcome.ran]
            worst = min(ran or c["rows"], key=lambda r: _worst_key(r, outputs.get(r.pair, [])))
            measured = [o for o in outputs.get(worst.pair, []) if measure_of(o)]
            sev = max(map(_severity, measured), default=None)
            shown = (worst.outcome.ran and worst.outcome is not Outcome.PASS) or sev is not None
            line.append(
                {
                    "verdict": worst.outcome,
                    "counts": [(o, c["counts"][o]) for o in OUTCOMES if c["counts"][o]],
                    "worst": worst.case_id if shown else None,
                    "worst_of_line": sev,
                    "worst_message": worst.message,
                }
            )
        grid.append((st, line))
    return {"backends": backends, "rows": grid}


def _failed(r: Row) -> bool:
    """Ran and did not pass."""
    return r.outcome.ran and r.outcome is not Outcome.PASS


def _failures(finals: list[Row], outputs) -> dict[str, Any]:
    """Pairs that ran and did not pass, worst first, each with its failing outputs (measure
    against the pass line, first bad element, diagnoses); unsupported/skipped by reason."""
    bad = [r for r in finals if _failed(r)]
    bad.sort(key=lambda r: (*_worst_key(r, outputs.get(r.pair, [])), r.case_id))
    items = []
    for r in bad[:MAX_WORST]:
        outs = []
        for o in outputs.get(r.pair, []):
            if o.outcome is Outcome.PASS:
                continue
            m = o.metrics
            measure = measure_of(o)
            outs.append(
                {
                    "compare": o.compare,
                    "message": "" if o.message == r.message else o.message,
                    "measure": measure,
                    "value": _fmt(m.number(measure)) if measure else "-",
                    "pass_line": _fmt(_pass_line(o)) if measure else "-",
                    "first_bad": m.first_bad(),
                    "diagnoses": [
                        (name, m[k]) for k, name in _DIAGNOSES.items() if m.get(k) is not None
                    ],
                }
            )
        items.append({"row": r, "outputs": outs})
    reasons: Counter = Counter(
        (r.outcome, r.backend, r.message) for r in finals if not r.outcome.ran
    )
    return {
        "pairs": items,
        "n_more": max(0, len(bad) - MAX_WORST),
        "n_bad": len(bad),
        "not_run": sorted(reasons.items(), key=lambda kv: -kv[1]),
        "n_not_run": sum(reasons.values()),
    }


def _headroom(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (stage, backend, summed output): how much of its pass line the worst and the median
    case use, and the error sizes the rows carry (signed mean error and bf16 ulps when the
    metrics record them)."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if measure_of(r) and not r.final:
            groups.setdefault((r.stage, r.backend, r.compare), []).append(r)
    out = []
    for (stage, backend, compare), rs in sorted(
        groups.items(), key=lambda kv: (_stage_order(kv[0][0]), kv[0][1:])
    ):
        used = sorted(_severity(r) for r in rs)

        def worst(key: str, rs=rs) -> str:
            vals = [v for r in rs if (v := r.metrics.number(key)) is not None and v == v]
            return _fmt(max(vals, key=abs)) if vals else "-"

        out.append(
            {
                "stage": stage,
                "backend": backend,
                "compare": compare,
                "measure": measure_of(rs[0]),
                "n": len(rs),
                "n_fail": sum(r.outcome is not Outcome.PASS for r in rs),
                "worst_used": _fmt(used[-1], ".3g"),
                "median_used": _fmt(used[len(used) // 2], ".3g"),
                "max_abs": worst("max_abs"),
                "mean_abs": worst("mean_abs"),
                "mean_err": worst("mean_err"),
                "max_ulps": worst("max_ulps_bf16"),
            }
        )
    return out


def _discrete(r: Row) -> bool:
    c = compared(r.stage, r.compare)
    return c is not None and c.discrete and not r.final


def _bit_exact(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (stage, backend) of the discrete outputs (codes, scale bytes, layouts; harness.records
    STAGE_METRICS): how many were compared, bit-exact, different only in accepted classes,
    different as traced layer intermediates (the verdict is on the layer output), failing."""
    groups: dict[tuple[str, str], Counter] = {}
    for r in rows:
        if not _discrete(r):
            continue
        c = groups.setdefault((r.stage, r.backend), Counter())
        equal = bool(r.metrics.get("equal"))
        passed = r.outcome is Outcome.PASS
        traced = compared(r.stage, r.compare).how is How.INFORMATIONAL
        c["outputs"] += 1
        c["exact"] += equal
        c["classified"] += not equal and passed and not traced
        c["traced"] += not equal and passed and traced
        c["fail"] += not passed
    return [
        {"stage": st, "backend": b, **{k: c[k] for k in _BIT_EXACT_COUNTS}}
        for (st, b), c in sorted(groups.items(), key=lambda kv: (_stage_order(kv[0][0]), kv[0][1]))
    ]


_BIT_EXACT_COUNTS = ("outputs", "exact", "classified", "traced", "fail")


def _mismatches(rows: list[Row]) -> list[dict[str, Any]]:
    """Every discrete output that is not bit-exact, one line per (case, backend, output), failing
    first: how many elements differ, their classes where classified, the first one."""
    out = []
    for r in rows:
        m = r.metrics
        if not _discrete(r) or m.get("equal"):
            continue
        n = m.get("n_mismatch")
        if n is None:  # a layer intermediate's codes and scales, counted apart
            n = (m.get("codes_mismatch") or 0) + (m.get("scales_mismatch") or 0)
        cls = {k: v for k, v in (m.get("classes") or {}).items() if v and k != "exact"}
        out.append(
            {
                "case_id": r.case_id,
                "backend": r.backend,
                "compare": r.compare,
                "outcome": r.outcome,
                "n": n,
                "numel": m.get("numel", "-"),
                "classes": ", ".join(f"{k} {v}" for k, v in cls.items()) or "-",
                "first_bad": m.first_bad(),
            }
        )
    out.sort(key=lambda d: (d["outcome"] is Outcome.PASS, d["case_id"], d["compare"]))
    return out[: MAX_WORST * 4]


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _speed(rows: list[Row]) -> dict[str, Any]:
    """The Speed section: every timing row with the verdict of its own case and backend.

    The headline table and the plots hold only pairs whose case passed; the detail table holds
    every timed pair, a failing one marked so its figure is never read as valid.
    """
    timed, untimed = [], []
    for r in rows:
        if r.compare != results.TIMING:
            continue
        m = r.metrics
        if r.outcome is not Outcome.TIMED or "latency_us" not in m:
            untimed.append({"row": r, "verdict": m.get("verdict", "-")})
            continue
        timed.append(
            {
                "case_id": r.case_id,
                "backend": r.backend,
                "stage": r.stage,
                "tokens": r.value("tokens"),
                "verdict": m.get("verdict", "-"),
                "valid": m.get("verdict") == Outcome.PASS,
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


def _diagnosis(r: Row) -> str:
    """What the harness named about one comparison row (harness/stages/), as one line."""
    m = r.metrics
    parts = []
    if r.outcome is not Outcome.PASS and m.get("first_divergent_stage"):
        parts.append(f"first divergent stage {m['first_divergent_stage']}")
    for key, what in (
        ("matches_variant", "SwiGLU matches"),
        ("matches_alpha", "alpha matches"),
        ("groups_misplaced", "scale rows misplaced for groups"),
        ("not_dsv4", "judged as declared, not DSV4"),
    ):
        if m.get(key):
            parts.append(f"{what} {m[key]}")
    direction = (m.get("rounding") or {}).get("direction")
    if direction:
        parts.append(f"rounding {direction}")
    cls = m.get("classes") or {}
    pol = [f"{k} x{cls[k]}" for k in ("scale_floor", "nan_scale_byte", "nan_amax") if cls.get(k)]
    if pol:
        parts.append("policy " + ", ".join(pol))
    if m.get("gain") is not None and r.outcome is not Outcome.PASS and "gain" in r.message:
        parts.append(f"gain {m['gain']:.5g}")
    return "; ".join(parts)


def _diagnoses(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.final:
            continue
        d = _diagnosis(r)
        if d:
            out.append({"row": r, "diagnosis": d})
    return out


def _nan_traces(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        m = r.metrics
        if r.compare == "out" and m.get("nan_first_stage"):
            out.append(
                {
                    "row": r,
                    "nan_first_stage": m["nan_first_stage"],
                    "first_divergent_stage": m.get("first_divergent_stage"),
                }
            )
    return out


def _baseline(rows: list[Row], baseline: str | Path) -> dict[str, Any]:
    base = results.read_rows(baseline)
    d = results.compare_sets(base, rows)
    sections = []
    for name in ("regressions", "new_failures", "improvements", "missing"):
        items = [
            {
                "case_id": k[0],
                "backend": k[1],
                "was": o.outcome if o else "-",
                "now": n.outcome if n else "-",
                "message": n.message if n else "",
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


def _latency(r: Row) -> str:
    m = r.metrics
    lo, hi = m.get("latency_p10_us", m["latency_us"]), m.get("latency_p90_us", m["latency_us"])
    return f"{m['latency_us']:.1f} us ({lo:.1f}..{hi:.1f})"


def _environment(meta_dir: Path) -> list[list[tuple[str, Any]]]:
    """The last runs' environments (meta.json), each led by its command line and git state."""
    out = []
    for run in results.read_meta(meta_dir)["runs"][-3:]:
        env = dict(run.get("env", {}))
        head = {
            "command": run.get("command", "- (not recorded by the harness that ran it)"),
            "run_id": run.get("run_id"),
            "git_sha": env.pop("git_sha", None),
            "git_dirty": env.pop("git_dirty", "- (not recorded)"),
            "shard": run.get("shard"),
        }
        out.append([*head.items(), *sorted(env.items())])
    return out


def _gemm_backends(finals: list[Row]) -> list[dict[str, Any]]:
    """Which grouped-GEMM backend each adapter ran its pairs on (rows' `gemm_backend`, recorded
    where the adapter says; "-" for adapters that do not, and for pairs that never ran)."""
    c: Counter = Counter(
        (r.backend, str(r.value("gemm_backend") or "-")) for r in finals if r.outcome.ran
    )
    return [{"backend": b, "gemm_backend": g, "pairs": n} for (b, g), n in sorted(c.items())]


def render(
    results_path: str | Path,
    out: str | Path,
    baseline: str | Path | None = None,
    title: str | None = None,
) -> Path:
    """Write the report for a results directory (or file) to `out`; returns its path."""
    rows = results.latest(results.read_rows(results_path))
    finals = [r for r in rows if r.final]
    counts = Counter(r.outcome for r in finals)
    outputs = _by_pair(rows)
    ran = {r.stage for r in finals if r.outcome.ran}
    meta_dir = Path(results_path) if Path(results_path).is_dir() else Path(results_path).parent
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
        n_ran=sum(r.outcome.ran for r in finals),
        counts=[(o, counts[o]) for o in OUTCOMES if counts[o]],
        verdicts=_verdicts(finals, outputs),
        failures=_failures(finals, outputs),
        headroom=_headroom(rows),
        bit_exact=_bit_exact(rows),
        mismatches=_mismatches(rows),
        layers_ran=any(Stage(st).is_layer for st in ran if st in {x.value for x in Stage}),
        baseline=_baseline(rows, baseline) if baseline else None,
        plots=_plots(rows),
        heatmaps=_heatmaps(rows),
        speed=_speed(rows),
        nan_traces=_nan_traces(rows),
        diagnoses=_diagnoses(rows),
        env=_environment(meta_dir),
        gemm_backends=_gemm_backends(finals),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
