"""Diagnoses: what a mismatch matches, so a failing verdict names the defect, not only the stage.

Each function answers one question about a kernel output the verdict already failed (or about a
quantizer's inputs), by re-running the reference -- or the adapter itself on a probe -- under
each alternative: which epilogue alpha (`identify_alpha`), which SwiGLU variant at the stage
(`identify_swiglu_variant`, on a probe at two limits) or in a layer (`identify_layer_swiglu`,
on the kernel's own L1 output: variant, gate/up order, routing-weight position, clamp before
alpha), which routing-weight scale a routed MoE applied (`identify_routing_scale`:
routed_scaling_factor missing, twice, or another model's), which groups of a 2D-side scale
assembly are misplaced (`misplaced_groups`), and whether a NaN global scale is a quantizer's
NaN-propagating amax (`nan_amax`). Pure of I/O; called by harness.stages.run, whose verdicts
(harness.stages.verdicts) they explain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import reference as ref
from harness import metrics
from harness.adapters import GemmOperands, from_adapter_scale, poisoned, to_adapter_scale
from harness.cases import PUBLISHED, Case
from reference import layers as ref_layers
from reference.activation import SwigluVariant, swiglu, variant_label
from reference.gemm import grouped_gemm_error_bound, grouped_gemm_nvfp4
from reference.layouts import round_up, unswizzle_scales
from reference.nvfp4 import global_scale_from_amax, tensor_amax

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
    conv = adapter.conventions
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


def matches_text(found: list[str]) -> str:
    if len(found) == 1:
        return f"matches SwiGLU variant {found[0]}"
    return f"matches SwiGLU variants {' or '.join(found)} (indistinguishable here)"


# A layer's SwiGLU diagnosis on the kernel's own L1 output: a convention explains the kernel's
# act_q when at most this fraction of its codes and scale bytes differ. Not 0: a clamp in raw GEMM
# units is recomputed from the bf16 L1 output divided by alpha, not from the kernel's fp32
# accumulator, so codes next to a rounding midpoint may flip (measured: < 0.5% on the tiny cases);
# a wrong convention moves far more wherever a clamp acts.
LAYER_MATCH_FRAC = 0.01


def layer_label(swiglu_label: str, weight_after_w2: bool, pre_alpha: bool = False) -> str:
    """A layer's SwiGLU convention as named in messages: variant and order, plus the routing
    weight position and a clamp in raw GEMM units where those differ from DSV4."""
    after = " (routing weight after w2)" if weight_after_w2 else ""
    pre = " (clamp in raw GEMM units, before alpha)" if pre_alpha else ""
    return swiglu_label + after + pre


def expert_of_rows(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    ends = offsets.long().cpu()
    counts = torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))
    return torch.repeat_interleave(torch.arange(ends.numel()), counts)[:rows]


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
    expert = expert_of_rows(offsets, l1.shape[0]).to(l1.device)
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
                    label = layer_label(variant_label(variant, gate_first), after, pre)
                    scored.append((n, sat, changed, label))
    close = [t for t in scored if t[0] <= LAYER_MATCH_FRAC * n_codes]
    if not close:
        return []
    best = min((t[0] > 0, t[1], t[2]) for t in close)  # exact first, then least saturated
    return [t[3] for t in close if (t[0] > 0, t[1], t[2]) == best]


def routing_scale_hypotheses(rsf: float) -> dict[str, float]:
    """Routing-weight scale mistakes of a routed MoE, for a case whose model's factor is `rsf`:
    name -> c, the factor by which the kernel's routing weights (and so its output, which is
    linear in them) differ from the reference's. Other factors tried: the published models'."""
    hyp = {
        "routed_scaling_factor not applied (normalized weights used as they are)": 1.0 / rsf,
        f"routed_scaling_factor applied twice ({rsf:g} x {rsf:g})": rsf,
    }
    for f in sorted({p.routed_scaling_factor for p in PUBLISHED.values()}):
        if f != rsf:
            hyp[f"routed_scaling_factor {f:g} instead of {rsf:g}"] = f / rsf
            hyp[f"routed_scaling_factor {f:g} applied to weights that include {rsf:g}"] = f
    out: dict[str, float] = {}
    for name, c in hyp.items():  # c == 1 is no mistake; two names of one c: the first
        if c != 1.0 and c not in out.values():
            out[name] = c
    return out


def identify_routing_scale(
    rsf: float, out: torch.Tensor, passes: Callable[[torch.Tensor], bool]
) -> tuple[str, float] | None:
    """(name, c) of the routing-scale mistake whose undoing, out / c, passes the case's own
    verdict (`passes`: budget, gain and bias against the reference), or None."""
    for name, c in routing_scale_hypotheses(rsf).items():
        if passes(out.float() / c):
            return name, c
    return None


def misplaced_groups(a: torch.Tensor, counts: list[int], o: torch.Tensor) -> tuple[list[int], str]:
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
    return bad, "; ".join(notes)
