"""The routed MoE's activation staging in one launch: quantize straight into the experts' layout.

`quantize_to_expert_layout` gathers (or SwiGLUs) the staged rows, quantizes them with the static
global scale and writes the scale bytes straight into the 2-D-side layout the grouped GEMM reads
(each expert's rows padded to 128 on their own, experts from int32 END offsets on the device).
The portable path is three ops: `quantize_activation_nvfp4` (or `swiglu_quantize`) of the rows,
an index_select, and `assemble_scales_2d_side_from_offsets` (~25 small kernels of its own); the
layers take it with quant_impl="torch", this one with "cutedsl". Same bits either way
(tests/test_cutedsl_quantize.py compares them on the GPU).
"""

from __future__ import annotations

import torch

from dsv4.ops import _checks
from dsv4.ops.activation import DEFAULT_SWIGLU_LIMIT
from dsv4.ops.layouts import padded_group_starts
from dsv4.ops.quantize import BLOCK, QuantImplUnavailableError, cutedsl_supports


def quantize_to_expert_layout(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    scale_starts: torch.Tensor | None = None,
    codes_out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
    *,
    index: torch.Tensor | None = None,
    swiglu: bool = False,
    limit: float | None = DEFAULT_SWIGLU_LIMIT,
    row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R staged rows -> codes_out uint8 [R, K/2] and scales_out, in one CuTeDSL launch.

    Row r is x[index[r]] (x [T, K], int32 `index` [R]), or x[r] without an index; with
    swiglu=True x is the L1 output [R, 2I] and row r its SwiGLU with `limit` (DeepSeek V4's
    clamp), times row_weight[r] (fp32 [R]) when given, quantized at K = I. scales_out (uint8 or
    float8_e4m3fn, 1-D, contiguous, at least max_padded_rows(R, E) * round_up(K/16, 4) bytes)
    gets expert e's rows expert_offsets[e-1] .. expert_offsets[e] (int32 [E] END offsets) at
    scale rows scale_starts[e] .. (int32 [E], `padded_group_starts`), padded to 128 with zeros;
    all max_padded_rows(R, E) rows are written, the bytes past them are not touched. global_scale:
    fp32, one value. Needs a CUDA device of sm_90+ with nvidia-cutlass-dsl
    (QuantImplUnavailableError otherwise, with the reason). Reads no value on the host:
    CUDA-graph capturable; with scale_starts, codes_out and scales_out given nothing is
    allocated (the runner's form). Each one left None is allocated: scale_starts by
    `padded_group_starts` (one small launch), codes_out [R, K/2], scales_out exactly
    max_padded_rows(R, E) * round_up(K/16, 4) bytes (uint8).
    """
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    ok, why = cutedsl_supports(x.device)
    if not ok:
        raise QuantImplUnavailableError(f"quantize_to_expert_layout {why}")
    _checks.tensor("x", x, _checks.FLOAT_INPUTS, ndim=2)
    _checks.tensor("expert_offsets", expert_offsets, (torch.int32,), ndim=1)
    e = expert_offsets.numel()
    if e == 0:
        raise ValueError("expert_offsets must hold one END offset per expert, got shape (0,)")
    if scale_starts is None:
        scale_starts = padded_group_starts(expert_offsets)
    _checks.tensor("scale_starts", scale_starts, (torch.int32,), ndim=1)
    _checks.shape("scale_starts", scale_starts, (e,))
    k = x.shape[1] // 2 if swiglu else x.shape[1]
    if k % BLOCK or (swiglu and x.shape[1] % 2):
        raise ValueError(
            f"x's quantized width must be a multiple of {BLOCK}, got x.shape={tuple(x.shape)} "
            f"({swiglu=})"
        )
    if index is not None:
        _checks.tensor("index", index, (torch.int32,), ndim=1)
    rows = index.shape[0] if index is not None else x.shape[0]
    if codes_out is None:
        codes_out = torch.empty(rows, k // 2, dtype=torch.uint8, device=x.device)
    _checks.tensor("codes_out", codes_out, (torch.uint8,))
    _checks.shape("codes_out", codes_out, (rows, k // 2))
    if row_weight is not None and not swiglu:
        raise ValueError("row_weight is only taken with swiglu=True")
    prologue = {}
    if swiglu:
        prologue = {
            "prologue": nq.Prologue.SWIGLU,
            "swiglu_limit": _checks.positive_limit("limit", limit),
            "row_weight": row_weight is not None,
        }
    dtype = str(x.dtype).removeprefix("torch.")
    cfg = nq.QuantConfig(k, dtype, gather=index is not None, experts=e, **prologue)
    need = cfg.scale_bytes(rows)  # max_padded_rows(R, E) * round_up(K/16, 4)
    if scales_out is None:
        scales_out = torch.empty(need, dtype=torch.uint8, device=x.device)
    _checks.tensor("scales_out", scales_out, _checks.SCALE_DTYPES, ndim=1)
    if scales_out.numel() < need:
        raise ValueError(
            f"scales_out must hold max_padded_rows(R={rows}, E={e}) * round_up(K/16={k // BLOCK}"
            f", 4) = {need} bytes, got scales_out.numel()={scales_out.numel()}"
        )
    gs = _checks.global_scale("global_scale", global_scale, x.device).reshape(1)
    cfg = nq.tuned(cfg, codes=codes_out, scales=scales_out, rows=rows)
    nq.run_quant(
        cfg, x, gs, codes_out, scales_out, row_weight, index, (expert_offsets, scale_starts)
    )
    return codes_out, scales_out
