"""reference.gemm: grouped NVFP4 GEMM exact where it can be, within its derived bound elsewhere.

Bit-exact cases use FP4 codes with power-of-two block and global scales: every product and
partial sum is a small multiple of 2^-6, exact in fp32, so any summation order gives the same
bits. The expected values come from an integer matmul of values decoded here, not by
reference.nvfp4, so the check does not share the decoder it judges.
"""

from __future__ import annotations

import pytest
import torch

from reference.gemm import (
    OUT_UNIT_ROUNDOFF,
    grouped_gemm_error_bound,
    grouped_gemm_nvfp4,
)
from reference.nvfp4 import pack_e2m1, quantize_nvfp4, quantize_weight_nvfp4

FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes by code & 7, bit 3 = sign


def _offsets(tokens: list[int]) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.int64).cumsum(0).to(torch.int32)


def _decode_here(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked 4-bit codes -> float64 values, written independently of reference.nvfp4."""
    mag = torch.tensor(FP4, dtype=torch.float64)[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


def _exact_case(tokens: list[int], k: int, n: int, seed: int, extra_rows: int = 0) -> dict:
    """Random FP4 codes, block scales 2^-2..2^2, global scales 2^-3..2^3; plus the exact result."""
    g = torch.Generator().manual_seed(seed)
    e = len(tokens)
    t = sum(tokens) + extra_rows
    a_c = torch.randint(0, 16, (t, k), generator=g, dtype=torch.uint8)
    b_c = torch.randint(0, 16, (e, k, n), generator=g, dtype=torch.uint8)
    a_x = torch.randint(-2, 3, (t, k // 16), generator=g)
    b_x = torch.randint(-2, 3, (e, k // 16, n), generator=g)
    gsa = torch.exp2(torch.randint(-3, 4, (e,), generator=g).float())
    gsb = torch.exp2(torch.randint(-3, 4, (e,), generator=g).float())

    # values * 8 are integers (FP4 steps of 0.5, scales >= 2^-2): an int64 matmul is exact
    a_int = (_decode_here(a_c) * torch.exp2(a_x.double()).repeat_interleave(16, 1) * 8).long()
    b_int = (_decode_here(b_c) * torch.exp2(b_x.double()).repeat_interleave(16, 1) * 8).long()
    exact = torch.zeros(t, n, dtype=torch.float64)
    offs = _offsets(tokens).tolist()
    for j, (start, end) in enumerate(zip([0, *offs[:-1]], offs, strict=True)):
        alpha = float(gsa[j]) * float(gsb[j])
        exact[start:end] = (a_int[start:end] @ b_int[j]).double() / 64 * alpha
    return {
        "args": (
            pack_e2m1(a_c),
            torch.exp2(a_x.float()).to(torch.float8_e4m3fn),  # powers of two: exact cast
            pack_e2m1(b_c.transpose(1, 2)).transpose(1, 2).contiguous(),
            torch.exp2(b_x.float()).to(torch.float8_e4m3fn),
            _offsets(tokens),
            gsa,
            gsb,
        ),
        "exact": exact,
        "end": offs[-1],
    }


def _block_spread(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.exp2(torch.randint(-6, 7, shape, generator=g).float())


def _random_case(tokens: list[int], k: int, n: int, seed: int, extra_rows: int = 0) -> tuple:
    """bf16 normal data quantized by the reference: per-expert activation and weight gs."""
    g = torch.Generator().manual_seed(seed)
    e, t = len(tokens), sum(tokens) + extra_rows
    # 16-element blocks spread over 2^-6..2^6, so the fp32 sums round (with one narrow range of
    # block scales, sums of 1024 FP4 products are often exact in fp32 and every order agrees)
    x = torch.randn(t, k, generator=g) * _block_spread((t, k // 16), g).repeat_interleave(16, 1)
    w_spread = _block_spread((e, k // 16, n), g).repeat_interleave(16, 1)
    x, w = x.bfloat16(), (torch.randn(e, k, n, generator=g) * w_spread * 0.02).bfloat16()
    a_codes = torch.zeros(t, k // 2, dtype=torch.uint8)
    a_scales = torch.zeros(t, k // 16, dtype=torch.float8_e4m3fn)
    gsa, gsb = torch.ones(e), torch.ones(e)
    b_codes, b_scales = [], []
    offs = _offsets(tokens).tolist()
    for j, (start, end) in enumerate(zip([0, *offs[:-1]], offs, strict=True)):
        if end > start:
            a_codes[start:end], a_scales[start:end], gsa[j] = quantize_nvfp4(x[start:end])
        bc, bs, gsb[j] = quantize_weight_nvfp4(w[j])
        b_codes.append(bc)
        b_scales.append(bs)
    return (
        a_codes,
        a_scales,
        torch.stack(b_codes),
        torch.stack(b_scales),
        _offsets(tokens),
        gsa,
        gsb,
    )


# --------------------------------------------------------------------------------------------
# bit-exact


@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("tokens", [[7], [0, 5, 0, 129, 3], [1, 5, 127, 129, 300]])
def test_bit_exact_on_exact_inputs(tokens: list[int], k: int) -> None:
    case = _exact_case(tokens, k, n=24, seed=k + len(tokens), extra_rows=3)
    args, exact = case["args"], case["exact"]
    out32 = grouped_gemm_nvfp4(*args, out_dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert torch.equal(out32, exact.float())  # exact.float() is exact: |sum| < 2^24 * 2^-6
    # one rounding from the exact value on both sides
    assert torch.equal(grouped_gemm_nvfp4(*args), exact.float().bfloat16())
    assert torch.equal(grouped_gemm_nvfp4(*args, out_dtype=torch.float16), exact.half())
    oracle = grouped_gemm_nvfp4(*args, oracle=True)
    assert oracle.dtype == torch.float64
    assert torch.equal(oracle, exact)


@pytest.mark.parametrize("tokens", [[1], [5], [127], [129], [300], [0, 5, 0, 129, 3], [0, 0]])
def test_token_counts_and_uncovered_rows(tokens: list[int]) -> None:
    case = _exact_case(tokens, k=64, n=16, seed=sum(tokens), extra_rows=9)
    args, end = case["args"], case["end"]
    out = grouped_gemm_nvfp4(*args, out_dtype=torch.float32)
    assert out.shape == (sum(tokens) + 9, 16)
    assert torch.equal(out, case["exact"].float())
    assert torch.count_nonzero(out[end:]) == 0  # rows past offsets[-1] belong to no expert
    assert torch.count_nonzero(grouped_gemm_error_bound(*args)[end:]) == 0
    if end:
        assert torch.count_nonzero(out[:end]) > 0  # the exact check is not vacuous


# --------------------------------------------------------------------------------------------
# the error bound


@pytest.fixture(scope="module")
def random_k1024() -> tuple:
    return _random_case([0, 5, 0, 129, 3], k=1024, n=64, seed=1234, extra_rows=4)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_within_bound(random_k1024: tuple, out_dtype: torch.dtype) -> None:
    args = random_k1024
    oracle = grouped_gemm_nvfp4(*args, oracle=True)
    out = grouped_gemm_nvfp4(*args, out_dtype=out_dtype)
    bound = grouped_gemm_error_bound(*args, out_dtype=out_dtype)
    assert out.dtype == out_dtype and bound.dtype == torch.float64
    err = (out.double() - oracle).abs()
    assert torch.isfinite(oracle).all() and oracle.abs().max() > 0
    assert (err <= bound).all(), f"max err/bound {(err / bound.clamp_min(1e-300)).max()}"
    # not vacuous: two half-ulps of the output format plus the summation term, which for K=1024
    # is gamma_K * P / max|R| ~ 6.1e-5 * 6 here (measured 3.9e-4 with fp32 output)
    rel = bound.max() / oracle.abs().max()
    assert rel < 1e-2
    assert rel < 2 * OUT_UNIT_ROUNDOFF[out_dtype] + 5e-4
    end = int(args[4][-1])  # 137 covered rows, 4 uncovered
    assert (out[end:] == 0).all() and (bound[end:] == 0).all() and (bound[:end] > 0).all()


def test_other_summation_order_within_bound(random_k1024: tuple) -> None:
    """A correct kernel with another order (split-K: 8 fp32 partials, summed last to first)."""
    a_codes, a_scales, b_codes, b_scales, offsets, gsa, gsb = random_k1024
    ones = torch.ones_like(gsa)
    total = torch.zeros(a_codes.shape[0], b_codes.shape[2])
    for part in reversed(range(8)):  # 8 slices of 128 along K
        ks, bs = slice(part * 64, (part + 1) * 64), slice(part * 8, (part + 1) * 8)
        sliced = (a_codes[:, ks], a_scales[:, bs], b_codes[:, ks], b_scales[:, bs])
        sliced = tuple(x.contiguous() for x in sliced)
        total += grouped_gemm_nvfp4(*sliced, offsets, ones, ones, out_dtype=torch.float32)
    counts = torch.diff(offsets, prepend=torch.zeros(1, dtype=torch.int32))
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    split32 = total[: len(rows)] * (gsa * gsb)[rows].unsqueeze(1)  # alpha in fp32, as an epilogue

    ours32 = grouped_gemm_nvfp4(*random_k1024, out_dtype=torch.float32)[: len(rows)]
    assert not torch.equal(split32, ours32)  # the order really differs in the last bits
    oracle = grouped_gemm_nvfp4(*random_k1024, oracle=True)[: len(rows)]
    for dtype in (torch.float32, torch.bfloat16):
        bound = grouped_gemm_error_bound(*random_k1024, out_dtype=dtype)[: len(rows)]
        assert ((split32.to(dtype).double() - oracle).abs() <= bound).all()


def test_bound_catches_skipped_last_k_block(random_k1024: tuple) -> None:
    a_codes, a_scales, *rest = random_k1024
    oracle = grouped_gemm_nvfp4(a_codes, a_scales, *rest, oracle=True)
    bound32 = grouped_gemm_error_bound(a_codes, a_scales, *rest, out_dtype=torch.float32)
    bound16 = grouped_gemm_error_bound(a_codes, a_scales, *rest)
    # a kernel that drops the last K block: zero its A scales, so its 16 products vanish
    skipped = a_scales.float()
    skipped[:, -1] = 0
    planted = (a_codes, skipped.to(torch.float8_e4m3fn), *rest)
    bad32 = grouped_gemm_nvfp4(*planted, out_dtype=torch.float32).double()
    bad16 = grouped_gemm_nvfp4(*planted).double()
    assert ((bad32 - oracle).abs() > bound32).any()
    assert ((bad16 - oracle).abs() > bound16).any()


def test_bound_covers_bf16_midpoint_flip() -> None:
    """Exact result on a bf16 midpoint: a correct kernel may land one bf16 ulp off bf16(oracle).

    K=32, one token: 16 products 4*4 and one product 1*1 give S = 257; alpha = 2^-8 puts R at
    1 + 2^-8, halfway between bf16 1 and 1 + 2^-7. The oracle rounds to 1 (tie to even); a kernel
    whose fp32 sum is off by one fp32 ulp (well inside gamma_K * P) rounds to 1 + 2^-7.
    """
    a_c = torch.zeros(1, 32, dtype=torch.uint8)
    a_c[0, :17] = 6  # 4.0
    a_c[0, 16] = 2  # 1.0
    b_c = torch.zeros(1, 32, 1, dtype=torch.uint8)
    b_c[0, :17, 0] = 6
    b_c[0, 16, 0] = 2
    args = (
        pack_e2m1(a_c),
        torch.ones(1, 2).to(torch.float8_e4m3fn),
        pack_e2m1(b_c.transpose(1, 2)).transpose(1, 2).contiguous(),
        torch.ones(1, 2, 1).to(torch.float8_e4m3fn),
        _offsets([1]),
        torch.tensor([2.0**-4]),
        torch.tensor([2.0**-4]),
    )
    oracle = grouped_gemm_nvfp4(*args, oracle=True)
    assert oracle.item() == 1 + 2**-8
    bound = grouped_gemm_error_bound(*args)
    ulp32 = 2.0**-23
    # room left beside the bf16 half-ulp: a one-ulp fp32 sum error is legitimate
    assert ulp32 < float(bound) - OUT_UNIT_ROUNDOFF[torch.bfloat16] * oracle.item()
    flipped = torch.tensor([[1 + 2**-8 + ulp32]]).bfloat16()  # such a kernel's bf16 output
    assert flipped.item() == 1 + 2**-7 != oracle.bfloat16().item()
    assert (flipped.double() - oracle).abs() <= bound


# --------------------------------------------------------------------------------------------
# validation


def _valid_args() -> list:
    return list(_exact_case([2, 0, 3], k=32, n=8, seed=0, extra_rows=1)["args"])


_BAD = [
    ("a_codes", lambda a: a.__setitem__(0, a[0].to(torch.int8))),
    ("a_scales", lambda a: a.__setitem__(1, a[1].float())),
    ("a_codes", lambda a: a.__setitem__(0, a[0][:, :4].contiguous())),  # K=8: not whole blocks
    ("b_codes", lambda a: a.__setitem__(2, a[2].to(torch.int32))),
    ("b_scales", lambda a: a.__setitem__(3, a[3].float())),
    ("K mismatch", lambda a: a.__setitem__(2, torch.zeros(3, 8, 8, dtype=torch.uint8))),
    ("a_scales", lambda a: a.__setitem__(1, a[1][:, :1].contiguous())),
    ("a_scales", lambda a: a.__setitem__(1, a[1][:-1].contiguous())),
    ("b_scales", lambda a: a.__setitem__(3, a[3][:, :, :-1].contiguous())),
    ("expert_offsets", lambda a: a.__setitem__(4, a[4].long())),
    ("expert_offsets", lambda a: a.__setitem__(4, torch.tensor([2, 1, 5], dtype=torch.int32))),
    ("expert_offsets", lambda a: a.__setitem__(4, torch.tensor([-1, 1, 5], dtype=torch.int32))),
    ("expert_offsets", lambda a: a.__setitem__(4, torch.tensor([2, 2, 7], dtype=torch.int32))),
    ("expert_offsets", lambda a: a.__setitem__(4, torch.tensor([2, 5], dtype=torch.int32))),
    ("global_scale_a", lambda a: a.__setitem__(5, torch.ones(2))),
    ("global_scale_b", lambda a: a.__setitem__(6, torch.ones(4))),
    ("global_scale_b", lambda a: a.__setitem__(6, torch.ones(3, dtype=torch.float64))),
    ("global_scale_a", lambda a: a.__setitem__(5, 1.0)),
]


@pytest.mark.parametrize("fn", [grouped_gemm_nvfp4, grouped_gemm_error_bound])
@pytest.mark.parametrize(("name", "mutate"), _BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(_BAD)])
def test_bad_inputs_name_the_argument(fn, name: str, mutate) -> None:
    args = _valid_args()
    fn(*args)  # the unmutated arguments are valid
    mutate(args)
    with pytest.raises(ValueError, match=name):
        fn(*args)


def test_bad_out_dtype() -> None:
    with pytest.raises(ValueError, match="out_dtype"):
        grouped_gemm_nvfp4(*_valid_args(), out_dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# bounded memory: one expert's weight dequantized at a time, bits unchanged


def _one_shot(args: tuple, oracle: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM and its bound as they were computed before the expert-by-expert loop: every
    expert's B dequantized at once (reference.nvfp4 directly), then one matmul per expert."""
    from reference import gemm as g
    from reference.nvfp4 import dequantize_nvfp4, dequantize_weight_nvfp4

    a_codes, a_scales, b_codes, b_scales, offsets, gsa, gsb = args
    acc = torch.float64 if oracle else torch.float32
    a = dequantize_nvfp4(a_codes, a_scales, 1.0).to(acc)
    b = dequantize_weight_nvfp4(b_codes, b_scales, 1.0).to(acc)  # all experts at once
    alpha = gsa.to(acc) * gsb.to(acc)
    out = torch.zeros(a.shape[0], b.shape[2], dtype=acc)
    ends = offsets.tolist()
    k = a.shape[1]
    g_acc, g64 = g.gamma(k, g.U32), g.gamma(k, g.U64)
    a64, b64 = a.double(), b.double()
    bound = torch.zeros_like(out, dtype=torch.float64)
    for e, (s, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        if end == s:
            continue
        out[s:end] = (a[s:end] @ b[e]) * alpha[e]
        al = (gsa.double() * gsb.double()).abs()[e]
        p = (a64[s:end].abs() @ b64[e].abs()) * (1.0 + 2.0 * g64)
        s_abs = (a64[s:end] @ b64[e]).abs() + g64 * p
        e_a = g.U32 * al + 2.0**-150
        m = s_abs + g_acc * p
        e_c = m * e_a + al * g_acc * p + g.U32 * m * (al + e_a) + 2.0**-150
        e_y = 2.0**-8 * (al * s_abs + e_c) + 2.0**-134
        e_o = al * (g64 * p + g.U64 * (s_abs + g64 * p)) + 2.0**-1074
        bound[s:end] = (e_c + e_y + e_o) * (1.0 + 2.0**-40)
    return (out if oracle else out.to(torch.bfloat16)), bound


@pytest.mark.parametrize("oracle", [False, True])
def test_expert_by_expert_equals_one_shot(oracle: bool, monkeypatch) -> None:
    """Several experts (one empty): the loop's output and bound equal the all-at-once formula
    bit for bit, and the dequantizer is never handed more than one expert's weight."""
    from reference import gemm as g

    args = _random_case([5, 0, 33, 17], 256, 64, seed=11)
    seen = []
    real = g.dequantize_weight_nvfp4

    def spy(codes, scales, gs, dtype=torch.float32):
        seen.append(tuple(codes.shape))
        return real(codes, scales, gs, dtype)

    monkeypatch.setattr(g, "dequantize_weight_nvfp4", spy)
    out = grouped_gemm_nvfp4(*args, oracle=oracle)
    bound = grouped_gemm_error_bound(*args)
    want_out, want_bound = _one_shot(args, oracle)
    assert out.dtype == want_out.dtype and torch.equal(out, want_out)
    assert torch.equal(bound, want_bound)
    assert seen and all(len(s) == 2 for s in seen)  # [K/2, N]: one expert, never [E, K/2, N]
    assert len(seen) == 2 * 3  # the three non-empty experts, once in the GEMM, once in the bound
