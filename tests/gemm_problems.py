"""Grouped-GEMM problems for the backend tests (test_dsv4_ops, test_sm90_gemm, test_sm100_gemm):
operands quantized by the reference in the production layouts, the check against reference.gemm's
derived bound, and the GPU check every fast backend must pass (graph capture, no allocation, no
host sync). Light on purpose (torch and reference at import): the sm90 interpreter child imports it.
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


def every_product_problem(k: int = 256, n: int = 256):
    """One expert whose B holds every E2M1 code times every finite e4m3 scale byte, and an A of
    one-hot rows (row t is 1.0 at K element t, scale 1.0; T = K): out[t, n] is then the single
    product B[t, n] * scale_b, exact in bf16, so a decode or MMA that loses a subnormal or a
    sign shows as a wrong bit (judged by torch.equal against the oracle, not a bound). Code of
    B[k, n] = (n + k) % 16, scale byte of (n, block kb) = (16 n + kb) % 256 with the two NaN
    bytes (0x7F, 0xFF: one would poison a whole column through 0 * NaN) replaced by 0x01."""
    kk = torch.arange(k)
    codes = ((torch.arange(n)[None, :] + kk[:, None]) % 16).to(torch.uint8)  # [K, N]
    b_codes = (codes[0::2] | (codes[1::2] << 4))[None]  # [1, K/2, N]: element 2i low nibble
    sb = (16 * torch.arange(n)[None, :] + torch.arange(k // 16)[:, None]) % 256  # [K/16, N]
    sb = torch.where((sb == 0x7F) | (sb == 0xFF), 1, sb).to(torch.uint8)
    b_scales = sb.view(torch.float8_e4m3fn)[None]
    a_el = torch.where(kk[None, :] == kk[:, None], 2, 0).to(torch.uint8)  # code 2 is 1.0
    a_codes = a_el[:, 0::2] | (a_el[:, 1::2] << 4)
    a_scales = torch.full((k, k // 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
    offsets = rlay.compute_expert_offsets(torch.tensor([k]))
    one = torch.ones(1)
    a_sw, _ = rlay.assemble_scales_2d_side_from_offsets(a_scales, offsets)
    b_sw = rlay.assemble_scales_3d_side([b_scales[0]])
    plain = (a_codes, a_scales, b_codes, b_scales, offsets, one, one)
    return plain, (a_codes, b_codes, a_sw, b_sw, offsets, one, one)


def within_bound(plain, out: torch.Tensor, t: int) -> None:
    a_codes, a_scales, *rest = plain
    args = (a_codes[:t], a_scales[:t], *rest)
    oracle = rgemm.grouped_gemm_nvfp4(*args, oracle=True)
    bound = rgemm.grouped_gemm_error_bound(*args, out_dtype=torch.bfloat16)
    err = (out[:t].double() - oracle).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= bound).all(), f"outside the derived bound (worst |err|/bound {worst:.3g})"


def cuda_problem(counts: list[int], k: int, n: int, seed: int):
    """gemm_problem on the GPU, B in the K-major layout the fast backends read (3 extra rows)."""
    from dsv4 import ops

    plain, gemm = gemm_problem(counts, k=k, n=n, seed=seed, extra=3)
    a, b, a_sw, b_sw, offs, gsa, gsb = (v.cuda() for v in gemm)
    return plain, (a, ops.make_b_k_major(b), a_sw, b_sw, offs, gsa, gsb)


def check_graph_no_alloc_no_sync(backend: str, counts: list[int], k: int, n: int, seed: int,
                                 same_bits: bool) -> None:  # fmt: skip
    """`backend` with its workspace (if it takes one): a call that allocates nothing and never
    syncs (sync debug mode 'error'), captured in a CUDA graph whose replay is within the bound;
    `same_bits`: the replay equals the eager call bit for bit (no split-K atomics)."""
    from dsv4 import ops

    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = cuda_problem(counts, k, n, seed)
    rows, e = a.shape[0], len(counts)
    ws_bytes = ops.grouped_gemm_workspace_bytes(backend, rows, k, n, e)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device="cuda") if ws_bytes else None
    out = torch.zeros(rows, n, dtype=torch.bfloat16, device="cuda")

    def call():
        ops.run_nvfp4_grouped_gemm(
            a, b, a_sw, b_sw, offs, gsa, gsb, out=out, backend=backend, workspace=ws
        )

    call()  # compiles
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    want = out.clone()
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph.replay()
    torch.cuda.synchronize()
    if same_bits:
        assert torch.equal(out, want)
    within_bound(plain, out.cpu(), sum(counts))
