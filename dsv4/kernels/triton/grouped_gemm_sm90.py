"""NVFP4 grouped GEMM (2D x 3D) for sm_90 in Triton: FP4 decoded in registers, fp16 MMA, fp32 acc.

Same operands as every backend (docs/backends.md); B is the backend's own layout
(`make_b_tiled`: 1 KiB chunks of 16 rows x 128 K, made once at finalize by `prepare_weight_codes`)
or K-major (`make_b_k_major`), so each expert's codes are read as int32 words of 8 consecutive K
elements either way (`_b_row`, `_b_word`: the constexpr TILED_B picks the address arithmetic).
Three launches, all reading the expert offsets on the device (no host sync, graph-capturable):

1. `_dequant_kernel` (GROUPED): A codes + per-group swizzled scales -> fp16 A (exact) in a K
   order permuted by word lane, Ap[r, t, j] = A[t, 8j + r] (fp4_bits: one decode for both operands).
2. `_grouped_gemm_kernel`: a persistent grid (1-8 programs per SM, by plan) walks a virtual
   tile space (m-tile of an expert, n-tile, k-split); the m-tiles of each expert come from a
   cumsum of cdiv(tokens_e, BM) on the device, so empty experts own no tile and are never
   visited. Per K step it loads B as words, decodes each word into 4 fp16 pairs (fp4_bits)
   with the e4m3 scale multiplied in (fp32 with the 2^14 fold, or the half decode's fp16
   product, the accumulator then unfolded by 2^14 before alpha), and accumulates
   acc += Ap[r] @ B_r for the 8 lanes r (K permuted identically on both sides: no interleave,
   as the H100 prototype found, docs/design.md §4).
   SPLIT_K == 1: alpha = gsa[e] * gsb[e] (fp32) on the accumulator, bf16 store (RNE).
   SPLIT_K > 1 (decode shapes, to fill the SMs): fp32 atomic adds into a workspace the
   dequantize programs of step 1 zeroed (no memset launch), then
3. `_finish_kernel`: out = bf16(acc * alpha[group of row]) for rows < offsets[-1].
The few-rows path (`Plan.hfma`: up to HFMA_MAX_ROWS rows per expert, as M=1 decode or one
token's top-6 over 48 experts) replaces all three with ONE launch, `_hfma_kernel`: no MMA (a
16-row MMA tile would compute 15 wasted rows), A's codes read and decoded in the kernel, the
code products of each 16-element block summed exactly in fp16x2 FMAs on the CUDA cores, the
block's two scales applied in fp32, whole-K tiles (no split-K, nothing to zero or finish).
The stream path (`Plan.stream`: up to 16 rows per expert where nvidia-cutlass-dsl is importable)
replaces all three with one CuTeDSL launch (dsv4/kernels/cutedsl/grouped_gemm_stream.py): the
weight words loaded straight into swapped mma.sync registers, no shared-memory round trip.
Which plan a shape gets, and the tuning space bench/gemm.py --plans measures: sm90_plans.py.
The grouped dense plan (`Plan.dense_group`, a --plans candidate, grouped_gemm_sm90_dense.py)
dequantizes every weight once and runs an fp16 grouped GEMM, some experts a pass.
The dense plan (one expert, prefill rows) replaces step 2: the same dequantize kernel writes A
[T, K] and the expert's B [N, K] in natural K order (exact fp16 values), cuBLAS computes the
fp32 product (`torch.mm(..., out_dtype=torch.float32)`: exact products, fp32 sums, the bound's
model), and step 3 applies alpha and rounds.
Alpha multiplies the complete fp32 sum in both paths (reference.gemm's order).

Status: on an H200 (Triton 3.6) every harness grouped-GEMM and layer case run so far is within
its bound, and CUDA-graph capture, no allocation and no host sync hold; the plan's tiles are the
fastest of `candidate_plans` measured there by bench/gemm.py --plans; the half decode's products
are bit-exact through its MMAs (every code x every scale byte), and so are the few-rows path's.
Speed: 0.46x (8 experts x 1024) to 0.92x (one expert, M=8192, dense) of BF16 cuBLAS; at decode
shapes the stream path (2.1x at M=1, 2.8-3.5x at 48 experts x 4-16 rows); far from the
weight-bytes roofline at decode (docs/backends.md).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dsv4.kernels.triton import fp4_bits
from dsv4.kernels.triton.grouped_tiles import (
    _alpha,
    _expert_table,
    _row_groups,
    _tile_coords,
    _to_bf16,
)
from dsv4.kernels.triton.sm90_plans import (  # noqa: F401  (some re-exported: bench, tests)
    _SPLIT_N_TILES,
    _STREAM_ALL_LOADS,
    _STREAM_SPILLS,
    _STREAM_TILES,
    SMEM_LIMIT,
    SPLIT_K_MAX_ROWS,
    WORD,
    Plan,
    _dense,
    _stream_plan,
    candidate_plans,
    plan,
    smem_bytes,
    stream_available,
    stream_config,
)
from dsv4.ops._workspace import Sizer, Workspace
from dsv4.ops.layouts import b_dims

# fp4_bits' constants as constexpr globals (a @triton.jit body may read only those)
_MAG_SHIFT = tl.constexpr(fp4_bits.MAG_SHIFT)
_SIGN_SHIFT = tl.constexpr(fp4_bits.SIGN_SHIFT)
_SCALE_FOLD = tl.constexpr(fp4_bits.SCALE_FOLD)
_PAIR_MAG = tl.constexpr(fp4_bits.LANE_MAG << fp4_bits.MAG_SHIFT)  # 0x0E000E00
_PAIR_SIGN = tl.constexpr((fp4_bits.LANE_SIGN << fp4_bits.SIGN_SHIFT) - (1 << 32))  # 0x80008000
_TWO14_X2 = tl.constexpr(0x74007400)  # 2^14 in both fp16 halves


# --------------------------------------------------------------------------------------------
# device helpers (inlined)


@triton.jit
def _word_pair(words, p: tl.constexpr):
    """int32 words -> int32 words holding two fp16 patterns of value * 2^-14: element p (low
    half) and p + 4 (high half), fp4_bits.word_pairs shifted straight from the word (two
    shifts and two masks; for p = 3 the sign bits are already in place)."""
    if p == 3:  # arithmetic shift: the bits it brings in are masked off
        return ((words >> 3) & _PAIR_MAG) | (words & _PAIR_SIGN)
    else:
        mag = (words << (_MAG_SHIFT - 4 * p)) & _PAIR_MAG
        return mag | ((words << (_SIGN_SHIFT - 4 * p)) & _PAIR_SIGN)


@triton.jit
def _halves(y):
    """int32 words of two fp16 bit patterns -> (low, high) fp16 tensors."""
    lo = (y & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    hi = ((y >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _fp16_lanes(words, p: tl.constexpr):
    """int32 words -> fp16 (lane p, lane p + 4) patterns of value * 2^-14 (fp4_bits)."""
    return _halves(_word_pair(words, p))


@triton.jit
def _hfma2(a, b, c, ASM: tl.constexpr):
    """a * b + c on int32 words of two fp16 each: one fma.rn.f16x2 (ASM), else the same in
    fp16 halves (Triton's interpreter runs no PTX). The sm90 callers keep every step exact."""
    if ASM:
        return tl.inline_asm_elementwise(
            "fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
            is_pure=True, pack=1,
        )  # fmt: skip
    else:
        al, ah = _halves(a)
        bl, bh = _halves(b)
        cl, ch = _halves(c)
        lo = (al * bl + cl).to(tl.uint16, bitcast=True).to(tl.int32)
        hi = (ah * bh + ch).to(tl.uint16, bitcast=True).to(tl.int32)
        return lo | (hi << 16)


@triton.jit
def _decode_pair(words, p: tl.constexpr, scale):
    """int32 words + fp32 folded scales (same shape) -> fp16 (lane p, lane p + 4) values."""
    lo, hi = _fp16_lanes(words, p)  # fp16 -> fp32 is exact, subnormals included
    return (lo.to(tl.float32) * scale).to(tl.float16), (hi.to(tl.float32) * scale).to(tl.float16)


@triton.jit
def _decode_pair_half(words, p: tl.constexpr, scale16):
    """The half decode (fp4_bits): fp16 (lane p, lane p + 4) values * scale * 2^-14, the fp16
    patterns times the unfolded fp16 scale, in fp16 (exact)."""
    lo, hi = _fp16_lanes(words, p)
    return lo * scale16, hi * scale16


@triton.jit
def _e4m3(bytes_u8):
    """UE4M3 scale bytes (uint8) -> their fp32 values (exact)."""
    return bytes_u8.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _folded_scale(bytes_u8):
    return _e4m3(bytes_u8) * _SCALE_FOLD


@triton.jit
def _swizzle_row(r, n_cb):
    """The row part of the 128x4 closed form (docs/design.md §3), n_cb atoms per atom row."""
    return (r // 128) * n_cb * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4


@triton.jit
def _swizzle_col(c):
    """The column part of the 128x4 closed form: offset = _swizzle_row(r) + _swizzle_col(c)."""
    return (c // 4) * 512 + c % 4


@triton.jit
def _swizzle_offset(r, c, n_cb):
    """The 128x4 closed form (docs/design.md §3) for scale row r, scale column c."""
    return _swizzle_row(r, n_cb) + _swizzle_col(c)


@triton.jit
def _b_row(n, stride_bn, TILED_B: tl.constexpr):
    """Word offset of weight row n within its expert: n * stride_bn (K-major), or in
    make_b_tiled's layout (stride_bn: the words of one 16-row tile) its tile's, half's and
    row's start."""
    n64 = n.to(tl.int64)
    if TILED_B:
        return (n64 // 16) * stride_bn + (n64 // 8 % 2) * 128 + (n64 % 8) * 16
    return n64 * stride_bn


@triton.jit
def _b_word(j, TILED_B: tl.constexpr):
    """Word offset of K word j (8 elements) within a row: j (K-major), or in make_b_tiled's
    layout its 128-K chunk's (256 words) and its word within the row's 64 bytes."""
    if TILED_B:
        return (j // 16) * 256 + j % 16
    return j


# --------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _dequant_kernel(
    src_ptr,  # uint8 codes, rows of stride_src words (A's token rows, or B's columns n)
    scale_ptr,  # uint8 swizzled scales (A: the 2-D side; B: one expert's 3-D side)
    offsets_ptr,  # int32 [E]
    dst_ptr,  # fp16
    R,  # rows (GROUPED: rows past offsets[-1] are left as they are)
    KW,  # K / 8
    stride_src,  # words between rows of src
    plane,  # fp16 elements between the word-lane planes of Ap (permuted layout only)
    zero_ptr,  # fp32 split-K accumulator the programs also zero (ZERO), else unused
    zero_numel,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    BT: tl.constexpr,
    BJ: tl.constexpr,
    GROUPED: tl.constexpr,  # rows are A's: scale rows padded per group; else one expert's B
    NATURAL: tl.constexpr,  # dst [R, K] in K order (dense path); else the permuted Ap planes
    ZERO: tl.constexpr,  # also zero zero_ptr[:zero_numel] (split-K: saves a memset launch)
    TILED_B: tl.constexpr,  # src is B in make_b_tiled's layout (stride_src: per tile)
):
    """Exact fp16 values of codes * block scale: the permuted Ap [8, R, KW] of the fused path,
    or the natural [R, K] matrix of the dense path, whose 8 lanes of a word are joined back
    into K order in registers so that each row segment is stored contiguously."""
    words_ptr = src_ptr.to(tl.pointer_type(tl.int32))
    if ZERO:  # each program zeroes one contiguous share of the accumulator
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        share = tl.cdiv(zero_numel, tl.num_programs(0) * tl.num_programs(1))
        for z in range(pid * share, tl.minimum((pid + 1) * share, zero_numel), 1024):
            zi = z + tl.arange(0, 1024)
            zend = tl.minimum((pid + 1) * share, zero_numel)
            tl.store(zero_ptr + zi, tl.zeros((1024,), tl.float32), mask=zi < zend)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    if GROUPED:
        idx, ends, starts, sstarts = _expert_table(offsets_ptr, E, E_PAD)
        total = tl.load(offsets_ptr + E - 1)
        _, srow = _row_groups(rows, idx, ends, starts, sstarts)
    else:
        total = R
        srow = rows
    mask = (rows[:, None] < total) & (j[None, :] < KW)
    src = _b_row(rows, stride_src, TILED_B)[:, None] + _b_word(j, TILED_B)[None, :]
    w = tl.load(words_ptr + src, mask=mask, other=0)
    n_cb = (KW // 2 + 3) // 4  # scale columns K/16 = KW/2, in atoms of 4
    soff = _swizzle_offset(srow[:, None], j[None, :] // 2, n_cb)
    s = _folded_scale(tl.load(scale_ptr + soff, mask=mask, other=0))
    if NATURAL:
        # element q = 4h + 2b + c of a word: lane (p = 2b + c, half h); joins append the
        # fastest axis last, so h is joined first, then b, then c
        lo0, hi0 = _decode_pair(w, 0, s)
        lo1, hi1 = _decode_pair(w, 1, s)
        lo2, hi2 = _decode_pair(w, 2, s)
        lo3, hi3 = _decode_pair(w, 3, s)
        c0 = tl.join(tl.join(lo0, hi0), tl.join(lo2, hi2))  # [BT, BJ, h, b] at c = 0
        c1 = tl.join(tl.join(lo1, hi1), tl.join(lo3, hi3))
        vals = tl.reshape(tl.join(c0, c1), (BT, BJ * 8))  # [BT, BJ, h, b, c] -> K order
        col = (tl.program_id(1) * BJ) * 8 + tl.arange(0, BJ * 8)
        nmask = (rows[:, None] < total) & (col[None, :] < KW * 8)
        dst = dst_ptr + rows[:, None].to(tl.int64) * (KW * 8) + col[None, :]
        tl.store(dst, vals, mask=nmask)
    else:
        dst = dst_ptr + rows[:, None].to(tl.int64) * KW + j[None, :]
        for p in tl.static_range(4):
            lo, hi = _decode_pair(w, p, s)
            tl.store(dst + p * plane, lo, mask=mask)
            tl.store(dst + (p + 4) * plane, hi, mask=mask)


@triton.jit
def _k_loop(
    ap_ptr, b_words_ptr, scale_b_ptr, e64, rows, cols, rmask, cmask, k0, k1,
    KW, plane, n_cb, stride_be, stride_bn, stride_se,
    BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, NUM_STAGES: tl.constexpr,
    SWAP_AB: tl.constexpr, HALF_DECODE: tl.constexpr, TILED_B: tl.constexpr,
):  # fmt: skip
    """acc over K steps k0..k1: acc += Ap[r] @ B_r for the 8 word lanes r, [BM, BN]. SWAP_AB
    computes its transpose, acc^T [BN, BM] += B_r^T @ Ap[r]^T: the decoded weight tile is then the
    dot's left operand (which wgmma may take from registers) and the few rows its N. Only the
    orientation of the tiles differs; the loads, the decode and the sums are the same.
    HALF_DECODE: the fp16 decode, acc is 2^-14 times the sum (the caller unfolds it)."""
    s_base = scale_b_ptr + e64 * stride_se
    col64 = _b_row(cols, stride_bn, TILED_B)
    if SWAP_AB:  # tiles [BN, BJ] of B, [BJ, BM] of A
        b_base = b_words_ptr + e64 * stride_be + col64[:, None]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:  # tiles [BJ, BN] of B, [BM, BJ] of A
        b_base = b_words_ptr + e64 * stride_be + col64[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for step in tl.range(k0, k1, num_stages=NUM_STAGES):
        j = step * BJ + tl.arange(0, BJ)
        jmask = j < KW
        if SWAP_AB:
            bmask = cmask[:, None] & jmask[None, :]
            w = tl.load(b_base + _b_word(j, TILED_B)[None, :], mask=bmask, other=0)
            soff = _swizzle_offset(cols[:, None], j[None, :] // 2, n_cb)
            amask = jmask[:, None] & rmask[None, :]
            a_ptrs = ap_ptr + rows[None, :] * KW + j[:, None]
        else:
            bmask = jmask[:, None] & cmask[None, :]
            w = tl.load(b_base + _b_word(j, TILED_B)[:, None], mask=bmask, other=0)
            soff = _swizzle_offset(cols[None, :], j[:, None] // 2, n_cb)
            amask = rmask[:, None] & jmask[None, :]
            a_ptrs = ap_ptr + rows[:, None] * KW + j[None, :]
        sb = tl.load(s_base + soff, mask=bmask, other=0)
        if HALF_DECODE:
            s = sb.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:
            s = _folded_scale(sb)
        for p in tl.static_range(4):
            if HALF_DECODE:
                b_lo, b_hi = _decode_pair_half(w, p, s)
            else:
                b_lo, b_hi = _decode_pair(w, p, s)
            a_lo = tl.load(a_ptrs + p * plane, mask=amask, other=0.0)
            a_hi = tl.load(a_ptrs + (p + 4) * plane, mask=amask, other=0.0)
            if SWAP_AB:
                acc = tl.dot(b_lo, a_lo, acc)
                acc = tl.dot(b_hi, a_hi, acc)
            else:
                acc = tl.dot(a_lo, b_lo, acc)
                acc = tl.dot(a_hi, b_hi, acc)
    return acc


@triton.jit
def _grouped_gemm_kernel(
    ap_ptr,  # fp16 [8, T, K/8] (Ap, see module docstring)
    b_ptr,  # uint8 [E, K/2, N] K-major codes (read as int32 words of 8 K elements)
    scale_b_ptr,  # uint8 [E, round_up(N,128) * round_up(K/16,4)]
    offsets_ptr,  # int32 [E]
    gsa_ptr,
    gsb_ptr,
    out_ptr,  # bf16 [T, N] (SPLIT_K == 1) or fp32 [T, N] zeroed (SPLIT_K > 1)
    T,
    N,
    KW,  # K / 8
    stride_be,  # words between experts of B
    stride_bn,  # words between columns n of B
    stride_se,  # bytes between experts of scale_b
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    GSA_PER_EXPERT: tl.constexpr,
    GSB_PER_EXPERT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,  # words per K step (BK = 8 * BJ elements)
    SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SWAP_AB: tl.constexpr,  # decoded B as the dot's left operand, rows as its N (decode)
    HALF_DECODE: tl.constexpr,  # fp16 decode: acc is 2^-14 times the sum
    TILED_B: tl.constexpr,  # B in make_b_tiled's layout (stride_bn: words per tile)
):
    b_words_ptr = b_ptr.to(tl.pointer_type(tl.int32))
    idx, ends, starts, _ = _expert_table(offsets_ptr, E, E_PAD)
    mtiles = (ends - starts + BM - 1) // BM  # 0 for an empty expert: it owns no tile
    cum_mt = tl.cumsum(mtiles, 0)
    n_tiles = tl.cdiv(N, BN)
    total = tl.sum(mtiles, 0) * n_tiles * SPLIT_K
    steps = tl.cdiv(KW, BJ)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    n_cb = (KW // 2 + 3) // 4
    plane = T * KW
    for tile in range(tl.program_id(0), total, tl.num_programs(0)):
        e, row0, row_end, nt, ks = _tile_coords(
            tile, idx, starts, ends, cum_mt, mtiles, n_tiles, BM, SPLIT_K
        )
        rows = row0 + tl.arange(0, BM)
        cols = nt * BN + tl.arange(0, BN)
        rmask = rows < row_end
        cmask = cols < N
        e64 = e.to(tl.int64)
        k0 = ks * steps_per_split
        k1 = tl.minimum((ks + 1) * steps_per_split, steps)
        acc = _k_loop(
            ap_ptr, b_words_ptr, scale_b_ptr, e64, rows, cols, rmask, cmask, k0, k1,
            KW, plane, n_cb, stride_be, stride_bn, stride_se, BM, BN, BJ, NUM_STAGES, SWAP_AB,
            HALF_DECODE, TILED_B,
        )  # fmt: skip
        if SWAP_AB:
            acc = tl.trans(acc)
        omask = rmask[:, None] & cmask[None, :]
        optrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        if SPLIT_K == 1:
            alpha = _alpha(gsa_ptr, gsb_ptr, e, GSA_PER_EXPERT, GSB_PER_EXPERT)
            if HALF_DECODE:
                acc = acc * _SCALE_FOLD  # exact, before alpha (reference.gemm's order)
            tl.store(optrs, _to_bf16(acc * alpha), mask=omask)
        else:
            tl.atomic_add(optrs, acc, mask=omask, sem="relaxed")


@triton.jit
def _hfma_kernel(
    a_ptr,  # uint8 [T, K/2] A codes (read as int32 words of 8 K elements)
    scale_a_ptr,  # uint8 the 2-D side: swizzled, each group's rows padded to 128
    b_ptr,  # uint8 [E, K/2, N] K-major codes (int32 words)
    scale_b_ptr,  # uint8 [E, round_up(N,128) * round_up(K/16,4)]
    offsets_ptr,  # int32 [E]
    gsa_ptr,
    gsb_ptr,
    out_ptr,  # bf16 [T, N]
    N,
    KW,  # K / 8
    stride_a,  # words between rows of A
    stride_be,  # words between experts of B
    stride_bn,  # words between columns n of B
    stride_se,  # bytes between experts of scale_b
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    GSA_PER_EXPERT: tl.constexpr,
    GSB_PER_EXPERT: tl.constexpr,
    BM: tl.constexpr,  # rows per tile (1, 2, 4: a few rows per expert)
    BN: tl.constexpr,
    BJ: tl.constexpr,  # words per K step
    NUM_STAGES: tl.constexpr,
    ASM: tl.constexpr,  # fma.rn.f16x2 by inline PTX (False: the interpreter's fp16 halves)
    EVEN_K: tl.constexpr,  # KW % BJ == 0
    EVEN_N: tl.constexpr,  # N % BN == 0
    TILED_B: tl.constexpr,  # B in make_b_tiled's layout (stride_bn: words per tile)
):
    """The few-rows path: no MMA, no dequantize launch, no split-K, one launch. Per 16-element
    block (two words of A and of B) the CODE products are summed in fp16x2 FMAs: B's fp16
    patterns (value * 2^-14) times A's codes made true values (pattern * 2^14, exact), each fp16
    lane summing 8 products of magnitude <= 36 * 2^-14 on the grid of 2^-16: every partial sum
    is exact in fp16 (< 2^-5, whose ulp is 2^-16). The two lanes go to fp32 (exact), their sum
    times the block's two scales (e4m3 x e4m3: exact, and the product with the block sum still
    has <= 24 significant bits) is added to the fp32 accumulator: the only rounding, a sum of
    exact block sums, which the bound's fp32-in-any-order model covers. The accumulator is
    2^-14 times the sum: unfolded before alpha, as the half decode does. Each program owns
    whole tiles (all of K for BM rows x BN columns), walked persistently from the device's
    offsets, so empty experts own none and nothing needs zeroing or finishing."""
    a_words = a_ptr.to(tl.pointer_type(tl.int32))
    b_words = b_ptr.to(tl.pointer_type(tl.int32))
    idx, ends, starts, sstarts = _expert_table(offsets_ptr, E, E_PAD)
    mtiles = (ends - starts + BM - 1) // BM
    cum_mt = tl.cumsum(mtiles, 0)
    n_tiles = tl.cdiv(N, BN)
    total = tl.sum(mtiles, 0) * n_tiles
    n_cb = (KW // 2 + 3) // 4
    jj = tl.arange(0, BJ)
    cc = tl.arange(0, BJ // 2)
    for tile in range(tl.program_id(0), total, tl.num_programs(0)):
        e, row0, row_end, nt, _ = _tile_coords(
            tile, idx, starts, ends, cum_mt, mtiles, n_tiles, BM, 1
        )
        sel = idx == e
        srow0 = tl.sum(tl.where(sel, sstarts, 0), 0) + row0 - tl.sum(tl.where(sel, starts, 0), 0)
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        srows = (srow0 + tl.arange(0, BM))[:, None, None]
        cols = nt * BN + tl.arange(0, BN)
        cmask = cols < N if not EVEN_N else cols >= 0  # (all True: N % BN == 0)
        e64 = e.to(tl.int64)
        a_base = a_words + rows[:, None, None].to(tl.int64) * stride_a
        b_base = b_words + e64 * stride_be + _b_row(cols[None, :, None], stride_bn, TILED_B)
        sw_base = scale_b_ptr + e64 * stride_se + _swizzle_row(cols[None, :, None], n_cb)
        sa_base = scale_a_ptr + _swizzle_row(srows, n_cb)
        r3 = rmask[:, None, None]
        c3 = cmask[None, :, None]
        acc = tl.zeros((BM, BN, BJ // 2), dtype=tl.float32)
        for step in tl.range(0, tl.cdiv(KW, BJ), num_stages=NUM_STAGES):
            j = (step * BJ + jj)[None, None, :]
            c = step * (BJ // 2) + cc
            jb = _b_word(j, TILED_B)
            sc = _swizzle_col(c)[None, None, :]
            if EVEN_K:  # no K mask: every step is whole
                w = tl.load(b_base + jb, mask=c3, other=0)
                a = tl.load(a_base + j, mask=r3, other=0)
                sw = tl.load(sw_base + sc, mask=c3, other=0)
                sa = tl.load(sa_base + sc, mask=r3, other=0)
            else:
                jm = j < KW
                km = (c < KW // 2)[None, None, :]
                w = tl.load(b_base + jb, mask=c3 & jm, other=0)
                a = tl.load(a_base + j, mask=r3 & jm, other=0)
                sw = tl.load(sw_base + sc, mask=c3 & km, other=0)
                sa = tl.load(sa_base + sc, mask=r3 & km, other=0)
            f = _e4m3(sw) * _e4m3(sa)  # exact: <= 8 significant bits
            w0, w1 = tl.split(tl.reshape(w, (1, BN, BJ // 2, 2)))  # the block's two words
            a0, a1 = tl.split(tl.reshape(a, (BM, 1, BJ // 2, 2)))
            s16 = tl.zeros((BM, BN, BJ // 2), dtype=tl.int32)
            zero = tl.zeros_like(a0)
            two14 = zero + _TWO14_X2
            for p in tl.static_range(4):  # A's codes as true values: pattern * 2^14 (exact)
                s16 = _hfma2(_word_pair(w0, p), _hfma2(_word_pair(a0, p), two14, zero, ASM),
                             s16, ASM)  # fmt: skip
                s16 = _hfma2(_word_pair(w1, p), _hfma2(_word_pair(a1, p), two14, zero, ASM),
                             s16, ASM)  # fmt: skip
            lo, hi = _halves(s16)
            acc += (lo.to(tl.float32) + hi.to(tl.float32)) * f
        alpha = _alpha(gsa_ptr, gsb_ptr, e, GSA_PER_EXPERT, GSB_PER_EXPERT)
        tot = tl.sum(acc, 2) * _SCALE_FOLD  # exact, before alpha (reference.gemm's order)
        optrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(optrs, _to_bf16(tot * alpha), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _finish_kernel(
    acc_ptr,  # fp32 [T, N]
    offsets_ptr,
    gsa_ptr,
    gsb_ptr,
    out_ptr,  # bf16 [T, N]
    N,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    GSA_PER_EXPERT: tl.constexpr,
    GSB_PER_EXPERT: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    UNFOLD: tl.constexpr,  # the accumulator's power-of-two factor (half decode), else 1.0
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    idx, ends, starts, sstarts = _expert_table(offsets_ptr, E, E_PAD)
    g, _ = _row_groups(rows, idx, ends, starts, sstarts)
    g = tl.minimum(g, E - 1)
    alpha = _alpha(gsa_ptr, gsb_ptr, g, GSA_PER_EXPERT, GSB_PER_EXPERT)
    mask = (rows[:, None] < tl.load(offsets_ptr + E - 1)) & (cols[None, :] < N)
    ptrs = rows[:, None].to(tl.int64) * N + cols[None, :]
    acc = tl.load(acc_ptr + ptrs, mask=mask, other=0.0)
    if UNFOLD != 1.0:
        acc = acc * UNFOLD  # exact: a power of two, before alpha
    tl.store(out_ptr + ptrs, _to_bf16(acc * alpha[:, None]), mask=mask)


def workspace_bytes(t: int, k: int, n: int, e: int) -> int:
    """Scratch of the sm90 backend for up to T rows (a runner sizes it once for its largest T and
    calls with fewer): fp16 A [T, K] (permuted or natural), fp32 [T, N] when split-K or the
    dense path may run, and the dense path's fp16 B [N, K]."""

    def need(rows: int) -> int:
        sizer = Sizer()
        _buffers(sizer, rows, k, n, e)
        return sizer.off

    return max(need(t), need(min(t, SPLIT_K_MAX_ROWS)))


def plan_workspace_bytes(p: Plan, t: int, k: int, n: int, e: int) -> int:
    """Scratch of plan `p` for T rows: workspace_bytes, or more for the grouped dense plan's
    fp16 weights (not counted there: plan() does not take it yet)."""
    sizer = Sizer()
    _buffers(sizer, t, k, n, e, p)
    return max(workspace_bytes(t, k, n, e), sizer.off)


def _buffers(ws: Workspace | Sizer, t: int, k: int, n: int, e: int, p: Plan | None = None):
    """(Ap or A [T, K] fp16, the fp32 accumulator or None, the dense plans' fp16 B or None)."""
    ap = ws.empty((WORD, t, k // WORD), torch.float16)  # Ap, or A [T, K] on the dense path
    dense = _dense(t, e)
    acc = ws.empty((t, n), torch.float32) if t <= SPLIT_K_MAX_ROWS or dense else None
    if p is not None and p.dense_group:  # G experts' weights a pass
        b16 = ws.empty((p.dense_group, n, k), torch.float16)
    else:
        b16 = ws.empty((n, k), torch.float16) if dense else None
    return ap, acc, b16


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_layout(mat_a: torch.Tensor, mat_b: torch.Tensor) -> tuple[int, int]:
    """Word loads need 4-byte aligned rows: A row-major, B K-major (make_b_k_major) or tiled
    (make_b_tiled, contiguous). Returns B's (words between experts, words between rows n, or
    between 16-row tiles where tiled)."""
    if mat_a.stride(1) != 1 or mat_a.stride(0) % 4 or mat_a.storage_offset() % 4:
        raise ValueError(
            f"backend 'sm90' reads mat_a as int32 words: needs row-major rows on 4-byte "
            f"boundaries, got mat_a.stride()={mat_a.stride()} "
            f"storage_offset={mat_a.storage_offset()}"
        )
    if mat_b.dim() == 4:
        if not mat_b.is_contiguous() or mat_b.shape[3] != 1024 or mat_b.storage_offset() % 16:
            raise ValueError(
                f"backend 'sm90' reads a 4-D mat_b as make_b_tiled's layout: needs it "
                f"contiguous [E, N/16, K/128, 1024] on a 16-byte boundary, got "
                f"mat_b.shape={tuple(mat_b.shape)} stride={mat_b.stride()} "
                f"storage_offset={mat_b.storage_offset()}"
            )
        return mat_b.stride(0) // 4, mat_b.stride(1) // 4
    if (
        mat_b.stride(1) != 1
        or mat_b.stride(2) % 4
        or mat_b.stride(0) % 4
        or (mat_b.storage_offset() % 4)
    ):
        raise ValueError(
            f"backend 'sm90' reads mat_b K-major as int32 words (make_b_k_major): needs "
            f"mat_b.stride(1) == 1 and the other strides multiples of 4, got "
            f"mat_b.stride()={mat_b.stride()} storage_offset={mat_b.storage_offset()}"
        )
    return mat_b.stride(0) // 4, mat_b.stride(2) // 4


# --------------------------------------------------------------------------------------------
# launcher and backend entry


def launch_grouped_gemm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    expert_offsets: torch.Tensor,
    global_scale_a: torch.Tensor,
    global_scale_b: torch.Tensor,
    out: torch.Tensor,
    *,
    workspace: torch.Tensor | None = None,
    num_sms: int | None = None,
    the_plan: Plan | None = None,
) -> None:
    """Run the three kernels on validated operands (dsv4.ops.gemm validates); writes `out`.

    `workspace`: uint8 1-D of `workspace_bytes(T, K, N, E)` bytes, else scratch is allocated.
    `num_sms` / `the_plan` override the device's SM count / the shape plan (tests, bench)."""
    stride_be, stride_bn = _check_layout(mat_a, mat_b)
    tiled = mat_b.dim() == 4
    t, kh = mat_a.shape
    e, _, n = b_dims(mat_b)
    k = 2 * kh
    kw = k // WORD
    if t == 0 or n == 0:
        return
    if num_sms is None:
        dev = out.device
        num_sms = _num_sms(dev.index if dev.index is not None else torch.cuda.current_device())
    p = the_plan or plan(t, k, n, e, num_sms, stream=None if out.is_cuda else False)
    cfg = _configs(p, e, global_scale_a.numel() > 1, global_scale_b.numel() > 1, k, n, tiled)
    scale_a8 = scale_a.view(torch.uint8)
    scale_b8 = scale_b.view(torch.uint8)
    if p.stream:  # one launch, no scratch
        from dsv4.kernels.cutedsl import grouped_gemm_stream as gst

        scfg = stream_config(
            p, k, n, e, global_scale_a.numel() > 1, global_scale_b.numel() > 1, tiled
        )
        gst.run_stream_gemm(
            scfg, mat_a, mat_b, scale_a8, scale_b8, expert_offsets, global_scale_a,
            global_scale_b, out,
        )  # fmt: skip
        return
    if p.hfma:  # one launch, no scratch
        consts, warps = cfg["hfma"]
        _hfma_kernel[(p.programs,)](
            mat_a, scale_a8, mat_b, scale_b8, expert_offsets, global_scale_a, global_scale_b,
            out, n, kw, mat_a.stride(0) // 4, stride_be, stride_bn, scale_b8.stride(0), **consts,
            num_warps=warps,
        )  # fmt: skip
        return
    ap, acc, b16 = _buffers(Workspace(workspace, out.device), t, k, n, e, p)
    if p.split_k > 1 and acc is None:
        raise ValueError(f"split_k={p.split_k} needs T <= {SPLIT_K_MAX_ROWS}, got T={t}")
    if p.dense and b16 is None:
        raise ValueError(
            f"the dense plan needs one expert and T > {SPLIT_K_MAX_ROWS}, got {e=} {t=}"
        )
    consts, warps = cfg["dequant_a"]  # A, for every plan
    grid = (triton.cdiv(t, consts["BT"]), triton.cdiv(kw, consts["BJ"]))
    via_acc = p.split_k > 1 or (p.dense and not p.dense_group)  # fp32 sums, then finished
    dst = acc[:t] if via_acc else out
    zero = (dst, t * n) if p.split_k > 1 else (global_scale_a, 0)  # any fp32 tensor when unused
    _dequant_kernel[grid](
        mat_a, scale_a8, expert_offsets, ap, t, kw, mat_a.stride(0) // 4, t * kw, *zero,
        **consts, num_warps=warps,
    )  # fmt: skip
    a16 = ap.view(-1)[: t * k].view(t, k)  # A in K order (the dense plans')
    if p.dense and p.dense_group:
        _dense_grouped_passes(
            p, cfg, mat_b, scale_b8, expert_offsets, global_scale_a, global_scale_b, out, a16,
            b16, stride_bn,
        )  # fmt: skip
        return
    if p.dense:
        _dequant_b(cfg, mat_b, scale_b8, expert_offsets, b16, stride_bn, global_scale_a)
        _mm_fp32(a16, b16.t(), acc)
    if not p.dense:
        consts, warps = cfg["grouped_gemm"]
        _grouped_gemm_kernel[(p.programs,)](
            ap, mat_b, scale_b8, expert_offsets, global_scale_a, global_scale_b, dst, t, n, kw,
            stride_be, stride_bn, scale_b8.stride(0), **consts,
            num_warps=warps,
        )  # fmt: skip
    if "finish" in cfg:
        consts, warps = cfg["finish"]
        grid = (triton.cdiv(t, consts["BT"]), triton.cdiv(n, consts["BN"]))
        _finish_kernel[grid](
            dst, expert_offsets, global_scale_a, global_scale_b, out, n, **consts, num_warps=warps
        )


def _dequant_b(cfg, b_e, scale_b_e, offsets, dst, stride_bn, gsa) -> None:
    """One expert's weight (codes b_e, scales scale_b_e) -> exact fp16 [N, K] in `dst`."""
    n, kw = dst.shape[0], dst.shape[1] // WORD
    consts, warps = cfg["dequant_b"]
    grid = (triton.cdiv(n, consts["BT"]), triton.cdiv(kw, consts["BJ"]))
    _dequant_kernel[grid](
        b_e, scale_b_e, offsets, dst, n, kw, stride_bn, 0, gsa, 0, **consts, num_warps=warps
    )


def _dense_grouped_passes(
    p, cfg, mat_b, scale_b8, offsets, gsa, gsb, out, a16, b16, stride_bn
) -> None:
    """The grouped dense plan after A (grouped_gemm_sm90_dense.py): per pass of dense_group
    experts, their weights dequantized, then one fp16 grouped GEMM launch."""
    from dsv4.kernels.triton import grouped_gemm_sm90_dense as gd

    e, _, n = b_dims(mat_b)
    consts, warps = cfg["dense_grouped"]
    for e0, e1 in gd.passes(e, p.dense_group):
        for ei in range(e0, e1):  # expert ei's weight [N, K] into slot ei - e0
            _dequant_b(cfg, mat_b[ei], scale_b8[ei], offsets, b16[ei - e0], stride_bn, gsa)
        gd._dense_grouped_kernel[(p.programs,)](
            a16, b16, offsets, gsa, gsb, out, n, a16.shape[1], e0, e1, **consts, num_warps=warps
        )


def _mm_fp32(a16: torch.Tensor, b16: torch.Tensor, acc: torch.Tensor) -> None:
    """acc = a16 @ b16 by cuBLAS with fp32 output: every product of the exact fp16 operands is
    exact in fp32 and the sums are fp32 (the bound's model); alpha comes after, in step 3.
    (A separate function so the CPU interpreter test can stand in for the CUDA-only op.)"""
    torch.mm(a16, b16, out_dtype=torch.float32, out=acc)


def _configs(
    p: Plan, e: int, gsa_pe: bool, gsb_pe: bool, k: int, n: int, tiled_b: bool = False
) -> dict[str, tuple[dict, int]]:
    """{kernel: (constexprs, num_warps)} of plan `p` at K, N (B in make_b_tiled's layout where
    `tiled_b`): what the launcher passes and compile_for compiles (one place, so the compiled
    configuration is the launched one)."""
    if p.stream:  # a CuTeDSL kernel, configured by the launcher
        return {}
    ex = dict(E=e, E_PAD=triton.next_power_of_2(e))
    gs = dict(GSA_PER_EXPERT=gsa_pe, GSB_PER_EXPERT=gsb_pe)
    if p.hfma:
        asm = not _INTERPRETED  # the interpreter runs no inline PTX
        even = dict(EVEN_K=(k // WORD) % p.bj == 0, EVEN_N=n % p.bn == 0)
        consts = dict(BM=p.bm, BN=p.bn, BJ=p.bj, NUM_STAGES=p.num_stages, ASM=asm, **even)
        consts["TILED_B"] = tiled_b
        return {"hfma": (dict(**ex, **gs, **consts), p.num_warps)}
    zero = p.split_k > 1  # the split-K accumulator, zeroed by the A dequantize programs
    dq = dict(**ex, BT=32, BJ=32)
    cfg = {"dequant_a": (dict(**dq, GROUPED=True, NATURAL=p.dense, ZERO=zero, TILED_B=False), 4)}
    if p.dense:
        cfg["dequant_b"] = (dict(**dq, GROUPED=False, NATURAL=True, ZERO=False, TILED_B=tiled_b), 4)
    if p.dense and p.dense_group:
        tiles = dict(BM=p.bm, BN=p.bn, BK=8 * p.bj, NUM_STAGES=p.num_stages)
        cfg["dense_grouped"] = (dict(**ex, **gs, **tiles), p.num_warps)
        return cfg
    if not p.dense:
        cfg["grouped_gemm"] = (
            dict(
                **ex,
                **gs,
                BM=p.bm,
                BN=p.bn,
                BJ=p.bj,
                SPLIT_K=p.split_k,
                NUM_STAGES=p.num_stages,
                SWAP_AB=p.swap_ab,
                HALF_DECODE=p.half_decode,
                TILED_B=tiled_b,
            ),
            p.num_warps,
        )
    if p.split_k > 1 or p.dense:
        unfold = fp4_bits.SCALE_FOLD if p.half_decode and not p.dense else 1.0
        cfg["finish"] = (dict(**ex, **gs, BT=32, BN=128, UNFOLD=unfold), 4)
    return cfg


# Triton decorated the kernels for its interpreter (TRITON_INTERPRET=1 at import, Triton's own
# switch, read by Triton): the few-rows path then takes its fp16-halves FMAs instead of PTX
_INTERPRETED = isinstance(_hfma_kernel, InterpretedFunction)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile (CPU-only machines: catch compile errors before spending device time)


_ALIGNED_INTS = ("N", "K", "KW", "stride_a", "stride_be", "stride_bn", "stride_se", "stride_src")


def compile_for(
    p: Plan,
    e: int,
    gs_per_expert: bool = True,
    arch: int = 90,
    k: int = 7168,
    n: int = 6144,
    tiled_b: bool = False,
) -> dict[str, triton.compiler.CompiledKernel]:
    """Compile the three kernels of plan `p` for sm_`arch` without a GPU (B K-major, or
    make_b_tiled's layout where `tiled_b`); {name: kernel} with `.asm["ptx"]`. A failure raises
    RuntimeError naming the kernel and the configuration.
    It compiles the specialization a launch on the production shapes gets (Triton's JIT marks a
    16-byte aligned pointer and an int divisible by 16 as such): every pointer and the K, N and
    stride arguments, so the PTX is the launched one (vector loads)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptrs = dict(offsets_ptr="*i32", gsa_ptr="*fp32", gsb_ptr="*fp32")
    names = ("T", "N", "KW", "stride_be", "stride_bn", "stride_se")
    types = {  # pointer and scalar argument types of each kernel
        "dequant": dict(
            src_ptr="*u8", scale_ptr="*u8", offsets_ptr="*i32", dst_ptr="*fp16",
            **{n: "i32" for n in ("R", "KW", "stride_src", "plane")}, zero_ptr="*fp32",
            zero_numel="i32",
        ),
        "grouped_gemm": dict(
            ap_ptr="*fp16", b_ptr="*u8", scale_b_ptr="*u8", **ptrs,
            out_ptr="*bf16" if p.split_k == 1 else "*fp32", **{n: "i32" for n in names},
        ),
        "finish": dict(acc_ptr="*fp32", **ptrs, out_ptr="*bf16", N="i32"),
        "hfma": dict(
            a_ptr="*u8", scale_a_ptr="*u8", b_ptr="*u8", scale_b_ptr="*u8", **ptrs,
            out_ptr="*bf16", **{n: "i32" for n in ("N", "KW", "stride_a", *names[3:])},
        ),
        "dense_grouped": dict(
            a_ptr="*fp16", b_ptr="*fp16", **ptrs, out_ptr="*bf16",
            **{n: "i32" for n in ("N", "K", "e0", "e1")},
        ),
    }  # fmt: skip
    from dsv4.kernels.triton.grouped_gemm_sm90_dense import _dense_grouped_kernel

    kernels = {"dequant": _dequant_kernel, "grouped_gemm": _grouped_gemm_kernel}
    kernels["finish"] = _finish_kernel
    kernels["hfma"] = _hfma_kernel
    kernels["dense_grouped"] = _dense_grouped_kernel
    out = {}
    configs = _configs(p, e, gs_per_expert, gs_per_expert, k, n, tiled_b)
    for name, (constexprs, warps) in configs.items():
        kind = "dequant" if name.startswith("dequant") else name
        fn = kernels[kind]
        signature = {**types[kind], **{k: "constexpr" for k in constexprs}}
        signature = {a: signature[a] for a in fn.arg_names}  # the kernel's argument order
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(fn.arg_names)
            if signature[a].startswith("*") or a in _ALIGNED_INTS
        }
        try:
            out[name] = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": warps},
            )
        except Exception as err:  # re-raised with the configuration that failed
            raise RuntimeError(
                f"sm90 kernel {name!r} failed to compile for sm_{arch} with {p} {e=} "
                f"{tiled_b=}: {err}"
            ) from err
    return out
