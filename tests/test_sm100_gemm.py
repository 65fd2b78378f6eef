"""The sm100 grouped GEMM on a B200 (skipped elsewhere, with the reason): NEVER RUN so far.

These are the checks docs/blackwell.md runs first on an sm_100 device: the derived bound of
reference.gemm (fp32 summation order only) over expert counts with empty experts and rows past
offsets[-1], those rows untouched, both tile widths, global scales per expert and shared; then
CUDA-graph capture, no allocation and no host sync in the call (the claims the docstring of
grouped_gemm_sm100 makes). On CPU and Hopper every test here is skipped naming the missing
capability: a skip is "not run", never a pass.
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from tests.gemm_problems import (
    check_graph_no_alloc_no_sync,
    cuda_problem,
    within_bound,
)


def _on_sm100() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs an sm_100 CUDA GPU (CPU-only machine)"
    return ops.sm100_supports(torch.device("cuda"))


needs_sm100 = pytest.mark.skipif(not _on_sm100()[0], reason=_on_sm100()[1] or "needs sm_100")


@needs_sm100
@pytest.mark.gpu
@pytest.mark.sm100
@pytest.mark.parametrize("tile_n", [128, 256])
@pytest.mark.parametrize(
    "counts,k,n",
    [
        ([1], 7168, 512),
        ([16, 0, 3], 2048, 768),
        ([0, 300, 1, 0], 1024, 256),
        ([600, 7], 512, 1024),
        ([129, 128, 127, 0, 255], 256, 512),
    ],
)
def test_sm100_on_gpu_within_the_derived_bound(counts, k, n, tile_n):
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import GemmConfig, run_grouped_gemm

    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = cuda_problem(counts, k, n, seed=sum(counts))
    out = torch.full((a.shape[0], n), 7.0, dtype=torch.bfloat16, device="cuda")
    run_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out, GemmConfig(tile_n))
    torch.cuda.synchronize()
    within_bound(plain, out.cpu(), sum(counts))
    assert (out[sum(counts) :] == 7.0).all()  # rows past offsets[-1] untouched


@needs_sm100
@pytest.mark.gpu
@pytest.mark.sm100
def test_sm100_through_the_registry_with_one_shared_global_scale():
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = cuda_problem([40, 0, 200], 512, 256, seed=9)
    assert ops.select_backend("cuda") == "sm100"
    out = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa[:1], gsb, backend="sm100")
    within_bound(plain, out.cpu(), 240)


@needs_sm100
@pytest.mark.gpu
@pytest.mark.sm100
@pytest.mark.parametrize("t", [5, 700])
def test_sm100_captures_in_a_graph_allocates_nothing_and_never_syncs(t):
    # one CTA owns each output tile: the replay gives the same bits
    check_graph_no_alloc_no_sync("sm100", [t - 2, 0, 2], 512, 256, seed=t, same_bits=True)
