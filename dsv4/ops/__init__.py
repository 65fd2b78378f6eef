"""dsv4.ops: the NVFP4 building blocks a serving stack calls (docs/design.md §2).

quantize: `quantize_to_nvfp4` (dynamic), `quantize_activation_nvfp4` (static, graph-safe),
`quantize_activation_nvfp4_grouped` (one scale per group), `quantize_weight_to_nvfp4`; each
activation op takes `impl=` ("torch" or "cutedsl", `select_quant_impl`). layouts:
`pad_and_swizzle`, `assemble_scales_2d_side[_from_offsets]`, `assemble_scales_3d_side`,
`make_b_k_major`, `make_b_tiled` (the sm90 weight layout), `compute_expert_offsets`,
`padded_group_starts`. staging: `quantize_to_expert_layout` (the routed MoE's gather / SwiGLU
quantize straight into the GEMM's per-expert scale layout, CuTeDSL). gemm:
`run_nvfp4_grouped_gemm`, its backend registry and `prepare_weight_codes` (the weight layout a
backend reads, made once at finalize). activation: `swiglu_quantize`.
Importing registers the `dsv4::*` torch.library custom ops and the `torch`, `sm90` and `sm100`
GEMM backends (Triton / CuTeDSL load on their first call); it touches no GPU. No function here
reads an environment variable. Every op a runner calls takes an optional `workspace=` (uint8 scratch
sized by its `*_workspace_bytes` helper): with it and the outputs given, the op allocates nothing.
"""

from dsv4.ops.activation import (
    DEFAULT_SWIGLU_LIMIT,
    swiglu,
    swiglu_quantize,
    swiglu_quantize_workspace_bytes,
    swiglu_workspace_bytes,
)
from dsv4.ops.gemm import (
    PLANNED_BACKENDS,
    Backend,
    BackendUnavailableError,
    available_backends,
    backend_supports_shape,
    describe_device,
    device_capability,
    grouped_gemm_workspace_bytes,
    prepare_weight_codes,
    register_backend,
    requires_capability,
    run_nvfp4_grouped_gemm,
    select_backend,
)
from dsv4.ops.gemm_sm90 import sm90_supports  # registers the sm90 backend (no Triton import)
from dsv4.ops.gemm_sm100 import sm100_supports  # registers the sm100 backend (no CuTeDSL import)
from dsv4.ops.gemm_torch import torch_grouped_gemm  # registers the torch backend
from dsv4.ops.layouts import (
    assemble_2d_workspace_bytes,
    assemble_scales_2d_side,
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    b_dims,
    compute_blockscale_offsets,
    compute_expert_offsets,
    make_b_k_major,
    make_b_tiled,
    max_padded_rows,
    pad_and_swizzle,
    pad_and_swizzle_workspace_bytes,
    padded_group_starts,
    padded_group_starts_workspace_bytes,
    swizzled_numel,
    unswizzle,
)
from dsv4.ops.quantize import (
    BLOCK,
    QUANT_IMPLS,
    QuantImplUnavailableError,
    cutedsl_supports,
    dequantize_nvfp4,
    global_scale_from_amax,
    nvfp4_amax,
    quantize_activation_nvfp4,
    quantize_activation_nvfp4_grouped,
    quantize_to_nvfp4,
    quantize_weight_to_nvfp4,
    quantize_workspace_bytes,
    select_quant_impl,
)
from dsv4.ops.staging import quantize_to_expert_layout

__all__ = [
    "QUANT_IMPLS",
    "QuantImplUnavailableError",
    "cutedsl_supports",
    "quantize_activation_nvfp4_grouped",
    "select_quant_impl",
    "quantize_workspace_bytes",
    "pad_and_swizzle_workspace_bytes",
    "assemble_2d_workspace_bytes",
    "grouped_gemm_workspace_bytes",
    "swiglu_workspace_bytes",
    "swiglu_quantize_workspace_bytes",
    "BLOCK",
    "DEFAULT_SWIGLU_LIMIT",
    "PLANNED_BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "assemble_scales_2d_side",
    "assemble_scales_2d_side_from_offsets",
    "assemble_scales_3d_side",
    "available_backends",
    "backend_supports_shape",
    "compute_blockscale_offsets",
    "compute_expert_offsets",
    "dequantize_nvfp4",
    "describe_device",
    "device_capability",
    "global_scale_from_amax",
    "b_dims",
    "make_b_k_major",
    "make_b_tiled",
    "max_padded_rows",
    "nvfp4_amax",
    "pad_and_swizzle",
    "padded_group_starts",
    "padded_group_starts_workspace_bytes",
    "quantize_to_expert_layout",
    "quantize_activation_nvfp4",
    "quantize_to_nvfp4",
    "quantize_weight_to_nvfp4",
    "register_backend",
    "requires_capability",
    "prepare_weight_codes",
    "run_nvfp4_grouped_gemm",
    "select_backend",
    "torch_grouped_gemm",
    "sm90_supports",
    "sm100_supports",
    "swiglu",
    "swiglu_quantize",
    "swizzled_numel",
    "unswizzle",
]
