"""The `sm90` grouped-GEMM backend's wiring: capability probe, workspace size, lazy launch.

The kernels live in dsv4/kernels/triton/grouped_gemm_sm90.py; this module only registers them
(importing it imports no Triton and touches no GPU: Triton loads on the first call). The probe
wants an sm_90 CUDA device and an installed Triton, and says which one is missing. The backend
reads B in its own layout, `make_b_tiled`'s 16-row x 128-K chunks of 1 KiB in MMA fragment
order (a warp's 16-byte loads of a K step read 512 contiguous bytes), made once at finalize
(`prepare_b`, which `prepare_weight_codes` calls; where N % 16 or K % 128 leaves no whole
chunk, the K-major layout `make_b_k_major` makes), and in the K-major layout too (`b_k_major`:
nothing else). Verified on an H200 (the harness's grouped-GEMM and layer cases, CUDA-graph
capture, no allocation, no host sync: docs/backends.md), it registers at the default priority
for its name (90): the layers take it by default on sm_90; the torch backend stays the portable
path (`backend="torch"`).
"""

from __future__ import annotations

import importlib.util

import torch

from dsv4.ops.gemm import register_backend, requires_capability
from dsv4.ops.layouts import TILE_K, TILE_ROWS, make_b_k_major, make_b_tiled

_needs_sm90 = requires_capability(9, 0)


def sm90_supports(device: torch.device) -> tuple[bool, str]:
    ok, why = _needs_sm90(device)
    if ok and importlib.util.find_spec("triton") is None:
        return False, "needs triton (pip install 'dsv4-nvfp4[sm90]'), not installed"
    return ok, why


def sm90_workspace_bytes(t: int, k: int, n: int, e: int) -> int:
    from dsv4.kernels.triton import grouped_gemm_sm90

    return grouped_gemm_sm90.workspace_bytes(t, k, n, e)


def sm90_prepare_b(b: torch.Tensor) -> torch.Tensor:
    """Codes [E, K/2, N] -> make_b_tiled's layout where it tiles, else K-major."""
    _, kh, n = b.shape
    if n % TILE_ROWS == 0 and (2 * kh) % TILE_K == 0:
        return make_b_tiled(b)
    return make_b_k_major(b)


def sm90_grouped_gemm(*args: torch.Tensor, workspace: torch.Tensor | None = None) -> None:
    """(mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out): the Triton kernels."""
    from dsv4.kernels.triton import grouped_gemm_sm90

    grouped_gemm_sm90.launch_grouped_gemm(*args, workspace=workspace)


register_backend(
    "sm90",
    sm90_grouped_gemm,
    sm90_supports,
    workspace_bytes=sm90_workspace_bytes,
    b_k_major=True,
    prepare_b=sm90_prepare_b,
    b_tiled=True,
)
