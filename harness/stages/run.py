"""Run one case on one adapter: inputs -> reference -> kernel (poisoned outputs) -> verdicts.

Stage cases are teacher forced: the kernel stage gets exactly the reference's inputs
(harness.stages.inputs). Layer cases run end to end; every named intermediate both sides expose
is compared, the first divergent stage is named, and the first stage whose output holds NaN/Inf
is the NaN culprit (later stages only propagate it). A layer also compares its calibrated global
scales and the adapter's own scale assembly, so a defect is named at the stage where it is born.
Everything is judged against the reference in the adapter's declared conventions
(harness.stages.verdicts); what a failing output matches (alpha, SwiGLU variant, routing scale,
misplaced groups) comes from harness.diagnose. The reference side of a case (a layer's reference
run, noise floor and SQNR; a GEMM's oracle and bound) is computed once per inputs and
conventions (harness.refcache). Every function returns `Comparison`s; nothing here writes files
or catches exceptions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

import reference as ref
from harness import diagnose, metrics, refcache
from harness.adapters import QuantizedOperand, from_adapter_scale, poisoned, to_adapter_scale
from harness.backends.reference import ReferenceAdapter
from harness.cases import Case, Stage, Tolerance
from harness.stages.ep import run_ep
from harness.stages.inputs import (
    LayerInputs,
    gemm_operands,
    layer_inputs,
    layer_inputs_from_tensors,
    quantize_inputs,
    run_layer,
    scale_assembly_inputs,
    swiglu_inputs,
)
from harness.stages.verdicts import (
    GS2_REL_TOL,
    GS_REL_TOL,
    Comparison,
    Outcome,
    append_note,
    compare_assembly,
    compare_bounded,
    compare_global_scale,
    compare_intermediate,
    compare_out,
    compare_quantized,
    flag_conventions,
)
from reference.gemm import grouped_gemm_error_bound, grouped_gemm_nvfp4


def _quantize(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    x, gs = quantize_inputs(case, dev)
    r = QuantizedOperand(*ref.quantize_nvfp4(x, gs))
    conv = adapter.conventions.global_scale
    codes, scales = _poisoned_like(r)
    out_gs = from_adapter_scale(
        adapter.quantize(x, to_adapter_scale(gs, conv), codes, scales), conv
    )
    exact = case.tolerance is Tolerance.EXACT or case.distribution.exact
    policies = adapter.conventions.policies
    whole = gs is None and diagnose.nan_amax(x, r.global_scale, out_gs)
    out = QuantizedOperand(codes, scales, out_gs)
    rows = compare_quantized("quantize", x, r, out, exact, policies, whole)
    g_row = compare_global_scale(r.global_scale, out_gs, conv)
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


def _poisoned_like(q: QuantizedOperand) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisoned code and scale outputs shaped as `q`'s: unwritten bytes show."""
    dev = q.codes.device
    return (
        poisoned(tuple(q.codes.shape), torch.uint8, dev),
        poisoned(tuple(q.scales.shape), torch.float8_e4m3fn, dev),
    )


def _scale_assembly(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    a, offsets, b = scale_assembly_inputs(case, dev)
    return compare_assembly(adapter, ("scales_2d", "scales_3d"), a, offsets, b)


def _grouped_gemm(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    ops, conv_ops = gemm_operands(case, dev, adapter.conventions.global_scale)
    args = ops.plain()
    oracle, bound = refcache.cached(  # the same for every backend of the case
        "grouped_gemm",
        case,
        lambda: (
            grouped_gemm_nvfp4(*args, oracle=True),
            grouped_gemm_error_bound(*args, out_dtype=torch.bfloat16),
        ),
    )
    out = poisoned((ops.a_codes.shape[0], ops.b_codes.shape[-1]), torch.bfloat16, dev)
    adapter.grouped_gemm(conv_ops, out)
    c = compare_bounded("grouped_gemm.out", oracle, out, bound, ops.expert_offsets)
    if c.outcome is Outcome.FAIL:
        found = diagnose.identify_alpha(ops, out)
        c.metrics["matches_alpha"] = found
        if found:
            c.message += f"; output matches alpha = {found} ({diagnose.ALPHA_VARIANTS[found][1]})"
    if case.probe is None:
        return [c]
    from harness import probes  # local: probes builds on this package

    return [c, probes.check(case.probe, ops, adapter, out)]


def _swiglu_requant(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    conv = adapter.conventions
    l1, act, gs = swiglu_inputs(case, dev, conv)
    r = QuantizedOperand(*ref.quantize_nvfp4(act, gs))
    codes, scales = _poisoned_like(r)
    adapter.swiglu_requant(l1, case.limit, to_adapter_scale(gs, conv.global_scale), codes, scales)
    exact = case.tolerance is Tolerance.EXACT
    out = QuantizedOperand(codes, scales, gs)  # the static scale it was given
    rows = compare_quantized("swiglu_requant", act, r, out, exact, conv.policies)
    found = None
    if any(r.outcome is Outcome.FAIL for r in rows) and case.limit is not None:
        found = diagnose.identify_swiglu_variant(adapter, case.limit, case.shape.intermediate, dev)
    for r in rows:
        flag_conventions(r, conv)
        if found is None:
            continue
        r.metrics["matches_variant"] = " or ".join(found) or None
        if found and r.outcome is Outcome.FAIL:
            r.message += (
                f"; output {diagnose.matches_text(found)}, not the declared {conv.swiglu_label}"
            )
    return rows


# The stages a layer must expose for a defect to be placed: its quantized inputs, its GEMM
# outputs (a layer whose only compared tensor is "out" names no stage at all).
DIAGNOSTIC_STAGES = ("x_q", "l1_out", "act_q", "l2_out", "gemm_out")
# Quantized activations whose scales the layer's GEMM reads assembled, and the weight beside.
ASSEMBLED = {"x_q": "w13_q", "act_q": "w2_q"}


# Quantized stages whose global scale is calibrated on the warm-up sample: (name, tolerance).
CALIBRATED = {"x_q": ("gs1", GS_REL_TOL), "act_q": ("gs2", GS2_REL_TOL)}


def reference_layer(case: Case, declared: Any, d: LayerInputs) -> tuple[dict, float, float]:
    """The reference side of a layer case, judged as `declared`: (its stages, the noise floor:
    calc_diff of the float64-GEMM rerun, the quantization SQNR against the unquantized twin)."""
    r = run_layer(case, ReferenceAdapter(conventions=declared), d)
    second = run_layer(case, ReferenceAdapter(conventions=declared, oracle=True), d)["out"]
    floor = metrics.error_panel(r["out"].float(), second.float(), 0.0, 0.0)["calc_diff"]
    twin = run_layer(case, ReferenceAdapter(quantized=False, conventions=declared), d)["out"]
    sqnr = metrics.error_panel(twin.float(), r["out"].float(), 0.0, 0.0)["sqnr_db"]
    return r, floor, sqnr


def _layer(
    case: Case, adapter: Any, dev: torch.device, d: LayerInputs | None = None
) -> list[Comparison]:
    seeded = d is None  # inputs drawn from the seed: the reference side is shared by backends
    d = layer_inputs(case, dev) if d is None else d
    declared = adapter.conventions
    ref_side = functools.partial(reference_layer, case, declared, d)
    r, floor, sqnr = refcache.cached("layer", case, ref_side, declared) if seeded else ref_side()
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
            cal = compare_global_scale(
                rv[2], from_adapter_scale(k[name][2], conv), conv, f"calibration.{gs_name}", tol
            )
            detail = f"{gs_name}: {cal.message}" if cal.message else gs_name
            if cal.outcome is Outcome.FAIL:
                cal.message = f"calibration ({gs_name}): {cal.message}"
            rows.append(cal)
            if first_divergent is None and not cal.metrics.get("equal", False):
                first_divergent, why = "calibration", detail
        c = compare_intermediate(name, rv, k[name])
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
            w_scales = r[wname][1].clone()  # a copy: r may be shared (harness.refcache)
            for a in compare_assembly(adapter, names, k[name][1], offs.to(dev), w_scales):
                rows.append(a)
                if first_divergent is None and a.outcome is Outcome.FAIL:
                    first_divergent, why = a.name, a.message
    out = compare_out(case, r["out"], k.get("out"), floor)
    if out.outcome is Outcome.FAIL and case.stage is Stage.ROUTED_MOE:
        _name_routing_scale(case, declared, r["out"], k.get("out"), floor, out)
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
            append_note(out, f"{diagnose.matches_text(swiglu_found)}, not the declared {label}")
    flag_conventions(out, declared)
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
    out.metrics["quant_sqnr_db"] = sqnr
    return [out, *rows]  # the verdict first: a case's message is its first failing row's


def _name_routing_scale(
    case: Case, declared: Any, r_out: torch.Tensor, k_out: Any, floor: float, out: Comparison
) -> None:
    """Name a failing routed MoE output that is a routing-weight scale mistake times the
    reference's (routed_scaling_factor missing, applied twice, another model's)."""
    if not (isinstance(k_out, torch.Tensor) and k_out.shape == r_out.shape):
        return
    rsf = case.shape.routed_scaling_factor
    found = diagnose.identify_routing_scale(
        rsf, k_out, lambda y: compare_out(case, r_out, y, floor).outcome is Outcome.PASS
    )
    out.metrics["matches_routing_scale"] = found[0] if found else None
    if found:
        scaled = getattr(declared, "routing_weights_scaled", True)
        given = f"weights given with {rsf:g} applied" if scaled else "normalized weights given"
        append_note(out, f"output is {found[1]:.4g} x the reference: {found[0]} ({given})")


_STAGES = {
    Stage.QUANTIZE: _quantize,
    Stage.SCALE_ASSEMBLY: _scale_assembly,
    Stage.GROUPED_GEMM: _grouped_gemm,
    Stage.SWIGLU_REQUANT: _swiglu_requant,
    Stage.SHARED_EXPERT: _layer,
    Stage.ROUTED_MOE: _layer,
    Stage.GROUPED_LINEAR: _layer,
    Stage.ROUTED_MOE_EP: run_ep,
}


def run_case(
    case: Case,
    adapter: Any,
    inputs: LayerInputs | Mapping[str, torch.Tensor] | None = None,
) -> list[Comparison]:
    """All comparisons of one case on one adapter (exceptions propagate to the runner).

    `inputs` (layer cases only: a `LayerInputs`, or its tensors by name, e.g. from a repro
    bundle) replace the ones drawn from the case's seed."""
    dev = torch.device(case.device)
    with torch.no_grad():
        if inputs is None:
            return _STAGES[case.stage](case, adapter, dev)
        if not case.stage.is_layer:
            raise ValueError(f"given inputs replay layer cases only, not {case.stage.value}")
        if not isinstance(inputs, LayerInputs):
            inputs = layer_inputs_from_tensors(case, inputs)
        return _layer(case, adapter, dev, inputs.to(dev))


__all__ = ["ASSEMBLED", "CALIBRATED", "DIAGNOSTIC_STAGES", "reference_layer", "run_case"]
