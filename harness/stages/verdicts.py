"""Verdicts: one kernel output against the reference's, as `Comparison`s (docs/design.md §5).

Codes and scale bytes are bit-exact, where only real mismatches fail (tie flips, signed zeros and
underflowed blocks are classified, not failed; a quantizer policy passes where the adapter
declares it) unless the case or its distribution demands exactness; layouts are exact; GEMM
outputs lie within the derived bound of `reference.gemm.grouped_gemm_error_bound`; a layer's
output meets a budget derived from the measured noise floor, with its gain and bias; global
scales match within an ulp or are named (the other convention). Pure functions: no I/O, no
adapter calls except `compare_assembly`, which runs the adapter's own assembly of the scales it
is given. What a failing output matches comes from harness.diagnose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import diagnose, metrics
from harness.adapters import QuantizedOperand, poisoned
from harness.cases import Case
from harness.records import Outcome
from reference.layouts import assemble_scales_2d_side_from_offsets, assemble_scales_3d_side
from reference.nvfp4 import ScaleConvention


@dataclass
class Comparison:
    """One row of results: a named output of a case, its verdict and its metrics."""

    name: str
    outcome: Outcome
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def compare_quantized(
    name: str,
    x: torch.Tensor,
    ref_q: QuantizedOperand,
    out_q: QuantizedOperand,
    exact: bool,
    policies: frozenset = frozenset(),
    whole_nan_amax: bool = False,
) -> list[Comparison]:
    """Codes and scale bytes of `out_q` against `ref_q`, both quantizations of `x`: bit-exact, or
    every mismatch classified at the reference's global scale (docs/design.md §5).

    Policy classes (metrics.POLICY_CLASSES) pass where the adapter declares them (`policies`,
    QuantPolicy values) and fail under their own name where it does not; never counted as real.
    `whole_nan_amax`: the adapter's global scale is NaN (see `nan_amax`), so every mismatch is
    that policy's consequence.
    """
    gs = ref_q.global_scale
    rows = []
    for part, r, o in (("codes", ref_q.codes, out_q.codes), ("scales", ref_q.scales, out_q.scales)):
        if r.shape != o.shape:
            rows.append(
                Comparison(
                    f"{name}.{part}",
                    Outcome.FAIL,
                    f"shape {tuple(o.shape)} != reference {tuple(r.shape)}",
                )
            )
            continue
        eq = metrics.codes_equal(r, o) if part == "codes" else metrics.bitwise_equal(r, o)
        rows.append(
            Comparison(f"{name}.{part}", Outcome.PASS, "", {**metrics.nonfinite_stats(o), **eq})
        )
    if all(c.metrics.get("equal") for c in rows):
        return rows
    if any(not c.metrics for c in rows):
        return rows
    sides = (ref_q.codes, ref_q.scales, out_q.codes, out_q.scales)
    cls = metrics.classify_quantize_mismatches(x, gs, *sides)
    declared = {p.value if hasattr(p, "value") else str(p) for p in policies}
    rounding = metrics.rounding_direction(x, gs, *sides)
    rows[0].metrics["rounding"] = rounding
    for c, part in zip(rows, ("codes", "scales"), strict=True):
        if whole_nan_amax:
            n = c.metrics["n_mismatch"]
            cls[part] = {"exact": c.metrics["numel"] - n, "nan_amax": n}
        counts = cls[part]
        c.metrics["classes"] = counts
        if c.metrics["equal"]:
            continue
        pol = {k: counts[k] for k in metrics.POLICY_CLASSES if counts.get(k)}
        undeclared = {k: v for k, v in pol.items() if k not in declared}
        by_policy = "; ".join(
            f"{v} {part} by policy {k} ({diagnose.POLICY_MEANING[k]}"
            + (f" {cls['scale_floor_value']:g}" if k == "scale_floor" else "")
            + ")"
            for k, v in pol.items()
        )
        accidents = c.metrics["n_mismatch"] - sum(pol.values())
        if exact and accidents:
            c.outcome = Outcome.FAIL
            c.message = (
                f"{c.metrics['n_mismatch']} of {c.metrics['numel']} {part} mismatch where "
                f"every intermediate is exact; first at {c.metrics['first_mismatch']}"
            )
        elif counts.get("real", 0):
            c.outcome = Outcome.FAIL
            first = cls[f"first_real_{part[:-1]}"]
            n, numel = counts["real"], c.metrics["numel"]
            c.message = f"{n} of {numel} {part} are real mismatches ({counts}); first at {first}"
        elif undeclared:
            c.outcome = Outcome.FAIL
            c.message = (
                f"{by_policy}, which the adapter does not declare "
                f"(Conventions.policies: {', '.join(sorted(undeclared))}); no real mismatches"
            )
        else:
            c.message = f"all mismatches classified as legitimate: {counts}"
            if pol:
                c.message += f" ({by_policy}, declared)"
        if part == "codes" and rounding["direction"] not in (None, "mixed"):
            r = rounding
            append_note(
                c,
                f"rounding: {r['direction']} (of {r['n']} differing codes under equal scales: "
                f"{r['tie_up']} ties up, {r['tie_down']} ties down, "
                f"{r['off_tie_down']} off-tie down, {r['off_tie_up']} off-tie up)",
            )
    return rows


# A global scale from the same amax in the same order is exact; one fp32 division or a
# reciprocal instead differs by at most an ulp or two.
GS_REL_TOL = 2.0**-22
# gs2 is calibrated on the amax of swiglu(L1 output): the L1 output is bf16, and a correct GEMM in
# another summation order may round the amax element one bf16 ulp (2^-8 relative) either way;
# h = silu(g) * u then moves by at most |du/u| + |d silu/silu| <= 2^-8 + 1.1 * 2^-8 (silu's
# relative slope g silu'(g) / silu(g) is <= 1.1 for g > 0, where an amax lies): 3 ulps covers it.
GS2_REL_TOL = 3.0 * 2.0**-8


def compare_global_scale(
    r_gs: torch.Tensor,
    out_gs: Any,
    conv: ScaleConvention,
    name: str = "quantize.global_scale",
    rel_tol: float = GS_REL_TOL,
) -> Comparison:
    """Global scale(s) in our DECODE convention (out_gs already converted from the adapter's):
    equal, within `rel_tol`, or named (the other convention: 1/gs) -- one value or one per group."""
    if out_gs is None:
        return Comparison(name, Outcome.FAIL, "adapter returned no global scale")
    r = torch.as_tensor(r_gs).double().reshape(-1).cpu()
    o = torch.as_tensor(out_gs).double().reshape(-1).cpu()
    if o.numel() == 1 and r.numel() > 1:
        o = o.expand(r.numel())
    if o.shape != r.shape:
        return Comparison(name, Outcome.FAIL, f"{o.numel()} global scales, reference {r.numel()}")
    same = (o == r) | (torch.isnan(o) & torch.isnan(r))  # also inf == inf (an Inf input)
    rel = torch.where(same, torch.zeros_like(r), (o - r).abs() / r.abs().clamp_min(1e-300))
    worst = int(rel.nan_to_num(nan=math.inf).argmax())
    one = o.numel() == 1
    m = {
        "ref": float(r[0]) if one else r.tolist(),
        "out": float(o[0]) if one else o.tolist(),
        "rel_err": float(rel.nan_to_num(nan=math.inf).max()),
        "equal": bool(same.all()),
    }
    at = "" if one else f" (group {worst})"
    if bool((same | (rel <= rel_tol)).all()):
        return Comparison(name, Outcome.PASS, "", m)
    if bool(((o * r - 1.0).abs() <= 2.0**-20).all()):
        other = "ENCODE" if conv is ScaleConvention.DECODE else "DECODE"
        return Comparison(
            name,
            Outcome.FAIL,
            f"global-scale convention mismatch: the adapter declares {conv.name} "
            f"but returns the {other} scale (1/gs)",
            m,
        )
    msg = f"global scale {float(o[worst]):.6g} != {float(r[worst]):.6g}{at}"
    return Comparison(
        name, Outcome.FAIL, f"{msg}: relative error {m['rel_err']:.3g} > {rel_tol:.3g}", m
    )


def compare_assembly(
    adapter: Any,
    names: tuple[str, str],
    a: torch.Tensor,
    offsets: torch.Tensor,
    b: torch.Tensor,
) -> list[Comparison]:
    """The adapter's own assembly of activation scales a [T, K/16] (groups at END offsets) and
    weight scales b [E, K/16, N], each against the reference layout; a 2D-side mismatch names the
    groups whose rows are misplaced."""
    dev = a.device
    r2d, _ = assemble_scales_2d_side_from_offsets(a, offsets)
    r3d = assemble_scales_3d_side(list(b))
    o2d = poisoned(tuple(r2d.shape), r2d.dtype, dev)
    o3d = poisoned(tuple(r3d.shape), r3d.dtype, dev)
    adapter.assemble_scales(a, offsets, b, o2d, o3d)
    ends = [int(v) for v in offsets.cpu().tolist()]
    counts = [e - s for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    pad2d = _padding_mask_2d(counts, a.shape[1]).to(dev)
    c2d = _compare_layout(names[0], r2d, o2d, pad2d)
    if c2d.outcome is Outcome.FAIL:
        bad, where = diagnose.misplaced_groups(a, counts, o2d)
        c2d.metrics["groups_misplaced"] = bad
        if bad:
            c2d.message += f"; rows misplaced: {where}"
    return [c2d, _compare_layout(names[1], r3d, o3d, None)]


def _padding_mask_2d(counts: list[int], cols: int) -> torch.Tensor:
    """True where the swizzled 2D-side buffer holds padding (rows past a group's tokens or cols
    past K/16). Built by swizzling a marker matrix, so it follows the same layout."""
    from reference.layouts import swizzle_scales  # local: only the diagnosis needs it

    parts = []
    for t in counts:
        if t == 0:
            continue
        marker = torch.ones((t, cols), dtype=torch.uint8)
        parts.append(swizzle_scales(marker) == 0)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _compare_layout(
    name: str, r: torch.Tensor, o: torch.Tensor, pad: torch.Tensor | None
) -> Comparison:
    eq = metrics.bitwise_equal(r, o)
    if eq["equal"]:
        return Comparison(name, Outcome.PASS, "", eq)
    diff = (r.view(torch.uint8) != o.view(torch.uint8)).reshape(-1)
    msg = f"{eq['n_mismatch']} of {eq['numel']} bytes differ; first at {eq['first_mismatch']}"
    if pad is not None and pad.shape == diff.shape:
        in_pad = int((diff & pad).sum())
        eq["mismatch_in_padding"] = in_pad
        if in_pad == int(diff.sum()):
            msg += "; all of them in padding (padding not zeroed / left unwritten)"
    return Comparison(name, Outcome.FAIL, msg, eq)


def compare_bounded(
    name: str,
    oracle: torch.Tensor,
    out: torch.Tensor,
    bound: torch.Tensor,
    offsets: torch.Tensor | None = None,
) -> Comparison:
    """A summed output against the fp64 oracle and its derived elementwise bound."""
    m = metrics.error_panel_bound(oracle, out, bound)
    panel = metrics.error_panel(oracle, out, atol=0.0, rtol=2.0**-8)
    m.update(
        {
            k: panel[k]
            for k in (
                "max_abs",
                "max_rel",
                "calc_diff",
                "cosine",
                "worst_token_cosine",
                "sqnr_db",
                "nan_out",
                "inf_out",
            )
        }
    )
    err = (out.double() - oracle.double()).abs().nan_to_num(nan=float("inf"))
    if out.numel():
        m["periodic"] = metrics.periodic_error_structure(err.cpu())
    if offsets is not None:
        m["per_group"] = metrics.per_group_error(oracle, out, offsets.cpu())
        ends = offsets.cpu().tolist()
        for g, start, end in zip(m["per_group"], [0, *ends[:-1]], ends, strict=True):
            part = metrics.error_panel_bound(oracle[start:end], out[start:end], bound[start:end])
            g["worst_ratio"] = part["worst_ratio"] if end > start else 0.0
    if m["n_outside"] == 0:
        return Comparison(name, Outcome.PASS, "", m)
    msg = (
        f"{m['n_outside']} elements outside the derived bound (worst |err|/bound "
        f"{m['worst_ratio']:.3g}); first at {m['first_outside']}"
    )
    suspect = m.get("periodic", {}).get("suspect_period")
    if suspect:
        msg += f"; error repeats every {suspect} elements (layout?)"
    return Comparison(name, Outcome.FAIL, msg, m)


def compare_intermediate(name: str, rv: Any, kv: Any) -> Comparison:
    """Informational per-stage comparison (the verdict is on the layer output)."""
    if isinstance(rv, tuple):  # (codes, scales, gs)
        m = {}
        for part, a, b in (("codes", rv[0], kv[0]), ("scales", rv[1], kv[1])):
            eq = metrics.codes_equal(a, b) if part == "codes" else metrics.bitwise_equal(a, b)
            m[f"{part}_mismatch"] = eq["n_mismatch"]
        m["equal"] = not (m["codes_mismatch"] or m["scales_mismatch"])
        st = metrics.nonfinite_stats(kv[1])
        m["nonfinite_out"] = st.get("nan_bytes", 0)
        m["scale_stats"] = st
        return Comparison(name, Outcome.PASS, "", m)
    if not isinstance(rv, torch.Tensor) or not rv.dtype.is_floating_point:
        eq = metrics.bitwise_equal(rv, kv)
        return Comparison(name, Outcome.PASS if eq["equal"] else Outcome.FAIL, "", eq)
    m = metrics.error_panel(rv.float(), kv.float(), 0.0, 0.0)
    m["equal"] = metrics.equal_nan(rv, kv)  # NaN at the same place is equal (a NaN-input case)
    st = metrics.nonfinite_stats(kv)
    m["nonfinite_out"] = st["nan"] + st["inf"]
    m["stats"] = st
    return Comparison(name, Outcome.PASS, "", m)


# Layer budget (docs/design.md §5 level 2), derived per case. The legitimate noise floor is
# measured:
# the reference layer run again with float64 GEMMs (another summation order, rounded once) gives
# calc_diff f against the fp32 reference. A correct kernel in a third order sits about as far from
# either, so the budget is NOISE_MULT * f, but never below CALC_DIFF_MIN: the fp32 GEMM sums of
# the tiny presets are mostly exact (f is often 0), while a kernel may still round each bf16
# output one ulp (2^-8 relative) the other way in two roundings (L2 output and combine):
# 2 * (2^-8)^2 / 2 = 2^-16. A uniform 1% scale error has calc_diff 4.9e-5 (above it).
NOISE_MULT = 10.0
CALC_DIFF_MIN = 2.0**-16
# Gain and bias: least-squares gain g = <r, k> / <r, r> and signed mean error / rms(r). For a
# zero-mean legitimate error e of energy calc_diff * sum(r^2 + k^2) ~ 2 * budget * sum(r^2), both
# have a standard deviation of sqrt(2 * budget / N) over N elements; GAIN_SIGMAS of them is the
# threshold (a scale error below the calc_diff budget, e.g. 0.5%, is caught here). Where the
# observed calc_diff exceeds the budget, it replaces the budget in that formula.
GAIN_SIGMAS = 6.0


def derived_calc_diff_budget(noise_floor: float) -> float:
    f = noise_floor if noise_floor == noise_floor else 0.0  # NaN (nothing finite): no floor
    return max(NOISE_MULT * f, CALC_DIFF_MIN)


def compare_out(
    case: Case, r: torch.Tensor, k: torch.Tensor | None, noise_floor: float = 0.0
) -> Comparison:
    if k is None:
        return Comparison("out", Outcome.FAIL, "adapter returned no 'out' stage")
    if k.shape != r.shape:
        return Comparison(
            "out", Outcome.FAIL, f"shape {tuple(k.shape)} != reference {tuple(r.shape)}"
        )
    b = case.budget
    m = metrics.error_panel(r.float(), k.float(), b.atol, b.rtol)
    budget = derived_calc_diff_budget(noise_floor) if b.calc_diff is None else b.calc_diff
    gb = metrics.gain_and_bias(r.float(), k.float())
    cd_seen = m["calc_diff"] if m["calc_diff"] == m["calc_diff"] else 0.0
    # judged against the noise present: a large random error moves the gain by chance too
    tol = GAIN_SIGMAS * math.sqrt(2.0 * max(budget, cd_seen) / max(1, gb["n"]))
    m.update(
        noise_floor_calc_diff=noise_floor,
        budget_calc_diff=budget,
        budget_derived=b.calc_diff is None,
        gain=gb["gain"],
        bias=gb["bias"],
        gain_bias_tol=tol,
    )
    bad = []
    if m["nan_out"] + m["inf_out"] > m["nan_ref"] + m["inf_ref"]:
        bad.append(
            f"{m['nan_out']} NaN / {m['inf_out']} Inf in output (reference "
            f"{m['nan_ref']} / {m['inf_ref']})"
        )
    cd = m["calc_diff"]
    how = f"{NOISE_MULT:g} x noise floor {noise_floor:.2g}, min {CALC_DIFF_MIN:.2g}"
    if cd != cd or cd > budget:
        bad.append(
            f"calc_diff {cd:.3g} > budget {budget:.3g}"
            + (f" ({how})" if b.calc_diff is None else "")
        )
    g, bias = gb["gain"], gb["bias"]
    if g == g and abs(g - 1.0) > tol:
        bad.append(
            f"gain {g:.5g} (output {abs(g - 1) * 100:.2g}% too {'large' if g > 1 else 'small'}; "
            f"|gain - 1| > {tol:.2g})"
        )
    if bias == bias and abs(bias) > tol:
        bad.append(f"bias {bias:.3g} rms (|bias| > {tol:.2g})")
    if b.min_frac_within and m["frac_within"] < b.min_frac_within:
        bad.append(f"only {m['frac_within']:.4f} within atol={b.atol} rtol={b.rtol}")
    return Comparison("out", Outcome.FAIL if bad else Outcome.PASS, "; ".join(bad), m)


def flag_conventions(c: Comparison, conv: Any) -> None:
    """Show beside a verdict when it was judged against a convention that is not DSV4's."""
    other = conv.not_dsv4()
    c.metrics["swiglu_convention"] = conv.swiglu_label
    if not other:
        return
    c.metrics["not_dsv4"] = other
    append_note(c, f"judged as declared ({', '.join(other)}): not DeepSeek V4's convention")


def append_note(c: Comparison, note: str) -> None:
    c.message = f"{c.message}; {note}" if c.message else note


__all__ = [
    "CALC_DIFF_MIN",
    "GAIN_SIGMAS",
    "GS2_REL_TOL",
    "GS_REL_TOL",
    "NOISE_MULT",
    "Comparison",
    "Outcome",
    "append_note",
    "compare_assembly",
    "compare_bounded",
    "compare_global_scale",
    "compare_intermediate",
    "compare_out",
    "compare_quantized",
    "derived_calc_diff_budget",
    "flag_conventions",
]
