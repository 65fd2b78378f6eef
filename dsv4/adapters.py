"""dsv4's backends as harness adapters: the one module of dsv4 that knows the harness exists.

`Dsv4Adapter(backend)` implements the harness's stage methods (docs/cases.md "Adapters") with
dsv4.ops, the grouped GEMM pinned to one backend of the registry; `can_implement` asks that
backend's capability probe for the case's device, so `dsv4-sm100` on an H100 is "unsupported:
needs sm_100, got sm_90", never a silent fallback. The layer methods (shared_expert,
routed_moe, grouped_linear) are dsv4.layers' `LayerMethods` mixin, which runs the layer runners
on the adapter's `backend`.
The quantize-family stages (quantize, swiglu_requant, and inside the layers) run on the
adapter's `quant_impl` ("torch" or "cutedsl", dsv4.ops.select_quant_impl), refused by
can_implement where it cannot run ("needs a CUDA device of sm_90 or newer").
Registered names: `dsv4-torch` (the portable backend, torch quantize), `dsv4-cutedsl` (the
CuTeDSL quantize / SwiGLU-requantize kernels, the GEMM on the device's best backend) and
`dsv4-sm90` (the Triton grouped GEMM for sm_90: opt-in, unverified on a GPU).
Conventions are ours (decode-convention global scales, DeepSeek V4 SwiGLU, gate first). Never
imports `reference`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dsv4.layers.adapter import LayerMethods  # shared_expert, routed_moe, grouped_linear
from dsv4.ops import (
    QuantImplUnavailableError,
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    global_scale_from_amax,
    make_b_k_major,
    max_padded_rows,
    nvfp4_amax,
    quantize_activation_nvfp4,
    run_nvfp4_grouped_gemm,
    select_backend,
    select_quant_impl,
    swiglu_quantize,
)
from dsv4.ops.gemm import BackendUnavailableError
from harness.adapters import AdapterBase, Conventions, GemmOperands, default_can_implement, register


class Dsv4Adapter(LayerMethods, AdapterBase):
    """dsv4.ops stages with the grouped GEMM on one named backend."""

    conventions = Conventions()
    devices = ("cpu", "cuda")

    def __init__(self, backend: str | None, quant_impl: str = "torch", name: str = "") -> None:
        self.backend = backend  # None: the device's best grouped-GEMM backend
        self.quant_impl = quant_impl
        self.name = name or f"dsv4-{backend}"

    def can_implement(self, case: Any) -> tuple[bool, str]:
        ok, why = default_can_implement(self, case)
        if not ok:
            return ok, why
        dev = torch.device(case.device)
        try:  # ValueError: not registered; *UnavailableError: capability missing
            select_backend(dev, self.backend)
            select_quant_impl(dev, self.quant_impl)
        except (ValueError, BackendUnavailableError, QuantImplUnavailableError) as e:
            return False, str(e)
        return True, ""

    def gemm_backend(self, device: torch.device) -> str:
        """The grouped-GEMM backend this adapter runs on `device` (recorded in every row)."""
        return select_backend(device, self.backend)

    # ---- stages (outputs are caller-owned; every method writes them in place)

    def quantize(self, x, global_scale, codes_out, scales_out):
        gs = global_scale_from_amax(nvfp4_amax(x)) if global_scale is None else global_scale
        quantize_activation_nvfp4(x, gs.float(), codes_out, scales_out, impl=self.quant_impl)
        return gs

    def assemble_scales(self, a_scales, expert_offsets, b_scales, out_2d, out_3d):
        # The library fills a buffer sized for any routing (graph-safe, no sync); the harness
        # gives the exact size, which is a prefix of it: the tail past the last group is zero.
        t, c = a_scales.shape
        cp = (c + 3) // 4 * 4
        rows = max(max_padded_rows(t, expert_offsets.numel()), out_2d.numel() // cp)
        full = torch.empty(rows * cp, dtype=out_2d.dtype, device=out_2d.device)
        assemble_scales_2d_side_from_offsets(a_scales, expert_offsets, out=full)
        out_2d.copy_(full[: out_2d.numel()])
        assemble_scales_3d_side(b_scales, out=out_3d)

    def grouped_gemm(self, ops: GemmOperands, out):
        run_nvfp4_grouped_gemm(
            ops.a_codes,
            make_b_k_major(ops.b_codes),  # the production layout
            ops.a_scales_swizzled,
            ops.b_scales_swizzled,
            ops.expert_offsets,
            ops.global_scale_a,
            ops.global_scale_b,
            out=out,
            backend=self.backend,
        )

    def swiglu_requant(self, l1_out, limit, global_scale, codes_out, scales_out):
        swiglu_quantize(
            l1_out, global_scale.float(), limit, codes_out, scales_out, impl=self.quant_impl
        )


register("dsv4-torch", functools.partial(Dsv4Adapter, "torch"))
register("dsv4-cutedsl", functools.partial(Dsv4Adapter, None, "cutedsl", "dsv4-cutedsl"))
register("dsv4-sm90", functools.partial(Dsv4Adapter, "sm90"))  # opt-in: unverified on a GPU

__all__ = ["Dsv4Adapter"]
