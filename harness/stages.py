"""Run one case on one adapter: inputs -> reference -> kernel (poisoned outputs) -> comparisons.

Stage cases are teacher forced: the kernel stage gets exactly the reference's inputs (GEMM
operands come plain and in the reference's assembled layouts). Layer cases run end to end; every
named intermediate both sides expose is compared, the first divergent stage is named, and the
first stage whose output holds NaN/Inf is the NaN culprit (later stages only propagate it).

Verdicts (docs/design.md §5): codes and scale bytes are bit-exact, where only real mismatches fail
(tie flips, signed zeros and underflowed blocks are classified, not failed) unless the case or its
distribution demands exactness; layouts are exact; GEMM outputs lie within the derived bound of
`reference.gemm.grouped_gemm_error_bound`; a layer's output meets the case budget.
Every function returns `Comparison`s; nothing here writes files or catches exceptions.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch

import reference as ref
from harness import inputs, metrics
from harness.adapters import GemmOperands, ReferenceAdapter
from harness.cases import Case, Stage, Tolerance
from reference import layers as ref_layers
from reference.activation import SwigluVariant, swiglu, variant_label
from reference.gemm import grouped_gemm_error_bound, grouped_gemm_nvfp4
from reference.layouts import (
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    compute_expert_offsets,
    round_up,
    unswizzle_scales,
)
from reference.nvfp4 import ScaleConvention, global_scale_from_amax, tensor_amax

POISON_BYTE = 0xFF  # e4m3 NaN (negative), and a pair of -6 codes: unwritten bytes show


class Outcome(enum.Enum):
    """Verdict of one comparison or one case; each distinct in results and reports."""

    PASS = "pass"  # within the derived tolerance / budget
    FAIL = "fail"  # outside it: a wrong result
    ERROR = "error"  # the kernel (or the harness) raised
    UNSUPPORTED = "unsupported"  # can_implement said no: not a failure, not a pass
    SKIPPED = "skipped"  # not run (filtered, or needs hardware this machine lacks)
    TIMEOUT = "timeout"  # an isolated case ran past its timeout and was killed
    CRASHED = "crashed"  # an isolated case's process died (signal, illegal address, OOM kill)


@dataclass
class Comparison:
    """One row of results: a named output of a case, its verdict and its metrics."""

    name: str
    outcome: Outcome
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# helpers


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer whose unwritten elements show: NaN for floats, 0xFF bytes otherwise."""
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, POISON_BYTE, dtype=torch.uint8, device=device).view(dtype)


def to_adapter_scale(gs: torch.Tensor | None, convention: ScaleConvention) -> torch.Tensor | None:
    if gs is None or convention is ScaleConvention.DECODE:
        return gs
    return ref.to_encode_scale(gs)


def from_adapter_scale(gs: Any, convention: ScaleConvention) -> torch.Tensor | None:
    if gs is None:
        return None
    gs = torch.as_tensor(gs, dtype=torch.float32)
    return gs if convention is ScaleConvention.DECODE else ref.from_encode_scale(gs)


def _conventions(adapter: Any):
    return adapter.conventions


POLICY_MEANING = {
    "scale_floor": "block scales clamped up to a floor",
    "nan_scale_byte": "NaN scale byte 0xFF instead of 0x7F",
    "nan_amax": "a NaN-propagating dynamic amax (NaN global scale)",
}


def nan_amax(x: torch.Tensor, r_gs: Any, out_gs: Any) -> bool:
    """The adapter's dynamic global scale is NaN where ours is finite because x holds a NaN:
    its amax propagates NaN (ours ignores it, as fmaxf reductions do)."""
    if out_gs is None:
        return False
    o = torch.as_tensor(out_gs).float().reshape(-1)
    r = torch.as_tensor(r_gs).float().reshape(-1)
    return bool(torch.isnan(o).all() and torch.isfinite(r).all() and torch.isnan(x).any())


def compare_quantized(
    name: str,
    x: torch.Tensor,
    gs: torch.Tensor,
    ref_q: tuple[torch.Tensor, torch.Tensor],
    out_q: tuple[torch.Tensor, torch.Tensor],
    exact: bool,
    policies: frozenset = frozenset(),
    whole_nan_amax: bool = False,
) -> list[Comparison]:
    """Codes and scale bytes: bit-exact, or every mismatch classified (docs/design.md §5).

    Policy classes (metrics.POLICY_CLASSES) pass where the adapter declares them (`policies`,
    QuantPolicy values) and fail under their own name where it does not; never counted as real.
    `whole_nan_amax`: the adapter's global scale is NaN (see `nan_amax`), so every mismatch is
    that policy's consequence.
    """
    rows = []
    for part, r, o in (("codes", ref_q[0], out_q[0]), ("scales", ref_q[1], out_q[1])):
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
    cls = metrics.classify_quantize_mismatches(x, gs, ref_q[0], ref_q[1], out_q[0], out_q[1])
    declared = {p.value if hasattr(p, "value") else str(p) for p in policies}
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
            f"{v} {part} by policy {k} ({POLICY_MEANING[k]}"
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
    return rows


# --------------------------------------------------------------------------------------------
# stage cases (teacher forced)


def _quantize(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    g = inputs.generator(case, "x")
    x = inputs.activation((case.tokens, case.shape.hidden), case.distribution, g).to(dev)
    if case.distribution.exact:
        gs = torch.tensor(inputs.EXACT_GLOBAL_SCALE, device=dev)
    elif case.scale_ratio is None:
        gs = None
    else:
        # calibrated on the clean warm-up sample (the planted NaN / Inf only in the live x)
        gs = global_scale_from_amax(tensor_amax(inputs.finite(x)) / case.scale_ratio).to(dev)
    r_codes, r_scales, r_gs = ref.quantize_nvfp4(x, gs)
    conv = _conventions(adapter).global_scale
    codes = poisoned(tuple(r_codes.shape), torch.uint8, dev)
    scales = poisoned(tuple(r_scales.shape), torch.float8_e4m3fn, dev)
    out_gs = from_adapter_scale(
        adapter.quantize(x, to_adapter_scale(gs, conv), codes, scales), conv
    )
    exact = case.tolerance is Tolerance.EXACT or case.distribution.exact
    policies = _conventions(adapter).policies
    whole = gs is None and nan_amax(x, r_gs, out_gs)
    rows = compare_quantized(
        "quantize", x, r_gs, (r_codes, r_scales), (codes, scales), exact, policies, whole
    )
    g_row = _compare_global_scale(r_gs, out_gs, conv)
    if whole:  # a policy, named as one: declared it passes
        ok = any(getattr(p, "value", p) == "nan_amax" for p in policies)
        g_row.outcome = Outcome.PASS if ok else Outcome.FAIL
        g_row.message = f"global scale NaN by policy nan_amax ({POLICY_MEANING['nan_amax']})" + (
            ", declared" if ok else ", which the adapter does not declare (Conventions.policies)"
        )
    rows.append(g_row)
    return rows


# A global scale from the same amax in the same order is exact; one fp32 division or a
# reciprocal instead differs by at most an ulp or two.
GS_REL_TOL = 2.0**-22
# gs2 is calibrated on the amax of swiglu(L1 output): the L1 output is bf16, and a correct GEMM in
# another summation order may round the amax element one bf16 ulp (2^-8 relative) either way;
# h = silu(g) * u then moves by at most |du/u| + |d silu/silu| <= 2^-8 + 1.1 * 2^-8 (silu's
# relative slope g silu'(g) / silu(g) is <= 1.1 for g > 0, where an amax lies): 3 ulps covers it.
GS2_REL_TOL = 3.0 * 2.0**-8


def _compare_global_scale(
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


def _routed_counts(case: Case) -> torch.Tensor:
    ids, _ = inputs.routing(case, inputs.generator(case, "routing"))
    return inputs.tokens_per_expert(ids, inputs.first_expert(case), case.shape.n_experts)


def _scale_assembly(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    s = case.shape
    counts = _routed_counts(case)
    offsets = compute_expert_offsets(counts).to(dev)
    g = inputs.generator(case, "scales")
    c, n = s.hidden // 16, 2 * s.intermediate
    # Random finite bytes 0x01..0x7E: a zero padding byte can never be mistaken for data.
    a = torch.randint(1, 0x7F, (int(counts.sum()), c), generator=g, dtype=torch.uint8)
    b = torch.randint(1, 0x7F, (s.n_experts, c, n), generator=g, dtype=torch.uint8)
    a, b = a.view(torch.float8_e4m3fn).to(dev), b.view(torch.float8_e4m3fn).to(dev)
    return compare_assembly(adapter, ("scales_2d", "scales_3d"), a, offsets, b)


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
        _misplaced_groups(c2d, a, counts, r2d, o2d)
    return [c2d, _compare_layout(names[1], r3d, o3d, None)]


def _misplaced_groups(
    c: Comparison, a: torch.Tensor, counts: list[int], r: torch.Tensor, o: torch.Tensor
) -> None:
    """Which groups' scale rows are not where the layout puts them in a 2D-side assembly, and
    where they went when they sit at the group's DATA row offset (groups not padded to 128 rows
    each, the classic mis-padded assembly)."""
    cols = a.shape[1]
    cp = round_up(cols, 4)
    ob = o.view(torch.uint8).reshape(-1)
    total_rows = ob.numel() // cp
    whole = unswizzle_scales(ob, total_rows, cols) if total_rows % 128 == 0 else None
    bad, notes = [], []
    start = data = 0
    for g, t in enumerate(counts):
        span = round_up(t, 128)
        rows = a[data : data + t].view(torch.uint8)
        got = unswizzle_scales(ob[start * cp : (start + span) * cp], span, cols)[:t]
        if t and not torch.equal(got, rows):
            bad.append(g)
            where = f"group {g} (expected from scale row {start})"
            if whole is not None and torch.equal(whole[data : data + t], rows):
                where = (
                    f"group {g} at scale rows {data}..{data + t - 1} (its data-row offset), "
                    f"expected from {start}: groups not padded to 128 rows each"
                )
            notes.append(where)
        start += span
        data += t
    c.metrics["groups_misplaced"] = bad
    if bad:
        c.message += "; rows misplaced: " + "; ".join(notes)


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


def gemm_operands(
    case: Case, dev: torch.device, conv: ScaleConvention
) -> tuple[GemmOperands, GemmOperands]:
    """(reference-convention operands, adapter-convention operands) for a grouped GEMM case."""
    s = case.shape
    counts = _routed_counts(case)
    offsets = compute_expert_offsets(counts).to(dev)
    k, n, e = s.hidden, 2 * s.intermediate, s.n_experts
    x = inputs.activation((int(counts.sum()), k), case.distribution, inputs.generator(case, "a"))
    w = inputs.weight((e, k, n), inputs.generator(case, "b"))
    a_codes, a_scales, gsa = ref.quantize_nvfp4(x.to(dev))
    qs = [ref.quantize_weight_nvfp4(w[i].to(dev)) for i in range(e)]
    b_codes = torch.stack([q[0] for q in qs])
    b_scales = torch.stack([q[1] for q in qs])
    gsb = torch.stack([q[2] for q in qs]).reshape(e)
    gsa = gsa.reshape(1).expand(e).contiguous()
    a_sw, a_rows = assemble_scales_2d_side_from_offsets(a_scales, offsets)
    b_sw = assemble_scales_3d_side(list(b_scales))
    ops = GemmOperands(a_codes, a_scales, b_codes, b_scales, offsets, gsa, gsb, a_sw, a_rows, b_sw)
    conv_ops = GemmOperands(
        a_codes,
        a_scales,
        b_codes,
        b_scales,
        offsets,
        to_adapter_scale(gsa, conv),
        to_adapter_scale(gsb, conv),
        a_sw,
        a_rows,
        b_sw,
    )
    return ops, conv_ops


def _grouped_gemm(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    ops, conv_ops = gemm_operands(case, dev, _conventions(adapter).global_scale)
    args = ops.plain()
    oracle = grouped_gemm_nvfp4(*args, oracle=True)
    bound = grouped_gemm_error_bound(*args, out_dtype=torch.bfloat16)
    out = poisoned((ops.a_codes.shape[0], ops.b_codes.shape[-1]), torch.bfloat16, dev)
    adapter.grouped_gemm(conv_ops, out)
    c = compare_bounded("grouped_gemm.out", oracle, out, bound, ops.expert_offsets)
    if c.outcome is Outcome.FAIL:
        found = identify_alpha(ops, out)
        c.metrics["matches_alpha"] = found
        if found:
            c.message += f"; output matches alpha = {found} ({ALPHA_VARIANTS[found][1]})"
    return [c]


# Epilogue mistakes, as the (gsa, gsb) that reproduce them: name -> (scales, what it means).
ALPHA_VARIANTS: dict[str, tuple[Any, str]] = {
    "1/(gsa*gsb)": (lambda a, b: (1.0 / a, 1.0 / b), "encode-convention scales applied as decode"),
    "1 (missing)": (lambda a, b: (torch.ones_like(a), torch.ones_like(b)), "alpha never applied"),
    "(gsa*gsb)^2": (lambda a, b: (a * a, b * b), "alpha applied twice"),
    "gsa only": (lambda a, b: (a, torch.ones_like(b)), "the weight global scale is missing"),
    "gsb only": (lambda a, b: (torch.ones_like(a), b), "the activation global scale is missing"),
}


def identify_alpha(ops: GemmOperands, out: torch.Tensor) -> str | None:
    """Which mistaken alpha reproduces the kernel's output within the derived bound, if any: the
    reference GEMM and its bound rerun with the (gsa, gsb) of each variant."""
    for name, (scales, _) in ALPHA_VARIANTS.items():
        gsa, gsb = scales(ops.global_scale_a, ops.global_scale_b)
        args = (*ops.plain()[:5], gsa.float(), gsb.float())
        oracle = grouped_gemm_nvfp4(*args, oracle=True)
        bound = grouped_gemm_error_bound(*args, out_dtype=out.dtype)
        if metrics.error_panel_bound(oracle, out, bound)["n_outside"] == 0:
            return name
    return None


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


def _swiglu_input(case: Case, dev: torch.device) -> torch.Tensor:
    g = inputs.generator(case, "l1")
    l1 = inputs.activation((case.tokens, 2 * case.shape.intermediate), case.distribution, g)
    # x6: |value| > 10 for ~10% of normal draws, so the default limit's clamps are exercised.
    return (l1.float() * 6.0).to(torch.bfloat16).to(dev)


def _swiglu_requant(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    conv = _conventions(adapter)
    l1 = _swiglu_input(case, dev)
    act = swiglu(l1, case.limit, conv.swiglu_variant, conv.gate_first)  # as the adapter declares
    gs = global_scale_from_amax(tensor_amax(act)).to(dev)  # calibrated on this very sample
    r_codes, r_scales, _ = ref.quantize_nvfp4(act, gs)
    codes = poisoned(tuple(r_codes.shape), torch.uint8, dev)
    scales = poisoned(tuple(r_scales.shape), torch.float8_e4m3fn, dev)
    adapter.swiglu_requant(l1, case.limit, to_adapter_scale(gs, conv.global_scale), codes, scales)
    exact = case.tolerance is Tolerance.EXACT
    rows = compare_quantized(
        "swiglu_requant", act, gs, (r_codes, r_scales), (codes, scales), exact, conv.policies
    )
    found = None
    if any(r.outcome is Outcome.FAIL for r in rows) and case.limit is not None:
        found = identify_swiglu_variant(adapter, case.limit, case.shape.intermediate, dev)
    for r in rows:
        _flag_conventions(r, conv)
        if found is None:
            continue
        r.metrics["matches_variant"] = " or ".join(found) or None
        if found and r.outcome is Outcome.FAIL:
            r.message += f"; output {_matches(found)}, not the declared {conv.swiglu_label}"
    return rows


def _matches(found: list[str]) -> str:
    if len(found) == 1:
        return f"matches SwiGLU variant {found[0]}"
    return f"matches SwiGLU variants {' or '.join(found)} (indistinguishable here)"


def _flag_conventions(c: Comparison, conv: Any) -> None:
    """Show beside a verdict when it was judged against a convention that is not DSV4's."""
    other = conv.not_dsv4()
    c.metrics["swiglu_convention"] = conv.swiglu_label
    if not other:
        return
    c.metrics["not_dsv4"] = other
    _append(c, f"judged as declared ({', '.join(other)}): not DeepSeek V4's convention")


def _append(c: Comparison, note: str) -> None:
    c.message = f"{c.message}; {note}" if c.message else note


# SwiGLU variants are told apart at this limit as well as at the case's: at L = 10 silu has
# saturated (silu(10) = 9.9995), so DSV4's silu(min(g, L)) and SwigluStep's min(silu(g), L)
# differ by 5e-5 relative, which FP4 cannot show; at L = 1 (silu(1) = 0.73) every pair differs.
PROBE_LIMIT = 1.0


def variant_probe(limit: float, intermediate: int, dev: torch.device) -> torch.Tensor:
    """An L1 output [rows, 2I] holding every (gate, up) pair of levels on both sides of +-L
    (and so of the product's +-L), cycled over the I columns."""
    levels = torch.tensor([-3.0, -1.5, -0.5, 0.3, 0.8, 1.5, 3.0]) * limit
    g, u = torch.meshgrid(levels, levels, indexing="ij")
    rows = -(-g.numel() // intermediate)  # ceil: every pair at least once
    idx = torch.arange(rows * intermediate) % g.numel()
    gate, up = g.reshape(-1)[idx], u.reshape(-1)[idx]
    l1 = torch.cat([gate.reshape(rows, -1), up.reshape(rows, -1)], dim=-1)
    return l1.to(torch.bfloat16).to(dev)


def identify_swiglu_variant(adapter: Any, limit: float, intermediate: int, dev: torch.device):
    """The named SwiGLU variants (and gate/up orders) that reproduce the adapter's swiglu_requant
    bits on `variant_probe` at the case's limit and at PROBE_LIMIT: [] when none does. The probe's
    global scale covers the largest variant, so none saturates into looking like another."""
    cands = [(v, gf) for gf in (True, False) for v in SwigluVariant]
    found = {variant_label(v, gf) for v, gf in cands}
    conv = _conventions(adapter)
    for lim in dict.fromkeys((limit, PROBE_LIMIT)):
        l1 = variant_probe(lim, intermediate, dev)
        acts = {variant_label(v, gf): swiglu(l1, lim, v, gf) for v, gf in cands}
        gs = global_scale_from_amax(max(tensor_amax(a) for a in acts.values())).to(dev)
        codes = poisoned((l1.shape[0], intermediate // 2), torch.uint8, dev)
        scales = poisoned((l1.shape[0], intermediate // 16), torch.float8_e4m3fn, dev)
        adapter.swiglu_requant(l1, lim, to_adapter_scale(gs, conv.global_scale), codes, scales)
        for label, act in acts.items():
            c, sc, _ = ref.quantize_nvfp4(act, gs)
            same = torch.equal(c, codes) and torch.equal(
                sc.view(torch.uint8), scales.view(torch.uint8)
            )
            if not same:
                found.discard(label)
    return [variant_label(v, gf) for v, gf in cands if variant_label(v, gf) in found]


# --------------------------------------------------------------------------------------------
# layer cases (end to end)


def layer_inputs(case: Case, dev: torch.device) -> dict[str, Any]:
    """Inputs of a layer case, shared by reference and kernel."""
    s, t = case.shape, case.tokens
    gx = inputs.generator(case, "x")
    ratio = 1.0 if case.scale_ratio is None else case.scale_ratio
    if case.stage is Stage.GROUPED_LINEAR:
        heads = s.n_groups * s.group_dim // s.head_dim
        o = inputs.activation((t, heads, s.head_dim), case.distribution, gx)
        w = inputs.weight((s.n_groups, s.group_dim, s.o_lora_rank), inputs.generator(case, "w"))
        return {
            "o": o.to(dev),
            "w": w.to(dev),
            "calib_sample": inputs.calibration_sample(o, ratio).to(dev),
        }
    x = inputs.activation((t, s.hidden), case.distribution, gx)
    d = {"x": x.to(dev), "calib_sample": inputs.calibration_sample(x, ratio).to(dev)}
    if case.stage is Stage.SHARED_EXPERT:
        d["w13"] = inputs.weight((s.hidden, 2 * s.intermediate), inputs.generator(case, "w13")).to(
            dev
        )
        d["w2"] = inputs.weight((s.intermediate, s.hidden), inputs.generator(case, "w2")).to(dev)
    else:
        ids, wts = inputs.routing(case, inputs.generator(case, "routing"))
        e = s.n_experts
        d["topk_ids"], d["topk_weights"] = ids.to(dev), wts.to(dev)
        d["w13"] = inputs.weight(
            (e, s.hidden, 2 * s.intermediate), inputs.generator(case, "w13")
        ).to(dev)
        d["w2"] = inputs.weight((e, s.intermediate, s.hidden), inputs.generator(case, "w2")).to(dev)
    return d


def run_layer(case: Case, adapter: Any, d: dict[str, Any]) -> dict[str, Any]:
    s = case.shape
    if case.stage is Stage.SHARED_EXPERT:
        return adapter.shared_expert(
            d["x"], d["w13"], d["w2"], limit=case.limit, calib_sample=d["calib_sample"]
        )
    if case.stage is Stage.ROUTED_MOE:
        return adapter.routed_moe(
            d["x"],
            d["topk_ids"],
            d["topk_weights"],
            d["w13"],
            d["w2"],
            first_expert=inputs.first_expert(case),
            limit=case.limit,
            calib_sample=d["calib_sample"],
        )
    return adapter.grouped_linear(
        d["o"],
        d["w"],
        n_groups=s.n_groups,
        o_lora_rank=s.o_lora_rank,
        calib_sample=d["calib_sample"],
    )


# The stages a layer must expose for a defect to be placed: its quantized inputs, its GEMM
# outputs (a layer whose only compared tensor is "out" names no stage at all).
DIAGNOSTIC_STAGES = ("x_q", "l1_out", "act_q", "l2_out", "gemm_out")
# Quantized activations whose scales the layer's GEMM reads assembled, and the weight beside.
ASSEMBLED = {"x_q": "w13_q", "act_q": "w2_q"}


# Quantized stages whose global scale is calibrated on the warm-up sample: (name, tolerance).
CALIBRATED = {"x_q": ("gs1", GS_REL_TOL), "act_q": ("gs2", GS2_REL_TOL)}


def _layer(
    case: Case, adapter: Any, dev: torch.device, d: dict[str, Any] | None = None
) -> list[Comparison]:
    d = layer_inputs(case, dev) if d is None else d
    declared = _conventions(adapter)
    r = run_layer(case, ReferenceAdapter(conventions=declared), d)  # judged as declared
    k = run_layer(case, adapter, d)
    rows: list[Comparison] = []
    first_divergent = nan_culprit = None
    conv = declared.global_scale
    for name, rv in r.items():
        if name == "out" or name not in k or name.startswith("w"):
            continue
        if name in CALIBRATED:  # its gs was calibrated before the run: that stage comes first
            gs_name, tol = CALIBRATED[name]
            gs_name = "gs" if case.stage is Stage.GROUPED_LINEAR else gs_name  # its one scale
            cal = _compare_global_scale(
                rv[2], from_adapter_scale(k[name][2], conv), conv, f"calibration.{gs_name}", tol
            )
            if cal.outcome is Outcome.FAIL:
                cal.message = f"calibration ({gs_name}): {cal.message}"
            rows.append(cal)
            if first_divergent is None and not cal.metrics.get("equal", False):
                first_divergent = "calibration"
        c = _compare_intermediate(name, rv, k[name])
        rows.append(c)
        if first_divergent is None and not c.metrics.get("equal", False):
            first_divergent = name
        if nan_culprit is None and c.metrics.get("nonfinite_out", 0):
            nan_culprit = name
        if name in ASSEMBLED and callable(getattr(adapter, "assemble_scales", None)):
            # the layer's GEMM reads the adapter's own assembly of exactly these scales
            offs = k.get("expert_offsets", r.get("expert_offsets"))
            if offs is None:  # the shared expert: one group of every token
                offs = torch.tensor([k[name][0].shape[0]], dtype=torch.int32, device=dev)
            wname = ASSEMBLED[name] if ASSEMBLED[name] in r else "w_q"  # grouped_linear: w_q
            names = (f"{name}.assembly", f"{wname}.assembly")
            for a in compare_assembly(adapter, names, k[name][1], offs.to(dev), r[wname][1]):
                rows.append(a)
                if first_divergent is None and a.outcome is Outcome.FAIL:
                    first_divergent = a.name
    out = _compare_out(case, r["out"], k.get("out"))
    swiglu_found = None
    if (
        first_divergent in ("calibration", "act", "act_q")
        and case.stage is not Stage.GROUPED_LINEAR
    ):
        swiglu_found = identify_layer_swiglu(case, r, k, declared)
        out.metrics["matches_variant"] = " or ".join(swiglu_found) or None
        label = _layer_label(declared.swiglu_label, declared.weight_after_w2)
        if swiglu_found and label not in swiglu_found:
            first_divergent = "act"  # born in the SwiGLU; gs2 and act_q only follow from it
            _append(out, f"{_matches(swiglu_found)}, not the declared {label}")
    _flag_conventions(out, declared)
    ok_in = all(c.outcome is Outcome.PASS for c in rows)
    hidden = [n for n in r if n not in k and n in DIAGNOSTIC_STAGES]
    out.metrics.update(
        first_divergent_stage=first_divergent, nan_first_stage=nan_culprit, not_exposed=hidden
    )
    if out.outcome is Outcome.FAIL:
        out.message += f"; first divergent stage: {first_divergent}"
        if first_divergent is None and hidden:
            out.message += f" (the adapter exposes no {', '.join(hidden)})"
        if nan_culprit:
            out.message += f"; NaN/Inf first appears in stage {nan_culprit}"
    if not ok_in:
        out.metrics["intermediate_failures"] = [c.name for c in rows if c.outcome is Outcome.FAIL]
    if isinstance(k.get("out"), torch.Tensor) and k["out"].shape == r["out"].shape:
        out.metrics["per_token"] = metrics.per_token_error_bins(r["out"].float(), k["out"].float())
    l2r, l2k = r.get("l2_out"), k.get("l2_out")
    offs = r.get("expert_offsets")
    if case.stage is Stage.ROUTED_MOE and isinstance(l2k, torch.Tensor) and l2k.shape == l2r.shape:
        out.metrics["per_group"] = metrics.per_group_error(l2r.float(), l2k.float(), offs.cpu())
    twin = run_layer(case, ReferenceAdapter(quantized=False, conventions=declared), d)["out"]
    out.metrics["quant_sqnr_db"] = metrics.error_panel(twin.float(), r["out"].float(), 0.0, 0.0)[
        "sqnr_db"
    ]
    return [*rows, out]


def _layer_label(swiglu_label: str, weight_after_w2: bool, pre_alpha: bool = False) -> str:
    """A layer's SwiGLU convention as named in messages: variant and order, plus the routing
    weight position and a clamp in raw GEMM units where those differ from DSV4."""
    after = " (routing weight after w2)" if weight_after_w2 else ""
    pre = " (clamp in raw GEMM units, before alpha)" if pre_alpha else ""
    return swiglu_label + after + pre


def _expert_of_rows(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    ends = offsets.long().cpu()
    counts = torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))
    return torch.repeat_interleave(torch.arange(ends.numel()), counts)[:rows]


# A layer's SwiGLU diagnosis on the kernel's own L1 output: a convention explains the kernel's
# act_q when at most this fraction of its codes and scale bytes differ. Not 0: a clamp in raw GEMM
# units is recomputed from the bf16 L1 output divided by alpha, not from the kernel's fp32
# accumulator, so codes next to a rounding midpoint may flip (measured: < 0.5% on the tiny cases);
# a wrong convention moves far more wherever a clamp acts.
LAYER_MATCH_FRAC = 0.01


def identify_layer_swiglu(case: Case, r: dict, k: dict, declared: Any) -> list[str]:
    """Which SwiGLU convention turns the kernel's own L1 output into its own act_q (quantized with
    its own gs2): every variant and gate/up order, the routing weight before or after w2 (routed
    MoE), and DSV4's clamp in raw GEMM units before alpha. Of those within LAYER_MATCH_FRAC: exact
    ones first, then the ones saturating fewest values (two conventions coincide where both
    saturate), then the fewest choices changed from the declared convention (a variant that merely
    coincides where no clamp acts is not named over the declared one)."""
    if not (isinstance(k.get("l1_out"), torch.Tensor) and isinstance(k.get("act_q"), tuple)):
        return []
    l1 = k["l1_out"].float()
    codes, scales, gs2 = k["act_q"]
    conv = declared.global_scale
    gs2 = torch.as_tensor(from_adapter_scale(gs2, conv)).float().reshape(-1).to(l1.device)
    offsets = k.get("expert_offsets", r.get("expert_offsets"))
    if offsets is None:
        offsets = torch.tensor([l1.shape[0]], dtype=torch.int32, device=l1.device)
    n_groups = offsets.numel()
    gs2 = gs2.expand(n_groups) if gs2.numel() == 1 else gs2
    expert = _expert_of_rows(offsets, l1.shape[0]).to(l1.device)
    x_gs = from_adapter_scale(k["x_q"][2], conv) if isinstance(k.get("x_q"), tuple) else None
    alpha = None
    if x_gs is not None and "w13_q" in r and case.limit is not None:
        gs1 = torch.as_tensor(x_gs).float().reshape(-1).to(l1.device).expand(n_groups)
        alpha = (gs1 * r["w13_q"][2].float().reshape(-1))[expert][:, None]
    weight = r.get("row_weight")
    n_codes = codes.numel() * 2 + scales.numel()
    # Beyond 6 * 448 * gs2 a value saturates: any two conventions agree there, so the kernel's
    # own (one that its gs2 was calibrated on) is the one that saturates least.
    top = (6.0 * 448.0 * gs2[expert] * (1.0 + 2.0**-20))[:, None]
    scored = []  # (n_mismatch, changed choices, label)
    for gate_first in (True, False):
        for variant in SwigluVariant:
            for after in (False, True) if weight is not None else (False,):
                raw = alpha is not None and variant is SwigluVariant.DSV4
                for pre in (False, True) if raw else (False,):
                    if pre:
                        act = swiglu(l1 / alpha, case.limit, variant, gate_first, pre_alpha=alpha)
                    else:
                        act = swiglu(l1, case.limit, variant, gate_first)
                    if weight is not None and not after:
                        act = act * weight
                    c, sc, _ = ref_layers.quantize_groups(act, offsets, gs2)
                    n = metrics.codes_equal(c, codes)["n_mismatch"]
                    n += metrics.bitwise_equal(sc, scales)["n_mismatch"]
                    sat = int((act.abs() > top).sum())
                    changed = (
                        (variant is not declared.swiglu_variant)
                        + (gate_first != declared.gate_first)
                        + (after != declared.weight_after_w2)
                        + pre
                    )
                    label = _layer_label(variant_label(variant, gate_first), after, pre)
                    scored.append((n, sat, changed, label))
    close = [t for t in scored if t[0] <= LAYER_MATCH_FRAC * n_codes]
    if not close:
        return []
    best = min((t[0] > 0, t[1], t[2]) for t in close)  # exact first, then least saturated
    return [t[3] for t in close if (t[0] > 0, t[1], t[2]) == best]


def _compare_intermediate(name: str, rv: Any, kv: Any) -> Comparison:
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


def _compare_out(case: Case, r: torch.Tensor, k: torch.Tensor | None) -> Comparison:
    if k is None:
        return Comparison("out", Outcome.FAIL, "adapter returned no 'out' stage")
    if k.shape != r.shape:
        return Comparison(
            "out", Outcome.FAIL, f"shape {tuple(k.shape)} != reference {tuple(r.shape)}"
        )
    b = case.budget
    m = metrics.error_panel(r.float(), k.float(), b.atol, b.rtol)
    bad = []
    if m["nan_out"] + m["inf_out"] > m["nan_ref"] + m["inf_ref"]:
        bad.append(
            f"{m['nan_out']} NaN / {m['inf_out']} Inf in output (reference "
            f"{m['nan_ref']} / {m['inf_ref']})"
        )
    cd = m["calc_diff"]
    if cd != cd or cd > b.calc_diff:
        bad.append(f"calc_diff {cd:.3g} > budget {b.calc_diff:.3g}")
    if b.min_frac_within and m["frac_within"] < b.min_frac_within:
        bad.append(f"only {m['frac_within']:.4f} within atol={b.atol} rtol={b.rtol}")
    return Comparison("out", Outcome.FAIL if bad else Outcome.PASS, "; ".join(bad), m)


_STAGES = {
    Stage.QUANTIZE: _quantize,
    Stage.SCALE_ASSEMBLY: _scale_assembly,
    Stage.GROUPED_GEMM: _grouped_gemm,
    Stage.SWIGLU_REQUANT: _swiglu_requant,
    Stage.SHARED_EXPERT: _layer,
    Stage.ROUTED_MOE: _layer,
    Stage.GROUPED_LINEAR: _layer,
}


def run_case(
    case: Case, adapter: Any, inputs: dict[str, torch.Tensor] | None = None
) -> list[Comparison]:
    """All comparisons of one case on one adapter (exceptions propagate to the runner).

    `inputs` (layer cases only: the tensors of `layer_inputs`, e.g. from a repro bundle) replace
    the ones drawn from the case's seed."""
    dev = torch.device(case.device)
    with torch.no_grad():
        if inputs is None:
            return _STAGES[case.stage](case, adapter, dev)
        if not case.stage.is_layer:
            raise ValueError(f"given inputs replay layer cases only, not {case.stage.value}")
        return _layer(case, adapter, dev, {k: v.to(dev) for k, v in inputs.items()})


__all__ = ["Comparison", "Outcome", "run_case", "round_up"]
