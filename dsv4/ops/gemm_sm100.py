"""The `sm100` grouped-GEMM backend's wiring: capability probe, shape check, lazy launch.

The kernel lives in dsv4/kernels/cutedsl/grouped_gemm_sm100.py (CuTeDSL, tcgen05 block-scaled
MMA); this module only registers it: importing it imports no CuTeDSL and touches no GPU (the
DSL loads on the first call). The probe wants a CUDA device of compute capability 10.x and an
installed nvidia-cutlass-dsl, and says which one is missing; on any other device (CPU, Hopper)
the backend is unsupported with that reason, never a silent fallback. It reads B only K-major
(`b_k_major=True`) and takes no workspace; shapes it cannot tile (K % 256, N % 128) are refused
at the call by its shape check. Registered at the default priority for its name (100, above
sm90). Status: compiled and PTX-checked on CPU only; numerics and speed NOT verified on
hardware (docs/blackwell.md).
"""

from __future__ import annotations

import importlib.util

import torch

from dsv4.ops.gemm import register_backend, requires_capability

_needs_sm100 = requires_capability(10, 0)


def sm100_supports(device: torch.device) -> tuple[bool, str]:
    ok, why = _needs_sm100(device)
    if ok and importlib.util.find_spec("cutlass") is None:
        return False, "needs nvidia-cutlass-dsl (pip install 'dsv4-nvfp4[cutedsl]'), not installed"
    return ok, why


def sm100_shape_supports(t: int, k: int, n: int, e: int) -> tuple[bool, str]:
    """The kernel's can_implement for A [T, K/2] x B [E, K/2, N] (pure arithmetic)."""
    from dsv4.kernels.cutedsl import grouped_gemm_sm100

    return grouped_gemm_sm100.can_implement(t, k, n, e)


def sm100_grouped_gemm(*args: torch.Tensor) -> None:
    """(mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out): the CuTeDSL kernel."""
    from dsv4.kernels.cutedsl import grouped_gemm_sm100

    grouped_gemm_sm100.run_grouped_gemm(*args)


register_backend(
    "sm100",
    sm100_grouped_gemm,
    sm100_supports,
    shape_supports=sm100_shape_supports,
    b_k_major=True,
)
