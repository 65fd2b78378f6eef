"""CuTeDSL kernels (nvidia-cutlass-dsl, the `.[cutedsl]` extra): NVFP4 quantize and fused
SwiGLU-requantize for any arch from sm_90 (nvfp4_quant.py), the tcgen05 block-scaled grouped GEMM
for sm_100a (grouped_gemm_sm100.py: compiled and PTX-checked in CI, never run on hardware), the
sm90 backend's stream path for few rows per expert (grouped_gemm_stream.py: mma.sync, exact on
an H200), the routed MoE's combine (moe_combine.py: each token's slots summed in fp32 in slot
order, one launch), with `bitmodel.py` (the quantizer's bit tricks in torch, CPU-testable) and
`ptx_check.py` (compile on CPU, read PTX, ptxas's report and the tcgen05.mma kinds).

`available()` says whether the DSL imports (cached; the reason when not). Importing this
package imports neither cutlass nor CUDA; import the kernel modules for the kernels themselves.
"""

from __future__ import annotations

import functools


@functools.cache
def available() -> tuple[bool, str]:
    """(True, "") when nvidia-cutlass-dsl imports, else (False, why)."""
    try:
        import cutlass  # noqa: F401
        import cutlass.cute  # noqa: F401
    except ImportError as e:  # the reason is reported, never swallowed
        return False, f"nvidia-cutlass-dsl is not importable ({e}); pip install '.[cutedsl]'"
    return True, ""
