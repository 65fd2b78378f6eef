"""The sm90 backend's grouped dense plan: dequantize once, then an fp16 grouped GEMM in Triton.

For prefill rows (hundreds to thousands per expert) the fused kernels decode each weight tile
once per m-tile; this plan decodes every weight once. `Plan.dense` with `dense_group` G > 0
(grouped_gemm_sm90.py launches it):

1. A: the dequantize kernel writes the exact fp16 values of every routed row in K order
   (the dense plan's A, `NATURAL`).
2. Per pass over G experts (the host walks the E experts G at a time: E and G are shapes, no
   value is read): each expert's B dequantized to its exact fp16 values [N, K] into the
   workspace, then ONE launch of `_dense_grouped_kernel`: a persistent grid walks the m-tiles of
   the pass's experts (counted on the device from the END offsets; the other experts own no
   tile) times the column tiles, acc = A @ B^T by fp16 `tl.dot` (exact products, fp32 sums:
   the bound's model), alpha = gsa[e] * gsb[e] on the complete sum, bf16 rounded to nearest
   even, stored for the expert's rows only.

Workspace: fp16 A [T, K] and G experts' fp16 B [G, N, K] (G * N * K * 2 bytes: 88 MB an expert
at K 7168 N 6144). Graph-capturable, no host sync. Offered to bench/gemm.py --plans; plan()
takes it only where measured faster (not yet: docs/backends.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dsv4.kernels.triton.grouped_tiles import _alpha, _expert_table, _tile_coords, _to_bf16


@triton.jit
def _dense_grouped_kernel(
    a_ptr,  # fp16 [T, K], K order
    b_ptr,  # fp16 [G, N, K]: experts e0 .. e0 + G - 1 of this pass
    offsets_ptr,  # int32 [E] END offsets
    gsa_ptr,
    gsb_ptr,
    out_ptr,  # bf16 [T, N]
    N,
    K,
    e0,  # the pass's first expert
    e1,  # one past its last
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    GSA_PER_EXPERT: tl.constexpr,
    GSB_PER_EXPERT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    idx, ends, starts, _sstarts = _expert_table(offsets_ptr, E, E_PAD)
    mine = (idx >= e0) & (idx < e1)
    mtiles = tl.where(mine, (ends - starts + BM - 1) // BM, 0)  # other experts: no tile
    cum_mt = tl.cumsum(mtiles, 0)
    n_tiles = tl.cdiv(N, BN)
    total = tl.sum(mtiles, 0) * n_tiles
    for tile in range(tl.program_id(0), total, tl.num_programs(0)):
        e, row0, row_end, nt, _ks = _tile_coords(
            tile, idx, starts, ends, cum_mt, mtiles, n_tiles, BM, 1
        )
        rows = row0 + tl.arange(0, BM)
        cols = nt * BN + tl.arange(0, BN)
        rmask = rows < row_end
        cmask = cols < N
        a_rows = a_ptr + rows[:, None].to(tl.int64) * K
        b_cols = b_ptr + (e - e0).to(tl.int64) * N * K + cols[None, :].to(tl.int64) * K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=NUM_STAGES):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            a = tl.load(a_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_cols + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        alpha = _alpha(gsa_ptr, gsb_ptr, e, GSA_PER_EXPERT, GSB_PER_EXPERT)
        optrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(optrs, _to_bf16(acc * alpha), mask=rmask[:, None] & cmask[None, :])


def passes(e: int, group: int) -> list[tuple[int, int]]:
    """The experts [e0, e1) of each pass, `group` at a time."""
    return [(e0, min(e0 + group, e)) for e0 in range(0, e, group)]
