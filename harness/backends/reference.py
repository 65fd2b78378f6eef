"""The reference as an adapter: the oracle (`reference/`) through the harness's protocol.

`ReferenceAdapter` implements every stage and layer method with reference/ on any device; run
against itself it passes, which proves the harness end to end on any machine (registered name
`reference`). With other `conventions` it is an honest kernel of that convention, which is how
the harness judges every adapter: against the reference run with the adapter's declared
conventions (harness.stages.run). `quantized=False` is the unquantized fp32 twin of each layer
(the quantization-error panel), `oracle=True` runs the layer GEMMs in float64 (another summation
order: the measured noise floor of a layer's budget). `scales=(gs1, gs2)` runs the routed MoE
with those static scales instead of calibrating (the expert-parallel verdict's reference over
every expert, quantized as each rank calibrated its own: harness.stages.ep).
"""

from __future__ import annotations

from typing import Any

import reference as ref
from harness.adapters import AdapterBase, Conventions, GemmOperands
from reference import layers as ref_layers
from reference.activation import swiglu
from reference.gemm import grouped_gemm_nvfp4
from reference.layouts import assemble_scales_2d_side_from_offsets, assemble_scales_3d_side


class ReferenceAdapter(AdapterBase):
    """The oracle itself: every stage, any device. Passing proves the harness, not a kernel.

    With other `conventions` it is an honest kernel of that convention (SwiGLU variant, gate/up
    order, routing-weight position): the harness judges every adapter against the reference run
    with the adapter's declared conventions.
    """

    name = "reference"

    def __init__(
        self,
        quantized: bool = True,
        conventions: Conventions | None = None,
        oracle: bool = False,
        scales: tuple[Any, Any] | None = None,
    ):
        self.quantized = quantized  # False: the unquantized fp32 twin of each layer
        self.oracle = oracle  # True: layer GEMMs in float64 (another summation order)
        self.routed_scales = scales  # routed MoE (gs1, gs2), fp32 [E] each; None: calibrate
        if conventions is not None:
            self.conventions = conventions

    def _swiglu_args(self) -> dict[str, Any]:
        c = self.conventions
        return {"variant": c.swiglu_variant, "gate_first": c.gate_first}

    def quantize(self, x, global_scale, codes_out, scales_out):
        codes, scales, gs = ref.quantize_nvfp4(x, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)
        return gs

    def assemble_scales(self, a_scales, expert_offsets, b_scales, out_2d, out_3d):
        out_2d.copy_(assemble_scales_2d_side_from_offsets(a_scales, expert_offsets)[0])
        out_3d.copy_(assemble_scales_3d_side(list(b_scales)))

    def grouped_gemm(self, ops: GemmOperands, out):
        out.copy_(grouped_gemm_nvfp4(*ops.plain(), out_dtype=out.dtype))

    def swiglu_requant(self, l1_out, limit, global_scale, codes_out, scales_out):
        act = swiglu(l1_out, limit, **self._swiglu_args())
        codes, scales, _ = ref.quantize_nvfp4(act, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)

    def shared_expert(self, x, w13, w2, *, limit, calib_sample):
        kw = {"limit": limit, "oracle": self.oracle, **self._swiglu_args()}
        if not self.quantized:
            return ref_layers.shared_expert(x, w13, w2, quantized=False, **kw)
        gs1, gs2 = ref_layers.calibrate_shared_expert(calib_sample, w13, w2, **kw)
        return ref_layers.shared_expert(x, w13, w2, gs1=gs1, gs2=gs2, **kw)

    def routed_moe(
        self,
        x,
        topk_ids,
        topk_weights,
        w13,
        w2,
        *,
        first_expert,
        limit,
        calib_sample,
        routed_scaling_factor=1.0,  # given only where routing_weights_scaled is False
    ):
        args = (x, topk_ids, topk_weights, w13, w2)
        kw = {
            "first_expert": first_expert,
            "limit": limit,
            "weight_after_w2": self.conventions.weight_after_w2,
            "routed_scaling_factor": routed_scaling_factor,
            "oracle": self.oracle,
            **self._swiglu_args(),
        }
        if not self.quantized:
            return ref_layers.routed_moe(*args, quantized=False, **kw)
        if self.routed_scales is not None:
            gs1, gs2 = self.routed_scales
        else:
            gs1, gs2 = ref_layers.calibrate_routed_moe(calib_sample, *args[1:], **kw)
        return ref_layers.routed_moe(*args, gs1=gs1, gs2=gs2, **kw)

    def routed_moe_rank(
        self, x, topk_ids, topk_weights, w13, w2, *, rank, world, first_expert, n_local, **kw
    ):
        """Rank `rank` of `world` (docs/cases.md "Expert parallel"): the reference restricted to
        global experts first_expert .. first_expert + n_local - 1 of the global weights."""
        local = slice(first_expert, first_expert + n_local)
        args = (x, topk_ids, topk_weights, w13[local], w2[local])
        return self.routed_moe(*args, first_expert=first_expert, **kw)

    def grouped_linear(self, o, w, *, n_groups, o_lora_rank, calib_sample):
        if not self.quantized:
            return ref_layers.grouped_linear(
                o, w, n_groups=n_groups, o_lora_rank=o_lora_rank, quantized=False
            )
        gs = ref_layers.calibrate_grouped_linear(calib_sample, n_groups=n_groups)
        return ref_layers.grouped_linear(
            o, w, n_groups=n_groups, o_lora_rank=o_lora_rank, gs=gs, oracle=self.oracle
        )


__all__ = ["ReferenceAdapter"]
