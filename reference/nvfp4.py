"""NVFP4 exactly as the hardware does it: E2M1 codes, UE4M3 block scales, an fp32 global scale.

Format (docs/design.md §3): E2M1 has 1 sign, 2 exponent and 1 mantissa bit; codes 0..7 are
0, 0.5, 1, 1.5, 2, 3, 4, 6 and bit 3 is the sign. Two codes per byte, element 2i in the LOW nibble.
Sixteen consecutive elements along the contraction dim share one UE4M3 scale (float8_e4m3fn byte);
one fp32 global scale per tensor, in the DECODE convention: value = code * block_scale * gs.

Rounding follows `cvt.rn.satfinite.e2m1x2.f32`: nearest, ties to the even code, saturate to +-6,
sign kept when rounding to zero. Every threshold below is a comparison, not arithmetic, so the
encoder is exact for every float32. The block scale is clamped to [0, 448] BEFORE it is rounded,
and the rounding to e4m3 is done here by explicit arithmetic: torch's own float8 cast turns
overflow into NaN on torch 2.11 and saturates on 2.13, and the reference must not depend on that.
NaN handling is a named policy (`NanPolicy`), never an accident.
"""

from __future__ import annotations

import enum

import torch

BLOCK = 16  # elements per block scale
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_NAN_BYTE = 0x7F  # float8_e4m3fn NaN: a NaN block amax stays visible here, and only here
NEG_ZERO_CODE = 0x8

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Rounding midpoints between neighbouring magnitudes, and whether a value exactly on the midpoint
# goes UP (to the higher code). Ties go to the even code: 0.25->0, 0.75->1.0 (code 2),
# 1.25->1.0 (code 2), 1.75->2.0 (code 4), 2.5->2.0, 3.5->4.0, 5->4.0.
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_GOES_UP = (False, True, False, True, False, True, False)


class NanPolicy(enum.Enum):
    """What E2M1 encoding does with a NaN input (E2M1 has no NaN)."""

    POSITIVE_MAX = "positive_max"  # NaN -> +6 (code 0x7), as CUDA's software cvt path gives
    ZERO = "zero"  # NaN -> +0 (code 0x0)
    RAISE = "raise"  # refuse: ValueError naming how many elements are NaN


class ScaleConvention(enum.Enum):
    """Direction of a global scale as passed across an API."""

    DECODE = "decode"  # ours, ModelOpt's: value = code * scale * gs, gs = amax / (6 * 448)
    ENCODE = "encode"  # vLLM / FlashInfer kernels: x * es is quantized, es = 6 * 448 / amax


# --------------------------------------------------------------------------------------------
# validation


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {name}.dtype={x.dtype}")


def _check_dtype(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != dtype:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be {dtype}, got {got}")


def _check_last_dim(name: str, x: torch.Tensor, multiple: int) -> None:
    if x.dim() == 0 or x.shape[-1] % multiple:
        raise ValueError(
            f"{name} last dim must be a multiple of {multiple}, got {name}.shape={tuple(x.shape)}"
        )


# --------------------------------------------------------------------------------------------
# E2M1 codes


def encode_e2m1(x: torch.Tensor, nan_policy: NanPolicy = NanPolicy.POSITIVE_MAX) -> torch.Tensor:
    """Round float values to E2M1 codes (uint8 in 0..15, one per element, unpacked)."""
    _check_float("x", x)
    x = x.float()
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for mid, up in zip(E2M1_MIDPOINTS, _TIE_GOES_UP, strict=True):
        code += (a >= mid if up else a > mid).to(torch.uint8)  # +Inf passes all: saturates to 6
    code |= torch.signbit(x).to(torch.uint8) << 3  # -0.0 and negatives rounding to 0 -> 0x8
    nan = torch.isnan(x)
    if nan_policy is NanPolicy.RAISE:
        n = int(nan.sum())
        if n:
            raise ValueError(f"x holds {n} NaN element(s) and nan_policy=RAISE")
    else:
        fill = 0x7 if nan_policy is NanPolicy.POSITIVE_MAX else 0x0
        code = torch.where(nan, torch.full_like(code, fill), code)
    return code


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15, unpacked) -> float32. Code 8 is -0.0."""
    _check_dtype("codes", codes, torch.uint8)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must be 4-bit (0..15), got max {int(codes.max())}")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8).bool(), -mag, mag)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] 4-bit codes -> [..., K/2] bytes; element 2i in the low nibble, 2i+1 in the high."""
    _check_dtype("codes", codes, torch.uint8)
    _check_last_dim("codes", codes, 2)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] 4-bit codes (inverse of `pack_e2m1`)."""
    _check_dtype("packed", packed, torch.uint8)
    out = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# --------------------------------------------------------------------------------------------
# UE4M3 block scales


def round_to_e4m3(s: torch.Tensor) -> torch.Tensor:
    """Round non-negative fp32 values already clamped to [0, 448] to e4m3 (nearest, ties even).

    Done by arithmetic, not by torch's cast: the quantum of s is 2^(floor(log2 s) - 3) in the
    normal range and 2^-9 below 2^-6 (subnormals). s / quantum is exact (power of two), and
    torch.round rounds halves to even. Returns float32 values that e4m3 represents exactly.
    """
    s = s.float()
    _, exp = torch.frexp(s)  # s = m * 2^exp, m in [0.5, 1): floor(log2 s) = exp - 1
    q_exp = torch.clamp(exp - 1 - 3, min=-9)
    return torch.ldexp(torch.round(torch.ldexp(s, -q_exp)), q_exp)


def encode_block_scales(scale_fp32: torch.Tensor) -> torch.Tensor:
    """fp32 block scales -> float8_e4m3fn: clamp to [0, 448], round to nearest even; NaN -> 0x7F.

    Values above 448 and +Inf saturate to 448 (the hardware's satfinite), whatever torch's cast
    would do with them.
    """
    # clamp keeps NaN; abs() turns a -0.0 input (which clamp passes through) into +0.0, else
    # its byte would be 0x80 (e4m3fn -0), not the 0x00 of the unsigned UE4M3 scale
    s = torch.clamp(scale_fp32.float(), 0.0, E4M3_MAX).abs()
    nan = torch.isnan(s)
    exact = round_to_e4m3(torch.where(nan, torch.zeros_like(s), s))
    byte = exact.to(torch.float8_e4m3fn).view(torch.uint8)  # exact: no rounding in the cast
    byte = torch.where(nan, torch.full_like(byte, E4M3_NAN_BYTE), byte)
    return byte.view(torch.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# global scale


def true_div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """RN(x / divisor) on every device. `x / 6.0` on CUDA is x * RN(1 / 6) (PyTorch's CUDA division
    by a CPU scalar multiplies by the reciprocal), which differs from the quotient in its last
    bit for some x, and so, near an e4m3 tie, in the scale byte; a device tensor divisor divides."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """Decode-convention global scale: amax / (6 * 448) in fp32; 1.0 where amax is 0.

    An all-zero tensor has no natural scale; 1.0 keeps every division defined.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, true_div(amax, E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def to_encode_scale(global_scale: torch.Tensor | float) -> torch.Tensor:
    """Decode-convention gs -> encode-convention scale (1 / gs), as vLLM / FlashInfer take it."""
    return 1.0 / torch.as_tensor(global_scale, dtype=torch.float32)


def from_encode_scale(encode_scale: torch.Tensor | float) -> torch.Tensor:
    """Encode-convention scale -> decode-convention gs (1 / es)."""
    return 1.0 / torch.as_tensor(encode_scale, dtype=torch.float32)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| ignoring NaN (as fmaxf-based reductions in kernels do); +Inf propagates."""
    a = x.float().abs()
    return torch.nan_to_num(a, nan=0.0, posinf=float("inf")).amax() if a.numel() else a.sum()


def _as_global_scale(global_scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=device)
    if gs.numel() != 1:
        raise ValueError(f"global_scale must hold one value, got shape {tuple(gs.shape)}")
    return gs.reshape(())


# --------------------------------------------------------------------------------------------
# quantize / dequantize


def quantize_nvfp4(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    nan_policy: NanPolicy = NanPolicy.POSITIVE_MAX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize along the last dim. Returns (codes uint8 [..., K/2], scales e4m3 [..., K/16], gs).

    `global_scale=None` computes it from the tensor's amax (dynamic); a given value is used as is
    (static, calibrated), so values beyond the calibrated amax saturate in the block scale.
    Order of operations (bits depend on it, docs/design.md §3), all in fp32:
      x_n = x / gs;  s = amax_block(|x_n|) / 6;  clamp [0, 448];  round to e4m3;
      q = x_n / s  (0 where s == 0);  round q to E2M1.
    A NaN in a block makes its amax NaN, its scale byte 0x7F, and its codes follow `nan_policy`.
    """
    _check_float("x", x)
    _check_last_dim("x", x, BLOCK)
    if global_scale is None:
        gs = global_scale_from_amax(tensor_amax(x)).to(x.device)
    else:
        gs = _as_global_scale(global_scale, x.device)
    xn = x.float() / gs
    blocks = xn.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # NaN-propagating, unlike tensor_amax
    scales = encode_block_scales(true_div(amax, E2M1_MAX))
    s = scales.float()
    q = torch.where(s == 0, torch.zeros_like(blocks), blocks / s)
    codes = encode_e2m1(q.reshape(x.shape), nan_policy)
    return pack_e2m1(codes), scales.squeeze(-1), gs


def dequantize_nvfp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(codes [..., K/2], scales [..., K/16], gs) -> code * scale * gs in `dtype`.

    code * scale is exact in fp32 (and in bf16); the product with gs rounds once in fp32, then
    the cast to `dtype` rounds again.
    """
    _check_dtype("codes", codes, torch.uint8)
    _check_dtype("scales", scales, torch.float8_e4m3fn)
    k = codes.shape[-1] * 2
    if codes.shape[:-1] != scales.shape[:-1] or scales.shape[-1] * BLOCK != k:
        raise ValueError(
            f"codes {tuple(codes.shape)} and scales {tuple(scales.shape)} disagree: "
            f"need scales[..., K/16] for codes[..., K/2]"
        )
    gs = _as_global_scale(global_scale, codes.device)
    vals = decode_e2m1(unpack_e2m1(codes))
    block = scales.float().repeat_interleave(BLOCK, dim=-1)
    return (vals * block * gs).to(dtype)


def quantize_weight_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight [..., K, N] with blocks along K (the contraction dim).

    Returns (codes uint8 [..., K/2, N], scales e4m3 [..., K/16, N], gs): the layout of
    `quantize_weight_to_nvfp4` in the serving code.
    """
    _check_float("w", w)
    if w.dim() < 2 or w.shape[-2] % BLOCK:
        raise ValueError(
            f"w must be [..., K, N] with K a multiple of 16, got w.shape={tuple(w.shape)}"
        )
    codes, scales, gs = quantize_nvfp4(w.transpose(-1, -2), global_scale)
    return codes.transpose(-1, -2).contiguous(), scales.transpose(-1, -2).contiguous(), gs


def dequantize_weight_nvfp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_weight_nvfp4`: codes [..., K/2, N], scales [..., K/16, N] -> w."""
    deq = dequantize_nvfp4(codes.transpose(-1, -2), scales.transpose(-1, -2), global_scale, dtype)
    return deq.transpose(-1, -2)
