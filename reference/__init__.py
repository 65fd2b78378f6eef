"""The oracle: pure PyTorch, any device, imports nothing from dsv4/ (docs/design.md §1).

What the harness says is only as true as this package. It follows the hardware bit for bit
(docs/design.md §3) and each function reads like the math it implements.
"""

from reference import activation, gemm, layers, layouts
from reference.nvfp4 import (
    BLOCK,
    E2M1_MIDPOINTS,
    E2M1_VALUES,
    NanPolicy,
    ScaleConvention,
    decode_e2m1,
    dequantize_nvfp4,
    dequantize_weight_nvfp4,
    encode_block_scales,
    encode_e2m1,
    from_encode_scale,
    global_scale_from_amax,
    pack_e2m1,
    quantize_nvfp4,
    quantize_weight_nvfp4,
    to_encode_scale,
    unpack_e2m1,
)

__all__ = [
    "activation",
    "gemm",
    "layers",
    "layouts",
    "BLOCK",
    "E2M1_MIDPOINTS",
    "E2M1_VALUES",
    "NanPolicy",
    "ScaleConvention",
    "decode_e2m1",
    "dequantize_nvfp4",
    "dequantize_weight_nvfp4",
    "encode_block_scales",
    "encode_e2m1",
    "from_encode_scale",
    "global_scale_from_amax",
    "pack_e2m1",
    "quantize_nvfp4",
    "quantize_weight_nvfp4",
    "to_encode_scale",
    "unpack_e2m1",
]
