"""Timing baselines: what a kernel's speed is reported against, measured in the same run.

`bf16` is BF16 cuBLAS on dequantized weights (the speed an NVFP4 kernel has to beat to be worth
it): every GEMM of the grouped GEMM and of the three layers as `torch.mm` / `torch.bmm` on bf16
operands dequantized once at prepare time (the routed MoE on CUDA as two `torch._grouped_mm`
calls, where torch has it), SwiGLU and the routing weight as plain torch ops. It
has no NVFP4 stage methods, so it cannot be a correctness backend: name it under a case file's
`baselines:` (or `run --time --baseline bf16`). Any registered adapter (`dsv4-torch`,
`reference`) can be a baseline too.

`reference-compiled` is the reference's quantize and SwiGLU-requant under `torch.compile`
(what a user gets from the oracle with no kernel written): a baseline for the memory-bound
stages and also a correctness backend (a compiler that changed the bits would fail).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import reference as ref
from harness.adapters import AdapterBase, GemmOperands
from harness.backends.reference import ReferenceAdapter
from reference.activation import swiglu
from reference.gemm import _expert_rows, dequantize_codes_scales
from reference.nvfp4 import dequantize_weight_nvfp4


class Bf16Baseline(AdapterBase):
    """BF16 cuBLAS on dequantized operands: a timing baseline only."""

    name = "bf16"
    devices = ("cuda",)
    timing_only = True

    def can_implement(self, case: Any) -> tuple[bool, str]:
        return False, (
            "bf16 is a timing baseline (BF16 cuBLAS on dequantized weights), not an NVFP4 "
            "implementation: name it under the case file's baselines:"
        )

    def prepare_grouped_gemm(self, ops: GemmOperands, out: torch.Tensor) -> Callable[[], None]:
        a = dequantize_codes_scales(ops.a_codes, ops.a_scales).to(torch.bfloat16)
        b = dequantize_weight_nvfp4(ops.b_codes, ops.b_scales, 1.0, torch.bfloat16)
        # host offsets, read once here so run() never syncs
        groups = _expert_rows(ops.expert_offsets.tolist())

        def run() -> None:
            for e, s, t in groups:
                torch.mm(a[s:t], b[e], out=out[s:t])

        return run

    def prepare_shared_expert(self, x, w13, w2, *, limit, calib_sample) -> Callable[[], Any]:
        w13, w2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16)
        return lambda: swiglu(x @ w13, limit).to(torch.bfloat16) @ w2

    def prepare_routed_moe(
        self, x, topk_ids, topk_weights, w13, w2, *, first_expert, limit, calib_sample
    ) -> Callable[[], Any]:
        w13, w2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16)
        n_experts = w13.shape[0]
        local = topk_ids.flatten() - first_expert
        slot = torch.nonzero((local >= 0) & (local < n_experts)).flatten()
        order = slot[torch.argsort(local[slot], stable=True)]
        counts = torch.bincount(local[order], minlength=n_experts).tolist()
        rows = order // topk_ids.shape[1]  # token of each routed slot, in expert order
        weight = topk_weights.flatten()[order].to(torch.float32).unsqueeze(1)
        bounds, s = [], 0
        for e, c in enumerate(counts):
            if c:
                bounds.append((e, s, s + c))
            s += c
        if x.is_cuda and hasattr(torch, "_grouped_mm") and bounds:
            return _grouped_moe(x, rows, weight, counts, w13, w2, limit)

        def run() -> torch.Tensor:
            xs = x.index_select(0, rows)
            out = torch.zeros_like(x)
            for e, s, t in bounds:
                h = swiglu(xs[s:t] @ w13[e], limit) * weight[s:t]
                out.index_add_(0, rows[s:t], h.to(torch.bfloat16) @ w2[e])
            return out

        return run

    def prepare_grouped_linear(
        self, o, w, *, n_groups, o_lora_rank, calib_sample
    ) -> Callable[[], Any]:
        t = o.shape[0]
        og = o.reshape(t, n_groups, -1).transpose(0, 1)  # [G, T, D]
        w = w.to(torch.bfloat16)
        return lambda: torch.bmm(og, w).transpose(0, 1)


def _grouped_moe(x, rows, weight, counts, w13, w2, limit) -> Callable[[], Any]:
    """The routed MoE as two `torch._grouped_mm` calls (BF16 cuBLAS grouped GEMM, offsets on the
    device: no per-expert launch, graph-capturable), SwiGLU and the routing weight between them."""
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(x.device)
    w13k = w13.transpose(1, 2).contiguous().transpose(1, 2)  # [E, K, N] read K-major
    w2k = w2.transpose(1, 2).contiguous().transpose(1, 2)

    def run() -> torch.Tensor:
        xs = x.index_select(0, rows)
        h = torch._grouped_mm(xs, w13k, offs=offs, out_dtype=torch.bfloat16)
        a = (swiglu(h, limit) * weight).to(torch.bfloat16)
        y = torch._grouped_mm(a, w2k, offs=offs, out_dtype=torch.bfloat16)
        return torch.zeros_like(x).index_add_(0, rows, y)

    return run


def _swiglu_quantize(l1: torch.Tensor, limit: float | None, gs: torch.Tensor):
    return ref.quantize_nvfp4(swiglu(l1, limit), gs)


class CompiledReference(ReferenceAdapter):
    """The reference's quantize and SwiGLU-requant compiled by torch.compile (layers: eager)."""

    name = "reference-compiled"

    def __init__(self) -> None:
        super().__init__()
        self._quantize = torch.compile(ref.quantize_nvfp4, dynamic=False)
        self._swiglu_quantize = torch.compile(_swiglu_quantize, dynamic=False)

    def quantize(self, x, global_scale, codes_out, scales_out):
        codes, scales, gs = self._quantize(x, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)
        return gs

    def swiglu_requant(self, l1_out, limit, global_scale, codes_out, scales_out):
        codes, scales, _ = self._swiglu_quantize(l1_out, limit, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)


__all__ = ["Bf16Baseline", "CompiledReference"]
