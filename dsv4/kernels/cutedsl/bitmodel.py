"""The CuTeDSL quantize kernel's bit tricks, written as torch ops one for one (CPU-testable).

The kernel (nvfp4_quant.py) computes NVFP4 with the reference's order of operations
(docs/design.md §3), fp32 throughout: x_n = x / gs (div.rn); amax = max.NaN |x_n| over 16; s =
amax / 6 (div.rn); byte = cvt.rn.satfinite.e4m3 (clamp-then-round: > 448 and +Inf give 448,
NaN gives 0x7F); s' = the byte decoded (exact); q = x_n / s' (div.rn), the block's codes 0 when
s' == 0. E2M1 of q, where the arch has no cvt...e2m1x2 (sm_90), by these exact steps:
  c = max(min(q, 6), -6)       min first: min(NaN, 6) = 6, so NaN -> +6 (the NaN policy)
  a = |c|;  C = 2^(e - 104) with e = floor(log2(max(a, 1)))   (bit ops on max(a, 1))
  r = fma(a, 2^-126, C) - C    rounds a*2^-126 to the grid of C's ulp, 2^(e-127): the E2M1
                               quantum 0.5 / 1 / 2 on [0,2) / [2,4) / [4,6], ties to even
  code = bits(r) >> 22         r is a*2^-126 on the grid: 0.5 -> 2^-127 (subnormal) -> 1,
                               1 -> 2, 1.5 -> 3, 2 -> 4, 3 -> 5, 4 -> 6, 6 -> 7
  code |= signbit(c) << 3      -0.0 and negatives rounding to 0 keep 0x8; NaN was made +6
sm_100a uses cvt.rn.satfinite.e2m1x2.f32 on the same clamped c (so NaN -> +6 there too).

The bracket (sm_90, in-range blocks, `bracket_codes`): the codes of q = RN(RN(x / gs) / s) come
from q' = 6 sat(|x| * R6), R6 ~ 1 / (6 gs s) (rcp.approx and one Newton step of RN(gs * s),
times RN(1/6)), with no division per element. |q' / q - 1| <= about 8 * 2^-24 (six roundings,
the Newton step's ~1 ulp);
the code of min(|q|, 6) is monotone in |q|, so if a (1 - d) and a (1 + d) round to the same code
(a = min(|q'|, 6), d = 2^-19 = 32 * 2^-24), |q|'s code is that one. A block where any value's two
ends differ (a quotient within about 2^-19 of an E2M1 midpoint, exact ties included) is redone
by the corrected divisions, so the bits never depend on R's last bits (tests perturb R by +-8
ulps). Tiny |q'| (subnormal products) are far below the first midpoint: code 0 either way.

This module mirrors those steps in torch (fma emulated exactly in fp64), so tests check the
tricks against reference/ on CPU for every bf16 value before any GPU runs them.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_NAN_BYTE = 0x7F
TWO_M126 = 2.0**-126
EXP_MASK = 0x7F800000
C_BIAS = -(104 << 23)  # (22 - 126) << 23: C = 2^(e + 22) scaled by 2^-126
BRACKET = 2.0**-19  # the bracket's half width, relative (nvfp4_quant._BRACKET_LO / _HI)
FAST_AMAX_MAX = 2.0**90  # the fast path's range (nvfp4_quant._FAST_RANGE_PTX)
FAST_GS_RANGE = (2.0**-30, 2.0**30)


def e2m1_codes_sw(q: torch.Tensor) -> torch.Tensor:
    """fp32 q -> uint8 E2M1 codes (0..15) by the kernel's software steps (sm_90 path)."""
    q = q.float()
    c = torch.where(torch.isnan(q), torch.full_like(q, E2M1_MAX), q)  # min(NaN, 6) = 6
    c = c.clamp(-E2M1_MAX, E2M1_MAX)
    a = c.abs()
    m = torch.maximum(a, torch.ones_like(a))
    cbits = (m.view(torch.int32) & EXP_MASK) + C_BIAS
    cc = cbits.view(torch.float32)
    # fma(a, 2^-126, C) rounded once to fp32: a * 2^-126 + C is exact in fp64 (<= 47 bits)
    r = (a.double() * TWO_M126 + cc.double()).float()
    r = r - cc  # exact; may be an fp32 subnormal (CPU torch keeps subnormals)
    code = (r.view(torch.int32) >> 22) & 0x7
    code = code | (torch.signbit(c).to(torch.int32) << 3)
    return code.to(torch.uint8)


def e2m1_codes_finite(q: torch.Tensor, sign_of: torch.Tensor) -> torch.Tensor:
    """The fast path's steps for a finite q (no NaN clamp; min(|q|, 6) saturates), the sign
    bit taken from `sign_of` (the block's input value, same sign as q)."""
    q = q.float()
    a = q.abs().clamp(max=E2M1_MAX)
    m = torch.maximum(a, torch.ones_like(a))
    cc = ((m.view(torch.int32) & EXP_MASK) + C_BIAS).view(torch.float32)
    r = (a.double() * TWO_M126 + cc.double()).float() - cc
    code = (r.view(torch.int32) >> 22) & 0x7
    code = code | (torch.signbit(sign_of.float()).to(torch.int32) << 3)
    return code.to(torch.uint8)


def e4m3_satfinite(s: torch.Tensor) -> torch.Tensor:
    """cvt.rn.satfinite.e4m3x2.f32 of non-negative fp32 s -> uint8 bytes (NaN -> 0x7F)."""
    s = s.float()
    byte = s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(s), torch.full_like(byte, E4M3_NAN_BYTE), byte)


def quantize_model(x: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed codes uint8 [..., K/2], scale bytes uint8 [..., K/16]) exactly as the
    kernel computes them (software E2M1), gs a one-element fp32 tensor."""
    xn = x.float() / gs.float().reshape(())
    blocks = xn.unflatten(-1, (-1, 16))
    amax = blocks.abs().amax(-1)  # NaN-propagating, as max.NaN.f32
    byte = e4m3_satfinite(amax / E2M1_MAX)
    s = byte.view(torch.float8_e4m3fn).float().unsqueeze(-1)
    q = blocks / s
    codes = e2m1_codes_sw(q.flatten(-2))
    codes = torch.where((s == 0).expand_as(blocks).flatten(-2), torch.zeros_like(codes), codes)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, byte


def bracket_codes(v: torch.Tensor, rcp6: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bracket's codes of in-range blocks v [..., 16] (the block's input values) with the
    per-block rcp6 [..., 1] (fp32, ~ 1 / (6 gs s), the kernel's $10): (codes uint8 [..., 16],
    agree bool [..., 16]); where agree is False the kernel discards that value's code and divides
    (the corrected divisions)."""
    q6 = (v.float().abs() * rcp6.float()).nan_to_num(nan=0.0)  # mul.rn.sat: NaN -> 0
    a = q6.clamp(max=1.0) * E2M1_MAX  # 6 sat(.): min(|q|, 6) up to two more roundings
    e = (a.clamp(min=1.0).view(torch.int32) >> 23) - 127  # 2^e: the binade of max(a, 1)
    # fma(a, 2^-22 (1 -+ d), k), k = bits(2^e) + 2e: k is on its ulp's grid (2^(e-23)) and the
    # sum stays in k's binade, so the result is k + N ulps with N = a (1 -+ d) / 2^(e-1) rounded
    # half to even; a (1 -+ d) is exact in fp64 (24 x 20 significant bits). Low byte: N + 2e
    ends = [
        torch.round(a.double() * (1 + sign * BRACKET) * torch.exp2(1.0 - e.double())).to(
            torch.int32
        )
        for sign in (-1, 1)
    ]
    agree = ends[0] == ends[1]
    code = (ends[0] + 2 * e) | (torch.signbit(v.float()).to(torch.int32) << 3)
    return code.to(torch.uint8), agree


def bracket_rcp(gs: torch.Tensor, s: torch.Tensor, ulps: int = 0) -> torch.Tensor:
    """RN(RN(1 / RN(gs * s)) * RN(1 / 6)) in fp32 (the kernel's $10), moved by `ulps` units in
    the last place (the kernel's rcp.approx + Newton step is within about one ulp of the
    reciprocal; tests move it further)."""
    r = (1.0 / (gs.float() * s.float())) * torch.tensor(1 / 6, dtype=torch.float32)
    step = torch.full_like(r, float("inf") if ulps > 0 else 0.0)
    for _ in range(abs(ulps)):
        r = torch.nextafter(r, step)
    return r


def quantize_model_bracketed(
    x: torch.Tensor, gs: torch.Tensor, rcp_ulps: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_model with the sm_90 kernel's bracket on in-range blocks: (packed codes, scale
    bytes, redone [..., K] bool: the values whose bracket ends disagreed and that the kernel
    divides). The codes must equal quantize_model's whatever rcp_ulps."""
    packed, byte = quantize_model(x, gs)
    g = gs.float().reshape(())
    blocks = x.float().unflatten(-1, (-1, 16))
    amax_x = blocks.abs().amax(-1)  # NaN-propagating: a NaN block is out of range
    in_range = (amax_x <= FAST_AMAX_MAX) & bool(FAST_GS_RANGE[0] <= g <= FAST_GS_RANGE[1])
    s = byte.view(torch.float8_e4m3fn).float().unsqueeze(-1)
    codes, agree = bracket_codes(blocks, bracket_rcp(g, s, rcp_ulps))
    codes = torch.where(s == 0, torch.zeros_like(codes), codes).flatten(-2)
    exact = _unpack(packed)
    redone = (in_range.unsqueeze(-1) & ~agree).flatten(-2)
    codes = torch.where(in_range.repeat_interleave(16, -1) & ~redone, codes, exact)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), byte, redone


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)
