"""Run one case on one adapter: inputs -> reference -> kernel (poisoned outputs) -> comparisons.

Stage cases are teacher forced: the kernel stage gets exactly the reference's inputs (GEMM
operands come plain and in the reference's assembled layouts). Layer cases run end to end; every
named intermediate both sides expose is compared, the first divergent stage is named, and the
first stage whose output holds NaN/Inf is the NaN culprit (later stages only propagate it).

Verdicts (docs/design.md §5): codes and scale bytes are bit-exact, where only real mismatches fail
(tie flips, signed zeros and underflowed blocks are classified, not failed; a quantizer policy
passes where the adapter declares it) unless the case or its distribution demands exactness;
layouts are exact; GEMM outputs lie within the derived bound of
`reference.gemm.grouped_gemm_error_bound`; a layer's output meets a budget derived from the
measured noise floor, with its gain and bias. Everything is judged against the reference in the
adapter's declared conventions. A layer also compares its calibrated global scales and the
adapter's own scale assembly, so a defect is named at the stage where it is born; what a failing
output matches (alpha, SwiGLU variant, misplaced groups) comes from harness.diagnose.
Every function returns `Comparison`s; nothing here writes files or catches exceptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

import reference as ref
from harness import diagnose, inputs, metrics
from harness.adapters import (
    GemmOperands,
    ReferenceAdapter,
    from_adapter_scale,
    poisoned,
    to_adapter_scale,
)
from harness.cases import Case, Stage, Tolerance
from harness.records import Outcome
from reference.activation import swiglu
from reference.gemm import grouped_gemm_error_bound, grouped_gemm_nvfp4
from reference.layouts import (
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    compute_expert_offsets,
    round_up,
)
from reference.nvfp4 import ScaleConvention, global_scale_from_amax, tensor_amax


@dataclass
class Comparison:
    """One row of results: a named output of a case, its verdict and its metrics."""

    name: str
    outcome: Outcome
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# helpers


def _conventions(adapter: Any):
    return adapter.conventions


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
    rounding = metrics.rounding_direction(x, gs, ref_q[0], ref_q[1], out_q[0], out_q[1])
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
            _append(
                c,
                f"rounding: {r['direction']} (of {r['n']} differing codes under equal scales: "
                f"{r['tie_up']} ties up, {r['tie_down']} ties down, "
                f"{r['off_tie_down']} off-tie down, {r['off_tie_up']} off-tie up)",
            )
    return rows


# --------------------------------------------------------------------------------------------
# stage cases (teacher forced)


def quantize_inputs(case: Case, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A quantize case's x [T, K] and its decode-convention global scale (None: dynamic)."""
    g = inputs.generator(case, "x")
    x = inputs.activation((case.tokens, case.shape.hidden), case.distribution, g).to(dev)
    if case.distribution.exact:
        gs = torch.tensor(inputs.EXACT_GLOBAL_SCALE, device=dev)
    elif case.scale_ratio is None:
        gs = None
    else:
        # calibrated on the clean warm-up sample (the planted NaN / Inf only in the live x)
        gs = global_scale_from_amax(tensor_amax(inputs.finite(x)) / case.scale_ratio).to(dev)
    return x, gs


def _quantize(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    x, gs = quantize_inputs(case, dev)
    r_codes, r_scales, r_gs = ref.quantize_nvfp4(x, gs)
    conv = _conventions(adapter).global_scale
    codes = poisoned(tuple(r_codes.shape), torch.uint8, dev)
    scales = poisoned(tuple(r_scales.shape), torch.float8_e4m3fn, dev)
    out_gs = from_adapter_scale(
        adapter.quantize(x, to_adapter_scale(gs, conv), codes, scales), conv
    )
    exact = case.tolerance is Tolerance.EXACT or case.distribution.exact
    policies = _conventions(adapter).policies
    whole = gs is None and diagnose.nan_amax(x, r_gs, out_gs)
    rows = compare_quantized(
        "quantize", x, r_gs, (r_codes, r_scales), (codes, scales), exact, policies, whole
    )
    g_row = _compare_global_scale(r_gs, out_gs, conv)
    if whole:  # a policy, named as one: declared it passes
        ok = any(getattr(p, "value", p) == "nan_amax" for p in policies)
        g_row.outcome = Outcome.PASS if ok else Outcome.FAIL
        g_row.message = (
            f"global scale NaN by policy nan_amax ({diagnose.POLICY_MEANING['nan_amax']})"
            + (
                ", declared"
                if ok
                else ", which the adapter does not declare (Conventions.policies)"
            )
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


def scale_assembly_inputs(
    case: Case, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scale-assembly case's (activation scales [T, K/16], END offsets [E], weight scales
    [E, K/16, N])."""
    s = case.shape
    counts = _routed_counts(case)
    offsets = compute_expert_offsets(counts).to(dev)
    g = inputs.generator(case, "scales")
    c, n = s.hidden // 16, 2 * s.intermediate
    # Random finite bytes 0x01..0x7E: a zero padding byte can never be mistaken for data.
    a = torch.randint(1, 0x7F, (int(counts.sum()), c), generator=g, dtype=torch.uint8)
    b = torch.randint(1, 0x7F, (s.n_experts, c, n), generator=g, dtype=torch.uint8)
    return a.view(torch.float8_e4m3fn).to(dev), offsets, b.view(torch.float8_e4m3fn).to(dev)


def _scale_assembly(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    a, offsets, b = scale_assembly_inputs(case, dev)
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
        found = diagnose.identify_alpha(ops, out)
        c.metrics["matches_alpha"] = found
        if found:
            c.message += f"; output matches alpha = {found} ({diagnose.ALPHA_VARIANTS[found][1]})"
    return [c]


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


def swiglu_inputs(
    case: Case, dev: torch.device, conv: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A SwiGLU-requant case's (L1 output, reference activation in the convention `conv`
    declares, decode-convention global scale calibrated on that very activation)."""
    l1 = _swiglu_input(case, dev)
    act = swiglu(l1, case.limit, conv.swiglu_variant, conv.gate_first)  # as the adapter declares
    return l1, act, global_scale_from_amax(tensor_amax(act)).to(dev)


def _swiglu_requant(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    conv = _conventions(adapter)
    l1, act, gs = swiglu_inputs(case, dev, conv)
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
        found = diagnose.identify_swiglu_variant(adapter, case.limit, case.shape.intermediate, dev)
    for r in rows:
        _flag_conventions(r, conv)
        if found is None:
            continue
        r.metrics["matches_variant"] = " or ".join(found) or None
        if found and r.outcome is Outcome.FAIL:
            r.message += (
                f"; output {diagnose.matches_text(found)}, not the declared {conv.swiglu_label}"
            )
    return rows


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
    why = ""  # the first divergent stage's own diagnosis, repeated in the verdict
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
            detail = f"{gs_name}: {cal.message}" if cal.message else gs_name
            if cal.outcome is Outcome.FAIL:
                cal.message = f"calibration ({gs_name}): {cal.message}"
            rows.append(cal)
            if first_divergent is None and not cal.metrics.get("equal", False):
                first_divergent, why = "calibration", detail
        c = _compare_intermediate(name, rv, k[name])
        rows.append(c)
        if first_divergent is None and not c.metrics.get("equal", False):
            first_divergent, why = name, c.message
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
                    first_divergent, why = a.name, a.message
    second = run_layer(case, ReferenceAdapter(conventions=declared, oracle=True), d)["out"]
    floor = metrics.error_panel(r["out"].float(), second.float(), 0.0, 0.0)["calc_diff"]
    out = _compare_out(case, r["out"], k.get("out"), floor)
    swiglu_found = None
    if (
        first_divergent in ("calibration", "act", "act_q")
        and case.stage is not Stage.GROUPED_LINEAR
    ):
        swiglu_found = diagnose.identify_layer_swiglu(case, r, k, declared)
        out.metrics["matches_variant"] = " or ".join(swiglu_found) or None
        label = diagnose.layer_label(declared.swiglu_label, declared.weight_after_w2)
        if swiglu_found and label not in swiglu_found:
            first_divergent, why = "act", ""  # born in the SwiGLU; gs2, act_q only follow
            _append(out, f"{diagnose.matches_text(swiglu_found)}, not the declared {label}")
    _flag_conventions(out, declared)
    ok_in = all(c.outcome is Outcome.PASS for c in rows)
    hidden = [n for n in r if n not in k and n in DIAGNOSTIC_STAGES]
    out.metrics.update(
        first_divergent_stage=first_divergent, nan_first_stage=nan_culprit, not_exposed=hidden
    )
    if out.outcome is Outcome.FAIL:
        out.message += f"; first divergent stage: {first_divergent}"
        if why:
            out.message += f" ({why})"
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
    return [out, *rows]  # the verdict first: a case's message is its first failing row's


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


def _compare_out(
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
