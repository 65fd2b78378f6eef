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
environment. Every user-supplied string goes through Jinja2's autoescape.
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
from harness.cases import Budget, Stage

OUTCOMES = ("pass", "fail", "error", "timeout", "crashed", "unsupported", "skipped")
_ORDER = {"crashed": 0, "timeout": 1, "error": 2, "fail": 3, "unsupported": 4, "skipped": 5}
_NOT_RUN = ("unsupported", "skipped")
MAX_WORST = 50
# The error measure per kind of output: how far outside the derived bound for summed stage
# outputs, calc_diff for layer outputs (both 0 when identical). Its pass line: the bound is 1 in
# worst_ratio units; calc_diff passes up to the case's budget (`_pass_line`).
_ERROR_OF = {"grouped_gemm.out": "worst_ratio", "out": "calc_diff"}
_DEFAULT_BUDGET = Budget().calc_diff
# The first bad element of an output, as the metrics name it (index), and the values beside it
# that the report shows where a row carries them.
_FIRST_BAD = ("first_outside", "first_mismatch")
_FIRST_VALUES = ("ref", "out", "bound")
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


def _pass_line(row: dict[str, Any]) -> float:
    """Where the row's error measure stops passing: the derived bound (1 in worst_ratio units),
    or the calc_diff budget the verdict used (derived per case and recorded in the metrics; else
    the case's own; rows written before budgets were recorded: the default)."""
    if _ERROR_OF.get(row.get("compare")) == "worst_ratio":
        return 1.0
    used = _float((row.get("metrics") or {}).get("budget_calc_diff"))
    return used or _float(row.get("budget_calc_diff")) or _DEFAULT_BUDGET


def _error_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    recs = []
    for r in rows:
        key = _ERROR_OF.get(r.get("compare"))
        if key is None:
            continue
        v = _float((r.get("metrics") or {}).get(key))
        if v is None:
            continue
        recs.append(
            {
                "stage": r["stage"],
                "backend": r["backend"],
                "case_id": r["case_id"],
                "tokens": r["tokens"],
                "limit": r.get("limit"),
                "scale_ratio": r.get("scale_ratio"),
                "measure": key,
                "error": v,
                "pass_line": _pass_line(r),
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


def _plots(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worst error per axis value, per stage and backend, with the pass line drawn (bound or
    budget) and the values of failing cases marked with a red cross. Each entry also carries
    `pass_lines` and `n_failing` per stage, the data behind what is drawn."""
    df = _error_frame(rows)
    out: list[dict[str, Any]] = []
    if df.empty:
        return out
    plt = _plt()
    for axis in ("tokens", "limit", "scale_ratio"):
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
                bad = b[b["outcome"] != "pass"]
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


def expert_grid(rows: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """Rows (case, backend) x experts of log10(error / pass line), NaN where the expert got no
    tokens; clipped to +-RATIO_DECADES (an exact 0 sits at the bottom). Labels: full case ids."""
    import numpy as np

    width = max(len(r["metrics"]["per_group"]) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        line = _pass_line(r)
        for j, g in enumerate(r["metrics"]["per_group"]):
            if g.get("rows", 1) == 0:
                continue  # no tokens: NaN, drawn grey
            v = _float(g.get(_ERROR_OF.get(r["compare"], "calc_diff"))) or 0.0
            grid[i, j] = np.log10(max(v / line, 10**-RATIO_DECADES))
    grid = np.clip(grid, -RATIO_DECADES, RATIO_DECADES)
    return grid, [f"{r['case_id']} [{r['backend']}]" for r in rows]


def _expert_heatmap(rows: list[dict[str, Any]], title: str) -> dict[str, str]:
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


def _heatmap(rows: list[dict[str, Any]], key: str, value, xlabel: str, title: str):
    """One image row per (case, backend) holding metric `key` (a list, or a dict with bins)."""
    import numpy as np

    data = [[value(v) for v in _bins(r["metrics"][key])] for r in rows]
    if not data:
        return None
    labels = [f"{r['case_id']} [{r['backend']}]" for r in rows]
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
    """Per-expert maps, one per stage, on the pass/fail scale; then per-token."""
    maps = []
    grouped = [
        r
        for r in rows
        if r.get("compare") in _ERROR_OF and (r.get("metrics") or {}).get("per_group")
    ]
    for stage in sorted({r["stage"] for r in grouped}):
        have = [r for r in grouped if r["stage"] == stage]
        have = sorted(have, key=lambda r: -_severity(r))[:MAX_HEATMAP_ROWS]
        measure = _ERROR_OF[have[0]["compare"]]
        line = "the derived bound" if measure == "worst_ratio" else "the case budget"
        maps.append(
            _expert_heatmap(
                have,
                f"{stage}: per-expert {measure} / {line} (worst per expert; worst cases "
                f"first; grey: the expert got no tokens)",
            )
        )

    def worst_first(have: list[dict[str, Any]], key: str, value) -> list[dict[str, Any]]:
        have = sorted(
            have, reverse=True, key=lambda r: max(map(value, _bins(r["metrics"][key])), default=0)
        )
        return have[:MAX_HEATMAP_ROWS]

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


def _severity(row: dict[str, Any]) -> float:
    """Error over pass line of an output row (0 without a measure); > 1 fails."""
    v = _float((row.get("metrics") or {}).get(_ERROR_OF.get(row.get("compare"), "")))
    return 0.0 if v is None else v / _pass_line(row)


# --------------------------------------------------------------------------------------------
# the answer first: verdicts, failures, headroom, bit-exact stages


def _stage_order(stage: str) -> int:
    names = [s.value for s in Stage]
    return names.index(stage) if stage in names else len(names)


def _by_pair(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("final") and r.get("compare") != results.TIMING:
            out.setdefault((r["case_id"], r["backend"]), []).append(r)
    return out


def _worst_key(final: dict[str, Any], outputs: list[dict[str, Any]]) -> tuple[int, float]:
    """Sort key, worst first: outcome severity, then the largest error over pass line."""
    return (_ORDER.get(final["outcome"], 9), -max(map(_severity, outputs), default=0.0))


def _verdicts(finals: list[dict[str, Any]], outputs) -> dict[str, Any]:
    """Stage x backend: outcome counts, the cell's verdict (its worst outcome) and worst case."""
    backends = sorted({r["backend"] for r in finals})
    stages = sorted({r["stage"] for r in finals}, key=_stage_order)
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in finals:
        c = cells.setdefault((r["stage"], r["backend"]), {"counts": Counter(), "rows": []})
        c["counts"][r["outcome"]] += 1
        c["rows"].append(r)
    grid = []
    for st in stages:
        line = []
        for b in backends:
            c = cells.get((st, b))
            if c is None:
                line.append(None)
                continue
            ran = [r for r in c["rows"] if r["outcome"] not in _NOT_RUN]
            worst = min(ran or c["rows"], key=lambda r: _worst_key(r, outputs.get(_pair(r), [])))
            measured = [o for o in outputs.get(_pair(worst), []) if o.get("compare") in _ERROR_OF]
            sev = max(map(_severity, measured), default=None)
            shown = worst["outcome"] not in ("pass", *_NOT_RUN) or sev is not None
            line.append(
                {
                    "verdict": worst["outcome"],
                    "counts": [(o, c["counts"][o]) for o in OUTCOMES if c["counts"][o]],
                    "worst": worst["case_id"] if shown else None,
                    "worst_of_line": sev,
                    "worst_message": worst.get("message", ""),
                }
            )
        grid.append((st, line))
    return {"backends": backends, "rows": grid}


def _pair(r: dict[str, Any]) -> tuple[str, str]:
    return (r["case_id"], r["backend"])


def _first_bad(m: dict[str, Any]) -> dict[str, Any] | None:
    for key in _FIRST_BAD:
        if m.get(key) is not None:
            values = {k: m.get(f"first_{k}") for k in _FIRST_VALUES}
            return {"index": m[key], **{k: v for k, v in values.items() if v is not None}}
    return None


def _failures(finals: list[dict[str, Any]], outputs) -> dict[str, Any]:
    """Pairs that ran and did not pass, worst first, each with its failing outputs (measure
    against the pass line, first bad element, diagnoses); unsupported/skipped by reason."""
    bad = [r for r in finals if r["outcome"] not in ("pass", *_NOT_RUN)]
    bad.sort(key=lambda r: (*_worst_key(r, outputs.get(_pair(r), [])), r["case_id"]))
    items = []
    for r in bad[:MAX_WORST]:
        outs = []
        for o in outputs.get(_pair(r), []):
            if o["outcome"] == "pass":
                continue
            m = o.get("metrics") or {}
            measure = _ERROR_OF.get(o.get("compare"))
            outs.append(
                {
                    "compare": o.get("compare"),
                    "message": "" if o.get("message") == r.get("message") else o.get("message", ""),
                    "measure": measure,
                    "value": _fmt(_float(m.get(measure))) if measure else "-",
                    "pass_line": _fmt(_pass_line(o)) if measure else "-",
                    "first_bad": _first_bad(m),
                    "diagnoses": [
                        (name, m[k]) for k, name in _DIAGNOSES.items() if m.get(k) is not None
                    ],
                }
            )
        items.append({**r, "outputs": outs})
    reasons: Counter = Counter(
        (r["outcome"], r["backend"], r.get("message", ""))
        for r in finals
        if r["outcome"] in _NOT_RUN
    )
    return {
        "pairs": items,
        "n_more": max(0, len(bad) - MAX_WORST),
        "n_bad": len(bad),
        "not_run": sorted(reasons.items(), key=lambda kv: -kv[1]),
        "n_not_run": sum(reasons.values()),
    }


def _headroom(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (stage, backend, summed output): how much of its pass line the worst and the median
    case use, and the error sizes the rows carry (signed mean error and bf16 ulps when the
    metrics record them)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("compare") in _ERROR_OF and not r.get("final"):
            groups.setdefault((r["stage"], r["backend"], r["compare"]), []).append(r)
    out = []
    for (stage, backend, compare), rs in sorted(
        groups.items(), key=lambda kv: (_stage_order(kv[0][0]), kv[0][1:])
    ):
        used = sorted(_severity(r) for r in rs)

        def worst(key: str, rs=rs) -> str:
            vals = [v for r in rs if (v := _float((r.get("metrics") or {}).get(key))) is not None]
            return _fmt(max(vals, key=abs)) if vals else "-"

        out.append(
            {
                "stage": stage,
                "backend": backend,
                "compare": compare,
                "measure": _ERROR_OF[compare],
                "n": len(rs),
                "n_fail": sum(r["outcome"] != "pass" for r in rs),
                "worst_used": _fmt(used[-1], ".3g"),
                "median_used": _fmt(used[len(used) // 2], ".3g"),
                "max_abs": worst("max_abs"),
                "mean_abs": worst("mean_abs"),
                "mean_err": worst("mean_err"),
                "max_ulps": worst("max_ulps_bf16"),
            }
        )
    return out


def _bit_exact(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (stage, backend) of the discrete outputs (codes, scale bytes, layouts): how many were
    compared, bit-exact, different only in accepted classes, and failing."""
    groups: dict[tuple[str, str], Counter] = {}
    for r in rows:
        m = r.get("metrics") or {}
        if r.get("final") or not ("n_mismatch" in m or "codes_mismatch" in m):
            continue
        c = groups.setdefault((r["stage"], r["backend"]), Counter())
        c["outputs"] += 1
        c["exact"] += bool(m.get("equal"))
        c["classified"] += (not m.get("equal")) and r["outcome"] == "pass"
        c["fail"] += r["outcome"] != "pass"
    return [
        {"stage": st, "backend": b, **c}
        for (st, b), c in sorted(groups.items(), key=lambda kv: (_stage_order(kv[0][0]), kv[0][1]))
    ]


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


def _diagnosis(r: dict[str, Any]) -> str:
    """What the harness named about one comparison row (harness/stages/), as one line."""
    m = r.get("metrics") or {}
    parts = []
    if r.get("outcome") != "pass" and m.get("first_divergent_stage"):
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
    if m.get("gain") is not None and r.get("outcome") != "pass" and "gain" in r.get("message", ""):
        parts.append(f"gain {m['gain']:.5g}")
    return "; ".join(parts)


def _diagnoses(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.get("final"):
            continue
        d = _diagnosis(r)
        if d:
            out.append({**r, "diagnosis": d})
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
    outputs = _by_pair(rows)
    ran = {r["stage"] for r in finals if r["outcome"] not in _NOT_RUN}
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
        verdicts=_verdicts(finals, outputs),
        failures=_failures(finals, outputs),
        headroom=_headroom(rows),
        bit_exact=_bit_exact(rows),
        layers_ran=any(Stage(st).is_layer for st in ran if st in {x.value for x in Stage}),
        baseline=_baseline(rows, baseline) if baseline else None,
        plots=_plots(rows),
        heatmaps=_heatmaps(rows),
        speed=_speed(rows),
        classes=_classes(rows),
        nan_traces=_nan_traces(rows),
        diagnoses=_diagnoses(rows),
        env=env,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
