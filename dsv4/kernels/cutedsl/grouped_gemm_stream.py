"""NVFP4 grouped GEMM for few rows per expert in CuTeDSL: weights streamed into mma.sync registers.

The decode shapes (one token to a few dozen rows per expert) are bound by the weight bytes. This
kernel reads each weight word once, straight into the registers of the MMA that uses it: no
shared-memory round trip, no dequantize launch, no split-K workspace. The MMA is the swapped
`mma.sync.m16n8k16.row.col.f32.f16.f16.f32`: its 16 "rows" are 16 weight rows n, its 8
"columns" 8 tokens, so a tile of 16 weight rows feeds 8 tokens per instruction.

Operands are every backend's (docs/backends.md): A codes [T, K/2] (rows in expert order), the
2-D-side swizzled scale_a (each expert's rows padded to 128), B K-major ([E, N, K/2] in memory)
or, with `StreamConfig.b_tiled`, make_b_tiled's [E, N/16, K/128, 1024] (the fragment order: a
warp's loads of one K step read 512 contiguous bytes instead of 8 runs of 64), the 3-D-side
swizzled scale_b, int32 END offsets [E], fp32 gsa / gsb ([E] or [1]).

Fragments. Thread (g = lane / 4, t = lane % 4) of a warp holds, per 128-K step, the four int32
words 4t..4t+3 of the step's 64 bytes of weight row g and of row g + 8 (two 16-byte loads), and
the same words of token g (one 16-byte load per 8 tokens): K elements 32t..32t+31, the two
16-element scale blocks 2t, 2t+1 (one 2-byte load of each row's swizzled scales). A word's
elements (p, p+4), p = 0..3, become one fp16x2 register holding the fp16 patterns of
dsv4/kernels/triton/fp4_bits.py (value * 2^-14; made by `_decode_ptx`'s byte permutes, 11 integer
operations a word), multiplied in fp16 by the block's e4m3 scale
(exact: a multiple of 2^-24 with <= 6 significant bits, below 1). Word j gives two MMAs: pairs
0, 1 (then 2, 3) are the A fragment's column pairs 2t.. and 2t+8.. of rows g and g + 8, and the
token's pairs of the same word are the B fragment's k pairs. The MMA's 16 logical k thus map to
16 physical K elements the same way on both sides, which is all a dot product needs. Products
are exact in fp32 (value * 2^-28); the fp32 sums are the bound's model; the sum times 2^28
(exact) times alpha = gsa[e] * gsb[e] (reference.gemm's order), rounded to bf16 once.

Work: CTA (n-tile of 16 * MT weight rows, expert e), WARPS warps splitting the K steps (warp w
takes steps w, w + WARPS, ...), each warp MT row tiles x NT token tiles of accumulators; the
warps' partial sums are added in shared memory in warp order (deterministic) and stored as bf16
for the expert's rows only. An expert with more than 8 * NT rows is walked in chunks of 8 * NT
tokens (the weights re-read per chunk: this kernel is for few rows); an empty expert's CTAs do
nothing. Reads offsets on the device only: graph-capturable, no host sync, no allocation.
Needs K % 128 == 0 and N % (16 * MT) == 0 (`StreamConfig.supports`).

split_n (many experts): the warps split the CTA's weight rows instead (each warp MT row tiles
over all of K, its sums stored straight from registers: no reduction). A token fragment is the
same for every warp, so each `stage` K steps' fragments are loaded and decoded once per CTA,
each fragment by one warp, into one of two shared buffers, and read back by all (one barrier a
stage; the next stage is decoded while this one is read). The K-split kernel decoded each
fragment once per 16 * MT weight rows, the split_n CTA once per 16 * MT * WARPS: a third of the
decode work at 32 x 16 tiles. Needs N % (16 * MT * WARPS) == 0.

Status: compiled for sm_90a on CPU in CI (tests/test_sm90_stream.py checks the PTX: mma.sync,
16-byte non-coherent loads, no local memory); numerics and speed are measured on the H200 only
(docs/backends.md).
Layers (STYLE.md rule 1): `StreamGemmKernel` (config, `@cute.jit` launch, `@cute.kernel` body),
`compile_stream` (cached by config and arch), `run_stream_gemm` (validates, writes `out`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.memory import SmemAllocator

from dsv4.kernels.cutedsl.nvfp4_quant import _asm  # one pure inline-PTX statement

ARCH = "sm_90a"
K_STEP = 128  # K elements per step: 64 bytes of a row, 16 bytes a thread
ATOM_ROWS = 128
UNFOLD = 2.0**28  # the fp16 patterns' 2^-14 on both operands, undone on the fp32 sum


@dataclass(frozen=True)
class StreamConfig:
    """One compiled kernel: the shape class and the tile (hashable, a compile key)."""

    k: int
    n: int
    e: int
    mt: int = 2  # 16-row weight tiles per warp (and per CTA)
    nt: int = 2  # 8-token tiles per chunk
    warps: int = 8  # warps per CTA, splitting K
    prefetch: bool = False  # the next step's loads issued before this step's MMAs
    # of the K loop (not of the ring's); 0: no loop, each warp's loads of all its steps issued
    # first, then their MMAs (one memory round trip where its registers hold them)
    unroll: int = 2
    ring: int = 0  # >= 2: the loads go through a cp.async ring of this many steps in shared memory
    # warps split the weight rows (N), not K: each warp takes mt row tiles over all of K, and
    # each stage's token fragments are decoded once per CTA into shared memory (not per warp)
    split_n: bool = False
    stage: int = 4  # split_n: K steps a token-fragment buffer holds (at most: a divisor of K/128)
    gsa_per_expert: bool = True
    gsb_per_expert: bool = True
    # B in make_b_tiled's layout (a warp's 16-byte loads of a step: 512 contiguous bytes),
    # else K-major rows (8 runs of 64 bytes)
    b_tiled: bool = False

    def __post_init__(self) -> None:
        if (
            self.mt not in (1, 2, 4)
            or self.nt not in (1, 2, 3, 4, 8)
            or self.warps not in (2, 4, 8, 16)
        ):
            raise ValueError(
                f"mt in (1, 2, 4), nt in (1, 2, 3, 4, 8), warps in (2, 4, 8, 16), got {self}"
            )
        if self.unroll not in (0, 1, 2, 4) or self.ring not in (0, 2, 3, 4, 6, 8):
            raise ValueError(f"unroll in (0, 1, 2, 4) and ring in (0, 2, 3, 4, 6, 8), got {self}")
        if self.unroll == 0 and (self.ring or self.prefetch or self.split_n):
            raise ValueError(f"unroll 0 (all loads first) is a loop of its own, got {self}")
        if self.stage not in (1, 2, 4, 8):
            raise ValueError(f"stage in (1, 2, 4, 8), got {self}")
        if self.split_n and (self.ring or self.prefetch):
            raise ValueError(f"split_n loads weights at use: no ring, no prefetch, got {self}")
        ok, why = self.supports(self.k, self.n)
        if not ok:
            raise ValueError(f"{why} ({self})")

    def supports(self, k: int, n: int) -> tuple[bool, str]:
        if k % K_STEP:
            return False, f"the stream kernel needs K % {K_STEP} == 0, got K={k}"
        if n % self.cta_rows:
            return False, f"the stream kernel needs N % {self.cta_rows} == 0, got N={n}"
        return True, ""

    @property
    def cta_rows(self) -> int:
        """Weight rows of one CTA."""
        return 16 * self.mt * (self.warps if self.split_n else 1)

    @property
    def stage_steps(self) -> int:
        """split_n: the K steps of one token-fragment buffer (the largest divisor of K / 128
        up to `stage`)."""
        steps = self.k // K_STEP
        return next(d for d in range(self.stage, 0, -1) if steps % d == 0)

    @property
    def rows(self) -> int:
        """Tokens per chunk: an expert with more rows is walked in chunks of this many."""
        return 8 * self.nt


# --------------------------------------------------------------------------------------------
# PTX helpers


def _struct(n: int, ty):
    return llvm.StructType.get_literal([ty] * n)


def _fields(res, n: int, ty, cls, loc, ip):
    return [cls(llvm.extractvalue(ty, res, [i], loc=loc, ip=ip)) for i in range(n)]


@dsl_user_op
def _ld_v4(addr: Int64, pred: Uint32, *, loc=None, ip=None):
    """Four u32 at a 16-byte aligned global address (non-coherent path, not kept in L1);
    zeros where pred is 0 (rows past the expert's end)."""
    ptx = (
        "{ .reg .pred p; setp.ne.u32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; "
        "mov.b32 $3, 0; @p ld.global.nc.L1::no_allocate.v4.u32 {$0, $1, $2, $3}, [$4]; }"
    )
    res = _asm(_struct(4, T.i32()), ptx, "=r,=r,=r,=r,l,r", [addr, pred], loc, ip)
    return _fields(res, 4, T.i32(), Uint32, loc, ip)


@dsl_user_op
def _ld_u16(addr: Int64, pred: Uint32, *, loc=None, ip=None) -> Uint32:
    """The 2 bytes at addr (2-byte aligned) in the low half of a u32; 0 where pred is 0."""
    ptx = (
        "{ .reg .pred p; .reg .b16 h; setp.ne.u32 p, $2, 0; mov.b16 h, 0; "
        "@p ld.global.nc.u16 h, [$1]; cvt.u32.u16 $0, h; }"
    )
    return Uint32(_asm(T.i32(), ptx, "=r,l,r", [addr, pred], loc, ip))


def _halves_ptx(src: str) -> str:
    """$0, $1: the e4m3 bytes 0 and 1 of register `src` as fp16x2, each in both halves
    (exact); uses .b16 h and .b32 u."""
    return (
        f"prmt.b32 u, {src}, 0, 0x0000; cvt.u16.u32 h, u; cvt.rn.f16x2.e4m3x2 $0, h; "
        f"prmt.b32 u, {src}, 0, 0x1111; cvt.u16.u32 h, u; cvt.rn.f16x2.e4m3x2 $1, h;"
    )


@dsl_user_op
def _scale_pair(addr: Int64, pred: Uint32, *, loc=None, ip=None):
    """_ld_u16 and _scale_halves in one statement (so the compiler keeps the load at its use:
    fewer registers live, measured faster at the default plans)."""
    ptx = (
        "{ .reg .pred p; .reg .b16 h; .reg .b32 t, u; setp.ne.u32 p, $3, 0; mov.b16 h, 0; "
        "@p ld.global.nc.u16 h, [$2]; cvt.u32.u16 t, h; " + _halves_ptx("t") + " }"
    )
    res = _asm(_struct(2, T.i32()), ptx, "=r,=r,l,r", [addr, pred], loc, ip)
    return _fields(res, 2, T.i32(), Uint32, loc, ip)


@dsl_user_op
def _scale_halves(pair: Uint32, *, loc=None, ip=None):
    """Two e4m3 scale bytes (the low half of a u32) as two fp16x2 words, each byte's value in
    both halves (exact)."""
    ptx = "{ .reg .b16 h; .reg .b32 u; " + _halves_ptx("$2") + " }"
    res = _asm(_struct(2, T.i32()), ptx, "=r,=r,r", [pair], loc, ip)
    return _fields(res, 2, T.i32(), Uint32, loc, ip)


# The decode's byte selectors: pair p = elements (p, p + 4) = byte p // 2 and byte p // 2 + 2 of
# the low nibbles' (p even) or the high nibbles' (p odd) fp16 high bytes, into bytes 1 and 3 of
# the result; selector 4 (a byte of the zero operand) fills bytes 0 and 2
_PAIR_SELECT = tuple(0x0404 | (p // 2) << 4 | (p // 2 + 2) << 12 for p in range(4))


def _decode_ptx() -> str:
    """$0..$3: fp16x2 of elements (p, p+4) of word $4, p = 0..3, each times the fp16x2 $5.

    An E2M1 nibble s.mmm is the fp16 pattern s000.mmm0.0000.0000 (value * 2^-14): its sign on
    bit 15, its magnitude on bits 9..11, the low byte zero. So each nibble's fp16 high byte
    (s at bit 7, m at bits 1..3) is made in place, for all 8 nibbles at once in two words (the
    low nibbles': s from bit 3, m from bits 0..2; the high nibbles': s already on bit 7, m from
    bits 4..6), and one prmt a pair puts two of them on bytes 1 and 3 over zero bytes: 11
    integer operations a word where a shift-and-mask per pair takes 15."""
    lines = [
        "{ .reg .b32 l, h, t, u, r;",
        "shl.b32 t, $4, 1; and.b32 t, t, 0x0E0E0E0E; shl.b32 u, $4, 4; and.b32 u, u, 0x80808080;",
        "or.b32 l, t, u;",
        "shr.u32 t, $4, 3; and.b32 t, t, 0x0E0E0E0E; and.b32 u, $4, 0x80808080; or.b32 h, t, u;",
    ]
    for p, sel in enumerate(_PAIR_SELECT):
        src = "h" if p % 2 else "l"
        lines.append(f"prmt.b32 r, {src}, 0, 0x{sel:04X}; mul.rn.f16x2 ${p}, r, $5;")
    return " ".join(lines) + " }"


_DECODE_PTX = _decode_ptx()


@dsl_user_op
def _decode(word: Uint32, scale: Uint32, *, loc=None, ip=None):
    res = _asm(_struct(4, T.i32()), _DECODE_PTX, "=r,=r,=r,=r,r,r", [word, scale], loc, ip)
    return _fields(res, 4, T.i32(), Uint32, loc, ip)


def _side_effect(ptx: str, cons: str, args, loc, ip) -> None:
    _asm(None, ptx, cons, args, loc, ip, side_effects=True)


@dsl_user_op
def _cp_async(dst: Int32, src: Int64, nbytes: int, live: Uint32, *, loc=None, ip=None) -> None:
    """Copy nbytes (16 or 4) global -> shared asynchronously; zeros where live is 0."""
    kind = "cg" if nbytes == 16 else "ca"
    size = Uint32(live) * Uint32(nbytes)
    ptx = f"cp.async.{kind}.shared.global [$0], [$1], {nbytes}, $2;"
    _side_effect(ptx, "r,l,r,~{memory}", [Int32(dst), src, size], loc, ip)


@dsl_user_op
def _cp_commit(*, loc=None, ip=None) -> None:
    _side_effect("cp.async.commit_group;", "~{memory}", [], loc, ip)


@dsl_user_op
def _cp_wait(pending: int, *, loc=None, ip=None) -> None:
    """Wait until at most `pending` of this thread's copy groups are in flight."""
    _side_effect(f"cp.async.wait_group {pending};", "~{memory}", [], loc, ip)


@dsl_user_op
def _lds_v4(addr: Int32, *, loc=None, ip=None):
    """Four u32 at a 16-byte aligned shared address (after its copy's wait)."""
    ptx = "ld.shared.v4.u32 {$0, $1, $2, $3}, [$4];"
    res = _asm(_struct(4, T.i32()), ptx, "=r,=r,=r,=r,r,~{memory}", [Int32(addr)], loc, ip, True)
    return _fields(res, 4, T.i32(), Uint32, loc, ip)


@dsl_user_op
def _lds_u32(addr: Int32, *, loc=None, ip=None) -> Uint32:
    ptx = "ld.shared.u32 $0, [$1];"
    return Uint32(_asm(T.i32(), ptx, "=r,r,~{memory}", [Int32(addr)], loc, ip, True))


@dsl_user_op
def _sts_v4(addr: Int32, words, *, loc=None, ip=None) -> None:
    """Four u32 to a 16-byte aligned shared address."""
    ptx = "st.shared.v4.u32 [$0], {$1, $2, $3, $4};"
    _side_effect(ptx, "r,r,r,r,r,~{memory}", [Int32(addr)] + [Uint32(w) for w in words], loc, ip)


_MMA_PTX = (
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
    "{$8, $9}, {$10, $11, $12, $13};"
)


@dsl_user_op
def _mma(a, b, c, *, loc=None, ip=None):
    """c + A (4 fp16x2: rows g / g+8 x k 2t.. / 2t+8..) x B (2 fp16x2: k 2t.., 2t+8.. of
    column g): the four fp32 accumulators (rows g, g+8 x columns 2t, 2t+1)."""
    args = [Uint32(x) for x in a] + [Uint32(x) for x in b] + [Float32(x) for x in c]
    cons = "=f,=f,=f,=f," + ",".join("r" * 6) + ",0,1,2,3"
    res = _asm(_struct(4, T.f32()), _MMA_PTX, cons, args, loc, ip)
    return _fields(res, 4, T.f32(), Float32, loc, ip)


@dsl_user_op
def _st_bf16(addr: Int64, v: Float32, *, loc=None, ip=None) -> None:
    """bf16(v), round to nearest even (NaN stays NaN), stored at addr."""
    ptx = "{ .reg .b16 h; cvt.rn.bf16.f32 h, $1; st.global.b16 [$0], h; }"
    _side_effect(ptx, "l,f,~{memory}", [addr, Float32(v)], loc, ip)


# --------------------------------------------------------------------------------------------
# the kernel


class StreamGemmKernel:
    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg

    @cute.jit
    def __call__(
        self,
        a_ptr: cute.Pointer,
        sa_ptr: cute.Pointer,
        b_ptr: cute.Pointer,
        sb_ptr: cute.Pointer,
        off_ptr: cute.Pointer,
        gsa_ptr: cute.Pointer,
        gsb_ptr: cute.Pointer,
        out_ptr: cute.Pointer,
        stride_a: Int32,  # bytes between A rows
        stride_be: Int64,  # bytes between experts of B
        stride_bn: Int32,  # bytes between rows n of B (b_tiled: between 16-row tiles)
        stride_se: Int32,  # bytes between experts of scale_b
        stream,
    ):
        cfg = self.cfg
        off = cute.make_tensor(off_ptr, cute.make_layout(cfg.e))
        gsa = cute.make_tensor(gsa_ptr, cute.make_layout(cfg.e if cfg.gsa_per_expert else 1))
        gsb = cute.make_tensor(gsb_ptr, cute.make_layout(cfg.e if cfg.gsb_per_expert else 1))
        self.kernel(
            a_ptr,
            sa_ptr,
            b_ptr,
            sb_ptr,
            off,
            gsa,
            gsb,
            out_ptr,
            stride_a,
            stride_be,
            stride_bn,
            stride_se,
        ).launch(
            grid=[cfg.n // cfg.cta_rows, cfg.e, 1], block=[32 * cfg.warps, 1, 1], stream=stream
        )

    @cute.kernel
    def kernel(
        self,
        a_ptr: cute.Pointer,
        sa_ptr: cute.Pointer,
        b_ptr: cute.Pointer,
        sb_ptr: cute.Pointer,
        off: cute.Tensor,
        gsa: cute.Tensor,
        gsb: cute.Tensor,
        out_ptr: cute.Pointer,
        stride_a: Int32,
        stride_be: Int64,
        stride_bn: Int32,
        stride_se: Int32,
    ):
        cfg = self.cfg
        mt_n, nt_n, warps = cfg.mt, cfg.nt, cfg.warps
        n_acc = mt_n * nt_n * 4  # accumulators per thread
        tidx, _, _ = cute.arch.thread_idx()
        nb, e, _ = cute.arch.block_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        lane = tidx % 32
        g = lane // 4
        tg = lane % 4
        smem = SmemAllocator()
        red = None
        ring = None
        frags = None
        if cutlass.const_expr(cfg.split_n):  # two stages of token fragments, 16 words a lane
            frags = smem.allocate_tensor(Uint32, cute.make_layout(2 * self._stage_words), 16)
        else:
            red = smem.allocate_tensor(Float32, cute.make_layout(warps * n_acc * 32), 16)
        if cutlass.const_expr(cfg.ring > 1):  # 16 + 4 bytes a load a step, per thread
            ring_words = cfg.ring * (2 * mt_n + nt_n) * 32 * warps * 5
            ring = smem.allocate_tensor(Uint32, cute.make_layout(ring_words), 16)

        # the expert's rows [start, end) and its first padded scale row
        end = off[e]
        start = Int32(0)
        sstart = Int32(0)
        prev = Int32(0)
        for j in cutlass.range(e, unroll=8):  # loads of 8 offsets in flight together
            cur = off[j]
            sstart = sstart + (cur - prev + (ATOM_ROWS - 1)) // ATOM_ROWS * ATOM_ROWS
            prev = cur
        if e > 0:
            start = off[e - 1]
        ga = gsa[e] if cutlass.const_expr(cfg.gsa_per_expert) else gsa[0]
        gb = gsb[e] if cutlass.const_expr(cfg.gsb_per_expert) else gsb[0]
        alpha = ga * gb

        n_cb = cfg.k // 64  # scale atoms per atom row (K / 16 blocks, 4 per atom)
        a_base = a_ptr.toint()
        b_base = b_ptr.toint() + Int64(e) * stride_be
        sa_base = sa_ptr.toint()
        sb_base = sb_ptr.toint() + Int64(e) * Int64(stride_se)
        n0 = nb * cfg.cta_rows
        if cutlass.const_expr(cfg.split_n):
            n0 = n0 + warp * (16 * mt_n)
        # per row tile and half (rows g, g + 8): the row's byte offset and its scale row offset
        b_rows = []
        sb_rows = []
        for mt in cutlass.range_constexpr(mt_n):
            for h in cutlass.range_constexpr(2):
                n = n0 + 16 * mt + 8 * h + g
                if cutlass.const_expr(cfg.b_tiled):  # stride_bn: bytes between 16-row tiles
                    tile = Int64(n0 // 16 + mt) * Int64(stride_bn)
                    b_rows.append(b_base + tile + Int64(h * 512 + lane * 16))
                else:
                    b_rows.append(b_base + Int64(n) * Int64(stride_bn) + Int64(tg * 16))
                sb_rows.append(sb_base + Int64(self._swizzle_row(n, n_cb) + 2 * (tg % 2)))
        col_step = Int64(512 * (tg // 2))  # the scale atom column of blocks 2t, 2t + 1

        for c0 in cutlass.range(start, end, 8 * nt_n, unroll=1):
            a_rows = []
            sa_rows = []
            valid = []
            for nt in cutlass.range_constexpr(nt_n):
                tok = c0 + 8 * nt + g
                ok = tok < end
                tokc = tok if ok else start  # a valid address either way
                a_rows.append(a_base + Int64(tokc) * Int64(stride_a) + Int64(tg * 16))
                srow = sstart + tokc - start
                sa_rows.append(sa_base + Int64(self._swizzle_row(srow, n_cb) + 2 * (tg % 2)))
                valid.append(Uint32(1) if ok else Uint32(0))
            acc = cute.make_rmem_tensor(n_acc, Float32)
            for i in cutlass.range_constexpr(n_acc):
                acc[i] = Float32(0.0)
            # the step's operand addresses: token tiles, their validity, weight row halves
            rows = (a_rows, sa_rows, valid, b_rows, sb_rows, col_step)
            if cutlass.const_expr(cfg.split_n):
                self._split_n_loop(rows, frags.iterator.toint(), warp, lane, acc)
                for i in cutlass.range_constexpr(n_acc):  # this warp's rows: no reduction
                    self._store(out_ptr, n0, c0, end, i // 4, i % 4, lane, acc[i], alpha)
            else:
                if cutlass.const_expr(cfg.ring > 1):
                    self._ring_loop(rows, ring.iterator.toint(), tidx, warp, acc)
                else:
                    self._direct_loop(rows, warp, acc)
                # the warps' partial sums, added in warp order
                for i in cutlass.range_constexpr(n_acc):
                    red[(warp * n_acc + i) * 32 + lane] = acc[i]
                cute.arch.barrier()
                total = n_acc * 32
                for r in cutlass.range_constexpr((total + 32 * warps - 1) // (32 * warps)):
                    f = tidx + r * 32 * warps
                    if f < total:
                        v = red[f]
                        for w in cutlass.range_constexpr(1, warps):
                            v = v + red[w * total + f]
                        self._store(out_ptr, n0, c0, end, f // 128, f // 32 % 4, f % 32, v, alpha)
                cute.arch.barrier()

    @cute.jit
    def _store(self, out_ptr, n0: Int32, c0: Int32, end: Int32, tile, q, ln, v, alpha):
        """Accumulator q (0..3) of fragment lane ln in tile (mt, nt) = divmod(tile, NT): its
        sum v times 2^28 (exact) times alpha, rounded to bf16, stored where its token has a
        row."""
        nt_n = self.cfg.nt
        n = n0 + 16 * (tile // nt_n) + ln // 4 + 8 * (q // 2)
        tok = c0 + 8 * (tile % nt_n) + 2 * (ln % 4) + q % 2
        if tok < end:
            addr = out_ptr.toint() + (Int64(tok) * self.cfg.n + Int64(n)) * 2
            _st_bf16(addr, v * Float32(UNFOLD) * alpha)

    @cute.jit
    def _fetch(self, rows, s: Int32, live):
        """Step s's raw operands (zeros where not `live`): per token tile its 4 words and its
        2 scale bytes, then per weight tile rows g and g + 8's 4 words each and 2 scale bytes
        each."""
        a_rows, sa_rows, valid, b_rows, sb_rows, col_step = rows
        on = Uint32(1) if live else Uint32(0)
        kb = Int64(s) * 64
        ks = Int64(s) * 1024 + col_step  # 2 atoms of scale columns per step
        out = []
        for nt in cutlass.range_constexpr(self.cfg.nt):
            out += _ld_v4(a_rows[nt] + kb, valid[nt] & on)
            out.append(_ld_u16(sa_rows[nt] + ks, valid[nt] & on))
        for r in cutlass.range_constexpr(2 * self.cfg.mt):
            out += _ld_v4(b_rows[r] + Int64(s) * self._b_step, on)
        for r in cutlass.range_constexpr(2 * self.cfg.mt):
            out.append(_ld_u16(sb_rows[r] + ks, on))
        return out

    @cute.jit
    def _step(self, raw, acc: cute.Tensor):
        """acc += one step's products (the raw operands of _fetch)."""
        mt_n, nt_n = self.cfg.mt, self.cfg.nt
        bfrag = []  # [nt][j] -> 4 fp16x2 of the token's word j (its scale: j // 2)
        for nt in cutlass.range_constexpr(nt_n):
            s0, s1 = _scale_halves(raw[5 * nt + 4])
            bfrag.append([_decode(raw[5 * nt + j], s0 if j < 2 else s1) for j in range(4)])
        wb = 5 * nt_n
        sb = wb + 8 * mt_n
        for mt in cutlass.range_constexpr(mt_n):
            sg = _scale_halves(raw[sb + 2 * mt])
            s8 = _scale_halves(raw[sb + 2 * mt + 1])
            w = raw[wb + 8 * mt : wb + 8 * mt + 8]
            self._tile_mmas(mt, w[:4], w[4:], sg, s8, bfrag, acc)

    @cute.jit
    def _direct_loop(self, rows, warp: Int32, acc: cute.Tensor):
        """The K loop loading from global memory into registers: at each use, or (prefetch) one
        step ahead."""
        cfg = self.cfg
        steps = cfg.k // K_STEP
        if cutlass.const_expr(cfg.unroll == 0):  # every step of this warp's, all loads first
            whole = steps // cfg.warps  # the steps every warp has
            raws = [
                self._fetch(
                    rows, warp + i * cfg.warps, True if i < whole else warp < steps % cfg.warps
                )
                for i in range((steps + cfg.warps - 1) // cfg.warps)
            ]
            for raw in raws:  # in step order: the sums of every other unroll, bit for bit
                self._step(raw, acc)
            return
        n_raw = 5 * cfg.nt + 10 * cfg.mt
        buf = cute.make_rmem_tensor(n_raw, Uint32)
        if cutlass.const_expr(cfg.prefetch):
            first = self._fetch(rows, warp, warp < steps)
            for i in cutlass.range_constexpr(n_raw):
                buf[i] = first[i]
        for s in cutlass.range(warp, steps, cfg.warps, unroll=cfg.unroll):
            if cutlass.const_expr(cfg.prefetch):
                cur = [buf[i] for i in range(n_raw)]
                nxt = self._fetch(rows, s + cfg.warps, s + cfg.warps < steps)
                for i in cutlass.range_constexpr(n_raw):
                    buf[i] = nxt[i]
                self._step(cur, acc)
            else:
                self._step_loading(rows, s, acc)

    @cute.jit
    def _ring_loop(self, rows, ring: Int32, tidx: Int32, warp: Int32, acc: cute.Tensor):
        """The K loop through a cp.async ring of cfg.ring stages in shared memory: each thread
        copies its own operands and reads them back itself (its own wait_group, no barrier), so
        cfg.ring - 1 steps of loads are in flight without holding registers."""
        cfg = self.cfg
        depth, nt_n, mt_n = cfg.ring, cfg.nt, cfg.mt
        chunks = 2 * mt_n + nt_n
        threads = 32 * cfg.warps
        steps = cfg.k // K_STEP
        n_mine = (steps - warp + cfg.warps - 1) // cfg.warps  # this warp's steps
        for p in cutlass.range_constexpr(depth - 1):
            self._ring_issue(rows, ring, tidx, p, warp + p * cfg.warps, p < n_mine)
            _cp_commit()
        for i in cutlass.range(n_mine, unroll=1):
            _cp_wait(depth - 2)
            slot = i % depth
            raw = []
            shift = Uint32(16 * (tidx % 4 % 2))  # the scale bytes' half of the 4-byte word
            for c in cutlass.range_constexpr(chunks):
                at = (slot * chunks + c) * threads + tidx
                words = _lds_v4(ring + at * 16)
                sc = _lds_u32(ring + threads * depth * chunks * 16 + at * 4) >> shift
                if cutlass.const_expr(c < nt_n):  # a token tile: 4 words, its scale bytes
                    raw += [*words, sc]
                else:
                    raw.append((words, sc))
            weights = raw[5 * nt_n :]
            raw = raw[: 5 * nt_n] + [w for ws, _ in weights for w in ws] + [x for _, x in weights]
            j = i + depth - 1
            self._ring_issue(rows, ring, tidx, j % depth, warp + j * cfg.warps, j < n_mine)
            _cp_commit()
            self._step(raw, acc)
        _cp_wait(0)  # the ring is refilled by the next chunk

    @cute.jit
    def _ring_issue(self, rows, ring: Int32, tidx: Int32, slot: Int32, s: Int32, live):
        """Copy step s's operands into ring slot `slot` (zeros where not live): the token tiles'
        and then the weight row halves' 16 bytes and the 4-byte word holding their scale bytes."""
        a_rows, sa_rows, valid, b_rows, sb_rows, col_step = rows
        cfg = self.cfg
        chunks = 2 * cfg.mt + cfg.nt
        threads = 32 * cfg.warps
        on = Uint32(1) if live else Uint32(0)
        kb = Int64(s) * 64
        ks = Int64(s) * 1024 + col_step - Int64(2 * (tidx % 4 % 2))  # the 4-byte word
        kbb = Int64(s) * self._b_step
        srcs = [(a_rows[i] + kb, sa_rows[i], valid[i] & on) for i in range(cfg.nt)]
        srcs += [(b_rows[r] + kbb, sb_rows[r], on) for r in range(2 * cfg.mt)]
        for c in cutlass.range_constexpr(chunks):
            at = (slot * chunks + c) * threads + tidx
            row, srow, ok = srcs[c]
            _cp_async(ring + at * 16, row, 16, ok)
            _cp_async(ring + threads * cfg.ring * chunks * 16 + at * 4, srow + ks, 4, ok)

    @cute.jit
    def _token_frag(self, rows, s: Int32, nt: int):
        """Token tile nt's B fragments of step s: per word j its 4 fp16x2 (zeros past the
        expert's end), loaded and decoded."""
        a_rows, sa_rows, valid, _, _, col_step = rows
        words = _ld_v4(a_rows[nt] + Int64(s * 64), valid[nt])
        s0, s1 = _scale_pair(sa_rows[nt] + Int64(s * 1024) + col_step, valid[nt])
        return [_decode(words[j], s0 if j < 2 else s1) for j in range(4)]

    @cute.jit
    def _step_loading(self, rows, s: Int32, acc: cute.Tensor):
        """acc += step s's products, each weight tile's loads issued where it is used (fewer
        registers live than _fetch + _step: more warps per SM, faster where measured)."""
        bfrag = [self._token_frag(rows, s, nt) for nt in range(self.cfg.nt)]
        _, _, _, b_rows, sb_rows, col_step = rows
        kb = Int64(s * self._b_step)
        ks = Int64(s * 1024) + col_step
        for mt in cutlass.range_constexpr(self.cfg.mt):
            wg = _ld_v4(b_rows[2 * mt] + kb, Uint32(1))
            w8 = _ld_v4(b_rows[2 * mt + 1] + kb, Uint32(1))
            g0, g1 = _scale_pair(sb_rows[2 * mt] + ks, Uint32(1))
            e0, e1 = _scale_pair(sb_rows[2 * mt + 1] + ks, Uint32(1))
            self._tile_mmas(mt, wg, w8, (g0, g1), (e0, e1), bfrag, acc)

    @property
    def _b_step(self) -> int:
        """Bytes between one K step's and the next's weight loads: 1 KiB chunks (tiled), else
        64 bytes of a row."""
        return 1024 if self.cfg.b_tiled else 64

    @property
    def _stage_words(self) -> int:
        """u32 of one stage of token fragments: [step][tile][word j][lane][4] (_frag_at)."""
        return self.cfg.stage_steps * self.cfg.nt * 4 * 32 * 4

    def _frag_at(self, base, f, j, lane):
        """Shared address of fragment f (= step i * NT + tile nt) word j of `lane` in a stage's
        buffer at `base`: 16 bytes, lanes adjacent (conflict-free 16-byte accesses)."""
        return base + ((f * 4 + j) * 32 + lane) * 16

    @cute.jit
    def _stage_tokens(self, rows, base: Int32, s0: Int32, warp: Int32, lane: Int32):
        """Decode the token fragments of steps s0 .. s0 + stage - 1 into the buffer at `base`:
        fragment (step i, tile nt) by warp (i * nt + nt) % warps, each lane its own."""
        cfg = self.cfg
        for f in cutlass.range_constexpr(cfg.stage_steps * cfg.nt):
            if warp == f % cfg.warps:
                frag = self._token_frag(rows, s0 + f // cfg.nt, f % cfg.nt)
                for j in cutlass.range_constexpr(4):
                    _sts_v4(self._frag_at(base, f, j, lane), frag[j])

    @cute.jit
    def _split_n_loop(self, rows, frags: Int32, warp: Int32, lane: Int32, acc: cute.Tensor):
        """split_n's K loop: every step of K for this warp's row tiles, the token fragments of
        each stage decoded once per CTA into one of two shared buffers (a barrier a stage: the
        next stage's buffer is written while this one is read)."""
        cfg = self.cfg
        nt_n, stage = cfg.nt, cfg.stage_steps
        n_stages = cfg.k // K_STEP // stage
        half = self._stage_words * 4  # bytes of one buffer
        self._stage_tokens(rows, frags, Int32(0), warp, lane)
        cute.arch.barrier()
        for st in cutlass.range(n_stages, unroll=1):
            if st + 1 < n_stages:
                nxt = frags + (st + 1) % 2 * half
                self._stage_tokens(rows, nxt, (st + 1) * stage, warp, lane)
            base = frags + st % 2 * half
            for i in cutlass.range_constexpr(stage):
                at = self._frag_at(base, i * nt_n, 0, lane)
                self._shared_step(rows, st * stage + i, at, acc)
            cute.arch.barrier()

    @cute.jit
    def _shared_step(self, rows, s: Int32, at: Int32, acc: cute.Tensor):
        """split_n: acc += step s's products, the weight tiles loaded at the step's start and
        each word's token fragments read from shared memory (at: this lane's, tile 0, word 0)
        where they are used (fewer registers live)."""
        _, _, _, b_rows, sb_rows, col_step = rows
        mt_n, nt_n = self.cfg.mt, self.cfg.nt
        kb = Int64(s * self._b_step)
        ks = Int64(s * 1024) + col_step
        words = [_ld_v4(b_rows[r] + kb, Uint32(1)) for r in range(2 * mt_n)]
        scales = [_scale_pair(sb_rows[r] + ks, Uint32(1)) for r in range(2 * mt_n)]
        for j in cutlass.range_constexpr(4):
            bt = [_lds_v4(self._frag_at(at, nt, j, 0)) for nt in range(nt_n)]
            for mt in cutlass.range_constexpr(mt_n):
                pa = _decode(words[2 * mt][j], scales[2 * mt][j // 2])
                pb = _decode(words[2 * mt + 1][j], scales[2 * mt + 1][j // 2])
                for nt in cutlass.range_constexpr(nt_n):
                    self._mma_pair(mt, nt, pa, pb, bt[nt], acc)

    @cute.jit
    def _tile_mmas(self, mt: int, wg, w8, sg, s8, bfrag, acc: cute.Tensor):
        """Weight tile mt's 8 MMAs per token tile: rows g (words wg, scales sg) and g + 8."""
        nt_n = self.cfg.nt
        for j in cutlass.range_constexpr(4):
            pa = _decode(wg[j], sg[j // 2])
            pb = _decode(w8[j], s8[j // 2])
            for nt in cutlass.range_constexpr(nt_n):
                self._mma_pair(mt, nt, pa, pb, bfrag[nt][j], acc)

    @cute.jit
    def _mma_pair(self, mt: int, nt: int, pa, pb, bt, acc: cute.Tensor):
        """Tile (mt, nt)'s two MMAs of one word: rows g (pa) and g + 8 (pb) x the token's bt."""
        base = (mt * self.cfg.nt + nt) * 4
        c = [acc[base + i] for i in range(4)]
        c = _mma((pa[0], pb[0], pa[1], pb[1]), (bt[0], bt[1]), c)
        c = _mma((pa[2], pb[2], pa[3], pb[3]), (bt[2], bt[3]), c)
        for i in cutlass.range_constexpr(4):
            acc[base + i] = c[i]

    @cute.jit
    def _swizzle_row(self, r: Int32, n_cb: int) -> Int32:
        """The row part of the 128x4 closed form (docs/design.md §3)."""
        u = Uint32(r)
        return Int32((u >> 7) * (n_cb * 512) + ((u & 31) << 4) + (((u >> 5) & 3) << 2))


# --------------------------------------------------------------------------------------------
# compile (cached) and the runner


def _ptr_types():
    from cutlass import BFloat16, Uint8

    return (
        (Uint8, 16),  # A codes
        (Uint8, 2),  # scale_a
        (Uint8, 16),  # B codes
        (Uint8, 2),  # scale_b
        (Int32, 4),  # offsets
        (Float32, 4),  # gsa
        (Float32, 4),  # gsb
        (BFloat16, 2),  # out
    )


def _fake_args():
    from cutlass.cute.runtime import make_ptr
    from cutlass.runtime import make_fake_stream

    ptrs = [make_ptr(t, 0, cute.AddressSpace.gmem, assumed_align=a) for t, a in _ptr_types()]
    return (*ptrs, Int32(16), Int64(16), Int32(16), Int32(16), make_fake_stream())


@functools.cache
def compile_stream(cfg: StreamConfig, arch: str = ARCH, extra_options: str = ""):
    """Compile for `arch` (no GPU needed); cached. A failure names the configuration."""
    from dsv4.kernels.cutedsl.ptx_check import compile_named

    return compile_named(
        StreamGemmKernel(cfg), _fake_args(), arch, extra_options, f"CuTeDSL stream GEMM ({cfg})"
    )


def run_stream_gemm(
    cfg: StreamConfig, mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out
) -> None:
    """Launch on validated operands (dsv4.ops.gemm validates them; the sm90 launcher checks the
    word layout) on the current stream; writes out's rows of every expert."""
    import torch
    from cuda.bindings import driver
    from cutlass.cute.runtime import make_ptr

    from dsv4.ops.layouts import b_dims

    t, kh = mat_a.shape
    e, _, n = b_dims(mat_b)
    if (2 * kh, n, e, mat_b.dim() == 4) != (cfg.k, cfg.n, cfg.e, cfg.b_tiled):
        raise ValueError(f"{cfg} was given K={2 * kh} N={n} E={e}, mat_b.dim()={mat_b.dim()}")
    if mat_a.data_ptr() % 16 or mat_a.stride(0) % 16 or mat_b.data_ptr() % 16:
        raise ValueError(
            "the stream kernel loads 16 bytes at a time: A and B must start 16-byte aligned "
            f"and A's rows be multiples of 16 bytes, got mat_a.stride()={mat_a.stride()}"
        )
    row = 1 if cfg.b_tiled else 2  # the stride between rows n, or between 16-row tiles
    if mat_b.stride(row) % 16 or mat_b.stride(0) % 16:
        raise ValueError(f"B's rows must be 16-byte multiples, got mat_b.stride()={mat_b.stride()}")
    kernel = compile_stream(cfg)
    tensors = (mat_a, scale_a, mat_b, scale_b, offsets, gsa, gsb, out)
    ptrs = [
        make_ptr(ty, v.data_ptr(), cute.AddressSpace.gmem, assumed_align=al)
        for (ty, al), v in zip(_ptr_types(), tensors, strict=True)
    ]
    stream = driver.CUstream(torch.cuda.current_stream(out.device).cuda_stream)
    kernel(
        *ptrs,
        Int32(mat_a.stride(0)),
        Int64(mat_b.stride(0)),
        Int32(mat_b.stride(row)),
        Int32(scale_b.view(torch.uint8).stride(0) if scale_b.dim() > 1 else 0),
        stream,
    )
