"""NVFP4 decode by bit tricks on 32-bit words: the constants the sm_90 kernel uses, and a torch
model of the same steps (no Triton here, so it is tested exhaustively on any machine).

A little-endian uint32 word holds 4 packed bytes = 8 E2M1 nibbles, nibble q (bits 4q..4q+3) is
element q of the word (docs/design.md §3: element 2i in byte i's low nibble). For p in 0..3,
`x = w >> 4p` has nibble p in bits 0..3 and nibble p+4 in bits 16..19, so one AND/shift/OR on the
whole word makes TWO fp16 bit patterns (low half: element p, high half: element p+4):

    y = ((x & 0x00070007) << 9) | ((x & 0x00080008) << 12)

The 3 magnitude bits land on fp16's two lowest exponent bits and its top mantissa bit, the sign on
bit 15: as an fp16 number that is exactly the E2M1 value times 2^-14 (codes 1 and 9 are fp16
subnormals; the conversion to fp32 keeps them exactly, and from there on nothing is subnormal).
The kernel multiplies it, in fp32, by the block scale times SCALE_FOLD = 2^14: exact (<= 2 x 4
significant bits), giving value * scale: <= 6 significant bits in [2^-10, 2688], so the cast to
fp16 is exact too (fp16's normal range starts at 2^-14). The MMA operands are fp16, not bf16:
both hold NVFP4 products exactly and run at the same wgmma rate, and the Triton 3.9 interpreter
multiplies bf16 dot operands as raw integers, so only fp16 lets the CPU test run the kernel.
(A bf16 placement needs a 2^126 factor and makes code 1 a bf16 subnormal, 2^-127, inside fp32
arithmetic: flushed to zero by FTZ, and by the interpreter, which is how this was found.)
The half decode (a plan field, `Plan.half_decode`) skips fp32: it multiplies the fp16 pattern,
still value * 2^-14, by the UNFOLDED block scale in fp16 (`decode_words(..., half=True)`). The
product value * scale * 2^-14 is exact there too: value is a multiple of 0.5 with 2 significant
bits, an e4m3 scale a multiple of 2^-9 with <= 4, so the product is a multiple of 2^-24 (fp16's
subnormal step) with <= 6 significant bits, and <= 6 * 448 * 2^-14 < 1 (fp16 keeps subnormals;
the MMA takes them as they are). The MMA's fp32 sum is then 2^-14 times the true one, and
SCALE_FOLD multiplies the accumulator instead, before alpha: exact, so the order of
reference.gemm (alpha times the complete fp32 sum) is kept. It saves two conversions and the
fp32 multiply per element.
Within a word the kernel keeps the element order (p, p+4): K is permuted identically for A and B,
which a dot product allows, so no nibble is ever interleaved back.
"""

from __future__ import annotations

import torch

LANE_MAG = 0x00070007  # the 3 magnitude bits of the nibble in each 16-bit lane
LANE_SIGN = 0x00080008  # its sign bit, in each lane
MAG_SHIFT = 9  # magnitude bits -> fp16 bits 9..11 (exponent bits 0..1, mantissa bit 9)
SIGN_SHIFT = 12  # nibble bit 3 -> fp16 bit 15
SCALE_FOLD = 2.0**14  # fp16 exponent bias (15) less E2M1's (1), folded into each block scale
# (or, by the half decode, into the accumulator)
WORD_ELEMS = 8  # E2M1 elements per 32-bit word
PAIRS = 4  # fp16 pairs made from one word: (p, p + 4) for p in 0..3


def word_pairs(words: torch.Tensor, p: int) -> torch.Tensor:
    """int32 words -> int32 words holding two fp16 bit patterns: elements p (low) and p+4."""
    x = torch.bitwise_right_shift(words, 4 * p)
    return ((x & LANE_MAG) << MAG_SHIFT) | ((x & LANE_SIGN) << SIGN_SHIFT)


def fp16_lanes(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 pair words -> (low lane, high lane) as fp16 tensors (bit reinterpretation)."""
    lo = (pairs & 0xFFFF).to(torch.int16)  # values < 2^16: wrap to int16 keeps the bits
    hi = (torch.bitwise_right_shift(pairs, 16) & 0xFFFF).to(torch.int16)
    return lo.view(torch.float16), hi.view(torch.float16)


def folded_scale(scale_bytes: torch.Tensor) -> torch.Tensor:
    """UE4M3 scale bytes (uint8) -> fp32 scale * SCALE_FOLD (exact: a power-of-two factor)."""
    return scale_bytes.view(torch.float8_e4m3fn).float() * SCALE_FOLD


def decode_words(
    words: torch.Tensor, scale_bytes: torch.Tensor, half: bool = False
) -> torch.Tensor:
    """The kernel's decode, modelled: int32 words [...] and one scale byte per word [...] ->
    fp16 values * scale [..., 8] in NATURAL element order (element q of each word). `half`:
    the half decode, value * scale * 2^-14 multiplied in fp16 (exact, subnormals included)."""
    if half:
        s = scale_bytes.view(torch.float8_e4m3fn).to(torch.float16)
    else:
        s = folded_scale(scale_bytes)
    out = torch.empty((*words.shape, WORD_ELEMS), dtype=torch.float16, device=words.device)
    for p in range(PAIRS):
        for q, lane in zip((p, p + PAIRS), fp16_lanes(word_pairs(words, p)), strict=True):
            # exact product, exact cast (half: already fp16, the product exact there)
            out[..., q] = lane * s if half else (lane.float() * s).to(torch.float16)
    return out


def pack_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 packed codes [..., 4m] (contiguous) -> int32 words [..., m], little endian."""
    return packed.contiguous().view(torch.int32)
