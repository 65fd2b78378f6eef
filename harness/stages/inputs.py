"""Inputs of a case, the same for the reference and the kernel: built from the case's seed.

Stage cases are teacher forced: `quantize_inputs`, `scale_assembly_inputs`, `gemm_operands`
(the reference's own quantization, plain and in its assembled layouts, in both scale
conventions) and `swiglu_inputs` give a stage exactly the reference's inputs. `layer_inputs`
draws a layer's activations, weights, routing and calibration sample; `run_layer` hands them to
an adapter's layer method. The verdict (harness.stages.run) and the timing (harness.timing) both
build their inputs here, so what is timed is what was judged. Draws come from harness.inputs.
"""

from __future__ import annotations

from typing import Any

import torch

import reference as ref
from harness import inputs
from harness.adapters import GemmOperands, to_adapter_scale
from harness.cases import Case, Stage
from reference.activation import swiglu
from reference.layouts import (
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    compute_expert_offsets,
)
from reference.nvfp4 import ScaleConvention, global_scale_from_amax, tensor_amax


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


def routed_counts(case: Case) -> torch.Tensor:
    ids, _ = inputs.routing(case, inputs.generator(case, "routing"))
    return inputs.tokens_per_expert(ids, inputs.first_expert(case), case.shape.n_experts)


def scale_assembly_inputs(
    case: Case, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scale-assembly case's (activation scales [T, K/16], END offsets [E], weight scales
    [E, K/16, N])."""
    s = case.shape
    counts = routed_counts(case)
    offsets = compute_expert_offsets(counts).to(dev)
    g = inputs.generator(case, "scales")
    c, n = s.hidden // 16, 2 * s.intermediate
    # Random finite bytes 0x01..0x7E: a zero padding byte can never be mistaken for data.
    a = torch.randint(1, 0x7F, (int(counts.sum()), c), generator=g, dtype=torch.uint8)
    b = torch.randint(1, 0x7F, (s.n_experts, c, n), generator=g, dtype=torch.uint8)
    return a.view(torch.float8_e4m3fn).to(dev), offsets, b.view(torch.float8_e4m3fn).to(dev)


def gemm_operands(
    case: Case, dev: torch.device, conv: ScaleConvention
) -> tuple[GemmOperands, GemmOperands]:
    """(reference-convention operands, adapter-convention operands) for a grouped GEMM case."""
    s = case.shape
    counts = routed_counts(case)
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


__all__ = [
    "gemm_operands",
    "layer_inputs",
    "quantize_inputs",
    "routed_counts",
    "run_layer",
    "scale_assembly_inputs",
    "swiglu_inputs",
]
