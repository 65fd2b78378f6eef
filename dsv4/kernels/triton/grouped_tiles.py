"""Device helpers the sm90 grouped-GEMM kernels share (grouped_gemm_sm90.py, its dense plan).

The expert table of the END offsets (first rows, padded scale-row starts), the group of a row,
the persistent grid's virtual tile -> (expert, rows, n-tile, k-split), alpha = gsa[e] * gsb[e]
in fp32 and the bf16 rounding by integer ops: one place, imported by each kernel module (Triton
inlines them).
"""

from __future__ import annotations

import triton
import triton.language as tl

_ATOM_ROWS = tl.constexpr(128)  # rows of a 128x4 scale atom


@triton.jit
def _to_bf16(x):
    """fp32 -> bf16, round to nearest even, by integer ops on the bits (NaN kept quiet): the
    rounding the reference uses, on every target (the Triton 3.9 interpreter truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # carries into the exponent: Inf
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _expert_table(offsets_ptr, E: tl.constexpr, E_PAD: tl.constexpr):
    """Per expert (padded to E_PAD): END offset, first row, padded scale-row start."""
    idx = tl.arange(0, E_PAD)
    live = idx < E
    last = tl.load(offsets_ptr + E - 1)
    ends = tl.load(offsets_ptr + idx, mask=live, other=0)
    ends = tl.where(live, ends, last)  # padding experts: empty, after the last
    starts = tl.load(offsets_ptr + idx - 1, mask=live & (idx > 0), other=0)
    starts = tl.where(live, starts, last)
    padded = (ends - starts + _ATOM_ROWS - 1) // _ATOM_ROWS * _ATOM_ROWS
    sstarts = tl.cumsum(padded, 0) - padded
    return idx, ends, starts, sstarts


@triton.jit
def _row_groups(rows, idx, ends, starts, sstarts):
    """Group of each row (rows >= offsets[-1] clamp to the last real one) and its scale row."""
    g = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), 1)
    sel = idx[None, :] == g[:, None]
    start = tl.sum(tl.where(sel, starts[None, :], 0), 1)
    sstart = tl.sum(tl.where(sel, sstarts[None, :], 0), 1)
    return g, sstart + rows - start


@triton.jit
def _tile_coords(tile, idx, starts, ends, cum_mt, mtiles, n_tiles, BM: tl.constexpr, SPLIT_K):
    """Virtual tile -> (expert, first row, the expert's END row, n-tile, k-split): the m-tiles of
    every expert in order, each times n_tiles column tiles times SPLIT_K splits."""
    ks = tile % SPLIT_K
    nt = (tile // SPLIT_K) % n_tiles
    mt = tile // (SPLIT_K * n_tiles)
    e = tl.sum((cum_mt <= mt).to(tl.int32), 0)
    sel = idx == e
    row0 = (
        tl.sum(tl.where(sel, starts, 0), 0)
        + (mt - tl.sum(tl.where(sel, cum_mt - mtiles, 0), 0)) * BM
    )
    row_end = tl.sum(tl.where(sel, ends, 0), 0)
    return e, row0, row_end, nt, ks


@triton.jit
def _alpha(gsa_ptr, gsb_ptr, g, GSA_PER_EXPERT: tl.constexpr, GSB_PER_EXPERT: tl.constexpr):
    """alpha = gsa[g] * gsb[g] in fp32 (reference.gemm's rounding)."""
    ga = tl.load(gsa_ptr + g) if GSA_PER_EXPERT else tl.load(gsa_ptr + g * 0)
    gb = tl.load(gsb_ptr + g) if GSB_PER_EXPERT else tl.load(gsb_ptr + g * 0)
    return ga * gb
