"""Comparison metrics: small pure functions from tensors to JSON-ready Python values.

Every function takes tensors and returns floats, ints, bools, lists and dicts only, so a runner can
write the result straight into a JSONL record (docs/design.md §5). No I/O, no pytest, no printing.
Float64 is used wherever a sum is taken. Non-finite values are never silently averaged: the panels
compute their statistics on the elements where both sides are finite and count the rest apart.
A statistic over zero finite pairs is float('nan') ("undefined"), an exact match gives
float('inf') SQNR; `json.dumps` writes these as NaN / Infinity.

Discrete stages are compared exactly (`bitwise_equal`), and quantizer mismatches are sorted into
legitimate classes (ties, signed zeros, underflow, scale ties) versus real errors by
`classify_quantize_mismatches`, which uses `reference.nvfp4` for the format itself.
Coordinates are lists of ints in the C order of the tensor's logical shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from reference.nvfp4 import (
    BLOCK,
    E2M1_MIDPOINTS,
    E4M3_MAX,
    NanPolicy,
    decode_e2m1,
    encode_e2m1,
    unpack_e2m1,
)

# max_rel divides by max(|ref|, REL_FLOOR_FRAC * max|ref|): elements below 0.1% of the tensor's
# amax are measured against that floor, so a ref of 0 next to an error of 1e-7 does not read 1e+30.
REL_FLOOR_FRAC = 1e-3

# Tie tolerance of the quantize classifier, relative to the rounding midpoint: 4 fp32 ulps
# (2^-23 each). A reciprocal instead of a division, x * (1/gs) instead of x / gs, or an fp64
# evaluation each move the unrounded value by at most ~1 ulp; 4 leaves room for their sum.
TIE_REL_TOL = 4.0 * 2.0**-23

# Smallest positive e4m3 value (subnormal): a block scale amax/6 below it rounds to 0 or to it.
E4M3_MIN_SUBNORMAL = 2.0**-9

# periodic_error_structure: a period is suspect when the error share at one residue is at least
# SUSPECT_RATIO times the uniform share (by magnitude and by count of "hits", elements above
# HIT_FACTOR x the median error), judged only with at least MIN_HITS_PER_RESIDUE * period hits:
# 4 per residue keeps the chance that uniform random hits reach 4x the mean at one residue below
# ~1e-5 per residue. Among suspect periods the smallest whose concentration is within
# PERIOD_TIE_FRAC of the best wins: a period-16 defect concentrates equally at 32 and 128.
SUSPECT_RATIO = 4.0
HIT_FACTOR = 4.0
MIN_HITS_PER_RESIDUE = 4
PERIOD_TIE_FRAC = 0.75

CODE_CLASSES = (
    "exact",
    "tie_flip",
    "signed_zero",
    "underflow_block",
    "scale_consequence",
    "nan_input",
    "real",
)
SCALE_CLASSES = (
    "exact",
    "signed_zero",
    "underflow_block",
    "scale_tie_flip",
    "scale_floor",
    "nan_scale_byte",
    "real",
)
# Classes that are a quantizer's POLICY, not an error and not a rounding accident: legitimate only
# where the adapter declares them (harness.adapters.QuantPolicy has the same names).
POLICY_CLASSES = ("scale_floor", "nan_scale_byte", "nan_amax")


# --------------------------------------------------------------------------------------------
# helpers


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"shapes differ: {name_a}.shape={tuple(a.shape)} {name_b}.shape={tuple(b.shape)}"
        )


def _coord(flat: int, shape: Sequence[int]) -> list[int]:
    """Flat C-order index -> coordinate list (empty list for a 0-dim tensor)."""
    out = []
    for size in reversed(tuple(shape)):
        out.append(flat % size)
        flat //= size
    return out[::-1]


def _first_true(mask: torch.Tensor) -> list[int] | None:
    """Coordinate of the first True of `mask` in C order, or None."""
    flat = mask.reshape(-1)
    if flat.numel() == 0 or not bool(flat.any()):
        return None
    return _coord(int(torch.argmax(flat.to(torch.uint8))), mask.shape)  # argmax: first maximum


def _value(t: torch.Tensor, coord: list[int] | None) -> float | int | None:
    """The element of `t` at `coord` as a Python number (float8/bf16 decoded), or None."""
    if coord is None:
        return None
    v = t[tuple(coord)] if coord else t.reshape(())
    return float(v.double()) if v.is_floating_point() else int(v)


def _first_values(
    ref: torch.Tensor, out: torch.Tensor, coord: list[int] | None, bound: torch.Tensor | None
) -> dict:
    """first_ref / first_out (/ first_bound) at the first bad element (none where all is good):
    the report shows them beside the coordinate, so a failure reads without rerunning."""
    if coord is None:
        return {}
    vals = {"first_ref": _value(ref, coord), "first_out": _value(out, coord)}
    if bound is not None:
        vals["first_bound"] = _value(bound, coord)
    return vals


# bf16 keeps 8 significant bits: one ulp at |x| in [2^e, 2^(e+1)) is 2^(e-7); its smallest
# (subnormal) ulp is 2^-133.
BF16_MANTISSA_BITS = 7
BF16_MIN_ULP_EXP = -133


def ulps_bf16(err: torch.Tensor, ref: torch.Tensor, floor: float) -> torch.Tensor:
    """|err| in bf16 ulps of the reference value, each |ref| raised to `floor` first (the same
    floor as max_rel: an element near 0 is measured against the tensor's scale, not its own)."""
    mag = ref.abs().clamp_min(floor) if floor > 0 else ref.abs()
    _, exp = torch.frexp(mag)  # mag = m * 2^exp, m in [0.5, 1): floor(log2 mag) = exp - 1
    ulp_exp = (exp - 1 - BF16_MANTISSA_BITS).clamp_min(BF16_MIN_ULP_EXP)
    return err / torch.ldexp(torch.ones_like(err), ulp_exp.to(err.dtype))


def _signed_stats(rz: torch.Tensor, oz: torch.Tensor, fin: torch.Tensor) -> dict:
    """mean_err (signed: a bias shows, where mean |err| cannot tell it from noise) and
    max_ulps_bf16 over the finite pairs (NaN where there are none)."""
    n = int(fin.sum())
    if not n:
        return {"mean_err": math.nan, "max_ulps_bf16": math.nan}
    d = torch.where(fin, oz - rz, torch.zeros_like(rz))
    floor = REL_FLOOR_FRAC * _f(rz.abs().max())
    return {
        "mean_err": _f(d.sum() / n),
        "max_ulps_bf16": _f(ulps_bf16(d.abs(), rz, floor).max()),
    }


def _f(t: torch.Tensor | float) -> float:
    return float(t)


def _cosine(dot: torch.Tensor, rr: torch.Tensor, oo: torch.Tensor) -> torch.Tensor:
    """Cosine from sums; 1 where both sides are all zero, 0 where exactly one is."""
    denom = torch.sqrt(rr * oo)
    cos = dot / torch.where(denom > 0, denom, torch.ones_like(denom))
    both_zero = (rr == 0) & (oo == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def _token_rows(t: torch.Tensor, token_dim: int) -> torch.Tensor:
    """[T, rest]: rows along token_dim, other dims flattened (a 0-dim tensor is one token)."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.movedim(token_dim, 0).reshape(t.shape[token_dim], -1)


def _abs_err_inf(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """|out - ref| in float64; 0 where both hold the same non-finite value, inf where they differ
    in finiteness (or NaN vs Inf, or Inf of opposite sign)."""
    r, o = ref.double(), out.double()
    finite = torch.isfinite(r) & torch.isfinite(o)
    same_special = (torch.isnan(r) & torch.isnan(o)) | (torch.isinf(r) & (r == o))
    err = torch.where(finite, (o - r).abs(), torch.full_like(r, math.inf))
    return torch.where(same_special, torch.zeros_like(err), err)


# --------------------------------------------------------------------------------------------
# tolerant comparison


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's 1 - 2*sum(x*y) / sum(x^2 + y^2) in float64: 0 for equal, 2 for x == -y.

    0.0 when both are all zero. Any non-finite input gives NaN (mask first to avoid that).
    """
    _check_same_shape("x", x, "y", y)
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if _f(denom) == 0.0:
        return 0.0
    return _f(1.0 - 2.0 * (x * y).sum() / denom)


def error_panel(
    ref: torch.Tensor, out: torch.Tensor, atol: float, rtol: float, token_dim: int = 0
) -> dict:
    """The tolerant-comparison panel of docs/design.md §5.

    Statistics (max_abs, max_rel, mean_abs, calc_diff, cosine, worst_token_cosine, sqnr_db) use
    only elements where ref and out are both finite. max_rel divides by
    max(|ref|, REL_FLOOR_FRAC * max|ref|); when ref is all zero it is 0 or inf. Cosines are 1 for
    two all-zero vectors and 0 when only one is zero; per-token cosines (rows along `token_dim`,
    other dims flattened) zero the non-finite pairs on both sides. sqnr_db is
    10*log10(sum ref^2 / sum (out-ref)^2): inf when equal, -inf when ref is zero and out is not.
    An element is within when |out-ref| <= atol + rtol*|ref| (both finite), or when both hold the
    same non-finite value; a non-finite out next to a finite ref is outside. frac_within is 1.0
    for an empty tensor; statistics over zero finite pairs are NaN. mean_err is the signed mean
    of out - ref, max_ulps_bf16 the largest error in bf16 ulps of ref (`ulps_bf16`, the max_rel
    floor); first_ref / first_out / first_bound (atol + rtol*|ref|) are the values at
    first_outside, absent when nothing is outside.
    """
    _check_same_shape("ref", ref, "out", out)
    r, o = ref.detach().double(), out.detach().to(ref.device).double()
    fin = torch.isfinite(r) & torch.isfinite(o)
    rz = torch.where(fin, r, torch.zeros_like(r))
    oz = torch.where(fin, o, torch.zeros_like(o))
    err = (oz - rz).abs()
    n_fin = int(fin.sum())
    numel = r.numel()

    same_special = (torch.isnan(r) & torch.isnan(o)) | (torch.isinf(r) & (r == o))
    within = (fin & (err <= atol + rtol * rz.abs())) | same_special
    outside = ~within
    n_outside = int(outside.sum())

    nan = math.nan
    panel: dict = {
        "max_abs": nan,
        "max_rel": nan,
        "mean_abs": nan,
        "calc_diff": nan,
        "cosine": nan,
        "worst_token_cosine": nan,
        "worst_token": None,
        "sqnr_db": nan,
    }
    if n_fin:
        max_abs = _f(err.max())
        amax_ref = _f(rz.abs().max())
        if amax_ref > 0:
            floor = REL_FLOOR_FRAC * amax_ref
            max_rel = _f((err / rz.abs().clamp_min(floor)).max())
        else:
            max_rel = 0.0 if max_abs == 0 else math.inf
        signal, noise = rz.square().sum(), (oz - rz).square().sum()
        if _f(noise) == 0:
            sqnr = math.inf
        elif _f(signal) == 0:
            sqnr = -math.inf
        else:
            sqnr = _f(10.0 * torch.log10(signal / noise))
        tok_r, tok_o = _token_rows(rz, token_dim), _token_rows(oz, token_dim)
        tok_cos = _cosine((tok_r * tok_o).sum(1), tok_r.square().sum(1), tok_o.square().sum(1))
        worst = int(torch.argmin(tok_cos))
        panel.update(
            max_abs=max_abs,
            max_rel=max_rel,
            mean_abs=_f(err.sum() / n_fin),
            calc_diff=calc_diff(rz, oz),
            cosine=_f(_cosine((rz * oz).sum(), rz.square().sum(), oz.square().sum())),
            worst_token_cosine=_f(tok_cos[worst]),
            worst_token=worst,
            sqnr_db=sqnr,
        )
    first = _first_true(outside)
    panel.update(_signed_stats(rz, oz, fin))
    panel.update(_first_values(r, o, first, atol + rtol * r.abs()))
    panel.update(
        frac_within=1.0 if numel == 0 else (numel - n_outside) / numel,
        n_outside=n_outside,
        first_outside=first,
        nan_ref=int(torch.isnan(r).sum()),
        nan_out=int(torch.isnan(o).sum()),
        inf_ref=int(torch.isinf(r).sum()),
        inf_out=int(torch.isinf(o).sum()),
        numel=numel,
    )
    return panel


def gain_and_bias(r: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
    """Least-squares gain of k on r and signed mean error relative to rms(r), finite pairs only."""
    r, k = r.double(), k.double().to(r.device)
    fin = torch.isfinite(r) & torch.isfinite(k)
    r, k = r[fin], k[fin]
    rr = float((r * r).sum())
    if not rr:
        return {"gain": math.nan, "bias": math.nan, "n": int(fin.sum())}
    rms = math.sqrt(rr / r.numel())
    return {
        "gain": float((r * k).sum()) / rr,
        "bias": float((k - r).mean()) / rms,
        "n": int(r.numel()),
    }


def error_panel_bound(ref: torch.Tensor, out: torch.Tensor, bound: torch.Tensor | float) -> dict:
    """Check |out - ref| <= bound elementwise, `bound` (broadcastable to ref) from a derivation.

    worst_ratio is max |out-ref| / bound: 1.0 means the bound is reached exactly; a zero bound
    gives ratio 0 where the error is 0 and inf otherwise; a non-finite mismatch gives inf.
    frac_within is 1.0 for an empty tensor, worst_ratio 0.0. first_ref / first_out /
    first_bound are the values at first_outside (absent when nothing is outside); mean_abs,
    mean_err (signed) and max_ulps_bf16 are over the finite pairs, as in `error_panel`.
    """
    _check_same_shape("ref", ref, "out", out)
    err = _abs_err_inf(ref.detach(), out.detach().to(ref.device))
    b = torch.as_tensor(bound, dtype=torch.float64, device=err.device)
    try:
        b = torch.broadcast_to(b, err.shape)
    except RuntimeError as e:
        raise ValueError(
            f"bound.shape={tuple(b.shape)} does not broadcast to ref.shape={tuple(err.shape)}"
        ) from e
    outside = ~(err <= b)  # NaN bound counts as outside
    ratio = torch.where(err == 0, torch.zeros_like(err), err / b)  # x/0 = inf for x > 0
    numel = err.numel()
    n_outside = int(outside.sum())
    first = _first_true(outside)
    r, o = ref.detach().double(), out.detach().to(ref.device).double()
    fin = torch.isfinite(r) & torch.isfinite(o)
    n_fin = int(fin.sum())
    return {
        "n_outside": n_outside,
        "frac_within": 1.0 if numel == 0 else (numel - n_outside) / numel,
        "worst_ratio": _f(ratio.max()) if numel else 0.0,
        "first_outside": first,
        **_first_values(r, o, first, b),
        "mean_abs": _f(torch.where(fin, err, torch.zeros_like(err)).sum() / n_fin)
        if n_fin
        else math.nan,
        **_signed_stats(torch.where(fin, r, 0.0), torch.where(fin, o, 0.0), fin),
        "numel": numel,
    }


# --------------------------------------------------------------------------------------------
# exact comparison


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Compare raw bytes element by element, for any dtype (NaN == NaN bitwise, +0 != -0).

    Shapes and dtypes must match (ValueError naming them). first_mismatch is the coordinate of
    the first element whose bytes differ, first_ref / first_out the values of `a` (the
    reference) and `b` there (absent when equal).
    """
    _check_same_shape("a", a, "b", b)
    if a.dtype != b.dtype:
        raise ValueError(f"dtypes differ: a.dtype={a.dtype} b.dtype={b.dtype}")
    numel = a.numel()
    size = a.element_size()
    ab = a.detach().contiguous().reshape(-1).view(torch.uint8).reshape(numel, size)
    bb = b.detach().to(a.device).contiguous().reshape(-1).view(torch.uint8).reshape(numel, size)
    mismatch = (ab != bb).any(dim=1).reshape(a.shape)
    n = int(mismatch.sum())
    first = _first_true(mismatch)
    return {
        "equal": n == 0,
        "n_mismatch": n,
        "first_mismatch": first,
        **_first_values(a.detach(), b.detach().to(a.device), first, None),
        "numel": numel,
    }


def equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and values, a NaN equal to a NaN at the same position (torch.equal is
    never True once a NaN is present, so a NaN-input case would read as divergent everywhere).
    +0 == -0 here; use `bitwise_equal` where the sign of zero matters."""
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    a, b = a.detach(), b.detach().to(a.device)
    if not a.dtype.is_floating_point:
        return bool(torch.equal(a, b))
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def codes_equal(a: torch.Tensor, b: torch.Tensor) -> dict:
    """`bitwise_equal` of packed E2M1 codes counted per CODE (two per byte), not per byte:
    n_mismatch and first_mismatch are in element coordinates [..., K]; n_mismatch_bytes beside."""
    eq = bitwise_equal(unpack_e2m1(a), unpack_e2m1(b.to(a.device)))
    eq["n_mismatch_bytes"] = bitwise_equal(a, b)["n_mismatch"]
    return eq


def _near(q: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    return (q - mid).abs() <= TIE_REL_TOL * mid


def _e4m3_byte_value(mag: torch.Tensor) -> torch.Tensor:
    """Magnitude byte (0..0x7E) of float8_e4m3fn -> float64 value."""
    return mag.to(torch.uint8).view(torch.float8_e4m3fn).double()


def classify_quantize_mismatches(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    ref_codes: torch.Tensor,
    ref_scales: torch.Tensor,
    out_codes: torch.Tensor,
    out_scales: torch.Tensor,
) -> dict:
    """Sort NVFP4 quantizer mismatches into legitimate classes and real errors (docs/design.md §5).

    x [..., K] is the quantizer input, global_scale the decode-convention gs both sides used,
    codes packed uint8 [..., K/2], scales float8_e4m3fn [..., K/16]. s_true = amax(|x/gs|)/6 of a
    block (unrounded, clamped to 448). Scale bytes, per block:
      signed_zero      0x00 vs 0x80;
      underflow_block  one side 0, the other 0 or the smallest subnormal 2^-9, and s_true <= 2^-9
                       (+ tolerance): such a block legitimately flushes;
      scale_tie_flip   neighbouring bytes and s_true within TIE_REL_TOL of their midpoint;
      scale_floor      a policy: the out byte is larger than the ref byte and equals F, the
                       smallest out scale of the tensor (no out scale is below it; F > 0): scales
                       clamped up to a floor (returned as scale_floor_value), e.g. 2^-6;
      nan_scale_byte   a policy: both bytes are NaN, of the other sign (0xFF for 0x7F);
      real             anything else.
    Codes (unpacked, one per element), compared with the ref code in blocks whose scale bytes
    agree and with the code the OUT scale implies (reference rounding of x/gs/out_scale) in
    blocks whose scale bytes differ:
      scale_consequence  matches that implied code, or the block's scales are +-0 on both sides;
      underflow_block    the block's scale pair is underflow_block;
      nan_input          x is NaN, or both scale bytes are NaN (codes follow a NaN policy);
      signed_zero        both codes are zero magnitude, only the sign differs;
      tie_flip           neighbouring magnitudes, the sign of any nonzero code matches x, and
                         |q| = |x/gs/scale| (float64) lies within TIE_REL_TOL of their midpoint;
      real               anything else.
    n_real counts real codes plus real scale bytes. first_real is in x's coordinates [..., k]:
    the first real code, or the first element of a block whose scale byte is real, whichever
    comes first; first_real_code / first_real_scale give each kind on its own (scales in block
    coordinates [..., K/16]).
    """
    k = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or k % BLOCK:
        raise ValueError(f"x last dim must be a multiple of {BLOCK}, got x.shape={tuple(x.shape)}")
    lead, nb = tuple(x.shape[:-1]), k // BLOCK
    for name, t, dtype, last in (
        ("ref_codes", ref_codes, torch.uint8, k // 2),
        ("out_codes", out_codes, torch.uint8, k // 2),
        ("ref_scales", ref_scales, torch.float8_e4m3fn, nb),
        ("out_scales", out_scales, torch.float8_e4m3fn, nb),
    ):
        if t.dtype != dtype or tuple(t.shape) != (*lead, last):
            raise ValueError(
                f"{name} must be {dtype} of shape {(*lead, last)} for x.shape={tuple(x.shape)}, "
                f"got {name}.dtype={t.dtype} {name}.shape={tuple(t.shape)}"
            )
    dev = x.device
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=dev)
    if gs.numel() != 1:
        raise ValueError(f"global_scale must hold one value, got shape {tuple(gs.shape)}")

    xn = (x.detach().float() / gs.reshape(())).reshape(*lead, nb, BLOCK)  # fp32, as the reference
    rc = unpack_e2m1(ref_codes.to(dev)).reshape(*lead, nb, BLOCK)
    oc = unpack_e2m1(out_codes.to(dev)).reshape(*lead, nb, BLOCK)
    rsb = ref_scales.to(dev).view(torch.uint8)
    osb = out_scales.to(dev).view(torch.uint8)

    # ---- scale bytes, per block
    s_true = (xn.abs().amax(dim=-1).double() / 6.0).clamp(max=E4M3_MAX)  # NaN stays NaN
    rmag, omag = rsb & 0x7F, osb & 0x7F
    r_nan, o_nan = rmag == 0x7F, omag == 0x7F
    s_diff = rsb != osb
    s_signed_zero = s_diff & (rmag == 0) & (omag == 0)
    s_under = (
        s_diff
        & ~s_signed_zero
        & (torch.minimum(rmag, omag) == 0)
        & (torch.maximum(rmag, omag) <= 1)
        & (s_true <= E4M3_MIN_SUBNORMAL * (1.0 + TIE_REL_TOL))
    )
    step = (rmag.int() - omag.int()).abs() == 1
    lo = torch.minimum(rmag, omag)
    s_mid = (_e4m3_byte_value(lo) + _e4m3_byte_value(lo + 1)) / 2.0
    s_tie = (
        s_diff
        & ~s_signed_zero
        & ~s_under
        & step
        & ((rsb ^ osb) < 0x80)
        & ~r_nan
        & ~o_nan
        & _near(s_true, s_mid)
    )
    s_nan_byte = s_diff & r_nan & o_nan
    s_val_r, s_val_o = ref_scales.to(dev).float(), out_scales.to(dev).float()
    finite_o = s_val_o[~o_nan]
    floor = float(finite_o.min()) if finite_o.numel() else 0.0
    s_floor = (
        s_diff & ~s_signed_zero & ~s_under & ~s_tie & ~o_nan & ~r_nan
        & (s_val_o == floor) & (s_val_r < floor)
    ) if floor > 0 else torch.zeros_like(s_diff)  # fmt: skip
    s_real = s_diff & ~s_signed_zero & ~s_under & ~s_tie & ~s_nan_byte & ~s_floor

    # ---- codes, per element
    s_out32 = out_scales.to(dev).float()[..., None]
    q_out32 = torch.where(s_out32 == 0, torch.zeros_like(xn), xn / s_out32)  # reference order
    implied = encode_e2m1(q_out32, NanPolicy.POSITIVE_MAX)
    blk_diff = s_diff[..., None].expand_as(rc)
    base = torch.where(blk_diff, implied, rc)
    s_ref64, s_out64 = ref_scales.to(dev).double(), out_scales.to(dev).double()
    s_base = torch.where(s_diff, s_out64, s_ref64)[..., None]
    xn64 = xn.double()
    q = torch.where(s_base == 0, torch.zeros_like(xn64), xn64 / s_base)
    q_neg = torch.signbit(q)

    bmag, cmag = (base & 0x7).int(), (oc & 0x7).int()
    bsign, csign = (base & 0x8) != 0, (oc & 0x8) != 0
    mid_table = torch.tensor((*E2M1_MIDPOINTS, math.nan), dtype=torch.float64, device=dev)
    c_mid = mid_table[torch.minimum(bmag, cmag).long()]
    sign_ok = ((bmag == 0) | (bsign == q_neg)) & ((cmag == 0) | (csign == q_neg))
    neighbour = ((bmag - cmag).abs() == 1) & ((bsign == csign) | (torch.minimum(bmag, cmag) == 0))

    diff = rc != oc
    rest = diff.clone()

    def take(mask: torch.Tensor) -> torch.Tensor:
        nonlocal rest
        got = rest & mask
        rest = rest & ~got
        return got

    def expand(m: torch.Tensor) -> torch.Tensor:
        return m[..., None].expand_as(rc)

    c_nan = take(torch.isnan(xn) | expand(r_nan & o_nan))
    c_under = take(expand(s_under))
    c_cons = take(expand(s_signed_zero) | (blk_diff & (oc == base)))
    c_szero = take((bmag == 0) & (cmag == 0))
    c_tie = take(neighbour & sign_ok & _near(q.abs(), c_mid))
    c_real = rest

    code_counts = {
        "exact": int((~diff).sum()),
        "tie_flip": int(c_tie.sum()),
        "signed_zero": int(c_szero.sum()),
        "underflow_block": int(c_under.sum()),
        "scale_consequence": int(c_cons.sum()),
        "nan_input": int(c_nan.sum()),
        "real": int(c_real.sum()),
    }
    scale_counts = {
        "exact": int((~s_diff).sum()),
        "signed_zero": int(s_signed_zero.sum()),
        "underflow_block": int(s_under.sum()),
        "scale_tie_flip": int(s_tie.sum()),
        "scale_floor": int(s_floor.sum()),
        "nan_scale_byte": int(s_nan_byte.sum()),
        "real": int(s_real.sum()),
    }
    real_elems = c_real.reshape(*lead, k)
    first_code = _first_true(real_elems)
    first_scale = _first_true(s_real)
    first_block_elem = torch.zeros((*lead, nb, BLOCK), dtype=torch.bool, device=dev)
    first_block_elem[..., 0] = s_real  # a real scale byte is reported at its block's first element
    first = _first_true(real_elems | first_block_elem.reshape(*lead, k))
    return {
        "codes": code_counts,
        "scales": scale_counts,
        "n_real": code_counts["real"] + scale_counts["real"],
        "first_real": first,
        "first_real_code": first_code,
        "first_real_scale": first_scale,
        "scale_floor_value": floor if int(s_floor.sum()) else None,
    }


def rounding_direction(
    x: torch.Tensor,
    global_scale: torch.Tensor | float,
    ref_codes: torch.Tensor,
    ref_scales: torch.Tensor,
    out_codes: torch.Tensor,
    out_scales: torch.Tensor,
) -> dict:
    """Which way the kernel's codes round where they differ from ours (same block scale bytes).

    q = |x / gs / scale| of each mismatching element; `at_tie` means q lies within TIE_REL_TOL of
    an E2M1 midpoint. Counts: tie_up / tie_down (the kernel chose the larger / smaller magnitude
    at a tie), off_tie_down / off_tie_up (not at a tie: below / above the nearest value).
    direction names the rule the counts fit, or "mixed":
      "ties away from zero"  every mismatch a tie rounded up (C roundf);
      "ties toward zero"     every mismatch a tie rounded down;
      "truncation"           every mismatch rounded down, some off a tie (toward zero always);
      None                   no mismatch in blocks with equal scales.
    """
    k = x.shape[-1]
    nb = k // BLOCK
    lead = tuple(x.shape[:-1])
    dev = x.device
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=dev).reshape(())
    xn = (x.detach().float() / gs).reshape(*lead, nb, BLOCK).double()
    rc = unpack_e2m1(ref_codes.to(dev)).reshape(*lead, nb, BLOCK)
    oc = unpack_e2m1(out_codes.to(dev)).reshape(*lead, nb, BLOCK)
    same_scale = ref_scales.to(dev).view(torch.uint8) == out_scales.to(dev).view(torch.uint8)
    s = ref_scales.to(dev).double()[..., None]
    q = torch.where(s == 0, torch.zeros_like(xn), xn / s).abs()
    diff = (rc != oc) & same_scale[..., None] & torch.isfinite(q)
    rmag, omag = (rc & 0x7).long(), (oc & 0x7).long()
    mids = torch.tensor(E2M1_MIDPOINTS, dtype=torch.float64, device=dev)
    at_tie = ((q[..., None] - mids).abs() <= TIE_REL_TOL * mids).any(-1)
    up, down = diff & (omag > rmag), diff & (omag < rmag)
    counts = {
        "tie_up": int((up & at_tie).sum()),
        "tie_down": int((down & at_tie).sum()),
        "off_tie_up": int((up & ~at_tie).sum()),
        "off_tie_down": int((down & ~at_tie).sum()),
    }
    n = sum(counts.values())
    if not n:
        direction = None
    elif counts["tie_up"] == n:
        direction = "ties away from zero"
    elif counts["tie_down"] == n:
        direction = "ties toward zero"
    elif counts["tie_down"] + counts["off_tie_down"] == n:
        direction = "truncation"
    else:
        direction = "mixed"
    return {**counts, "n": n, "direction": direction}


# --------------------------------------------------------------------------------------------
# error structure


def periodic_error_structure(
    err: torch.Tensor, periods: Sequence[int] = (16, 32, 128), axis: int = -1
) -> dict:
    """Does the error concentrate at one residue modulo a period along `axis`? (layout bugs do)

    Magnitudes |err| are taken in float64; a non-finite entry counts as the largest finite one
    (1.0 if none). For each period p, `concentration` is the max over residues r of
    (share of total error at r) / (share of positions at r), i.e. 1.0 for uniform and p when all
    error sits at one residue (the share of positions is 1/p when p divides the length);
    `hit_concentration` is the same for the count of hits (|err| > HIT_FACTOR x median, or > 0
    when the median is 0), which a single outlier cannot move. A period is judged only when the
    axis holds two periods and there are >= MIN_HITS_PER_RESIDUE * p hits; suspect when both
    concentrations reach SUSPECT_RATIO. suspect_period is the smallest suspect period whose
    concentration is within PERIOD_TIE_FRAC of the best suspect one, else None. Concentrations
    are None when there is no error at all.
    """
    if err.dim() == 0:
        raise ValueError("err must have at least one dim, got a 0-dim tensor")
    e = err.detach().double().abs()
    finite = torch.isfinite(e)
    fill = e[finite].max() if bool(finite.any()) else torch.tensor(1.0, dtype=torch.float64)
    e = torch.where(finite, e, fill.to(e.device))
    e = e.movedim(axis, -1)
    n = e.shape[-1]
    e = e.reshape(-1, n)
    total = _f(e.sum())
    med = _f(e.median()) if e.numel() else 0.0
    hit_threshold = HIT_FACTOR * med
    hits = e > hit_threshold
    n_hits = int(hits.sum())
    col_mag = e.sum(0)
    col_hits = hits.sum(0).double()
    pos = torch.arange(n, device=e.device)

    table: dict[str, dict] = {}
    candidates: list[tuple[int, float]] = []
    for p in periods:
        res = pos % p
        share_pos = torch.bincount(res, minlength=p).double() / n
        entry: dict = {"concentration": None, "residue": None, "hit_concentration": None}
        if total > 0:
            mag = torch.zeros(p, dtype=torch.float64, device=e.device).index_add_(0, res, col_mag)
            ratio = torch.where(share_pos > 0, (mag / total) / share_pos, torch.zeros_like(mag))
            r = int(torch.argmax(ratio))
            entry.update(concentration=_f(ratio[r]), residue=r)
            if n_hits:
                hc = torch.zeros(p, dtype=torch.float64, device=e.device).index_add_(
                    0, res, col_hits
                )
                hratio = torch.where(share_pos > 0, (hc / n_hits) / share_pos, torch.zeros_like(hc))
                entry["hit_concentration"] = _f(hratio.max())
        judged = n >= 2 * p and n_hits >= MIN_HITS_PER_RESIDUE * p
        entry["judged"] = judged
        if (
            judged
            and entry["concentration"] is not None
            and entry["hit_concentration"] is not None
            and entry["concentration"] >= SUSPECT_RATIO
            and entry["hit_concentration"] >= SUSPECT_RATIO
        ):
            candidates.append((p, entry["concentration"]))
        table[str(p)] = entry

    suspect = None
    if candidates:
        best = max(c for _, c in candidates)
        suspect = min(p for p, c in candidates if c >= PERIOD_TIE_FRAC * best)
    return {
        "axis": axis,
        "length": n,
        "n_nonzero": int((e > 0).sum()),
        "n_hits": n_hits,
        "hit_threshold": hit_threshold,
        "periods": table,
        "suspect_period": suspect,
    }


def per_group_error(
    ref: torch.Tensor, out: torch.Tensor, group_offsets_end: list[int] | torch.Tensor
) -> list[dict]:
    """Error per expert/group: group e holds rows offsets[e-1]:offsets[e] (the first from 0).

    max_abs is inf when a non-finite value appears on one side only (n_nonfinite counts those);
    calc_diff uses the finite pairs. An empty group has max_abs 0.0 and calc_diff 0.0.
    """
    _check_same_shape("ref", ref, "out", out)
    ends = [int(v) for v in torch.as_tensor(group_offsets_end).reshape(-1).tolist()]
    rows = ref.shape[0] if ref.dim() else 0
    if any(b < a for a, b in zip([0, *ends], ends, strict=False)) or (ends and ends[-1] > rows):
        raise ValueError(
            f"group_offsets_end must be non-decreasing, >= 0 and <= rows={rows}, got {ends}"
        )
    r, o = ref.detach().double(), out.detach().to(ref.device).double()
    err = _abs_err_inf(r, o)
    fin = torch.isfinite(r) & torch.isfinite(o)
    groups = []
    start = 0
    for g, end in enumerate(ends):
        sl = slice(start, end)
        fin_g = fin[sl]
        rz = torch.where(fin_g, r[sl], torch.zeros_like(r[sl]))
        oz = torch.where(fin_g, o[sl], torch.zeros_like(o[sl]))
        groups.append(
            {
                "group": g,
                "rows": end - start,
                "max_abs": _f(err[sl].max()) if err[sl].numel() else 0.0,
                "calc_diff": calc_diff(rz, oz),
                "n_nonfinite": int((err[sl] == math.inf).sum()),
            }
        )
        start = end
    return groups


def per_row_error(ref: torch.Tensor, out: torch.Tensor) -> list[float]:
    """max |out - ref| per row of dim 0 (other dims flattened); inf for a row where a non-finite
    value appears on one side only."""
    _check_same_shape("ref", ref, "out", out)
    if ref.dim() == 0:
        raise ValueError("ref must have at least one dim, got a 0-dim tensor")
    err = _abs_err_inf(ref.detach(), out.detach().to(ref.device)).reshape(ref.shape[0], -1)
    if err.shape[1] == 0:
        return [0.0] * ref.shape[0]
    return [float(v) for v in err.max(dim=1).values.tolist()]


def per_token_error_bins(ref: torch.Tensor, out: torch.Tensor, bins: int = 64) -> dict:
    """Per-token error for heatmaps, kept small: tokens (dim 0) split into at most `bins`
    contiguous bins, each holding the max over its tokens of max |out - ref| / max |ref|
    (finite ref amax; 1.0 when ref is all zero). Returns {tokens, bins: [float]}."""
    rows = per_row_error(ref, out)
    finite = ref.detach().double().abs().nan_to_num(nan=0.0, posinf=0.0)
    scale = float(finite.max()) if finite.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    n = len(rows)
    edges = [round(i * n / min(bins, n)) for i in range(min(bins, n) + 1)] if n else [0]
    return {
        "tokens": n,
        "bins": [max(rows[a:b]) / scale for a, b in zip(edges[:-1], edges[1:], strict=True)],
    }


# --------------------------------------------------------------------------------------------
# NaN trace


def _hist(values: torch.Tensor, bins: int) -> dict[str, int]:
    counts = torch.bincount(values.reshape(-1).long(), minlength=bins).tolist()
    return {str(i): int(c) for i, c in enumerate(counts) if c}


def nonfinite_stats(t: torch.Tensor) -> dict:
    """Stats of one intermediate for the NaN trace: nan, inf, amax (finite), zero_frac, numel.

    float8_e4m3fn tensors (block scales) add scale_byte_hist {str(byte): count} over nonzero
    counts and nan_bytes (0x7F / 0xFF). uint8 tensors are read as packed E2M1 codes: nibble_hist
    {str(code): count}, amax is the largest decoded magnitude and zero_frac the fraction of codes
    of zero magnitude (+-0). amax is 0.0 when nothing finite is left.
    """
    t = t.detach()
    stats: dict = {"dtype": str(t.dtype), "shape": list(t.shape), "numel": t.numel()}
    if t.dtype == torch.uint8:
        codes = unpack_e2m1(t.reshape(-1, 1))
        mag = decode_e2m1(codes).abs()
        stats.update(
            nan=0,
            inf=0,
            amax=_f(mag.max()) if mag.numel() else 0.0,
            zero_frac=_f((mag == 0).double().mean()) if mag.numel() else 0.0,
            nibble_hist=_hist(codes, 16),
        )
        return stats
    if t.dtype.is_floating_point or t.dtype.is_complex:
        v = t.double() if not t.dtype.is_complex else t.abs().double()
    else:
        v = t.to(torch.float64)
    fin = torch.isfinite(v)
    finite_abs = torch.where(fin, v.abs(), torch.zeros_like(v))
    stats.update(
        nan=int(torch.isnan(v).sum()),
        inf=int(torch.isinf(v).sum()),
        amax=_f(finite_abs.max()) if v.numel() else 0.0,
        zero_frac=_f((v == 0).double().mean()) if v.numel() else 0.0,
    )
    if t.dtype == torch.float8_e4m3fn:
        b = t.view(torch.uint8)
        stats["scale_byte_hist"] = _hist(b, 256)
        stats["nan_bytes"] = int(((b & 0x7F) == 0x7F).sum())
    return stats
