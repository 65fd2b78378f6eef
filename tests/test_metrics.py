"""harness.metrics on hand-made inputs with known answers (CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.metrics import (
    TIE_REL_TOL,
    bitwise_equal,
    calc_diff,
    classify_quantize_mismatches,
    error_panel,
    error_panel_bound,
    nonfinite_stats,
    per_group_error,
    per_row_error,
    periodic_error_structure,
)
from reference.nvfp4 import encode_e2m1, pack_e2m1, quantize_nvfp4, unpack_e2m1


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# calc_diff / error_panel


def test_calc_diff_known_values():
    x = torch.randn(64, 32, generator=_gen())
    assert calc_diff(x, x) == 0.0
    assert calc_diff(x, -x) == pytest.approx(2.0, abs=1e-15)
    assert calc_diff(torch.zeros(4), torch.zeros(4)) == 0.0
    assert calc_diff(x, torch.zeros_like(x)) == pytest.approx(1.0)
    assert isinstance(calc_diff(x, x), float)
    with pytest.raises(ValueError, match=r"x.shape=\(64, 32\) y.shape=\(32, 64\)"):
        calc_diff(x, x.t())


def test_error_panel_exact_and_json():
    x = torch.randn(8, 16, generator=_gen())
    p = error_panel(x, x.clone(), atol=0.0, rtol=0.0)
    assert p["max_abs"] == 0.0 and p["calc_diff"] == 0.0
    assert p["cosine"] == pytest.approx(1.0) and p["worst_token_cosine"] == pytest.approx(1.0)
    assert p["sqnr_db"] == math.inf
    assert p["frac_within"] == 1.0 and p["n_outside"] == 0 and p["first_outside"] is None
    assert p["numel"] == 128
    json.dumps(p)  # plain Python values only


def test_error_panel_known_noise_sqnr_and_worst_token():
    ref = torch.ones(4, 100, dtype=torch.float64)
    out = ref.clone()
    out[2] += 0.1 * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0).double()  # noise power 0.01
    p = error_panel(ref, out, atol=0.05, rtol=0.0)
    # signal 400, noise 100 * 0.01 = 1 -> 10*log10(400) dB
    assert p["sqnr_db"] == pytest.approx(10 * math.log10(400))
    assert p["max_abs"] == pytest.approx(0.1)
    assert p["mean_abs"] == pytest.approx(0.1 * 100 / 400)
    assert p["worst_token"] == 2
    assert p["worst_token_cosine"] == pytest.approx(1 / math.sqrt(1.01))
    assert p["n_outside"] == 100 and p["first_outside"] == [2, 0]
    assert p["frac_within"] == pytest.approx(0.75)
    # token_dim=1: every column has a row-2 perturbation of alternating sign
    p1 = error_panel(ref, out, atol=0.05, rtol=0.0, token_dim=1)
    assert p1["worst_token"] in range(100)


def test_error_panel_rel_floor_and_rtol():
    ref = torch.tensor([100.0, 0.0, 1.0])
    out = torch.tensor([101.0, 0.01, 1.0])
    p = error_panel(ref, out, atol=0.0, rtol=0.02)
    # |ref| = 0 is measured against the floor 1e-3 * 100 = 0.1
    assert p["max_rel"] == pytest.approx(0.1)
    assert p["n_outside"] == 1 and p["first_outside"] == [1]


def test_error_panel_nonfinite():
    ref = torch.tensor([1.0, 2.0, float("nan"), float("inf"), 5.0])
    out = torch.tensor([1.0, float("nan"), float("nan"), float("inf"), float("-inf")])
    p = error_panel(ref, out, atol=1e-6, rtol=0.0)
    assert (p["nan_ref"], p["nan_out"], p["inf_ref"], p["inf_out"]) == (1, 2, 1, 2)
    assert p["n_outside"] == 2 and p["first_outside"] == [1]  # NaN where ref is finite
    assert p["max_abs"] == 0.0  # the one finite pair agrees
    nan_only = error_panel(torch.ones(3), torch.full((3,), float("nan")), atol=1.0, rtol=1.0)
    assert math.isnan(nan_only["max_abs"]) and nan_only["n_outside"] == 3


def test_error_panel_bound():
    ref = torch.zeros(2, 4)
    out = torch.tensor([[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0]])
    bound = torch.full((2, 4), 0.2)
    p = error_panel_bound(ref, out, bound)
    assert p["n_outside"] == 1 and p["first_outside"] == [1, 2]
    assert p["worst_ratio"] == pytest.approx(1.5)
    assert p["frac_within"] == pytest.approx(7 / 8)
    zero_bound = error_panel_bound(ref, out, 0.0)
    assert zero_bound["worst_ratio"] == math.inf and zero_bound["n_outside"] == 2
    nan_out = error_panel_bound(ref, torch.full((2, 4), float("nan")), bound)
    assert nan_out["n_outside"] == 8 and nan_out["worst_ratio"] == math.inf


# --------------------------------------------------------------------------------------------
# bitwise_equal


def test_bitwise_equal_float8_and_bf16():
    a = torch.tensor([1.0, 2.0, 448.0, 0.0]).to(torch.float8_e4m3fn)
    assert bitwise_equal(a, a.clone()) == {
        "equal": True,
        "n_mismatch": 0,
        "first_mismatch": None,
        "numel": 4,
    }
    b = torch.tensor([1.0, 2.0, 448.0, -0.0]).to(torch.float8_e4m3fn)  # -0 differs in bits
    r = bitwise_equal(a, b)
    assert not r["equal"] and r["n_mismatch"] == 1 and r["first_mismatch"] == [3]

    x = torch.randn(3, 5, generator=_gen()).bfloat16()
    y = x.clone()
    y[1, 3] = torch.nextafter(y[1, 3].float(), torch.tensor(10.0)).bfloat16() + 1
    y[2, 0] = float("nan")
    x2 = x.clone()
    x2[2, 0] = float("nan")
    r = bitwise_equal(x, y)
    assert r["n_mismatch"] == 2 and r["first_mismatch"] == [1, 3]
    assert bitwise_equal(x2, x2.clone())["equal"]  # NaN equals itself bitwise
    assert bitwise_equal(x.t(), x.t().contiguous())["equal"]  # layout is not a value difference
    with pytest.raises(ValueError, match="shapes differ"):
        bitwise_equal(x, x[:2])
    with pytest.raises(ValueError, match="dtypes differ"):
        bitwise_equal(x, x.float())


# --------------------------------------------------------------------------------------------
# classify_quantize_mismatches


def _block_input() -> torch.Tensor:
    """Two rows of two blocks, gs = 1, every block amax 6 -> scale exactly 1.0, so q == x."""
    x = torch.zeros(2, 32)
    x[:, 0] = 6.0
    x[:, 16] = 6.0
    x[0, 1] = 1.25  # midpoint of 1.0 (code 2) and 1.5 (code 3): ties to even code 2
    x[0, 2] = 0.0
    x[0, 3] = 1.0  # code 2, far from any midpoint
    x[1, 20] = 3.0  # code 5
    return x


def _with_codes(packed: torch.Tensor, edits: dict[tuple[int, int], int]) -> torch.Tensor:
    codes = unpack_e2m1(packed).clone()
    for (r, c), v in edits.items():
        codes[r, c] = v
    return pack_e2m1(codes)


def test_classify_identical_is_exact():
    x = torch.randn(4, 64, generator=_gen()) * 3
    c, s, gs = quantize_nvfp4(x)
    r = classify_quantize_mismatches(x, gs, c, s, c.clone(), s.clone())
    assert r["n_real"] == 0 and r["first_real"] is None
    assert r["codes"]["exact"] == 256 and sum(r["codes"].values()) == 256
    assert r["scales"]["exact"] == 16 and sum(r["scales"].values()) == 16
    json.dumps(r)


def test_classify_tie_flip_signed_zero_real():
    x = _block_input()
    c, s, gs = quantize_nvfp4(x, global_scale=1.0)
    assert float(s.float().min()) == 1.0
    assert unpack_e2m1(c)[0, 1] == 2
    out = _with_codes(c, {(0, 1): 3, (0, 2): 0x8, (0, 3): 4, (1, 20): 7})
    r = classify_quantize_mismatches(x, gs, c, s, out, s)
    codes = r["codes"]
    assert codes["tie_flip"] == 1  # (0, 1): other neighbour of the midpoint 1.25
    assert codes["signed_zero"] == 1  # (0, 2)
    assert codes["real"] == 2  # (0, 3): 1.0 -> 2.0, two steps; (1, 20): 3 -> 6
    assert codes["exact"] == 64 - 4
    assert r["n_real"] == 2 and r["first_real"] == [0, 3] and r["first_real_code"] == [0, 3]
    assert r["first_real_scale"] is None


def test_classify_tie_needs_the_midpoint():
    x = _block_input()
    x[0, 1] = 1.25 * (1 - 64 * 2.0**-23)  # 64 ulps below the midpoint: well outside 4 ulps
    c, s, gs = quantize_nvfp4(x, global_scale=1.0)
    r = classify_quantize_mismatches(x, gs, c, s, _with_codes(c, {(0, 1): 3}), s)
    assert r["codes"]["real"] == 1 and r["first_real"] == [0, 1]


def test_classify_reciprocal_order_gives_only_ties():
    """A kernel computing q = x_n * (1/s) instead of x_n / s differs only next to midpoints."""
    g = _gen(1)
    scale_vals = (0.875, 1.75, 0.9375, 14.0, 0.0546875)  # e4m3 values whose 1/s rounds badly
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    rows = []
    for sv in scale_vals:
        x = mids[torch.randint(0, 7, (8, 15), generator=g)] * sv  # exact: on the midpoints
        steps = torch.randint(-2, 3, x.shape, generator=g, dtype=torch.int32)
        x = (x.view(torch.int32) + steps).view(torch.float32)  # move x by -2..2 fp32 ulps
        x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
        blk = torch.cat([torch.full((8, 1), 6.0 * sv), x], dim=1)
        rows.append(blk.reshape(1, -1))
    x = torch.cat(rows)  # [5, 128]: every block amax = 6 * sv, so its scale is exactly sv
    c, s, gs = quantize_nvfp4(x, global_scale=1.0)
    assert torch.equal(s.float()[:, 0], torch.tensor(scale_vals))
    sf = s.float().repeat_interleave(16, dim=-1)
    out = pack_e2m1(encode_e2m1(x * (1.0 / sf)))
    r = classify_quantize_mismatches(x, gs, c, s, out, s)
    assert r["codes"]["tie_flip"] > 0  # the construction does hit differing ties
    assert r["n_real"] == 0 and r["codes"]["real"] == 0


def test_classify_scale_tie_flip_and_consequence():
    x = torch.zeros(1, 32)
    x[0, 0] = 6.375  # amax / 6 = 1.0625: midpoint of e4m3 1.0 and 1.125, ties to even 1.0
    x[0, 1:16] = torch.linspace(-6, 6, 15)
    x[0, 16] = 6.0
    c, s, gs = quantize_nvfp4(x, global_scale=1.0)
    assert s.view(torch.uint8)[0, 0] == 0x38
    out_s = s.clone()
    out_s.view(torch.uint8)[0, 0] = 0x39  # 1.125
    q = x[:, :16] / 1.125
    out_c = pack_e2m1(torch.cat([encode_e2m1(q), unpack_e2m1(c)[:, 16:]], dim=1))
    r = classify_quantize_mismatches(x, gs, c, s, out_c, out_s)
    assert r["scales"]["scale_tie_flip"] == 1 and r["scales"]["exact"] == 1
    assert r["codes"]["scale_consequence"] > 0 and r["codes"]["real"] == 0
    assert r["n_real"] == 0


def test_classify_real_scale_reported_at_block_start():
    x = torch.randn(2, 48, generator=_gen(2))
    c, s, gs = quantize_nvfp4(x)
    out_s = s.clone()
    out_s.view(torch.uint8)[1, 2] += 3
    r = classify_quantize_mismatches(x, gs, c, s, c, out_s)
    assert r["scales"]["real"] == 1
    assert r["first_real_scale"] == [1, 2] and r["first_real"] == [1, 32]


def test_classify_underflow_block():
    x = torch.zeros(1, 16)
    x[0, 0] = 6 * 2.0**-11  # amax / 6 = 2^-11 < 2^-10: rounds to scale 0, block flushes
    c, s, gs = quantize_nvfp4(x, global_scale=1.0)
    assert s.view(torch.uint8)[0, 0] == 0
    out_s = s.clone()
    out_s.view(torch.uint8)[0, 0] = 1  # 2^-9
    out_c = pack_e2m1(encode_e2m1(x / 2.0**-9))
    r = classify_quantize_mismatches(x, gs, c, s, out_c, out_s)
    assert r["scales"]["underflow_block"] == 1 and r["codes"]["underflow_block"] == 1
    assert r["n_real"] == 0


def test_classify_nan_policy_is_not_real():
    x = torch.ones(1, 16)
    x[0, 3] = float("nan")
    c, s, gs = quantize_nvfp4(x, global_scale=1.0)
    assert s.view(torch.uint8)[0, 0] == 0x7F
    out_c = pack_e2m1(torch.zeros(1, 16, dtype=torch.uint8))  # NanPolicy.ZERO-like kernel
    r = classify_quantize_mismatches(x, gs, c, s, out_c, s)
    assert r["codes"]["nan_input"] == 16 and r["n_real"] == 0


def test_classify_checks_shapes():
    x = torch.ones(2, 32)
    c, s, gs = quantize_nvfp4(x)
    with pytest.raises(ValueError, match="out_scales"):
        classify_quantize_mismatches(x, gs, c, s, c, s[:, :1])


def test_tie_tolerance_is_a_few_ulps():
    assert TIE_REL_TOL == pytest.approx(4 * 2.0**-23)


# --------------------------------------------------------------------------------------------
# error structure


def test_periodic_flags_planted_defect_not_random_error():
    g = _gen(3)
    noise = torch.randn(64, 512, generator=g) * 1e-3
    planted = noise.clone()
    planted[:, 5::16] += 0.5  # a layout defect: every 16th element wrong
    r = periodic_error_structure(planted)
    assert r["suspect_period"] == 16
    assert r["periods"]["16"]["residue"] == 5
    assert r["periods"]["16"]["concentration"] > 10

    clean = periodic_error_structure(noise)
    assert clean["suspect_period"] is None
    assert clean["periods"]["16"]["concentration"] < 1.5

    outlier = noise.clone()
    outlier[7, 300] = 100.0  # one large error is not a layout bug
    assert periodic_error_structure(outlier)["suspect_period"] is None

    sparse = torch.zeros(64, 512)
    sparse.view(-1)[torch.randperm(sparse.numel(), generator=g)[:40]] = 1.0  # too few to judge
    assert periodic_error_structure(sparse)["suspect_period"] is None
    json.dumps(r)


def test_periodic_picks_the_true_period_and_axis():
    err = torch.zeros(32, 2048)
    err[:, 3::128] = 1.0  # concentrates at 16 and 32 too, but most at 128
    assert periodic_error_structure(err)["suspect_period"] == 128
    # 8 rows give 128 hits: too few (< 4 * 128) to judge 128, so the best judged period is named
    assert periodic_error_structure(err[:8])["suspect_period"] == 32

    rows = torch.randn(256, 64, generator=_gen(4)).abs() * 1e-3
    rows[::32] += 1.0  # every 32nd token row wrong
    assert periodic_error_structure(rows, axis=-2)["suspect_period"] == 32
    assert periodic_error_structure(rows, axis=-1)["suspect_period"] is None
    assert periodic_error_structure(torch.zeros(4, 64))["periods"]["16"]["concentration"] is None


def test_per_group_and_per_row_error():
    ref = torch.zeros(6, 4)
    out = ref.clone()
    out[1, 2] = 0.5
    out[4, 0] = float("nan")
    groups = per_group_error(ref, out, [2, 2, 6])
    assert [g["rows"] for g in groups] == [2, 0, 4]
    assert groups[0]["max_abs"] == 0.5 and groups[1]["max_abs"] == 0.0
    assert groups[2]["max_abs"] == math.inf and groups[2]["n_nonfinite"] == 1
    assert groups[0]["calc_diff"] == pytest.approx(1.0)
    assert per_group_error(ref, out, torch.tensor([3, 6]))[0]["max_abs"] == 0.5
    with pytest.raises(ValueError, match="non-decreasing"):
        per_group_error(ref, out, [4, 2])
    assert per_row_error(ref, out) == [0.0, 0.5, 0.0, 0.0, math.inf, 0.0]


# --------------------------------------------------------------------------------------------
# NaN trace


def test_nonfinite_stats_float_scales_codes():
    t = torch.tensor([0.0, 1.0, -3.0, float("nan"), float("inf")])
    st = nonfinite_stats(t)
    assert (st["nan"], st["inf"], st["amax"], st["numel"]) == (1, 1, 3.0, 5)
    assert st["zero_frac"] == pytest.approx(0.2)

    sc = torch.tensor([1.0, 1.0, 0.0]).to(torch.float8_e4m3fn)
    sc = torch.cat([sc, torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)])
    st = nonfinite_stats(sc)
    assert st["scale_byte_hist"] == {"0": 1, "56": 2, "127": 1}
    assert st["nan_bytes"] == 1 and st["nan"] == 1 and st["amax"] == 1.0

    packed = pack_e2m1(torch.tensor([[0, 7, 8, 7]], dtype=torch.uint8))
    st = nonfinite_stats(packed)
    assert st["nibble_hist"] == {"0": 1, "7": 2, "8": 1}
    assert st["amax"] == 6.0 and st["zero_frac"] == 0.5
    json.dumps(st)


# --------------------------------------------------------------------------------------------
# the first bad element's values, signed mean error, bf16 ulps


def test_first_bad_element_carries_its_reference_output_and_bound():
    ref = torch.tensor([[1.0, 2.0], [4.0, -8.0]])
    out = torch.tensor([[1.0, 2.0], [4.5, -8.0]])
    p = error_panel(ref, out, atol=0.1, rtol=0.01)
    assert p["first_outside"] == [1, 0]
    assert (p["first_ref"], p["first_out"]) == (4.0, 4.5)
    assert p["first_bound"] == pytest.approx(0.1 + 0.01 * 4.0)
    b = error_panel_bound(ref, out, torch.tensor([[0.0, 0.0], [0.25, 0.0]]))
    assert (b["first_ref"], b["first_out"], b["first_bound"]) == (4.0, 4.5, 0.25)
    assert "first_ref" not in error_panel(ref, ref.clone(), 0.0, 0.0)
    a8 = torch.tensor([1.0, 2.0, 448.0]).to(torch.float8_e4m3fn)
    b8 = torch.tensor([1.0, 3.0, 448.0]).to(torch.float8_e4m3fn)
    eq = bitwise_equal(a8, b8)
    assert eq["first_mismatch"] == [1] and (eq["first_ref"], eq["first_out"]) == (2.0, 3.0)
    json.dumps(eq)


def test_signed_mean_error_and_bf16_ulps():
    ref = torch.tensor([1.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    # one bf16 ulp at 1.0 is 2^-7; at 3.0 (in [2, 4)) it is 2^-6
    out = ref + torch.tensor([2.0**-7, 2.0**-7, 2 * 2.0**-6, 0.0], dtype=torch.float64)
    p = error_panel(ref, out, 0.0, 0.0)
    assert p["mean_err"] == pytest.approx((2 * 2.0**-7 + 2.0**-5) / 4)
    assert p["max_ulps_bf16"] == pytest.approx(2.0)
    neg = error_panel(ref, 2 * ref - out, 0.0, 0.0)
    assert neg["mean_err"] == pytest.approx(-p["mean_err"])  # the sign is kept
    b = error_panel_bound(ref, out, 1.0)
    assert b["max_ulps_bf16"] == pytest.approx(2.0) and b["mean_err"] == p["mean_err"]
    x = torch.randn(64, generator=_gen()).bfloat16()
    up = (x.view(torch.int16) + 1).view(torch.bfloat16)  # sign-magnitude: |x| one step up
    q = error_panel(x.double(), up.double(), 0.0, 0.0)
    assert q["max_ulps_bf16"] == pytest.approx(1.0)  # one bf16 step away is one ulp
    nothing = error_panel(torch.full((2,), math.nan), torch.ones(2), 0.0, 0.0)
    assert math.isnan(nothing["mean_err"]) and math.isnan(nothing["max_ulps_bf16"])
