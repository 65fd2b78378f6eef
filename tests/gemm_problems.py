"""Grouped-GEMM problems for the backend tests (test_dsv4_ops, test_sm90_gemm): operands quantized
by the reference in the production layouts, and the check against reference.gemm's derived bound.
Light on purpose (torch and reference only): the sm90 interpreter child imports it.
"""

from __future__ import annotations

import torch

import reference as ref
from reference import gemm as rgemm
from reference import layouts as rlay


def gemm_problem(counts: list[int], k: int = 256, n: int = 192, seed: int = 0, extra: int = 0):
    """Operands quantized by the reference; extra rows past offsets[-1] hold random codes."""
    g = torch.Generator().manual_seed(seed)
    e, t = len(counts), sum(counts)
    x = torch.randn(t + extra, k, generator=g)
    a_codes, a_scales, gsa = ref.quantize_nvfp4(x)
    qs = [ref.quantize_weight_nvfp4(torch.randn(k, n, generator=g) * 0.05) for _ in range(e)]
    b_codes = torch.stack([q[0] for q in qs])
    b_scales = torch.stack([q[1] for q in qs])
    gsb = torch.stack([q[2] for q in qs]).reshape(e)
    gsa = gsa.reshape(1).expand(e).contiguous()
    offsets = rlay.compute_expert_offsets(torch.tensor(counts))
    a_sw, _ = rlay.assemble_scales_2d_side_from_offsets(a_scales[:t], offsets)
    b_sw = rlay.assemble_scales_3d_side(list(b_scales))
    plain = (a_codes, a_scales, b_codes, b_scales, offsets, gsa, gsb)
    return plain, (a_codes, b_codes, a_sw, b_sw, offsets, gsa, gsb)


def within_bound(plain, out: torch.Tensor, t: int) -> None:
    a_codes, a_scales, *rest = plain
    args = (a_codes[:t], a_scales[:t], *rest)
    oracle = rgemm.grouped_gemm_nvfp4(*args, oracle=True)
    bound = rgemm.grouped_gemm_error_bound(*args, out_dtype=torch.bfloat16)
    err = (out[:t].double() - oracle).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= bound).all(), f"outside the derived bound (worst |err|/bound {worst:.3g})"
