"""NVFP4 quantize kernels in CuTeDSL, any arch: activation quantize and fused SwiGLU-requantize.

One kernel family, variants as config fields (`QuantConfig`): the input may be a [T, K] tensor,
G groups of one [T, G, K] tensor with one global scale each (the grouped linear, one launch),
or the L1 output [T, 2I] passed through the DeepSeek V4 SwiGLU with limit (times a per-row
routing weight) before it is quantized. Scales go straight into the 128x4-swizzled layout the
GEMM reads, each group's rows padded to 128 on their own (padding bytes written as 0), or stay
linear [rows, K/16] (the harness's stage output). One thread quantizes `blocks_per_thread`
consecutive 16-element blocks of a row (1, 2 or 4): all their 16-byte loads issued before the
math, their codes stored as one contiguous 8/16/32-byte run and their scale bytes as one 1/2/4-byte
word (the swizzled layout keeps 4 K-blocks of a row in one 32-bit word); `threads` per CTA.
The tuning fields change speed only, never bits; `DEFAULT_TUNING` is the one place the
public functions take them from.

Bits (docs/design.md §3, the reference's order, fp32, correctly rounded divisions): x_n = x / gs;
amax = max.NaN |x_n|; s = amax / 6; byte = cvt.rn.satfinite.e4m3 (clamp-then-round, NaN ->
0x7F); q = x_n / decode(byte), 0 where the scale is 0; E2M1 of q by cvt.rn.satfinite.e2m1x2 on
sm_100+ and by the exact software steps of `bitmodel` elsewhere. NaN policy: +6 (q is clamped
with min first, so NaN never reaches the conversion). SwiGLU: gate = min.NaN(gate, L), up =
clamp(up) (NaN kept, as torch.clamp), silu(g) = g / (1 + exp(-g)) as torch's CUDA kernel.

Layers (STYLE.md rule 1): `Nvfp4QuantKernel` (config, `@cute.jit` launch, `@cute.kernel` body),
`compile_quant` (cached by (config, arch)), `run_quant` (validates, writes caller-owned outputs).
Nothing here reads an environment variable; importing it imports cutlass but touches no GPU.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Uint8, Uint16, Uint32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from dsv4.ops._checks import need as _need
from dsv4.ops.layouts import max_padded_rows

BLOCK = 16
ATOM_ROWS, ATOM_COLS = 128, 4  # the 512-byte scale atom (docs/design.md §3 "Scale layout")
ARCHS = ("sm_90a", "sm_100a")


class ScaleLayout(enum.Enum):
    """Where the scale bytes go."""

    SWIZZLED = "swizzled"  # 128x4 atoms, each group's rows padded to 128 (the GEMM's operand)
    LINEAR = "linear"  # [rows, K/16] row-major, no padding (stage outputs, the harness)


class Prologue(enum.Enum):
    """What the kernel computes from its input before quantizing."""

    NONE = "none"  # quantize the input itself
    SWIGLU = "swiglu"  # DeepSeek V4 SwiGLU with limit of the [.., 2K] L1 output


_DTYPES = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16, "float32": Float32}


@dataclass(frozen=True)
class QuantConfig:
    """Everything that changes generated code (the compile key, with the arch)."""

    k: int  # quantized width (columns of codes * 2); the input has k (NONE) or 2k (SWIGLU)
    in_dtype: str = "bfloat16"  # "bfloat16" | "float16" | "float32"
    scale_layout: ScaleLayout = ScaleLayout.SWIZZLED
    groups: int = 1  # G: input [T, G, k], one global scale per group, one launch
    prologue: Prologue = Prologue.NONE
    swiglu_limit: float | None = 10.0  # SWIGLU only; None clamps nothing
    gate_first: bool = True  # SWIGLU only: gate = first half of the L1 output
    row_weight: bool = False  # SWIGLU only: h *= w[row] (routing weight) before quantizing
    gather: bool = False  # output row r reads input row index[r] (the routed MoE's staging)
    # E > 0 (SWIZZLED, one group): the output rows are E experts' back to back (int32 END
    # offsets [E] on the device) and each expert's scale rows are padded to 128 on their own,
    # from the int32 [E] padded starts (`padded_group_starts`): the GEMM's 2-D-side operand,
    # assemble_scales_2d_side_from_offsets's layout, every byte of its max_padded_rows(T, E)
    # rows written (padding 0). Threads walk scale rows, each finding its expert by a binary
    # search over the starts.
    experts: int = 0
    # divisions of in-range blocks by a reciprocal and one fma correction (bit-identical to
    # div.rn there, see _div_corrected); div.rn for every other block and when False
    fast_division: bool = True
    # in-range blocks on an arch without the e2m1 cvt (sm_90): codes from x * R, R ~ 1/(gs*s),
    # each rounded at both ends of a +-2^-19 bracket (_BRACKET_PTX); a value whose two ends
    # round apart (a quotient near an E2M1 midpoint) gets its code from the corrected
    # divisions. Same bits either way (bitmodel.bracket_codes); needs fast_division; no effect
    # on sm_100. A tuning field (DEFAULT_TUNING): speed only
    bracketed_codes: bool = True
    # speed only (bit-identical outputs): consecutive 16-element blocks one thread quantizes
    # (1, 2, 4; must divide k/16) and threads per CTA
    blocks_per_thread: int = 1
    threads: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k <= 0 or self.k % BLOCK:
            raise ValueError(f"QuantConfig.k must be a positive multiple of {BLOCK}, got {self.k=}")
        if self.in_dtype not in _DTYPES:
            raise ValueError(
                f"QuantConfig.in_dtype must be one of {sorted(_DTYPES)}, got {self.in_dtype=}"
            )
        if not isinstance(self.groups, int) or self.groups <= 0:
            raise ValueError(f"QuantConfig.groups must be an int >= 1, got {self.groups=}")
        if self.prologue is not Prologue.SWIGLU and (self.row_weight or not self.gate_first):
            raise ValueError(
                f"row_weight / gate_first apply to the SWIGLU prologue only, got "
                f"{self.prologue=} {self.row_weight=} {self.gate_first=}"
            )
        if self.blocks_per_thread not in (1, 2, 4) or self.cols % self.blocks_per_thread:
            raise ValueError(
                f"QuantConfig.blocks_per_thread must be 1, 2 or 4 and divide k/16={self.cols}, "
                f"got {self.blocks_per_thread=}"
            )
        if self.threads not in (64, 128, 256, 512):
            raise ValueError(
                f"QuantConfig.threads must be 64, 128, 256 or 512, got {self.threads=}"
            )
        if not isinstance(self.experts, int) or self.experts < 0:
            raise ValueError(f"QuantConfig.experts must be an int >= 0, got {self.experts=}")
        if self.experts and (self.scale_layout is not ScaleLayout.SWIZZLED or self.groups != 1):
            raise ValueError(
                "QuantConfig.experts needs the SWIZZLED scale layout and one group, got "
                f"{self.experts=} {self.scale_layout=} {self.groups=}"
            )
        if self.bracketed_codes and not self.fast_division:
            raise ValueError(
                "QuantConfig.bracketed_codes falls back to the corrected divisions, so it needs "
                f"fast_division=True, got {self.bracketed_codes=} {self.fast_division=}"
            )
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise ValueError(
                f"QuantConfig.swiglu_limit must be > 0 or None, got {self.swiglu_limit=}"
            )

    @property
    def cols(self) -> int:
        """Scale columns K/16."""
        return self.k // BLOCK

    @property
    def padded_cols(self) -> int:
        c = self.cols
        if self.scale_layout is ScaleLayout.LINEAR:
            return c
        return (c + ATOM_COLS - 1) // ATOM_COLS * ATOM_COLS

    @property
    def in_width(self) -> int:
        return 2 * self.k if self.prologue is Prologue.SWIGLU else self.k

    def scale_rows(self, rows: int) -> int:
        """Scale rows per group for `rows` data rows (padded to 128 when swizzled; with
        experts, enough for any split of the rows: layouts.max_padded_rows)."""
        if self.scale_layout is ScaleLayout.LINEAR:
            return rows
        if self.experts:
            return max_padded_rows(rows, self.experts)
        return (rows + ATOM_ROWS - 1) // ATOM_ROWS * ATOM_ROWS

    def scale_bytes(self, rows: int) -> int:
        return self.groups * self.scale_rows(rows) * self.padded_cols

    @property
    def codes_align(self) -> int:
        """Byte alignment the codes pointer must have (the widest code store)."""
        return min(8 * self.blocks_per_thread, 16)


# The tuning the public functions use (speed only, never bits), by prologue: one table, easy to
# flip after a `bench/quantize.py --variants` run, and MANY_ROWS: what changes from
# min_rows output rows per group on. H200, 2026-12-03, the bracket on (bit-exact either way):
# quantize [8192, 7168] 55.0 us at 1 block per thread, 50.9 at 2, 59.5 at 4 (without the
# bracket 60.1 / 57.0 / 59.3); [128, 7168] (a decode step) 6.3 / 6.8 / 8.3 in the same table,
# so 1 below 4096 rows and 2 from there (the rows between 128 and 8192 were not measured);
# SwiGLU-requant [8192, 2x3072] 47.4 at 1, 49.2 at 2 (51.6 / 52.3 without the bracket).
# blocks_per_thread falls back to what k/16 and the outputs allow (tuned).
DEFAULT_TUNING = {
    Prologue.NONE: {"blocks_per_thread": 1, "threads": 128, "bracketed_codes": True},
    Prologue.SWIGLU: {"blocks_per_thread": 1, "threads": 128, "bracketed_codes": True},
}
MANY_ROWS = {Prologue.NONE: (4096, {"blocks_per_thread": 2})}


def tuned(
    cfg: QuantConfig, tuning: dict | None = None, codes=None, scales=None, rows: int | None = None
) -> QuantConfig:
    """cfg with the tuning fields of `tuning` (when None: DEFAULT_TUNING[cfg.prologue], updated
    by MANY_ROWS for `rows` output rows per group or more; rows default to the codes tensor's:
    blocks_per_thread, threads, bracketed_codes; a field it lacks keeps cfg's, and the bracket
    needs fast_division); blocks_per_thread drops to the largest of 4, 2, 1 at most the asked
    one that divides k/16 and whose wide stores the given (caller-owned) codes / scales tensors
    are aligned for."""
    import dataclasses

    if tuning is None:
        t = dict(DEFAULT_TUNING[cfg.prologue])
        if rows is None and codes is not None:
            rows = codes.shape[0] // cfg.groups
        many = MANY_ROWS.get(cfg.prologue)
        if many is not None and rows is not None and rows >= many[0]:
            t.update(many[1])
    else:
        t = dict(tuning)
    bpt = t.get("blocks_per_thread", 1)

    def fits(b: int) -> bool:
        return (
            cfg.cols % b == 0
            and (codes is None or codes.data_ptr() % min(8 * b, 16) == 0)
            and (scales is None or scales.data_ptr() % b == 0)
        )

    while not fits(bpt):
        bpt //= 2
    return dataclasses.replace(
        cfg,
        blocks_per_thread=bpt,
        threads=t.get("threads", cfg.threads),
        bracketed_codes=t.get("bracketed_codes", cfg.bracketed_codes) and cfg.fast_division,
    )


# --------------------------------------------------------------------------------------------
# PTX helpers (pure value computations: has_side_effects=False lets LLVM schedule them)


def _asm(res_type, ptx: str, constraints: str, args, loc=None, ip=None, side_effects=False):
    """One inline-PTX statement; `side_effects` (memory, ordering) keeps it where it stands."""
    return llvm.inline_asm(
        res_type,
        [a.ir_value(loc=loc, ip=ip) for a in args],
        ptx,
        constraints,
        has_side_effects=side_effects,
        is_align_stack=False,
    )


def _ptx(ptx: str, out, *args, loc=None, ip=None):
    """One pure inline-PTX value of type `out` (Float32 or Uint32) from Float32 / Uint32 args
    ($0 the result, $1.. the args; constraint letters follow the types)."""
    letter = {Float32: "f", Uint32: "r"}
    cons = "=" + letter[out] + "".join("," + letter[type(a)] for a in args)
    res = T.f32() if out is Float32 else T.i32()
    return out(_asm(res, ptx, cons, list(args), loc, ip))


@dsl_user_op
def _max_abs_nan(acc: Float32, v: Float32, *, loc=None, ip=None) -> Float32:
    """max(acc, |v|), NaN-propagating (a NaN block must give scale 0x7F)."""
    ptx = "{ .reg .f32 t; abs.f32 t, $2; max.NaN.f32 $0, $1, t; }"
    return _ptx(ptx, Float32, Float32(acc), Float32(v), loc=loc, ip=ip)


@dsl_user_op
def _amax_pairs(words, in_dtype: str, *, loc=None, ip=None) -> Float32:
    """max |x| of 16 bf16 / fp16 values packed in 8 u32 as fp32, NaN-propagating: a tree of
    max.NaN.xorsign.abs on pairs (the sign bit is junk, dropped at the end; the max of
    representable values is exact)."""
    ty = {"bfloat16": "bf16", "float16": "f16"}[in_dtype]
    to_f32 = "shl.b32 $0, t, 16;" if ty == "bf16" else "cvt.f32.f16 $0, m;"
    ptx = (
        "{ .reg .b32 a, b, c, d, e, f, g, t; .reg .b16 lo, hi, m; "
        f"max.NaN.xorsign.abs.{ty}x2 a, $1, $2; max.NaN.xorsign.abs.{ty}x2 b, $3, $4; "
        f"max.NaN.xorsign.abs.{ty}x2 c, $5, $6; max.NaN.xorsign.abs.{ty}x2 d, $7, $8; "
        f"max.NaN.xorsign.abs.{ty}x2 e, a, b; max.NaN.xorsign.abs.{ty}x2 f, c, d; "
        f"max.NaN.xorsign.abs.{ty}x2 g, e, f; mov.b32 {{lo, hi}}, g; "
        f"max.NaN.xorsign.abs.{ty} m, lo, hi; and.b16 m, m, 0x7FFF; cvt.u32.u16 t, m; "
        f"{to_f32} }}"
    )
    args = [Uint32(w) for w in words]
    return Float32(_asm(T.f32(), ptx, "=f," + ",".join("r" * 8), args, loc, ip))


@dsl_user_op
def _min_nan(a: Float32, b: Float32, *, loc=None, ip=None) -> Float32:
    return _ptx("min.NaN.f32 $0, $1, $2;", Float32, Float32(a), Float32(b), loc=loc, ip=ip)


@dsl_user_op
def _max_nan(a: Float32, b: Float32, *, loc=None, ip=None) -> Float32:
    return _ptx("max.NaN.f32 $0, $1, $2;", Float32, Float32(a), Float32(b), loc=loc, ip=ip)


@dsl_user_op
def _e4m3_byte(s: Float32, *, loc=None, ip=None) -> Uint32:
    """cvt.rn.satfinite.e4m3x2.f32: round to nearest even, > 448 and Inf -> 448, NaN -> 0x7F."""
    ptx = (
        "{ .reg .b16 h; cvt.rn.satfinite.e4m3x2.f32 h, $1, $1; cvt.u32.u16 $0, h; "
        "and.b32 $0, $0, 255; }"
    )
    return _ptx(ptx, Uint32, Float32(s), loc=loc, ip=ip)


@dsl_user_op
def _e4m3_value(byte: Uint32, *, loc=None, ip=None) -> Float32:
    """The e4m3 byte as fp32 (exact; 0x7F -> NaN)."""
    ptx = (
        "{ .reg .b16 h, lo, hi; .reg .b32 w; cvt.u16.u32 h, $1; cvt.rn.f16x2.e4m3x2 w, h; "
        "mov.b32 {lo, hi}, w; cvt.f32.f16 $0, lo; }"
    )
    return _ptx(ptx, Float32, Uint32(byte), loc=loc, ip=ip)


@dsl_user_op
def _zero_if_zero(word: Uint32, s: Float32, *, loc=None, ip=None) -> Uint32:
    ptx = "{ .reg .pred p; setp.eq.f32 p, $2, 0f00000000; selp.b32 $0, 0, $1, p; }"
    return _ptx(ptx, Uint32, Uint32(word), Float32(s), loc=loc, ip=ip)


@dsl_user_op
def _st_global_b32xn(ptr: cute.Pointer, words, *, loc=None, ip=None) -> None:
    """Store 2 or 4 u32 words at a 8- / 16-byte aligned global address as one vector store
    (st.global.v2 / v4.b32; autovec_copy emits scalar b32 stores here)."""
    n = len(words)
    regs = ", ".join(f"${j + 1}" for j in range(n))
    llvm.inline_asm(
        None,
        [ptr.toint(loc=loc, ip=ip).ir_value(loc=loc, ip=ip)]
        + [Uint32(w).ir_value(loc=loc, ip=ip) for w in words],
        f"st.global.v{n}.b32 [$0], {{{regs}}};",
        "l" + ",r" * n + ",~{memory}",
        has_side_effects=True,
        is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc,
        ip=ip,
    )


# max |x| <= 2^90 over the block (NaN and Inf fail) and gs in [2^-30, 2^30]: every quotient
# and residual of the corrected divisions that can change a code or a scale is a normal fp32
# number. Smaller |x| (zeros, subnormals) may make x_n and q off by an ulp there, but such a q
# is far below the first E2M1 midpoint (code magnitude 0 either way), the block amax comes
# from x itself, and code signs are taken from x, so the bits are unchanged.
_FAST_RANGE_PTX = (
    "{ .reg .pred p; setp.le.f32 p, $1, 0f6C800000; "
    "setp.ge.and.f32 p, $2, 0f30800000, p; setp.le.and.f32 p, $2, 0f4E800000, p; "
    "selp.u32 $0, 1, 0, p; }"
)
_RCP_6 = 0.16666667163372040  # RN(1 / 6) in fp32 (0x3E2AAAAB)


@dsl_user_op
def _fast_range(amax: Float32, gs: Float32, *, loc=None, ip=None) -> Uint32:
    return _ptx(_FAST_RANGE_PTX, Uint32, Float32(amax), Float32(gs), loc=loc, ip=ip)


@dsl_user_op
def _rcp_refined(b: Float32, *, loc=None, ip=None) -> Float32:
    """1 / b as CUDA's div.rn computes it before its quotient: rcp.approx, one Newton step."""
    ptx = (
        "{ .reg .f32 r, e, n; rcp.approx.ftz.f32 r, $1; neg.f32 n, $1; "
        "fma.rn.f32 e, n, r, 0f3F800000; fma.rn.f32 $0, r, e, r; }"
    )
    return _ptx(ptx, Float32, Float32(b), loc=loc, ip=ip)


# a / b as q0 = a * r, e = a - b * q0, q = q0 + r * e ($1 = a, $2 = r, $3 = -b): _div_corrected
_DIV_CORRECTED_PTX = (
    "{ .reg .f32 q, e; mul.rn.f32 q, $1, $2; fma.rn.f32 e, $3, q, $1; fma.rn.f32 $0, $2, e, q; }"
)


@dsl_user_op
def _div_corrected(a: Float32, r: Float32, neg_b: Float32, *, loc=None, ip=None) -> Float32:
    """a / b as q0 = a * r, e = a - b * q0 (exact, fma), q = q0 + r * e, r from _rcp_refined
    (or RN(1 / b)): CUDA's own div.rn fast path (the same five instructions in its SASS) minus
    its range check (FCHK), which the caller does per block (_fast_range); in that range the
    result is RN(a / b), bit for bit."""
    return _ptx(_DIV_CORRECTED_PTX, Float32, Float32(a), Float32(r), Float32(neg_b), loc=loc, ip=ip)


# E2M1 of one clamped value c = max(min(q, 6), -6) in register c, result nibble in k; see
# bitmodel.py for why each step is exact.
_E2M1_SW_STEPS = (
    "abs.f32 d, c; max.f32 e, d, 0f3F800000; and.b32 k, e, 0x7F800000; "
    "add.s32 k, k, -872415232; fma.rn.f32 f, d, 0f00800000, k; sub.rn.f32 f, f, k; "
    "shr.u32 k, f, 22; shr.u32 s, c, 28; and.b32 s, s, 8; or.b32 k, k, s; "
)


# The same for a finite value in register c (no NaN, any magnitude): min(|c|, 6) saturates;
# the sign comes from register x (the block's input value, whose sign q has even where q's
# own sign was lost: -0 through the corrected divisions)
# (its magnitude part alone, c -> k, is _E2M1_MAG_PTX's body)
_E2M1_FINITE_MAG = (
    "abs.f32 d, c; min.f32 d, d, 0f40C00000; max.f32 e, d, 0f3F800000; and.b32 k, e, 0x7F800000; "
    "add.s32 k, k, -872415232; fma.rn.f32 f, d, 0f00800000, k; sub.rn.f32 f, f, k; "
    "shr.u32 k, f, 22; "
)
_E2M1_FINITE_STEPS = _E2M1_FINITE_MAG + "shr.u32 s, x, 28; and.b32 s, s, 8; or.b32 k, k, s; "


@dsl_user_op
def _e2m1x2_finite(
    lo: Float32,
    hi: Float32,
    sign_lo: Float32,
    sign_hi: Float32,
    hardware: bool,
    *,
    loc=None,
    ip=None,
) -> Uint32:
    """_e2m1x2 for a block on the fast path (no NaN): no NaN clamp (the hardware cvt
    saturates, the software steps take min(|c|, 6)); signs from sign_lo / sign_hi."""
    args = (Float32(lo), Float32(hi), Float32(sign_lo), Float32(sign_hi))
    return _ptx(e2m1x2_finite_ptx(hardware), Uint32, *args, loc=loc, ip=ip)


def e2m1x2_finite_ptx(hardware: bool) -> str:
    """_e2m1x2_finite's PTX: $0 the code byte of ($1, $2), signs from ($3, $4)."""
    if hardware:  # copysign (lop3 0xD8: (a & ~m) | (b & m)), then the cvt
        return (
            "{ .reg .b32 c, g; .reg .b8 b; lop3.b32 c, $1, $3, 0x80000000, 0xD8; "
            "lop3.b32 g, $2, $4, 0x80000000, 0xD8; "
            "cvt.rn.satfinite.e2m1x2.f32 b, g, c; cvt.u32.u8 $0, b; }"
        )
    return (
        "{ .reg .b32 c, x, d, e, f, k, s, t; mov.b32 c, $1; mov.b32 x, $3; "
        + _E2M1_FINITE_STEPS
        + "mov.b32 t, k; mov.b32 c, $2; mov.b32 x, $4; "
        + _E2M1_FINITE_STEPS
        + "shl.b32 k, k, 4; or.b32 $0, t, k; }"
    )


# E2M1 codes of 8 in-range values v_j = $2..$9 (one code word, v_0 in the low nibble) from
# q_j = v_j * R, R ~ 1 / (gs s), with the bracket's check ($10 = RN(R / 6));
# bitmodel.bracket_codes models it step by step. Per value: a = 6 sat(|v_j| * $10) (that is
# min(|q|, 6), on the FMA pipe: mul.sat clamps to [0, 1]); 2^e = the power of two of max(a, 1)
# (e = 0, 1, 2: the E2M1 binade, quantum 2^(e-1)); k = bits(2^e) + 2e (exponent field by
# mul.hi, then one mad); l/h = fma(a, 2^-22 (1 -+ 2^-19), k). k's ulp is 2^(e-23), so the fma
# rounds a (1 -+ 2^-19) to the E2M1 grid exactly (ties to even) and adds N = a (1 -+ 2^-19) /
# 2^(e-1), rounded, to k: the low byte of bits(l) is N + 2e, the code. Pairs: p = l_2i +
# (l_2i+1 << 4) (low byte = the pair's codes); three prmts gather the 4 low bytes into the word
# of the low ends, the same for the high ends; $1 = their difference: nibble j is 1 where value
# j's two ends round apart (a quotient near a midpoint: the caller decides it by dividing), 0
# elsewhere. The signs are the inputs' (prmt's sign-replicate mode turns bit 31 of v_j into a
# 0x00 / 0xFF byte: even j into E, odd into O), merged into $0 by two lop3s (bit 3 of each
# nibble).
_BRACKET_LO, _BRACKET_HI = "0f347FFFE0", "0f34800010"  # 2^-22 (1 - 2^-19), 2^-22 (1 + 2^-19)


def _bracket_ptx() -> str:
    lines = [
        "{ .reg .b32 q, a, m, k, t, u, w, x, e, o, g;",
        ".reg .b32 l<8>, h<8>, p<4>;",
    ]
    for j in range(8):
        lines.append(
            f"abs.f32 q, ${2 + j}; mul.rn.sat.f32 q, q, $10; mul.rn.f32 a, q, 0f40C00000; "
            f"max.f32 m, a, 0f3F800000; mul.hi.u32 k, m, 512; mad.lo.s32 k, k, 8388610, -254; "
            f"fma.rn.f32 l{j}, a, {_BRACKET_LO}, k; fma.rn.f32 h{j}, a, {_BRACKET_HI}, k;"
        )
    for ends, word in (("l", "w"), ("h", "x")):
        for i in range(4):
            lines.append(f"shl.b32 t, {ends}{2 * i + 1}, 4; add.u32 p{i}, {ends}{2 * i}, t;")
        lines.append(
            f"prmt.b32 t, p0, p1, 0x0040; prmt.b32 u, p2, p3, 0x0040; "
            f"prmt.b32 {word}, t, u, 0x5410;"
        )
    lines += [
        "sub.u32 $1, x, w;",
        "prmt.b32 t, $2, $4, 0x00FB; prmt.b32 u, $6, $8, 0xFB00; prmt.b32 e, t, u, 0x7610;",
        "prmt.b32 t, $3, $5, 0x00FB; prmt.b32 u, $7, $9, 0xFB00; prmt.b32 o, t, u, 0x7610;",
        "lop3.b32 g, e, o, 0x0F0F0F0F, 0xE4; lop3.b32 $0, w, g, 0x88888888, 0xF8; }",
    ]
    return " ".join(lines)


_BRACKET_PTX = _bracket_ptx()


@dsl_user_op
def _bracket_word(vals, rcp: Float32, *, loc=None, ip=None):
    """(code word of the low ends, difference word) of 8 in-range values: see _BRACKET_PTX."""
    args = [Float32(v) for v in vals] + [Float32(rcp)]
    res = _asm(
        llvm.StructType.get_literal([T.i32(), T.i32()]),
        _BRACKET_PTX,
        "=r,=r," + ",".join("f" * 9),
        args,
        loc,
        ip,
    )
    word = Uint32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip))
    return word, Uint32(llvm.extractvalue(T.i32(), res, [1], loc=loc, ip=ip))


# the E2M1 magnitude code (0..7) of a finite value in $1: _E2M1_FINITE_STEPS without the sign
_E2M1_MAG_PTX = "{ .reg .b32 c, d, e, f, k; mov.b32 c, $1; " + _E2M1_FINITE_MAG + "mov.b32 $0, k; }"


@dsl_user_op
def _e2m1_mag(q: Float32, *, loc=None, ip=None) -> Uint32:
    return _ptx(_E2M1_MAG_PTX, Uint32, Float32(q), loc=loc, ip=ip)


def _quotient(v: Float32, gsv: Float32, r_gs: Float32, s: Float32, r_s: Float32) -> Float32:
    """q = RN(RN(v / gs) / s) by the corrected divisions (an in-range block's value)."""
    return _div_corrected(_div_corrected(v, r_gs, -gsv), r_s, -s)


@dsl_user_op
def _mul(a: Float32, b: Float32, *, loc=None, ip=None) -> Float32:
    return _ptx("mul.rn.f32 $0, $1, $2;", Float32, Float32(a), Float32(b), loc=loc, ip=ip)


@dsl_user_op
def _e2m1x2(lo: Float32, hi: Float32, hardware: bool, *, loc=None, ip=None) -> Uint32:
    """Two fp32 values -> one byte of E2M1 codes (lo in the low nibble), in a u32."""
    return _ptx(e2m1x2_ptx(hardware), Uint32, Float32(lo), Float32(hi), loc=loc, ip=ip)


def e2m1x2_ptx(hardware: bool) -> str:
    """_e2m1x2's PTX: $0 the code byte of ($1, $2), NaN -> +6 (min / max first)."""
    clamp = (
        "min.f32 c, $1, 0f40C00000; max.f32 c, c, 0fC0C00000; "
        "min.f32 g, $2, 0f40C00000; max.f32 g, g, 0fC0C00000; "
    )
    if hardware:  # sm_100+: cvt packs its FIRST source into the HIGH nibble
        return (
            "{ .reg .f32 c, g; .reg .b8 b; "
            + clamp
            + "cvt.rn.satfinite.e2m1x2.f32 b, g, c; cvt.u32.u8 $0, b; }"
        )
    return (
        "{ .reg .b32 c, g, d, e, f, k, s, t; "
        + clamp
        + _E2M1_SW_STEPS
        + "mov.b32 t, k; mov.b32 c, g; "
        + _E2M1_SW_STEPS
        + "shl.b32 k, k, 4; or.b32 $0, t, k; }"
    )


# --------------------------------------------------------------------------------------------
# the kernel


class Nvfp4QuantKernel:
    """Quantize (optionally SwiGLU first) [T, G, K_in] -> codes [G, T, K/2], scales, one launch."""

    def __init__(self, cfg: QuantConfig, arch: str) -> None:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch=}")
        self.cfg = cfg
        self.arch = arch
        self.hardware_e2m1 = int(arch.removeprefix("sm_").rstrip("af")) >= 100
        self.in_type = _DTYPES[cfg.in_dtype]

    @cute.jit
    def __call__(
        self,
        x_ptr: cute.Pointer,
        gs_ptr: cute.Pointer,
        codes_ptr: cute.Pointer,
        sf_ptr: cute.Pointer,
        w_ptr: cute.Pointer,
        idx_ptr: cute.Pointer,
        off_ptr: cute.Pointer,
        st_ptr: cute.Pointer,
        rows: Int32,
        x_row_stride16: Int32,
        x_group_stride16: Int32,
        stream,
    ):
        cfg = self.cfg
        g_n = cfg.groups
        # strides in units of 16 elements: every block starts 32-byte (bf16) aligned
        x = cute.make_tensor(
            x_ptr,
            cute.make_layout(
                (rows, g_n, cfg.in_width),
                stride=(
                    cute.assume(x_row_stride16 * BLOCK, divby=BLOCK),
                    cute.assume(x_group_stride16 * BLOCK, divby=BLOCK),
                    1,
                ),
            ),
        )
        codes = cute.make_tensor(
            codes_ptr,
            cute.make_layout((g_n, rows, cfg.k // 8), stride=(rows * (cfg.k // 8), cfg.k // 8, 1)),
        )
        gs = cute.make_tensor(gs_ptr, cute.make_layout(g_n))
        w = cute.make_tensor(w_ptr, cute.make_layout(rows))
        idx = cute.make_tensor(idx_ptr, cute.make_layout(rows))
        n_e = max(cfg.experts, 1)
        ends = cute.make_tensor(off_ptr, cute.make_layout(n_e))
        starts = cute.make_tensor(st_ptr, cute.make_layout(n_e))
        if cutlass.const_expr(cfg.experts > 0):  # layouts.max_padded_rows(rows, E)
            pad = (ATOM_ROWS - 1) * cutlass.min(rows, Int32(cfg.experts))
            srows = (rows + pad) // ATOM_ROWS * ATOM_ROWS
        elif cutlass.const_expr(cfg.scale_layout is ScaleLayout.SWIZZLED):
            srows = (rows + (ATOM_ROWS - 1)) // ATOM_ROWS * ATOM_ROWS
        else:
            srows = rows
        bpt = cfg.blocks_per_thread
        # one scale word of bpt bytes per thread (sf_ptr's element type is that word)
        sf = cute.make_tensor(sf_ptr, cute.make_layout(g_n * srows * cfg.padded_cols // bpt))
        n_threads = srows * (cfg.padded_cols // bpt)
        self.kernel(x, gs, codes, sf, w, idx, ends, starts, rows, srows).launch(
            grid=[(n_threads + (cfg.threads - 1)) // cfg.threads, g_n, 1],
            block=[cfg.threads, 1, 1],
            stream=stream,
        )

    @cute.kernel
    def kernel(
        self,
        x: cute.Tensor,
        gs: cute.Tensor,
        codes: cute.Tensor,
        sf: cute.Tensor,
        w: cute.Tensor,
        idx: cute.Tensor,
        ends: cute.Tensor,
        starts: cute.Tensor,
        rows: Int32,
        srows: Int32,
    ):
        cfg = self.cfg
        bpt = cfg.blocks_per_thread
        cpt = cfg.padded_cols // bpt  # threads per scale row
        tidx, _, _ = cute.arch.thread_idx()
        bidx, g, _ = cute.arch.block_idx()
        i = Uint32(bidx * cfg.threads + tidx)  # unsigned: no sign fix-ups in the index math
        ct = Int32(i % cpt)
        r = Int32(i // cpt)
        c0 = ct * bpt  # first block; bpt divides cols, so all bpt blocks are in or all out
        if r < srows:
            sf_off = self._scale_offset(g * srows + r, c0)
            d, has_row = r, r < rows  # the data row of scale row r, and whether it has one
            if cutlass.const_expr(cfg.experts > 0):
                d, has_row = self._expert_row(ends, starts, r)
            word = Uint32(0)  # the bpt scale bytes, block b in byte b (0: padding)
            if has_row & (c0 < cfg.cols):
                vs = [self._load_block(x, d, g, c0 + b, w, idx) for b in range(bpt)]  # loads first
                gsv = gs[g]
                words = []
                for b in cutlass.range_constexpr(bpt):
                    byte, w0, w1 = self._block(*vs[b], gsv)
                    word = word | (byte << (8 * b))
                    words += [w0, w1]
                dst = cute.zipped_divide(codes[g, d, None], (2 * bpt,))[(None, ct)]
                for j in cutlass.range_constexpr(0, 2 * bpt, 4):  # 8 or 16 bytes a store
                    _st_global_b32xn(dst.iterator + j, words[j : j + 4])
            sf[sf_off // bpt] = {1: Uint8, 2: Uint16, 4: Uint32}[bpt](word)

    @cute.jit
    def _block(self, v, words, gsv: Float32):
        """(scale byte, code word 0, code word 1) of one block's 16 values (`words`: their
        8 raw 16-bit pairs, or None)."""
        cfg = self.cfg
        byte, w0, w1 = Uint32(0), Uint32(0), Uint32(0)
        if cutlass.const_expr(cfg.fast_division):
            amax_x = Float32(0.0)
            if cutlass.const_expr(words is not None):  # max |x| of the 16-bit pairs (exact)
                amax_x = _amax_pairs(words, cfg.in_dtype)
            else:
                for j in cutlass.range_constexpr(BLOCK):
                    amax_x = _max_abs_nan(amax_x, v[j])
            if _fast_range(amax_x, gsv) != Uint32(0):
                # in range: finite x_n, s normal or 0 (codes zeroed)
                r_gs = _rcp_refined(gsv)
                # max_j RN(|x_j| / gs) = RN(max_j |x_j| / gs): RN is monotone
                amax_n = _div_corrected(amax_x, r_gs, -gsv)
                byte = _e4m3_byte(_div_corrected(amax_n, Float32(_RCP_6), Float32(-6.0)))
                s = _e4m3_value(byte)
                if cutlass.const_expr(cfg.bracketed_codes and not self.hardware_e2m1):
                    # s == 0: rcp NaN, every a 0 (sat flushes NaN); the codes are zeroed below
                    rcp = _mul(_rcp_refined(_mul(gsv, s)), Float32(_RCP_6))  # 1 / (6 gs s)
                    w0 = self._bracketed_word(v[0:8], gsv, r_gs, s, rcp)
                    w1 = self._bracketed_word(v[8:16], gsv, r_gs, s, rcp)
                else:
                    r_s = _rcp_refined(s)
                    w0 = self._word_divided(v[0:8], gsv, r_gs, s, r_s)
                    w1 = self._word_divided(v[8:16], gsv, r_gs, s, r_s)
                w0, w1 = _zero_if_zero(w0, s), _zero_if_zero(w1, s)
            else:
                byte, w0, w1 = self._exact(v, gsv)
        else:
            byte, w0, w1 = self._exact(v, gsv)
        return byte, w0, w1

    @cute.jit
    def _bracketed_word(self, v, gsv: Float32, r_gs: Float32, s: Float32, rcp: Float32):
        """The code word of 8 in-range values by the bracket; a value whose bracket ends
        round apart gets its code from the corrected divisions (a warp-uniform branch per
        value, taken where any lane needs it)."""
        word, diff = _bracket_word(v, rcp)
        if diff != Uint32(0):
            r_s = _rcp_refined(s)
            for j in cutlass.range_constexpr(8):
                if (diff >> (4 * j)) & Uint32(1) != Uint32(0):
                    q = _quotient(v[j], gsv, r_gs, s, r_s)
                    word = (word & Uint32(~(7 << (4 * j)) & 0xFFFFFFFF)) | (_e2m1_mag(q) << (4 * j))
        return word

    @cute.jit
    def _word_divided(self, v, gsv: Float32, r_gs: Float32, s: Float32, r_s: Float32) -> Uint32:
        """The code word of 8 in-range values by the corrected divisions (x / gs, then / s;
        r_gs, r_s their refined reciprocals); code signs from the inputs (a -0 quotient keeps its
        0x8)."""
        return self._word([_quotient(v[j], gsv, r_gs, s, r_s) for j in range(8)], v)

    @cute.jit
    def _word(self, q, signs) -> Uint32:
        """8 quotients -> one code word (q[0] in the low nibble). signs=None: the div.rn path
        (NaN possible); else the values are finite and signs[j] carries code j's sign."""
        acc = Uint32(0)
        for j in cutlass.range_constexpr(4):
            e = 2 * j
            if cutlass.const_expr(signs is None):
                pair = _e2m1x2(q[e], q[e + 1], self.hardware_e2m1)
            else:
                pair = _e2m1x2_finite(q[e], q[e + 1], signs[e], signs[e + 1], self.hardware_e2m1)
            acc = acc | (pair << (8 * j))
        return acc

    @cute.jit
    def _exact(self, v, gsv: Float32):
        """Any block (NaN, Inf, zeros, subnormals): div.rn everywhere, NaN-propagating amax."""
        xn = [v[j] / gsv for j in range(BLOCK)]  # x / gs: divide, as the reference
        amax = Float32(0.0)
        for j in cutlass.range_constexpr(BLOCK):
            amax = _max_abs_nan(amax, xn[j])
        byte = _e4m3_byte(amax / Float32(6.0))
        s = _e4m3_value(byte)
        q = [xn[j] / s for j in range(BLOCK)]
        # all-zero block: codes 0, not x / 0
        return (
            byte,
            _zero_if_zero(self._word(q[0:8], None), s),
            _zero_if_zero(self._word(q[8:16], None), s),
        )

    @cute.jit
    def _expert_row(self, ends: cute.Tensor, starts: cute.Tensor, r: Int32):
        """(data row, whether scale row r holds one) with cfg.experts: e = the last expert whose
        padded start is <= r (a binary search: the starts are non-decreasing, an empty expert
        shares its successor's start, and starts[0] = 0), its row r - starts[e] from its first
        data row ends[e - 1] (0 for e = 0), a padding row past its ends[e]."""
        n_e = self.cfg.experts
        lo, hi = Int32(0), Int32(n_e - 1)  # the answer lies in [lo, hi]
        for _ in cutlass.range_constexpr((n_e - 1).bit_length()):
            mid = (lo + hi + 1) >> 1
            take = starts[mid] <= r
            lo = cutlass.select_(take, mid, lo)
            hi = cutlass.select_(take, hi, mid - 1)
        first = cutlass.select_(lo > 0, ends[cutlass.max(lo - 1, Int32(0))], Int32(0))
        d = first + (r - starts[lo])
        return d, d < ends[lo]

    @cute.jit
    def _scale_offset(self, row: Int32, c: Int32) -> Int32:
        cfg = self.cfg
        if cutlass.const_expr(cfg.scale_layout is ScaleLayout.LINEAR):
            return row * cfg.cols + c
        n_cb = cfg.padded_cols // ATOM_COLS
        u, k = Uint32(row), Uint32(c)  # both >= 0: the atom arithmetic as shifts and masks
        return Int32(
            (((u >> 7) * n_cb + (k >> 2)) << 9) | ((u & 31) << 4) | (((u >> 5) & 3) << 2) | (k & 3)
        )

    @cute.jit
    def _load_block(
        self, x: cute.Tensor, r: Int32, g: Int32, c: Int32, w: cute.Tensor, idx: cute.Tensor
    ):
        """The 16 fp32 values the block quantizes (the input, or its SwiGLU), and the 8 raw
        pairs they came from (16-bit inputs without a prologue; else None)."""
        cfg = self.cfg
        src = idx[r] if cfg.gather else r  # a Python bool: decided at trace time
        row = x[src, g, None]
        if cutlass.const_expr(cfg.prologue is Prologue.NONE):
            raw = cute.zipped_divide(row, (BLOCK,))[(None, c)].load()
            v = raw.to(Float32)
            words = None
            if cutlass.const_expr(cfg.in_dtype != "float32"):
                pairs = raw.bitcast(Uint32)
                words = [pairs[j] for j in range(BLOCK // 2)]
            return [v[j] for j in range(BLOCK)], words
        first = cute.zipped_divide(row, (BLOCK,))[(None, c)].load().to(Float32)
        second = cute.zipped_divide(row, (BLOCK,))[(None, c + cfg.cols)].load().to(Float32)
        gate, up = (first, second) if cfg.gate_first else (second, first)
        out = []
        for j in cutlass.range_constexpr(BLOCK):
            gj, uj = gate[j], up[j]
            if cutlass.const_expr(cfg.swiglu_limit is not None):
                lim = Float32(cfg.swiglu_limit)
                gj = _min_nan(gj, lim)  # torch.clamp keeps NaN
                uj = _min_nan(_max_nan(uj, -lim), lim)
            # silu as torch's CUDA kernel: x / (1 + exp(-x)), then * up (then * weight)
            h = gj / (Float32(1.0) + cute.math.exp(-gj)) * uj
            if cutlass.const_expr(cfg.row_weight):
                h = h * w[r]
            out.append(h)
        return out, None


# --------------------------------------------------------------------------------------------
# compile (cached) and the fake-tensor compile used by CI


def _ptr_types(cfg: QuantConfig):
    bpt = cfg.blocks_per_thread
    return (
        (_DTYPES[cfg.in_dtype], 32),
        (Float32, 4),
        (Uint32, cfg.codes_align),
        ({1: Uint8, 2: Uint16, 4: Uint32}[bpt], bpt),
        (Float32, 4),
        (Int32, 4),
        (Int32, 4),
        (Int32, 4),
    )


def _fake_args(cfg: QuantConfig):
    from cutlass.cute.runtime import make_ptr
    from cutlass.runtime import make_fake_stream

    ptrs = [make_ptr(t, 0, cute.AddressSpace.gmem, assumed_align=a) for t, a in _ptr_types(cfg)]
    return (*ptrs, Int32(1), Int32(1), Int32(1), make_fake_stream())


@functools.cache
def compile_quant(cfg: QuantConfig, arch: str, extra_options: str = ""):
    """Compile the kernel for `arch` ("sm_90a" / "sm_100a"); cached by (cfg, arch, options).

    Needs no GPU. A failed compile raises naming the configuration and the arch.
    """
    from dsv4.kernels.cutedsl.ptx_check import compile_named

    return compile_named(
        Nvfp4QuantKernel(cfg, arch), _fake_args(cfg), arch, extra_options,
        f"CuTeDSL quantize kernel ({cfg})",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# runner: validates metadata, writes caller-owned outputs, launches on the current stream


def arch_of(device) -> str:
    """The compile arch of a CUDA device: sm_100a for 10.x (and newer), sm_90a for 9.x."""
    import torch

    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        raise ValueError(f"the CuTeDSL quantize kernels need sm_90 or newer, got sm_{major}x")
    return "sm_100a" if major >= 10 else "sm_90a"


def _meta(t) -> str:
    """dtype / shape / strides of a tensor (never its values)."""
    if t is None:
        return "None"
    return f"dtype={t.dtype} shape={tuple(t.shape)} stride={t.stride()}"


def run_quant(
    cfg: QuantConfig, x, gs, codes, scales, row_weight=None, index=None, experts=None
) -> None:
    """Quantize x into codes / scales (all on one CUDA device, caller-owned).

    x: [T_in, K_in] (groups == 1) or [T_in, G, K_in], last dim contiguous, row / group strides
    multiples of 16 elements, 32-byte aligned. The output has T rows per group: T = T_in, or
    with cfg.gather T = index.numel() and output row r reads x[index[r]] (int32 [T], values in
    [0, T_in), not checked: that would read them). gs fp32 [G]; codes uint8 [G*T, K/2]
    contiguous; scales uint8 or float8_e4m3fn, contiguous, cfg.scale_bytes(T) bytes (1-D,
    swizzled) or [G*T, K/16] (linear); row_weight fp32 [T] when cfg.row_weight; with
    cfg.experts, experts = (END offsets, padded starts), each contiguous int32 [E] (values not
    checked). Reads no value on the host: CUDA-graph capturable.
    """
    import torch
    from cutlass.cute.runtime import make_ptr

    g_n, k = cfg.groups, cfg.k
    x3 = x.unsqueeze(1) if x.dim() == 2 and g_n == 1 else x
    _need(
        x3.dim() == 3 and tuple(x3.shape[1:]) == (g_n, cfg.in_width),
        lambda: (
            f"x must be [T, {cfg.in_width}]"
            + (f" or [T, {g_n}, {cfg.in_width}]" if g_n > 1 else "")
            + f" for {cfg}, got x.shape={tuple(x.shape)}"
        ),
    )
    _need(
        x.dtype == getattr(torch, cfg.in_dtype),
        lambda: f"x must be {cfg.in_dtype}, got x.dtype={x.dtype}",
    )
    if cfg.gather:
        _need(
            index is not None
            and index.dtype == torch.int32
            and index.dim() == 1
            and index.is_contiguous(),
            lambda: f"index must be a contiguous int32 [T] for {cfg}, got {_meta(index)}",
        )
        t = index.shape[0]
    else:
        _need(index is None, lambda: f"index is only taken with gather=True, got one for {cfg}")
        t = x3.shape[0]
    s_row, s_grp, s_k = x3.stride()
    _need(
        s_k == 1 and s_row % BLOCK == 0 and s_grp % BLOCK == 0 and x.data_ptr() % 32 == 0,
        lambda: (
            f"x needs a contiguous last dim, row/group strides multiple of {BLOCK} and a 32-byte "
            f"aligned start, got x.stride()={x.stride()} x.data_ptr() % 32={x.data_ptr() % 32}"
        ),
    )
    _need(
        gs.dtype == torch.float32 and gs.numel() == g_n and gs.is_contiguous(),
        lambda: f"gs must be contiguous fp32 with {g_n} value(s), got {_meta(gs)}",
    )
    _need(
        codes.dtype == torch.uint8
        and tuple(codes.shape) == (g_n * t, k // 2)
        and codes.is_contiguous()
        and codes.data_ptr() % cfg.codes_align == 0,
        lambda: (
            f"codes must be contiguous uint8 [{g_n * t}, {k // 2}], {cfg.codes_align}-byte "
            f"aligned, got codes.dtype={codes.dtype} codes.shape={tuple(codes.shape)} "
            f"codes.data_ptr() % {cfg.codes_align}={codes.data_ptr() % cfg.codes_align}"
        ),
    )
    _need(
        scales.dtype in (torch.uint8, torch.float8_e4m3fn)
        and scales.is_contiguous()
        and scales.data_ptr() % cfg.blocks_per_thread == 0,
        lambda: (
            f"scales must be contiguous uint8 / float8_e4m3fn, {cfg.blocks_per_thread}-byte "
            f"aligned, got scales.dtype={scales.dtype} "
            f"scales.data_ptr() % {cfg.blocks_per_thread}="
            f"{scales.data_ptr() % cfg.blocks_per_thread}"
        ),
    )
    if cfg.scale_layout is ScaleLayout.LINEAR:
        _need(
            tuple(scales.shape) == (g_n * t, cfg.cols),
            lambda: f"scales must be [{g_n * t}, {cfg.cols}] (linear), got {tuple(scales.shape)}",
        )
    else:
        _need(
            scales.numel() >= cfg.scale_bytes(t),
            lambda: (
                f"scales must hold {cfg.scale_bytes(t)} bytes (swizzled, rows padded to 128), got "
                f"scales.numel()={scales.numel()}"
            ),
        )
    if cfg.experts:
        _need(
            experts is not None
            and len(experts) == 2
            and all(
                v.dtype == torch.int32 and tuple(v.shape) == (cfg.experts,) and v.is_contiguous()
                for v in experts
            ),
            lambda: (
                f"experts must be (END offsets, padded starts), contiguous int32 [{cfg.experts}] "
                f"each, for {cfg}, got "
                + ("None" if experts is None else ", ".join(_meta(v) for v in experts))
            ),
        )
    else:
        _need(experts is None, lambda: f"experts is only taken with cfg.experts, got one for {cfg}")
    if cfg.row_weight:
        _need(
            row_weight is not None
            and row_weight.dtype == torch.float32
            and tuple(row_weight.shape) == (t,)
            and row_weight.is_contiguous(),
            lambda: f"row_weight must be contiguous fp32 [{t}] for {cfg}, got {_meta(row_weight)}",
        )
    tensors = {
        "x": x,
        "gs": gs,
        "codes": codes,
        "scales": scales,
        "row_weight": row_weight,
        "index": index,
        "expert_offsets": None if experts is None else experts[0],
        "scale_starts": None if experts is None else experts[1],
    }
    devs = {n: v.device for n, v in tensors.items() if v is not None}
    _need(
        len(set(devs.values())) == 1 and x.device.type == "cuda",
        lambda: f"all tensors must be on one CUDA device, got {devs}",
    )
    if t == 0:
        return
    _need(
        x3.shape[0] * s_row < 2**31 and codes.numel() < 2**31,
        lambda: f"tensors must hold fewer than 2^31 elements, got x.shape={tuple(x.shape)}",
    )
    kernel = compile_quant(cfg, arch_of(x.device))
    w = row_weight if row_weight is not None else gs  # unused pointers: any valid address
    ix = index if index is not None else gs
    ends, starts = experts if experts is not None else (gs, gs)
    ptrs = [
        make_ptr(ty, v.data_ptr(), cute.AddressSpace.gmem, assumed_align=a)
        for (ty, a), v in zip(
            _ptr_types(cfg), (x, gs, codes, scales, w, ix, ends, starts), strict=True
        )
    ]
    stream = _cu_stream(torch.cuda.current_stream(x.device).cuda_stream)
    kernel(*ptrs, Int32(t), Int32(s_row // BLOCK), Int32(s_grp // BLOCK), stream)


def _cu_stream(handle: int):
    from cuda.bindings import driver

    return driver.CUstream(handle)


# --------------------------------------------------------------------------------------------
# thin public functions (allocate the outputs)


def quantize(x, gs, scale_layout: ScaleLayout = ScaleLayout.SWIZZLED, index=None):
    """x [T, K] (or [T, G, K] with gs [G]) -> (codes uint8 [G*T, K/2], scales e4m3); with an
    int32 `index` [R] the output rows are x[index] (gathered, R rows)."""
    import torch

    t = x.shape[0] if index is None else index.shape[0]
    cfg = tuned(
        QuantConfig(
            x.shape[-1],
            str(x.dtype).removeprefix("torch."),
            scale_layout,
            x.shape[1] if x.dim() == 3 else 1,
            gather=index is not None,
        ),
        rows=t,
    )
    return _alloc_and_run(cfg, x, gs.reshape(-1), t, torch, index=index)


def swiglu_quantize(
    l1_out,
    gs,
    limit: float | None = 10.0,
    row_weight=None,
    scale_layout: ScaleLayout = ScaleLayout.SWIZZLED,
    gate_first: bool = True,
):
    """SwiGLU (DeepSeek V4 clamp) of l1_out [T, 2I] (times row_weight [T]), requantized."""
    import torch

    cfg = tuned(
        QuantConfig(
            l1_out.shape[-1] // 2,
            str(l1_out.dtype).removeprefix("torch."),
            scale_layout,
            1,
            Prologue.SWIGLU,
            limit,
            gate_first,
            row_weight is not None,
        )
    )
    return _alloc_and_run(cfg, l1_out, gs.reshape(-1), l1_out.shape[0], torch, row_weight)


def _alloc_and_run(cfg: QuantConfig, x, gs, t: int, torch, row_weight=None, index=None):
    codes = torch.empty((cfg.groups * t, cfg.k // 2), dtype=torch.uint8, device=x.device)
    if cfg.scale_layout is ScaleLayout.LINEAR:
        shape = (cfg.groups * t, cfg.cols)
    else:
        shape = (cfg.scale_bytes(t),)
    scales = torch.empty(shape, dtype=torch.float8_e4m3fn, device=x.device)
    run_quant(cfg, x, gs, codes, scales, row_weight, index)
    return codes, scales
