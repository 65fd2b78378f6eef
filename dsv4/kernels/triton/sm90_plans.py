"""The sm90 grouped GEMM's plans: which kernel and tiles a shape gets, and the tuning space.

`plan(T, K, N, E, num_sms)` picks, by the rows per expert (host arithmetic on shapes, never on
values), the fastest passing plan that bench/gemm.py --plans measured on an H200
(docs/backends.md): the stream path (CuTeDSL, <= 16 rows per expert), the few-rows path, the MMA
decode tiles with split-K, the prefill tiles, or the dense plan (one expert: dequantize +
cuBLAS). `candidate_plans` is the space those measurements choose from; `Plan` is hashable (a
compile key and a bench row). grouped_gemm_sm90.py launches a plan; nothing here imports Triton's
kernels or touches a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import triton

from dsv4.kernels.triton import fp4_bits

WORD = fp4_bits.WORD_ELEMS  # K elements per int32 word
SPLIT_K_MAX_ROWS = 512  # split-K (and its fp32 workspace) only for T up to this: decode shapes


@dataclass(frozen=True)
class Plan:
    """One launch configuration; hashable (a compile key and a bench row)."""

    bm: int
    bn: int
    bj: int  # words per K step: BK = 8 * bj
    split_k: int
    num_warps: int
    num_stages: int
    programs: int  # persistent grid size
    swap_ab: bool = False  # decoded B as the dot's left operand (decode shapes)
    # one expert at prefill: A and B dequantized (exact fp16) into the workspace, cuBLAS
    # fp16 x fp16 -> fp32, then alpha and the bf16 rounding (the finishing kernel); the
    # tile fields above are then unused (DENSE)
    dense: bool = False
    # the fp16 decode of the K loop (fp4_bits.decode_words(half=True)): no fp32 round trip
    half_decode: bool = False
    # the few-rows path (`_hfma_kernel`): fp16x2 FMAs of the codes on the CUDA cores, no MMA,
    # one launch; bm rows per tile, whole K per tile (split_k 1)
    hfma: bool = False
    # the stream path (dsv4/kernels/cutedsl/grouped_gemm_stream.py, CuTeDSL): weights loaded
    # straight into mma.sync registers; bm = 8 * token tiles per chunk, bn = 16 * weight-row
    # tiles per CTA, num_warps splitting K, num_stages 1: loads at use, 2: the next K step's loads
    # issued before this one's MMAs, >= 3: a cp.async ring of that many steps in shared memory;
    # `unroll` of the K loop (0: no loop, each warp's loads of all its steps first); one launch,
    # no scratch
    stream: bool = False
    unroll: int = 1
    # stream, split_n: the warps split the weight rows (a CTA: bn * num_warps of them), each
    # `stage` K steps' token fragments decoded once per CTA into shared memory (loads at use)
    split_n: bool = False
    stage: int = 0
    # dense with dense_group G > 0: the grouped dense plan (grouped_gemm_sm90_dense.py), every
    # weight dequantized once, G experts a pass, then an fp16 grouped GEMM with tiles bm x bn,
    # BK = 8 * bj, num_warps, num_stages, `programs` persistent programs
    dense_group: int = 0


DENSE = Plan(0, 0, 0, 1, 0, 0, 0, dense=True)


SMEM_LIMIT = 227 * 1024  # bytes of shared memory a block may take on sm_90 (H100 / H200)


def smem_bytes(p: Plan) -> int:
    """Shared memory the pipelined K loop takes, per stage: 8 fp16 planes of A [BM, BJ], B words
    [BJ, BN] (int32) and their scale bytes [BJ, BN] (the H200 compile of BM 128 BN 128 BJ 32 with
    3 stages asked 245,760 bytes: this estimate gives 258,048); the few-rows path stages A's and
    B's words and their scale bytes, one per block."""
    if p.hfma:
        return p.num_stages * (9 * p.bj * (p.bm + p.bn)) // 2
    if p.dense:  # fp16 tiles of A [bm, BK] and B [BK, bn] (cuBLAS's own on the one-expert plan)
        return p.num_stages * 2 * 8 * p.bj * (p.bm + p.bn)
    if p.stream and p.split_n:  # two buffers of token fragments: 2 KB a step and token tile
        return 2 * p.stage * (p.bm // 8) * 2048
    if p.stream:  # the warps' partial sums, and the cp.async ring (16 + 4 bytes a load a step)
        mt, nt, threads = p.bn // 16, p.bm // 8, 32 * p.num_warps
        ring = p.num_stages if p.num_stages > 2 else 0
        return threads * 16 * mt * nt + ring * (2 * mt + nt) * threads * 20
    return p.num_stages * (16 * p.bm * p.bj + 5 * p.bj * p.bn)


# BM -> (BN, BJ, programs per SM, swapped K loop) of the decode plans, measured (plan())
_DECODE_TILES = {16: (64, 32, 8, False), 32: (128, 32, 4, False), 64: (128, 16, 4, True)}


def _tiles(t: int, n: int, e: int, bm: int, bn: int) -> int:
    """Output tiles the split-K choice counts: one expert's column tiles, or with several
    experts an m-tile bound of cdiv(T, BM) + E times the column tiles."""
    return triton.cdiv(n, bn) * (1 if e == 1 else triton.cdiv(t, bm) + e)


def _split(tiles: int, kw: int, bj: int, programs: int) -> int:
    """K splits so that tiles * split fills `programs` (at most one K step per split)."""
    return max(1, min(triton.cdiv(kw, bj), triton.cdiv(programs, max(1, tiles))))


def _dense(t: int, e: int) -> bool:
    """Where the dense path may run: one expert past the decode rows."""
    return e == 1 and t > SPLIT_K_MAX_ROWS


# rows per expert up to which plan() takes the few-rows path (`_hfma_kernel`): on the H200 it
# took 14.8-16.4 us at M=1 and 19.1-20.3 us at M=2 (bench/gemm.py --plans, K=7168 N=6144),
# where the MMA decode tiles took 31.7 us at M=1; at M=4 plan() keeps the MMA tiles (32.2 us;
# the few-rows path's 4-row tiles were not measured there)
HFMA_MAX_ROWS = 2


def _hfma_plan(
    t: int, n: int, e: int, num_sms: int, bm: int = 0, bn: int = 16, bj: int = 128,
    warps: int = 4, stages: int = 2, mult: int = 8,
) -> Plan:  # fmt: skip
    """A few-rows plan: bm rows per tile (0: the next power of two of the rows per expert),
    as many programs as tiles, at most `mult` per SM (each program owns whole tiles). The
    default tiles (BN 16, BK 1024, 4 warps, 2 stages) were within noise of the fastest at M=1
    (16.4 vs 15.4 us) and M=2 (19.9 vs 19.1) and the fastest at one token's top-6 over 48
    experts (67.6 us; the next 73.8) in one H200 sweep."""
    bm = bm or triton.next_power_of_2(triton.cdiv(t, max(1, e)))
    mtiles = triton.cdiv(t, bm) if e == 1 else min(t, triton.cdiv(t, bm) + e - 1)
    programs = max(1, min(mult * num_sms, mtiles * triton.cdiv(n, bn)))
    return Plan(bm, bn, bj, 1, warps, stages, programs, hfma=True)


def plan(t: int, k: int, n: int, e: int, num_sms: int, stream: bool | None = None) -> Plan:
    """Tile shape by rows, the fastest passing plans of bench/gemm.py --plans on an H200
    (docs/backends.md). Decode (T <= SPLIT_K_MAX_ROWS, or many experts of <= 64 rows each, as
    the routed MoE's 128 tokens x top-6 over 48 experts; split-K only up to SPLIT_K_MAX_ROWS),
    BM the next power of two of an expert's rows (16..64): up to 16 rows BN 64 and 8 programs
    per SM (M=1, 16 and 48 experts x 4 rows); 33..64 rows the swapped K loop (decoded weight as
    the wgmma's register operand), BK 128, 4 programs per SM (M=64); split-K fills the programs.
    Prefill: BM 128, BN 256, BK 128, 8 warps (wgmma), one program per SM (its shared memory
    allows no second); one expert: DENSE. Every fused plan takes the half decode (faster at
    every measured shape: M=1 32.3 vs 35.8 us, 8 experts x 1024 rows 2383 vs 2612 us).
    Up to 16 rows per expert the stream path where it is installed and tiles the shape
    (`_stream_default`), except the few-rows path's many experts of <= 2 rows. `stream`: whether
    the stream path may be chosen (None: where nvidia-cutlass-dsl is importable; the launcher
    passes False off CUDA, where only the Triton interpreter runs)."""
    rows = triton.cdiv(t, max(1, e))
    streamed = _stream_default(t, k, n, e) if stream is not False else None
    if streamed is not None:
        return streamed
    if rows <= HFMA_MAX_ROWS:
        return _hfma_plan(t, n, e, num_sms)
    return _mma_plan(t, k, n, e, num_sms)


def _stream_default(t: int, k: int, n: int, e: int) -> Plan | None:
    """plan()'s stream tiles, from H200 sweeps of bench/gemm.py --plans (every plan `pass`).
    One expert (the warps split K, loads at use, the K loop unrolled by 2): <= 8 rows 16 weight
    rows x 8 tokens (M=1 13.97 us, the few-rows path 16.09), 9..16 rows 32 x 16 (M=16 18.41,
    MMA 35.17; split_n's <= 96 CTAs: >= 49.9). Many experts (split_n: the warps split the rows,
    each token fragment decoded once per CTA): 3..8 rows 8 warps x 16 rows x 8 tokens, stages
    of 4 steps (48 x 4 rows 400.8 us, K-split 64 x 8 520.8), 9..16 rows 8 warps x 32 rows x 16
    tokens, stages of 2, where N % 256 == 0 (tiled weights: 48 x 16 rows 406.6 us, 4 warps
    424.6; the routed MoE's uniform routing at 128 tokens 567.5 vs 581.9, its L2 285.8 vs
    292.5), else 4 warps; where N does not divide, the K-split tiles. Not taken: many experts
    of <= 2 rows (one token's top-6 over 48: 78.4 us, the few-rows path 68.4) and past 16 rows
    (M=64: 56.7 us, the swapped MMA 48.7)."""
    rows = triton.cdiv(t, max(1, e))
    if not stream_available() or k % 128 or rows > 16 or (e > 1 and rows <= HFMA_MAX_ROWS):
        return None
    nt = 1 if rows <= 8 else 2
    if e > 1:
        tiles = ((1, 8, 4),) if nt == 1 else ((2, 8, 2), (2, 4, 2))
        for mt, warps, stage in tiles:  # the measured best, else the one N allows
            if n % (16 * mt * warps) == 0:
                return _stream_plan(t, e, mt, nt, warps, 1, 1, stage)
    prefer = 1 if e == 1 and nt == 1 else (4 if nt == 1 else 2)
    for mt in (4, 2, 1):  # the preferred weight tile, else the largest smaller one N allows
        if mt <= prefer and n % (16 * mt) == 0:
            return _stream_plan(t, e, mt, nt, 8, 1, 2)
    return None


def _mma_plan(t: int, k: int, n: int, e: int, num_sms: int) -> Plan:
    """plan() past the few-rows path: the tiles of the MMA kernels."""
    kw = k // WORD
    rows = triton.cdiv(t, max(1, e))
    if t <= SPLIT_K_MAX_ROWS or rows <= 64:  # few rows per expert: the decode tiles
        bm = min(64, max(16, triton.next_power_of_2(rows)))
        bn, bj, mult, swap = _DECODE_TILES[bm]
        programs = mult * num_sms
        split = _split(_tiles(t, n, e, bm, bn), kw, bj, programs) if t <= SPLIT_K_MAX_ROWS else 1
        return Plan(bm, bn, bj, split, 4, 3, programs, swap, half_decode=True)
    return DENSE if _dense(t, e) else Plan(128, 256, 16, 1, 8, 3, num_sms, half_decode=True)


# rows per expert up to which the stream path's plans are offered (and, where measured, chosen)
STREAM_MAX_ROWS = 64
# (16-row weight tiles, 8-token tiles per chunk, warps) the stream plans measure, each with its
# loads at use, one step prefetched (unrolled by 1 and 2) and through a 3- and 4-step ring
_STREAM_TILES = (
    (1, 1, 8), (1, 1, 16), (2, 1, 8), (1, 2, 8), (2, 2, 8), (4, 2, 8), (2, 4, 8), (1, 4, 8),
    (2, 2, 4), (4, 1, 8), (4, 4, 4), (1, 2, 16), (2, 1, 16),
)  # fmt: skip
# (tile, stages, unroll) that ptxas (CUDA 13) compiles with more than 16 bytes of spills: not
# offered (tests/test_sm90_stream.py compiles every offered plan and checks)
_STREAM_SPILLS = {
    ((4, 2, 8), 1, 2), ((2, 4, 8), 1, 2), ((2, 1, 16), 1, 2), ((4, 4, 4), 3, 1), ((4, 4, 4), 4, 1),
    ((2, 1, 16), 4, 1),  # since the byte-permute decode (40 bytes; 16 warps cap it at 128)
}  # fmt: skip


# tiles also offered with unroll 0 (no K loop: each warp issues the loads of all its K steps,
# then their MMAs; one memory round trip where the registers hold them): ptxas (CUDA 13.4)
# compiles these at K=7168 without spills (160-190 registers); (1, 1, 8) and (1, 1, 16) spill
_STREAM_ALL_LOADS = ((1, 1, 4), (2, 1, 8), (2, 2, 8))

# (16-row weight tiles per warp, 8-token tiles, warps, stage) of the split_n stream plans, loads
# at use, the stage's steps unrolled (ptxas spills <= 16 bytes on each: tests/test_sm90_stream.py)
_SPLIT_N_TILES = (
    (1, 1, 8, 4), (2, 1, 8, 4), (1, 2, 8, 4), (2, 2, 8, 2), (2, 2, 4, 2), (1, 4, 8, 2),
    (1, 1, 4, 8), (2, 1, 4, 4), (1, 2, 4, 4), (4, 1, 4, 2),
    # 24-token chunks: with the uniform routing of 128 tokens 19 of 48 experts get 17..24 rows,
    # whose weights 16-token chunks read twice (not measured yet; 128 registers, no spills)
    (2, 3, 8, 2), (1, 3, 8, 4), (2, 3, 4, 2),
)  # fmt: skip
# split_n tiles of 64-token chunks, offered past 32 rows per expert (M=64: its weights read once,
# where 32-token chunks read them twice; 2 or 4 warps of 16 rows: 192 or 96 CTAs at N=6144,
# 128-166 registers, no spills; not measured yet)
_SPLIT_N_WIDE = ((1, 8, 2, 2), (1, 8, 2, 4), (1, 8, 4, 2))


def stream_available() -> bool:
    """nvidia-cutlass-dsl importable (the stream path's CuTeDSL kernel; cached there)."""
    from dsv4.kernels.cutedsl import available

    return available()[0]


def stream_config(
    p: Plan, k: int, n: int, e: int, gsa_pe: bool = True, gsb_pe: bool = True, tiled: bool = False
):
    """The CuTeDSL kernel configuration of stream plan `p`, B tiled (make_b_tiled) or K-major
    (imports cutlass)."""
    from dsv4.kernels.cutedsl import grouped_gemm_stream as gst

    ring = p.num_stages if p.num_stages > 2 else 0
    return gst.StreamConfig(
        k, n, e, p.bn // 16, p.bm // 8, p.num_warps, p.num_stages == 2, p.unroll, ring,
        p.split_n, p.stage or 4, gsa_pe, gsb_pe, tiled,
    )  # fmt: skip


def _stream_plan(
    t: int,
    e: int,
    mt: int,
    nt: int = 0,
    warps: int = 8,
    stages: int = 1,
    unroll: int = 2,
    split_n: int = 0,
) -> Plan:
    """A stream plan: mt 16-row weight tiles per CTA (per warp with split_n), nt 8-token tiles
    per chunk (0: enough for the rows per expert, at most 4), `warps` splitting K (or, with
    split_n = the stage's K steps, the rows), `stages` 2: one step prefetched."""
    nt = nt or min(4, triton.cdiv(triton.cdiv(t, max(1, e)), 8))
    return Plan(
        8 * nt, 16 * mt, 16, 1, warps, stages, 0, stream=True, unroll=unroll,
        split_n=split_n > 0, stage=split_n,
    )  # fmt: skip


def candidate_plans(t: int, k: int, n: int, e: int, num_sms: int) -> list[Plan]:
    """The tuning space bench/gemm.py --plans measures for one shape: plan() first, then tile,
    split-K, grid-size and pipeline variants that fit SMEM_LIMIT (split-K only where T allows),
    each of the fused kernel's also with the other decode (half or fp32 scale)."""
    kw = k // WORD
    out = [plan(t, k, n, e, num_sms), _mma_plan(t, k, n, e, num_sms)]
    if triton.cdiv(t, max(1, e)) <= 2 * HFMA_MAX_ROWS:  # the few-rows path's tiles
        for bn, bj, warps, stages, mult in (
            (8, 128, 4, 3, 8), (8, 128, 4, 2, 8), (8, 128, 4, 1, 8), (8, 64, 2, 3, 16),
            (16, 64, 4, 3, 8), (16, 128, 4, 3, 8), (16, 128, 4, 1, 8), (16, 256, 4, 2, 8),
            (4, 128, 2, 3, 16), (4, 128, 2, 2, 16),
        ):  # fmt: skip
            out.append(_hfma_plan(t, n, e, num_sms, 0, bn, bj, warps, stages, mult))
    if stream_available() and k % 128 == 0 and triton.cdiv(t, max(1, e)) <= STREAM_MAX_ROWS:
        for mt, nt, warps in _STREAM_TILES:
            for stages, unroll in ((1, 2), (2, 1), (2, 2), (3, 1), (4, 1)):
                if ((mt, nt, warps), stages, unroll) in _STREAM_SPILLS:
                    continue
                q = _stream_plan(t, e, mt, nt, warps, stages, unroll)
                if n % q.bn == 0 and q not in out:
                    out.append(q)
        for mt, nt, warps in _STREAM_ALL_LOADS:  # unroll 0: each warp's loads all first
            q = _stream_plan(t, e, mt, nt, warps, 1, 0)
            if n % q.bn == 0 and q not in out:
                out.append(q)
        wide = _SPLIT_N_WIDE if triton.cdiv(t, max(1, e)) > 32 else ()
        for mt, nt, warps, stage in _SPLIT_N_TILES + wide:
            q = _stream_plan(t, e, mt, nt, warps, 1, 1, stage)
            if n % (q.bn * warps) == 0 and q not in out:
                out.append(q)
    mma = out[1]
    if t <= SPLIT_K_MAX_ROWS:
        bm = mma.bm
        for bn in (64, 128):
            tiles = _tiles(t, n, e, bm, bn)
            for mult in (1, 2, 4, 8):
                programs = mult * num_sms
                split = _split(tiles, kw, 32, programs)
                for sp in {1, split, min(2 * split, kw // 32)}:
                    out.append(Plan(bm, bn, 32, sp, 4, 3, programs))
            out.append(Plan(bm, bn, 32, _split(tiles, kw, 32, 4 * num_sms), 8, 3, 4 * num_sms))
            for mult in (2, 4):
                split = _split(tiles, kw, 32, mult * num_sms)
                for bj in (16, 32):
                    out.append(Plan(bm, bn, bj, split, 4, 3, mult * num_sms, swap_ab=True))
    else:
        out.append(Plan(128, 256, 16, 1, 8, 3, num_sms))  # the fused kernel, also for one expert
        if not mma.dense and mma.bm <= 64:  # few rows per expert: other small tiles
            for bn, mult in ((64, 8), (128, 4), (64, 4)):
                out.append(Plan(mma.bm, bn, 32, 1, 4, 3, mult * num_sms, mma.swap_ab))
        for bn, bj, warps, st, mult in (
            (256, 16, 8, 3, 1),
            (128, 16, 8, 3, 1),
            (128, 16, 8, 2, 2),
            (128, 16, 4, 2, 2),
            (256, 16, 8, 2, 1),
            (256, 16, 4, 2, 1),
            (128, 32, 8, 2, 1),
        ):
            out.append(Plan(128, bn, bj, 1, warps, st, mult * num_sms))
        for bn, st in ((128, 3), (128, 2), (64, 3)):  # 256-row tiles: each B decode feeds 2x rows
            out.append(Plan(256, bn, 16, 1, 8, st, num_sms))
        if e > 1:  # the grouped dense plan: each weight decoded once, <= 1 GiB of fp16 weights
            group = max(1, min(e, (1 << 30) // (2 * n * k)))
            for bm, bn, st in ((128, 256, 3), (128, 128, 4), (256, 128, 3)):
                out.append(Plan(bm, bn, 8, 1, 8, st, num_sms, dense=True, dense_group=group))
        # the swapped K loop at prefill: the decoded weight tile is the wgmma's register operand
        # (no shared-memory round trip of the decode; the unswapped tiles store it there), each
        # warpgroup 64 weight rows x bm tokens (ptxas: no spills with 8 warps)
        for bm, bn, bj, st in ((256, 128, 16, 3), (256, 128, 16, 2), (128, 128, 16, 3),
                               (128, 128, 32, 2), (128, 256, 16, 3), (256, 64, 16, 3)):  # fmt: skip
            out.append(Plan(bm, bn, bj, 1, 8, st, num_sms, swap_ab=True))
    if t <= SPLIT_K_MAX_ROWS:  # pipeline depth of the MMA decode plan (bytes in flight)
        out += [dataclasses.replace(mma, num_stages=st) for st in (2, 4, 5)]
        out.append(dataclasses.replace(mma, bj=64, num_stages=2))
    out += [
        dataclasses.replace(q, half_decode=not q.half_decode)
        for q in out
        if not q.dense and not q.hfma and not q.stream
    ]
    seen, keep = set(), []
    for q in out:
        if q not in seen and smem_bytes(q) <= SMEM_LIMIT:
            seen.add(q)
            keep.append(q)
    return keep
