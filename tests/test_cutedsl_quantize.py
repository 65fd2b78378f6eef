"""CuTeDSL NVFP4 quantize / SwiGLU-requantize kernels.

CPU (CI): the bit model of the kernel's software E2M1 rounding equals the reference on every
bf16 input and on dense fp32 sweeps around each rounding midpoint; the bracket's PTX text, run
by tests/ptx_emu.py, computes that model bit for bit; every kernel configuration
compiles for sm_90a and sm_100a with fake arguments, and its PTX holds the instructions the
semantics rest on (e2m1x2 cvt on sm_100a only, e4m3 satfinite cvt, max.NaN, div.rn) with no
local memory and no spills. GPU: bit-exact against reference/ (codes and scale bytes).
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.cutedsl.bitmodel import e2m1_codes_finite, e2m1_codes_sw, quantize_model
from reference.layouts import swizzle_scales as ref_swizzle
from reference.nvfp4 import encode_e2m1, quantize_nvfp4
from tests.cutedsl_marks import HAS_DSL, WHY_NO_DSL, needs_dsl, needs_gpu


def all_bf16() -> torch.Tensor:
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# the bit model (CPU)


def test_sw_e2m1_matches_reference_around_every_midpoint():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.0])
    steps = torch.arange(-4096, 4097, dtype=torch.int32)
    bits = mids.view(torch.int32).unsqueeze(1) + steps  # ulp neighbours of each midpoint
    q = bits.flatten().view(torch.float32)
    q = torch.cat([q, -q, torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])])
    assert torch.equal(e2m1_codes_sw(q), encode_e2m1(q))


def test_sw_e2m1_matches_reference_on_random_fp32_patterns():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64)
    q = bits.to(torch.int32).view(torch.float32)
    assert torch.equal(e2m1_codes_sw(q), encode_e2m1(q))


def test_fast_path_e2m1_matches_reference_for_finite_values():
    g = torch.Generator().manual_seed(2)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64)
    q = bits.to(torch.int32).view(torch.float32)
    q = q[torch.isfinite(q)]
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.9, 1e30, 0.0, -0.0])
    q = torch.cat([q, mids, -mids, torch.nextafter(mids, mids + 1)])
    assert torch.equal(e2m1_codes_finite(q, q), encode_e2m1(q))
    # a -0 input whose quotient lost its sign (+0) still gets code 0x8 from the input's sign
    assert e2m1_codes_finite(torch.tensor([0.0]), torch.tensor([-0.0])).tolist() == [8]


def test_sw_e2m1_named_ties_and_signs():
    q = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, -0.0, -0.1, float("nan")])
    assert e2m1_codes_sw(q).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 8, 7]


@pytest.mark.parametrize("gs", [1.0, 1 / 2688, 3.7e-5, 0.3, 123.456, 1e-30, 7e20])
def test_quantize_model_matches_reference_on_every_bf16(gs):
    x = all_bf16().reshape(-1, 16)
    g = torch.tensor(gs, dtype=torch.float32)
    for blocks in (
        x,
        x.flatten()[torch.randperm(65536, generator=torch.Generator().manual_seed(1))].reshape(
            -1, 16
        ),
    ):
        codes, scales = quantize_model(blocks, g)
        ref_codes, ref_scales, _ = quantize_nvfp4(blocks, g)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(scales, ref_scales.view(torch.uint8))


def _calibrated_randn(t: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 activations with the usual static scale gs = amax / (6 * 448): its factors 3 and 7
    meet the e4m3 scales' (1.5, 1.75, ...), so many quotients land exactly on E2M1 midpoints."""
    x = (torch.randn(t, k, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16)
    return x, (x.float().abs().amax() / 2688).reshape(1)


@pytest.mark.parametrize("rcp_ulps", [0, -8, 8])
@pytest.mark.parametrize("gs", [1.0, 1 / 2688, 3.7e-5, 0.3, 123.456, 1e-30, 7e20, 2.0**-30])
def test_bracket_model_matches_reference_on_every_bf16(gs, rcp_ulps):
    """The sm_90 bracket (codes from x * R, two roundings per value, a word redone by the
    divisions where they differ) gives the reference's bits for every bf16 value, however R's
    last bits fall (the kernel's R is within about one ulp of RN(1 / RN(gs * s)))."""
    from dsv4.kernels.cutedsl.bitmodel import quantize_model_bracketed

    x = all_bf16()
    perm = torch.randperm(65536, generator=torch.Generator().manual_seed(3))
    g = torch.tensor(gs, dtype=torch.float32)
    for blocks in (x.reshape(-1, 16), x[perm].reshape(-1, 16), x[perm].reshape(-1, 64)):
        codes, scales, _ = quantize_model_bracketed(blocks, g, rcp_ulps)
        ref_codes, ref_scales, _ = quantize_nvfp4(blocks, g)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(scales, ref_scales.view(torch.uint8))


@needs_dsl
@pytest.mark.parametrize("rcp_ulps", [0, -3, 5])
def test_bracket_ptx_computes_the_bit_model(rcp_ulps):
    """The kernel's bracket PTX text (nvfp4_quant._BRACKET_PTX), executed statement by
    statement by tests/ptx_emu.py on every finite bf16 value in blocks of 16 with the block's
    R: its code word holds the model's codes (bitmodel.bracket_codes: value j in nibble j, its
    sign in bit 3) and its difference word is 1 in exactly the nibbles whose two ends round
    apart. So the model the exhaustive tests above check is the PTX the kernel runs."""
    import numpy as np

    from dsv4.kernels.cutedsl import nvfp4_quant as nq
    from dsv4.kernels.cutedsl.bitmodel import bracket_codes, bracket_rcp
    from tests.ptx_emu import run_ptx

    x = all_bf16()
    x = x[torch.isfinite(x)]
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(rcp_ulps + 7))]
    blocks = x[: x.numel() // 16 * 16].float().reshape(-1, 16)
    _, byte = quantize_model(blocks.reshape(1, -1), torch.tensor(1.0))
    s = byte.view(torch.float8_e4m3fn).float().reshape(-1, 1)
    rcp = bracket_rcp(torch.tensor(1.0), s, rcp_ulps)
    codes, agree = bracket_codes(blocks, rcp)
    for half in range(2):
        v = blocks[:, 8 * half : 8 * half + 8].numpy()
        args = {2 + j: v[:, j].astype(np.float32) for j in range(8)}
        args[10] = rcp[:, 0].numpy().astype(np.float32)
        regs = run_ptx(nq._BRACKET_PTX, args)
        c = codes[:, 8 * half : 8 * half + 8].numpy().astype(np.uint32)
        a = agree[:, 8 * half : 8 * half + 8].numpy()
        word = sum(c[:, j] << np.uint32(4 * j) for j in range(8)).astype(np.uint32)
        diff = sum((~a[:, j]).astype(np.uint32) << np.uint32(4 * j) for j in range(8))
        bad = np.flatnonzero((regs["$0"] != word) | (regs["$1"] != diff.astype(np.uint32)))
        assert bad.size == 0, (
            f"half {half}, block {bad[0]}: PTX word {regs['$0'][bad[0]]:#010x} diff "
            f"{regs['$1'][bad[0]]:#010x}, model {word[bad[0]]:#010x} {diff[bad[0]]:#010x}"
        )


@needs_dsl
@pytest.mark.parametrize("finite", [False, True], ids=["with_nan_clamp", "finite"])
def test_software_e2m1_ptx_computes_the_bit_model(finite):
    """The sm_90 software E2M1 PTX of the divided values (nvfp4_quant.e2m1x2_ptx: NaN -> +6,
    clamped to +-6 first) and of the fast path (e2m1x2_finite_ptx: min(|q|, 6), the sign from
    another register), run by tests/ptx_emu.py on random fp32 patterns (NaN, Inf, subnormals)
    and on every ulp neighbour of each E2M1 midpoint: the bit model's codes, both nibbles."""
    import numpy as np

    from dsv4.kernels.cutedsl import nvfp4_quant as nq
    from dsv4.kernels.cutedsl.bitmodel import e2m1_codes_finite, e2m1_codes_sw
    from tests.ptx_emu import run_ptx

    g = torch.Generator().manual_seed(11)
    rand = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=g).to(torch.int32)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.0, 1.0, 2.0, 4.0])
    near = (mids.view(torch.int32)[:, None] + torch.arange(-300, 301, dtype=torch.int32)).flatten()
    q = torch.cat([rand.view(torch.float32), near.view(torch.float32), -near.view(torch.float32)])
    if finite:
        q = q[~torch.isnan(q)]
    q = q[: q.numel() // 2 * 2]
    lo, hi = q[0::2], q[1::2]
    if finite:  # signs from the block's inputs: here values of the same sign, other bits
        sl, sh = lo * 3, -(-hi * 0.5)
        want = e2m1_codes_finite(lo, sl).int() | e2m1_codes_finite(hi, sh).int() << 4
        args = {1: lo.numpy(), 2: hi.numpy(), 3: sl.numpy(), 4: sh.numpy()}
        regs = run_ptx(nq.e2m1x2_finite_ptx(False), args)
    else:
        want = e2m1_codes_sw(lo).int() | e2m1_codes_sw(hi).int() << 4
        regs = run_ptx(nq.e2m1x2_ptx(False), {1: lo.numpy(), 2: hi.numpy()})
    want = want.numpy().astype(np.uint32)
    bad = np.flatnonzero(regs["$0"] != want)
    assert bad.size == 0, (
        f"({lo[bad[0]].item()!r}, {hi[bad[0]].item()!r}): PTX {regs['$0'][bad[0]]:#x}, "
        f"model {want[bad[0]]:#x}"
    )


@needs_dsl
@pytest.mark.parametrize("r_ulps", [0, -1, 1])
def test_corrected_division_ptx_is_the_correctly_rounded_quotient(r_ulps):
    """The fast path's division (nvfp4_quant._DIV_CORRECTED_PTX: q0 = a r, e = a - b q0,
    q = q0 + r e), run by tests/ptx_emu.py with r one ulp either side of RN(1 / b) (the
    kernel's rcp.approx + Newton step lands within that), equals RN(a / b) computed exactly
    (fractions) for a, b over the fast path's range (|a| <= 2^90, b in [2^-30, 2^30], the
    e4m3 scales among them)."""
    import math
    from fractions import Fraction

    import numpy as np

    from dsv4.kernels.cutedsl import nvfp4_quant as nq
    from tests.ptx_emu import run_ptx

    g = torch.Generator().manual_seed(17 + r_ulps)
    n = 4000
    a = (torch.rand(n, generator=g) * 2 - 1) * torch.exp2(torch.randint(-60, 91, (n,), generator=g))
    e4m3 = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    b = torch.cat([e4m3, torch.rand(n - e4m3.numel(), generator=g) + 0.5])
    b = b * torch.exp2(torch.randint(-30, 29, (n,), generator=g).float())
    b = b.clamp(2.0**-30, 2.0**30)
    r = (1.0 / b.double()).float()  # RN(1 / b): one rounding of the exact fp64 quotient's
    for _ in range(abs(r_ulps)):
        r = torch.nextafter(r, torch.full_like(r, math.inf if r_ulps > 0 else 0.0))
    got = run_ptx(nq._DIV_CORRECTED_PTX, {1: a.numpy(), 2: r.numpy(), 3: (-b).numpy()})["$0"]

    def rn32(x: Fraction) -> float:  # correctly rounded to fp32 (normal results here)
        if x == 0:
            return 0.0
        m, e = abs(x), math.floor(math.log2(abs(x)))
        while Fraction(2) ** e > m:
            e -= 1
        while Fraction(2) ** (e + 1) <= m:
            e += 1
        t = m / Fraction(2) ** e * 2**23
        lo = math.floor(t)
        up = t - lo > Fraction(1, 2) or (t - lo == Fraction(1, 2) and lo % 2)
        return math.copysign(float(Fraction(lo + up, 2**23) * Fraction(2) ** e), float(x))

    want = np.array(
        [rn32(Fraction(float(x)) / Fraction(float(y))) for x, y in zip(a, b, strict=True)],
        dtype=np.float32,
    ).view(np.uint32)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"a={a[bad[0]].item()!r} b={b[bad[0]].item()!r}: {bad.size} differ"


def test_bracket_divides_the_quotients_near_a_midpoint():
    """Quotients exactly on and within an ulp of every midpoint, for every e4m3 scale: the bracket
    must not decide those (the kernel divides them), and the result is the reference's."""
    from dsv4.kernels.cutedsl.bitmodel import bracket_codes, quantize_model_bracketed

    s = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    steps = torch.arange(-2, 3, dtype=torch.int32)
    q = (mids[:, None].view(torch.int32) + steps).view(torch.float32)  # [7 midpoints, 5]
    q = torch.cat([q, q[:1]])  # 8 words
    words = torch.cat([q, torch.zeros(8, 3)], 1)  # 8 words of 8: 5 quotients, 3 zeros
    x = (words[None] * s[:, None, None]).reshape(len(s), 4, 16)  # per scale 4 blocks, gs = 1
    x[..., 15] = 6 * s[:, None]  # each block's amax: its scale byte is s again
    x = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.5, -x, x)
    _, agree = bracket_codes(x, 1.0 / (6 * s[:, None, None]))  # gs = 1: the kernel's R / 6
    near = agree.unflatten(-1, (-1, 8))[..., :5]  # each word: 5 quotients near a midpoint
    assert not near.all(-1).any()  # the bracket decides none of those words alone
    codes, scales, redone = quantize_model_bracketed(x, torch.tensor(1.0))
    ref_codes, ref_scales, _ = quantize_nvfp4(x, torch.tensor(1.0))
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales.view(torch.uint8))
    assert redone.unflatten(-1, (-1, 8)).any(-1).all()
    assert not redone.unflatten(-1, (-1, 8))[..., 5:].any()  # zeros and amax: decided


def test_bracket_redoes_few_words_of_calibrated_activations():
    """How often the fallback runs on realistic input (a speed fact, asserted loosely so a
    bracket that silently redoes everything, or nothing at exact ties, fails)."""
    from dsv4.kernels.cutedsl.bitmodel import quantize_model_bracketed

    x, gs = _calibrated_randn(512, 7168, 0)
    codes, _, redone = quantize_model_bracketed(x, gs)
    assert torch.equal(codes, quantize_nvfp4(x, gs)[0])
    assert 1e-4 < redone.float().mean() < 0.02, redone.float().mean()
    _, _, redone = quantize_model_bracketed(x, torch.tensor([0.0123457]))  # no shared factors
    assert redone.float().mean() < 1e-4


def test_bracket_fma_rounds_exactly_as_modelled():
    """The model's claim for fma(a, 2^-22 (1 -+ 2^-19), bits(2^e) + 2e): the result is k plus N
    ulps, N = a (1 -+ 2^-19) / 2^(e-1) rounded half to even, and its low byte is the E2M1 code
    of a (1 -+ 2^-19). Checked with exact rational arithmetic around every midpoint and binade
    edge and on random magnitudes."""
    import math
    import random
    import struct
    from fractions import Fraction

    from dsv4.kernels.cutedsl.bitmodel import BRACKET
    from reference.nvfp4 import E2M1_MIDPOINTS, E2M1_VALUES

    def f32(bits: int) -> float:
        return struct.unpack("<f", struct.pack("<I", bits))[0]

    def bits(v: float) -> int:
        return struct.unpack("<I", struct.pack("<f", v))[0]

    def rn_f32(x: Fraction) -> int:  # bits of RN(x) in fp32, x in [1, 8): 23 fraction bits
        e = math.floor(math.log2(x))
        n = x / Fraction(2) ** e * 2**23
        lo = math.floor(n)
        r = lo + (1 if n - lo > Fraction(1, 2) or (n - lo == Fraction(1, 2) and lo % 2) else 0)
        return ((127 + e) << 23) + r - 2**23

    def e2m1_code(t: Fraction) -> int:  # exact RNE of t >= 0 to E2M1 (saturating at 6)
        grid = [Fraction(v) for v in E2M1_VALUES]
        best = min(range(8), key=lambda c: (abs(t - grid[c]), c % 2))  # ties: the even code
        return best

    rng = random.Random(5)
    points = [0.0, 1.0, 2.0, 4.0, 6.0, *E2M1_MIDPOINTS]
    values = [rng.uniform(0, 6) for _ in range(3000)]
    for p in points:
        for d in range(-40, 41):
            values.append(f32(bits(p) + d) if p else f32(max(d, 0)))
    for sign in (-1, 1):
        s_bits = bits(2.0**-22 * (1 + sign * BRACKET))
        for v in values:
            a = min(abs(f32(bits(v))), 6.0)
            e = int(math.floor(math.log2(max(a, 1.0))))
            k = bits(2.0**e) + 2 * e
            exact = rn_f32(Fraction(a) * Fraction(f32(s_bits)) + Fraction(f32(k)))
            n = round(Fraction(a) * (1 + sign * Fraction(BRACKET)) * Fraction(2) ** (1 - e))
            assert exact == k + n, (v, sign)
            assert (exact & 0xFF) == e2m1_code(Fraction(a) * (1 + sign * Fraction(BRACKET)))


# --------------------------------------------------------------------------------------------
# compile for sm_90a / sm_100a with fake arguments (CPU), PTX checks


def _configs():
    from dsv4.kernels.cutedsl.nvfp4_quant import Prologue, QuantConfig, ScaleLayout

    return {
        "quant_h7168": QuantConfig(7168),
        "quant_linear_fp32": QuantConfig(4096, "float32", ScaleLayout.LINEAR),
        "quant_grouped_g8": QuantConfig(4096, groups=8),
        "quant_k48_padded_cols": QuantConfig(48),
        "quant_gather_linear": QuantConfig(7168, scale_layout=ScaleLayout.LINEAR, gather=True),
        "quant_div_rn_only": QuantConfig(7168, fast_division=False, bracketed_codes=False),
        "quant_no_bracket": QuantConfig(7168, bracketed_codes=False),
        "swiglu_i3072_weighted": QuantConfig(3072, prologue=Prologue.SWIGLU, row_weight=True),
        "swiglu_up_first_nolimit": QuantConfig(
            2048, prologue=Prologue.SWIGLU, swiglu_limit=None, gate_first=False
        ),
        # the tuning fields (bench/quantize.py --variants): several blocks per thread
        "quant_h7168_bpt2_thr256": QuantConfig(7168, blocks_per_thread=2, threads=256),
        "quant_h7168_bpt4": QuantConfig(7168, blocks_per_thread=4),
        "quant_gather_linear_bpt4": QuantConfig(
            7168, scale_layout=ScaleLayout.LINEAR, gather=True, blocks_per_thread=4
        ),
        "swiglu_i3072_weighted_bpt4": QuantConfig(
            3072, prologue=Prologue.SWIGLU, row_weight=True, blocks_per_thread=4
        ),
        # the routed MoE's staging: scales straight into the experts' padded layout
        "quant_gather_experts48": QuantConfig(7168, gather=True, experts=48),
        "quant_gather_experts48_bpt2": QuantConfig(
            7168, gather=True, experts=48, blocks_per_thread=2
        ),
        "swiglu_i3072_weighted_experts48": QuantConfig(
            3072, prologue=Prologue.SWIGLU, row_weight=True, experts=48
        ),
        "quant_experts1": QuantConfig(512, experts=1),
    }


@needs_dsl
@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("name", list(_configs()))
def test_kernel_compiles_with_expected_ptx(name, arch):
    from dsv4.kernels.cutedsl.nvfp4_quant import Prologue, compile_quant
    from dsv4.kernels.cutedsl.ptx_check import compile_report

    cfg = _configs()[name]
    rep = compile_report(lambda opts: compile_quant(cfg, arch, opts), arch)
    bpt = cfg.blocks_per_thread  # every block of a thread has both paths of its own
    paths = (2 if cfg.fast_division else 1) * bpt  # the fast path and the div.rn path
    hw = rep.count("cvt.rn.satfinite.e2m1x2.f32")
    want = 8 * paths if arch == "sm_100a" else 0
    assert hw == want, f"{name} {arch}: {hw} e2m1x2 cvts, want {want}"
    if arch == "sm_90a":  # the exact software rounding: one fma per element and path
        assert rep.count("fma.rn.f32") >= 16 * paths
    assert rep.count("cvt.rn.satfinite.e4m3x2.f32") == paths
    assert rep.count("max.NaN.f32") >= 16 * bpt
    # the div.rn path: x / gs and q / s per element and amax / 6, correctly rounded as the
    # reference (silu's division too); the fast path: CUDA's div.rn fast path inlined
    per_elem = 2 if cfg.prologue is Prologue.NONE else 3
    assert rep.count("div.rn.f32") >= (16 * per_elem + 1) * bpt
    bracket = cfg.bracketed_codes and arch == "sm_90a"
    if cfg.fast_division:  # 1 / gs and 1 / s seeded by rcp.approx, one Newton step each
        # the bracket: 1 / (gs * s) too, and 1 / s in each code word's fallback
        assert rep.count("rcp.approx.ftz.f32") == (4 if bracket else 2) * bpt
        assert rep.count("fma.rn.f32") >= 2 * 2 * 16 * bpt  # two corrections per division
    if cfg.fast_division and cfg.prologue is Prologue.NONE and cfg.in_dtype != "float32":
        # the fast path's block amax: a tree of packed 16-bit maxes (7 per block)
        ty = {"bfloat16": "bf16x2", "float16": "f16x2"}[cfg.in_dtype]
        assert rep.count(f"max.NaN.xorsign.abs.{ty}") == 7 * bpt
    if bracket:  # per code word: 2 x 3 prmts gather both ends' codes, 6 the signs
        assert rep.count("prmt.b32") == 2 * 12 * bpt
        assert rep.ptx.count("0f347FFFE0") == rep.ptx.count("0f34800010") == 16 * bpt
    else:
        assert rep.count("prmt.b32") == 0
    # codes: one vector store of 8 (one block) or 16 bytes (2 blocks) per 16 bytes;
    # scales: one store of bpt bytes
    assert rep.count(
        {1: "st.global.v2.b32", 2: "st.global.v4.b32", 4: "st.global.v4.b32"}[bpt]
    ) == (2 if bpt == 4 else 1)
    assert rep.count({1: "st.global.b8", 2: "st.global.b16", 4: "st.global.b32"}[bpt]) == 1
    assert rep.count("div.approx") == 0
    # the only flush-to-zero: exp's ex2.approx.ftz (libdevice expf, as torch's CUDA silu) and
    # the fast path's rcp.approx.ftz seeds, whose operands are normal (range-checked)
    ftz = rep.ptx.count(".ftz")
    assert ftz == rep.count("ex2.approx.ftz.f32") + rep.count("rcp.approx.ftz.f32"), ftz
    if cfg.prologue is Prologue.NONE:
        assert rep.count("ex2.approx.ftz.f32") == 0
    assert not rep.uses_local_memory, f"{name} {arch} uses local memory"
    assert (rep.stack_bytes, rep.spill_store_bytes, rep.spill_load_bytes) == (0, 0, 0), rep
    assert rep.registers <= 128, f"{name} {arch}: {rep.registers} registers"


@needs_dsl
def test_kernel_loads_are_vectorized_and_codes_store_wide():
    from dsv4.kernels.cutedsl.nvfp4_quant import QuantConfig, compile_quant
    from dsv4.kernels.cutedsl.ptx_check import compile_report

    rep = compile_report(lambda o: compile_quant(QuantConfig(7168), "sm_90a", o), "sm_90a")
    assert rep.count("ld.global.v4.b32") == 2  # 16 bf16 = two 16-byte loads
    assert rep.count("ld.global.b16") == 0


def test_config_rejects_bad_values_naming_them():
    if not HAS_DSL:
        pytest.skip(WHY_NO_DSL)
    from dsv4.kernels.cutedsl.nvfp4_quant import Nvfp4QuantKernel, QuantConfig, ScaleLayout

    with pytest.raises(ValueError, match="k must be a positive multiple of 16"):
        QuantConfig(24)
    with pytest.raises(ValueError, match="in_dtype"):
        QuantConfig(32, "int8")
    with pytest.raises(ValueError, match="SWIGLU prologue only"):
        QuantConfig(32, row_weight=True)
    with pytest.raises(ValueError, match="arch must be one of"):
        Nvfp4QuantKernel(QuantConfig(32), "sm_80")
    with pytest.raises(ValueError, match=r"blocks_per_thread must be 1, 2 or 4 and divide k/16=3"):
        QuantConfig(48, blocks_per_thread=2)
    with pytest.raises(ValueError, match="blocks_per_thread"):
        QuantConfig(64, blocks_per_thread=3)
    with pytest.raises(ValueError, match="threads must be"):
        QuantConfig(64, threads=96)
    with pytest.raises(ValueError, match="experts needs the SWIZZLED scale layout and one group"):
        QuantConfig(64, scale_layout=ScaleLayout.LINEAR, experts=4)
    with pytest.raises(ValueError, match="experts needs the SWIZZLED"):
        QuantConfig(64, groups=2, experts=4)
    with pytest.raises(ValueError, match="experts must be an int >= 0"):
        QuantConfig(64, experts=-1)


def test_tuned_falls_back_to_what_k_and_the_outputs_allow():
    if not HAS_DSL:
        pytest.skip(WHY_NO_DSL)
    from dsv4.kernels.cutedsl.nvfp4_quant import QuantConfig, tuned

    four = {"blocks_per_thread": 4, "threads": 256}
    assert tuned(QuantConfig(7168), four).blocks_per_thread == 4  # 448 blocks
    assert tuned(QuantConfig(7168), four).threads == 256
    assert tuned(QuantConfig(96), four).blocks_per_thread == 2  # 6 blocks
    assert tuned(QuantConfig(48), four).blocks_per_thread == 1  # 3 blocks
    buf = torch.empty(64, dtype=torch.uint8)
    at = buf.data_ptr()
    codes = buf[(8 - at) % 16 :]  # 8 bytes past a 16-byte boundary: no 16-byte code stores
    assert codes.data_ptr() % 16 == 8
    assert tuned(QuantConfig(7168), four, codes=codes).blocks_per_thread == 1
    scales = buf[(2 - at) % 4 :]  # 2-byte aligned only: 2-byte scale words at most
    assert tuned(QuantConfig(7168), four, scales=scales).blocks_per_thread == 2


@needs_dsl
def test_tuned_takes_the_many_rows_tuning_from_its_row_count():
    from dsv4.kernels.cutedsl.nvfp4_quant import MANY_ROWS, Prologue, QuantConfig, tuned

    min_rows, many = MANY_ROWS[Prologue.NONE]
    cfg = QuantConfig(7168)
    assert tuned(cfg, rows=min_rows - 1).blocks_per_thread == 1
    assert tuned(cfg, rows=min_rows).blocks_per_thread == many["blocks_per_thread"]
    codes = torch.empty(min_rows, 3584, dtype=torch.uint8)  # rows from the outputs
    assert tuned(cfg, codes=codes).blocks_per_thread == many["blocks_per_thread"]
    assert tuned(cfg, codes=codes[:128]).blocks_per_thread == 1
    assert tuned(cfg, {"blocks_per_thread": 1}, rows=10**6).blocks_per_thread == 1  # explicit
    sw = QuantConfig(3072, prologue=Prologue.SWIGLU)
    assert tuned(sw, rows=10**6).blocks_per_thread == 1  # SwiGLU: 1 at every row count
    slow = QuantConfig(7168, fast_division=False, bracketed_codes=False)
    assert tuned(slow).bracketed_codes is False  # the bracket needs the fast path


# --------------------------------------------------------------------------------------------
# GPU: bit-exact against the reference


def _ref(x, gs):
    codes, scales, _ = quantize_nvfp4(x, gs)
    return codes, scales.view(torch.uint8)


def _assert_linear_exact(cfg, x, gs, quantized=None):
    """Run cfg (linear scales) on x [T, K_in] and compare codes and scale bytes with reference/'s
    quantize of `quantized` (x itself when None; the SwiGLU of x for a SWIGLU config)."""
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    codes = torch.empty(x.shape[0], cfg.k // 2, dtype=torch.uint8, device=x.device)
    sf = torch.empty(x.shape[0], cfg.cols, dtype=torch.uint8, device=x.device)
    nq.run_quant(cfg, x, gs, codes, sf)
    rc, rs = _ref(x if quantized is None else quantized, gs)
    assert torch.equal(sf, rs)
    assert torch.equal(codes, rc)


@needs_gpu
@pytest.mark.parametrize("bpt", [1, 2, 4])
@pytest.mark.parametrize("t", [1, 3, 31, 128, 129, 4097])
def test_gpu_quantize_bit_exact_any_token_count(t, bpt, monkeypatch):
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    tuning = {"blocks_per_thread": bpt, "threads": 256}
    monkeypatch.setattr(nq, "DEFAULT_TUNING", {p: tuning for p in nq.Prologue})
    monkeypatch.setattr(nq, "MANY_ROWS", {})

    g = torch.Generator(device="cuda").manual_seed(t)
    x = (torch.randn(t, 7168, device="cuda", generator=g) * 3).to(torch.bfloat16)
    x[0, :16] = 0  # an all-zero block
    x[-1, 16:32] *= 1e4  # a block past the calibrated amax: scale saturates at 448
    gs = (x.float().abs().amax() / 2688 / 4).reshape(1)
    codes, sf = nq.quantize(x, gs)
    rc, rs = _ref(x, gs)
    assert torch.equal(codes, rc)
    assert torch.equal(sf.view(torch.uint8), ref_swizzle(rs).view(torch.uint8))
    lc, ls = nq.quantize(x, gs, nq.ScaleLayout.LINEAR)
    assert torch.equal(lc, rc) and torch.equal(ls.view(torch.uint8), rs)


@needs_gpu
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("gs", [1.0, 1 / 2688, 3.7e-5, 123.456, 1e-30, 2.0**-31, 2.0**29])
def test_gpu_quantize_every_bf16_value(gs, fast):
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    x = all_bf16().reshape(-1, 64).cuda()
    finite = x[torch.isfinite(x) & (x.abs() < 2.0**80)]
    blocks = [x, x.flatten()[torch.randperm(65536, device="cuda")].reshape(-1, 64)]
    for _ in range(4):  # in-range blocks only: every one takes the fast path
        perm = torch.randperm(finite.numel(), device="cuda", generator=None)
        blocks.append(finite[perm][: finite.numel() // 64 * 64].reshape(-1, 64))
    x = torch.cat(blocks)
    g = torch.tensor([gs], dtype=torch.float32, device="cuda")
    for bpt in (1, 2, 4):
        cfg = nq.QuantConfig(
            64,
            scale_layout=nq.ScaleLayout.LINEAR,
            fast_division=fast,
            bracketed_codes=fast,
            blocks_per_thread=bpt,
        )
        _assert_linear_exact(cfg, x, g)


@needs_gpu
@pytest.mark.parametrize("bracket", [True, False])
def test_gpu_calibrated_activations_bit_exact_with_and_without_the_bracket(bracket):
    """gs = amax / 2688 puts many quotients exactly on midpoints (bitmodel: ~0.7% of the code
    words redone by the divisions): both code paths of the fast path, every blocks-per-thread."""
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    x, gs = _calibrated_randn(1024, 7168, 7)
    x, gs = x.cuda(), gs.cuda()
    for bpt in (1, 2, 4):
        cfg = nq.QuantConfig(
            7168, scale_layout=nq.ScaleLayout.LINEAR, bracketed_codes=bracket, blocks_per_thread=bpt
        )
        _assert_linear_exact(cfg, x, gs)
    from reference.activation import swiglu

    sw = nq.QuantConfig(
        3584,
        scale_layout=nq.ScaleLayout.LINEAR,
        prologue=nq.Prologue.SWIGLU,
        bracketed_codes=bracket,
    )
    h = swiglu(x, 10.0)
    _assert_linear_exact(sw, x, (h.abs().amax() / 2688).reshape(1), quantized=h)


@needs_gpu
def test_gpu_fast_division_on_rounding_midpoints():
    """Blocks whose quotients land on and next to every E2M1 midpoint, for every e4m3 scale:
    where a division's last bit decides the code."""
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device="cuda")
    scales = torch.arange(1, 127, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    s = scales.float()
    steps = torch.arange(-3, 4, device="cuda", dtype=torch.int32)
    q = (mids[None, :, None].view(torch.int32) + steps).view(torch.float32)  # ulp neighbours
    vals = (q * s[:, None, None]).reshape(len(s), -1)  # x_n near m * s, exact or not
    vals = vals[:, : vals.shape[1] // 15 * 15].reshape(-1, 15)
    amax = (6 * s).repeat_interleave(vals.shape[0] // len(s))[:, None]  # block max: s exact
    x = torch.cat([vals, amax], 1)
    x = torch.where(torch.rand_like(x) < 0.5, -x, x)
    gs = torch.tensor([1.0], device="cuda")
    _assert_linear_exact(nq.QuantConfig(16, "float32", nq.ScaleLayout.LINEAR), x, gs)


@needs_gpu
def test_gpu_quantize_specials_and_fp32_input():
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    x = torch.randn(64, 256, device="cuda")
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    x[3, :16] = -0.0
    x[4, :16] = 1e-42  # subnormal fp32: underflowed block
    x[5] = x[5] * 1e30
    g = torch.tensor([0.01], device="cuda")
    codes, sf = nq.quantize(x, g, nq.ScaleLayout.LINEAR)
    rc, rs = _ref(x, g)
    assert torch.equal(codes, rc) and torch.equal(sf.view(torch.uint8), rs)
    assert int(sf.view(torch.uint8)[0, 0]) == 0x7F


@needs_gpu
def test_gpu_grouped_one_launch_per_group_scale():
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    t, gn, d = 129, 4, 512
    o = torch.randn(t, gn * d, device="cuda").to(torch.bfloat16)
    gs = torch.rand(gn, device="cuda") * 0.01 + 1e-3
    codes, sf = nq.quantize(o.view(t, gn, d), gs)
    rows = (t + 127) // 128 * 128
    per = rows * (d // 16)
    for g in range(gn):
        rc, rs = _ref(o.view(t, gn, d)[:, g], gs[g])
        assert torch.equal(codes[g * t : (g + 1) * t], rc)
        assert torch.equal(
            sf.view(torch.uint8)[g * per : (g + 1) * per], ref_swizzle(rs).view(torch.uint8)
        )


@needs_gpu
def test_gpu_gather_quantize_equals_quantize_of_gathered_rows():
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    x = torch.randn(100, 512, device="cuda").to(torch.bfloat16)
    index = torch.randint(0, 100, (600,), device="cuda", dtype=torch.int32)
    gs = torch.tensor([0.001], device="cuda")
    codes, sf = nq.quantize(x, gs, nq.ScaleLayout.LINEAR, index=index)
    rc, rs = _ref(x[index.long()], gs)
    assert torch.equal(codes, rc) and torch.equal(sf.view(torch.uint8), rs)


@needs_gpu
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize(
    "counts", [[17, 0, 130, 1, 0], [0, 0, 5], [300], [0, 129, 0, 0], [128, 128, 1, 255]]
)
def test_gpu_expert_layout_equals_quantize_then_assemble(counts, swiglu):
    """quantize_to_expert_layout (one launch) = the torch quantize (or SwiGLU-requant) of the
    staged rows + assemble_scales_2d_side_from_offsets, byte for byte over the whole
    max_padded_rows buffer (filled with garbage first: every byte is written), and the bytes
    past it untouched. Ragged and empty experts, an empty last expert, exact multiples of 128."""
    from dsv4 import ops

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(len(counts) + sum(counts))
    offsets = ops.compute_expert_offsets(torch.tensor(counts, dtype=torch.int32, device=dev))
    rows, k = sum(counts), 512
    gs = torch.tensor([0.002], device=dev)
    if swiglu:
        x = (torch.randn(rows, 2 * k, device=dev, generator=g) * 6).to(torch.bfloat16)
        w, index = torch.rand(rows, device=dev, generator=g), None
        want_codes, want_scales = ops.swiglu_quantize(x, gs, 10.0, row_weight=w, impl="torch")
    else:
        x = torch.randn(100, k, device=dev, generator=g).to(torch.bfloat16)
        w = None
        index = torch.randint(0, 100, (rows,), device=dev, generator=g, dtype=torch.int32)
        want_codes, want_scales = ops.quantize_activation_nvfp4(x[index.long()], gs, impl="torch")
    want_sf, _ = ops.assemble_scales_2d_side_from_offsets(want_scales, offsets)
    need = want_sf.numel()
    codes = torch.full((rows, k // 2), 0xAB, dtype=torch.uint8, device=dev)
    sf = torch.full((need + 512,), 0xCD, dtype=torch.uint8, device=dev)
    ops.quantize_to_expert_layout(
        x, gs, offsets, ops.padded_group_starts(offsets), codes, sf,
        index=index, swiglu=swiglu, row_weight=w,
    )  # fmt: skip
    assert torch.equal(codes, want_codes)
    assert torch.equal(sf[:need], want_sf.view(torch.uint8))
    assert bool((sf[need:] == 0xCD).all())
    # the allocating form (starts, codes and scales made): the same bytes, exactly `need` of them
    codes2, sf2 = ops.quantize_to_expert_layout(
        x, gs, offsets, index=index, swiglu=swiglu, row_weight=w
    )
    assert sf2.dtype == torch.uint8 and sf2.numel() == need
    assert torch.equal(codes2, want_codes) and torch.equal(sf2, want_sf.view(torch.uint8))


def test_expert_layout_refuses_bad_outputs_naming_them():
    from dsv4 import ops

    if not ops.cutedsl_supports(torch.device("cuda") if torch.cuda.is_available() else "cpu")[0]:
        with pytest.raises(ops.QuantImplUnavailableError, match="quantize_to_expert_layout"):
            ops.quantize_to_expert_layout(
                torch.zeros(4, 32), torch.ones(1), torch.tensor([4], dtype=torch.int32),
                torch.zeros(1, dtype=torch.int32), torch.zeros(4, 16, dtype=torch.uint8),
                torch.zeros(512, dtype=torch.uint8),
            )  # fmt: skip
        with pytest.raises(ops.QuantImplUnavailableError, match="quantize_to_expert_layout"):
            ops.quantize_to_expert_layout(  # the allocating form: the same refusal
                torch.zeros(4, 32), torch.ones(1), torch.tensor([4], dtype=torch.int32)
            )
        return
    dev = torch.device("cuda")
    off = torch.tensor([3, 4], dtype=torch.int32, device=dev)
    st = ops.padded_group_starts(off)
    x, gs = torch.zeros(4, 32, device=dev), torch.ones(1, device=dev)
    codes = torch.zeros(4, 16, dtype=torch.uint8, device=dev)
    with pytest.raises(ValueError, match=r"scales_out must hold max_padded_rows\(R=4, E=2\)"):
        ops.quantize_to_expert_layout(
            x, gs, off, st, codes, torch.zeros(100, dtype=torch.uint8, device=dev)
        )
    with pytest.raises(ValueError, match="scale_starts"):
        ops.quantize_to_expert_layout(
            x, gs, off, st[:1], codes, torch.zeros(1024, dtype=torch.uint8, device=dev)
        )


@needs_gpu
@pytest.mark.parametrize("weighted", [False, True])
def test_gpu_swiglu_requant_bit_exact(weighted):
    from dsv4.kernels.cutedsl import nvfp4_quant as nq
    from reference.activation import swiglu

    t, i = 257, 3072
    l1 = (torch.randn(t, 2 * i, device="cuda") * 6).to(torch.bfloat16)
    w = torch.rand(t, device="cuda") if weighted else None
    h = swiglu(l1, 10.0)
    if weighted:
        h = h * w[:, None]
    gs = (h.abs().amax() / 2688).reshape(1)
    codes, sf = nq.swiglu_quantize(l1, gs, 10.0, w, nq.ScaleLayout.LINEAR)
    rc, rs = _ref(h, gs)
    assert torch.equal(sf.view(torch.uint8), rs)
    assert torch.equal(codes, rc)


@needs_gpu
def test_gpu_graph_capture_and_no_recompile_across_t():
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    cfg = nq.QuantConfig(1024)
    x = torch.randn(300, 1024, device="cuda").to(torch.bfloat16)
    gs = torch.tensor([0.002], device="cuda")
    codes = torch.empty(300, 512, dtype=torch.uint8, device="cuda")
    sf = torch.empty(cfg.scale_bytes(300), dtype=torch.uint8, device="cuda")
    nq.run_quant(cfg, x, gs, codes, sf)  # compiles once
    before = nq.compile_quant.cache_info().currsize
    for t in (1, 77, 300):
        nq.run_quant(cfg, x[:t], gs, codes[:t], sf)
    assert nq.compile_quant.cache_info().currsize == before
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nq.run_quant(cfg, x, gs, codes, sf)
    codes.zero_()
    graph.replay()
    torch.cuda.synchronize()
    rc, rs = _ref(x, gs)
    assert torch.equal(codes, rc)
    assert torch.equal(sf, ref_swizzle(rs).view(torch.uint8))
