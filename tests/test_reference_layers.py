"""Reference SwiGLU variants and layers (shared expert, routed MoE, grouped linear) on CPU.

Exactness strategy: inputs are built ON the NVFP4 grid (every 16-block holds a +-6 code, its
block scale is an e4m3 value, every global scale is a power of two), so quantization is exact and
the quantized layer and its fp32 twin start from identical operands. Then the two may differ only
by (1) GEMM summation order and output rounding, bounded by `grouped_gemm_error_bound`, and (2) the
requantization of the SwiGLU output, bounded per block by max(s, amax_n - 6 s) * gs (half the
widest E2M1 gap, 4..6, or the saturation excess). The end-to-end check is rigorous:
|l2_q - l2_twin| <= bound_L2(act_q, w2_q) + |deq(act_q) - act_twin| @ |w2|
                    + gamma_I |act_twin| @ |w2|.
Bit-identity against per-token loops uses oracle=True (float64 sums of NVFP4 products are exact).
Sizes are V4-shaped but small: H=256, I=128, E_local=4, k=2.
"""

from __future__ import annotations

import pytest
import torch

from reference.activation import SwigluVariant, clamp_active_mask, swiglu
from reference.gemm import (
    U32,
    dequantize_codes_scales,
    gamma,
    grouped_gemm_error_bound,
    grouped_gemm_nvfp4,
)
from reference.layers import (
    calibrate_routed_moe,
    calibrate_shared_expert,
    grouped_linear,
    routed_moe,
    shared_expert,
)
from reference.nvfp4 import (
    dequantize_nvfp4,
    dequantize_weight_nvfp4,
    quantize_nvfp4,
    quantize_weight_nvfp4,
    tensor_amax,
)

H, INTER, E, K_TOP = 256, 128, 4, 2
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
V = SwigluVariant


# --------------------------------------------------------------------------------------------
# inputs on the NVFP4 grid


def grid_rows(
    shape: tuple[int, ...], gen: torch.Generator, block_scales: list[float]
) -> torch.Tensor:
    """[..., K]: E2M1 values times one block scale per 16-block (drawn from block_scales).

    Every block holds a +-6 at a random position, so its amax / 6 IS its block scale.
    """
    *lead, k = shape
    codes = GRID[torch.randint(0, 8, (*lead, k // 16, 16), generator=gen)]
    codes = codes * (torch.randint(0, 2, codes.shape, generator=gen) * 2 - 1)
    pos = torch.randint(0, 16, (*lead, k // 16, 1), generator=gen)
    six = 6.0 * (torch.randint(0, 2, pos.shape, generator=gen) * 2 - 1).float()
    codes = codes.scatter(-1, pos, six)
    pick = torch.randint(0, len(block_scales), (*lead, k // 16, 1), generator=gen)
    scales = torch.tensor(block_scales)[pick]
    return (codes * scales).reshape(shape)


def grid_activation(t: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Quantizes exactly with gs = 1: block scales are powers of two."""
    return grid_rows((t, k), gen, [0.25, 0.5, 1.0])


WEIGHT_GS = 2.0**-12


def grid_weight(e: int, k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[E, K, N], blocks along K; quantizes exactly with its DYNAMIC gs = 2^-12 per expert.

    Block scales are 448 * 2^-j (e4m3 values) and each expert holds a 448-block, so its
    amax = 6 * 448 * 2^-12 and amax / (6 * 448) is the power of two 2^-12.
    """
    w = grid_rows((e, n, k), gen, [28.0, 56.0, 112.0, 224.0, 448.0])
    w[:, 0, :16] = GRID[7] * 448.0  # a whole 448-block of +6 in every expert
    return (w * WEIGHT_GS).transpose(1, 2).contiguous()


def pow2_ceil(x: torch.Tensor) -> float:
    return float(2.0 ** torch.ceil(torch.log2(x.double())))


# --------------------------------------------------------------------------------------------
# helpers


def deq(q: tuple[torch.Tensor, torch.Tensor, torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
    """Staged quantized activation (codes, scales, gs[G]) -> fp32, each group with its gs."""
    codes, scales, gs = q
    out = dequantize_codes_scales(codes, scales)
    starts = [0, *offsets.tolist()[:-1]]
    for g, (s, e) in enumerate(zip(starts, offsets.tolist(), strict=True)):
        out[s:e] *= gs[g]
    return out


def per_group_matmul(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, dtype
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[-1], dtype=dtype)
    starts = [0, *offsets.tolist()[:-1]]
    for g, (s, e) in enumerate(zip(starts, offsets.tolist(), strict=True)):
        out[s:e] = x[s:e].to(dtype) @ w[g].to(dtype)
    return out


def bound(a_q, b_q, offsets, out_dtype) -> torch.Tensor:
    return grouped_gemm_error_bound(
        a_q[0], a_q[1], b_q[0], b_q[1], offsets, a_q[2], b_q[2], out_dtype
    )


def requant_bound(act: torch.Tensor, act_q, offsets: torch.Tensor) -> torch.Tensor:
    """Per element: max(s, amax_n - 6 s) * gs, the most quantizing a block can move a value."""
    _, scales, gs = act_q
    starts = [0, *offsets.tolist()[:-1]]
    gs_row = torch.ones(act.shape[0])
    for g, (s, e) in enumerate(zip(starts, offsets.tolist(), strict=True)):
        gs_row[s:e] = gs[g]
    xn = (act / gs_row[:, None]).double()
    amax_n = xn.reshape(act.shape[0], -1, 16).abs().amax(-1)
    s = scales.double()
    per_block = torch.maximum(s, amax_n - 6 * s) * gs_row[:, None].double()
    return per_block.repeat_interleave(16, dim=-1) * (1 + 2.0**-20)


def check_against_twin(q, tw, staged, w13, w2, offsets) -> None:
    """The whole chain of bounds between a quantized layer and its twin (see module docstring)."""
    w13, w2 = (w13[None], w2[None]) if w13.dim() == 2 else (w13, w2)
    # premise: the operands are on the grid, so quantization is exact
    assert torch.equal(deq(q["x_q"], offsets), staged)
    assert torch.equal(dequantize_weight_nvfp4(*q["w13_q"][:2], 1.0) * WEIGHT_GS, w13)
    assert torch.equal(dequantize_weight_nvfp4(*q["w2_q"][:2], 1.0) * WEIGHT_GS, w2)
    # L1: both sides are fp32-order sums of the same exact products
    l1_diff = (q["l1_out"].double() - tw["l1_out"].double()).abs()
    b1 = bound(q["x_q"], q["w13_q"], offsets, torch.bfloat16)
    b1 += bound(q["x_q"], q["w13_q"], offsets, torch.float32)
    assert bool((l1_diff <= b1).all()), float((l1_diff - b1).max())
    # requantization of the SwiGLU output
    a_deq = deq(q["act_q"], offsets)
    rq = (a_deq.double() - q["act"].double()).abs()
    assert bool((rq <= requant_bound(q["act"], q["act_q"], offsets)).all())
    # L2 with teacher forcing: the twin's fp32 matmul fed the dequantized act_q
    tf = per_group_matmul(a_deq, w2, offsets, torch.float32)
    b2 = bound(q["act_q"], q["w2_q"], offsets, torch.bfloat16)
    b2_32 = bound(q["act_q"], q["w2_q"], offsets, torch.float32)
    assert bool(((q["l2_out"].double() - tf.double()).abs() <= b2 + b2_32).all())
    # end to end: L2 bound + act difference propagated through |w2| + the twin's own fp32 error
    act_tw = tw["act"].double()
    delta = per_group_matmul((a_deq.double() - act_tw).abs(), w2.abs(), offsets, torch.float64)
    twin_err = gamma(w2.shape[1], U32) * per_group_matmul(
        act_tw.abs(), w2.abs(), offsets, torch.float64
    )
    e2e = (b2 + delta + twin_err) * (1 + 2.0**-30) + 2.0**-120
    diff = (q["l2_out"].double() - tw["l2_out"].double()).abs()
    assert bool((diff <= e2e).all()), float((diff - e2e).max())
    assert float(diff.max()) > 0  # the check is not vacuous: quantizing act does change L2


def l1_gs2(x, w13, w2, **kw) -> float:
    """A power-of-two static L2 scale covering the act amax (no saturation, exact dequant)."""
    st = shared_expert(x, w13, w2, gs1=1.0, **kw)
    return pow2_ceil(tensor_amax(st["act"]) / 2688)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# --------------------------------------------------------------------------------------------
# SwiGLU


def test_swiglu_variants_agree_when_no_clamp_is_active(gen):
    l1 = torch.empty(64, 2 * INTER).uniform_(-3, 3, generator=gen)  # |silu(3) * 3| = 8.6 < 10
    ref = swiglu(l1, variant=V.NO_CLAMP)
    for v in V:
        assert not bool(clamp_active_mask(l1, 10.0, v).any())
        assert torch.equal(swiglu(l1, 10.0, v), ref), v
    assert torch.equal(swiglu(l1, None), ref)
    gate, up = l1.chunk(2, dim=-1)
    assert torch.equal(ref, torch.nn.functional.silu(gate) * up)


def test_swiglu_variants_differ_exactly_where_a_clamp_is_active(gen):
    l1 = torch.randn(64, 2 * INTER, generator=gen) * 8
    out = {v: swiglu(l1, 10.0, v) for v in V}
    mask = {v: clamp_active_mask(l1, 10.0, v) for v in V}
    for v in V:
        m = mask[v]
        assert torch.equal(out[v][~m], out[V.NO_CLAMP][~m]), v
        assert bool((out[v][m] != out[V.NO_CLAMP][m]).all()), v
    either = mask[V.DSV4] | mask[V.CLAMP_AFTER_PRODUCT]
    assert 0 < int(either.sum()) < either.numel()
    assert torch.equal(out[V.DSV4][~either], out[V.CLAMP_AFTER_PRODUCT][~either])
    assert bool((out[V.DSV4][either] != out[V.CLAMP_AFTER_PRODUCT][either]).all())
    # the DSV4 definition itself
    gate, up = l1.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0)
    assert torch.equal(out[V.DSV4], want)


def test_swiglu_gate_first_false_is_swapped_halves(gen):
    l1 = torch.randn(16, 2 * INTER, generator=gen) * 8
    gate, up = l1.chunk(2, dim=-1)
    swapped = torch.cat([up, gate], dim=-1)
    for v in V:
        assert torch.equal(swiglu(swapped, 10.0, v, gate_first=False), swiglu(l1, 10.0, v))
        assert torch.equal(
            clamp_active_mask(swapped, 10.0, v, gate_first=False), clamp_active_mask(l1, 10.0, v)
        )


def test_swiglu_pre_alpha_clamps_in_raw_units(gen):
    alpha = 2.0**-6
    raw = torch.empty(32, 2 * INTER).uniform_(-9, 9, generator=gen)  # raw clamp inactive
    assert not bool(clamp_active_mask(raw, 10.0, V.DSV4, pre_alpha=alpha).any())
    assert torch.equal(swiglu(raw, 10.0, pre_alpha=alpha), swiglu(raw * alpha, None))
    # per-row alpha broadcast as [T, 1]
    alphas = 2.0 ** -torch.randint(0, 8, (32, 1), generator=gen).float()
    assert torch.equal(swiglu(raw, 10.0, pre_alpha=alphas), swiglu(raw * alphas, None))
    # with the clamp active: an effective limit of L * alpha in true units
    raw = torch.randn(32, 2 * INTER, generator=gen) * 40
    assert bool(clamp_active_mask(raw, 10.0, V.DSV4, pre_alpha=alpha).any())
    assert torch.equal(swiglu(raw, 10.0, pre_alpha=alpha), swiglu(raw * alpha, 10.0 * alpha))
    with pytest.raises(ValueError, match="pre_alpha"):
        swiglu(raw, 10.0, V.CLAMP_AFTER_PRODUCT, pre_alpha=alpha)


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match=r"l1_out.shape=\(2, 7\)"):
        swiglu(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"l1_out.shape=\(2, 7\)"):
        clamp_active_mask(torch.zeros(2, 7))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="limit"):
            swiglu(torch.zeros(2, 8), limit=bad)


# --------------------------------------------------------------------------------------------
# shared expert


def shared_weights(gen):
    return grid_weight(1, H, 2 * INTER, gen)[0], grid_weight(1, INTER, H, gen)[0]


@pytest.mark.parametrize("t", [1, 5, 129])
def test_shared_expert_vs_twin_within_derived_bounds(gen, t):
    x = grid_activation(t, H, gen)
    w13, w2 = shared_weights(gen)
    q = shared_expert(x, w13, w2, gs1=1.0, gs2=l1_gs2(x, w13, w2))
    tw = shared_expert(x, w13, w2, quantized=False)
    assert list(q) == ["w13_q", "w2_q", "x_q", "l1_out", "act", "act_q", "l2_out", "out"]
    assert list(tw) == ["l1_out", "act", "l2_out", "out"]
    assert q["out"].dtype == torch.bfloat16 and q["out"].shape == (t, H)
    assert tw["out"].dtype == torch.float32
    assert torch.equal(q["act"], swiglu(q["l1_out"]))
    check_against_twin(q, tw, x, w13, w2, torch.tensor([t], dtype=torch.int32))


def test_shared_expert_dynamic_matches_its_own_math(gen):
    x = torch.randn(5, H, generator=gen)
    w13, w2 = torch.randn(H, 2 * INTER, generator=gen) / 8, torch.randn(INTER, H, generator=gen) / 8
    st = shared_expert(x, w13, w2, variant=V.SWIGLU_STEP, gate_first=False, limit=7.0)
    codes, scales, gs = quantize_nvfp4(x)
    one = torch.tensor([5], dtype=torch.int32)
    wc, ws, wg = quantize_weight_nvfp4(w13)
    l1 = grouped_gemm_nvfp4(codes, scales, wc[None], ws[None], one, gs.reshape(1), wg.reshape(1))
    assert torch.equal(st["l1_out"], l1)
    assert torch.equal(st["act"], swiglu(l1, 7.0, V.SWIGLU_STEP, gate_first=False))
    assert torch.equal(st["act_q"][0], quantize_nvfp4(st["act"])[0])


def test_calibrate_shared_expert(gen):
    sample = torch.randn(33, H, generator=gen) * 3
    w13, w2 = torch.randn(H, 2 * INTER, generator=gen) / 4, torch.randn(INTER, H, generator=gen) / 8
    gs1, gs2 = calibrate_shared_expert(sample, w13, w2, 10.0, V.DSV4, True)
    assert torch.equal(gs1, sample.abs().amax() / 2688)
    codes, scales, _ = quantize_nvfp4(sample, gs1)
    wc, ws, wg = quantize_weight_nvfp4(w13)
    one = torch.tensor([33], dtype=torch.int32)
    l1 = grouped_gemm_nvfp4(codes, scales, wc[None], ws[None], one, gs1.reshape(1), wg.reshape(1))
    assert torch.equal(gs2, swiglu(l1, 10.0).abs().amax() / 2688)
    # calibrated static scales on the sample reproduce the dynamic run
    static = shared_expert(sample, w13, w2, gs1=gs1, gs2=gs2)
    assert torch.equal(static["out"], shared_expert(sample, w13, w2)["out"])


# --------------------------------------------------------------------------------------------
# routed MoE


def naive_routed(x, ids, wts, w13, w2, gs1, gs2, first_expert, **kw) -> torch.Tensor:
    """Per token, per slot: the same quantized expert math on that one row (oracle GEMMs)."""
    one = torch.tensor([1], dtype=torch.int32)
    w13_q = [quantize_weight_nvfp4(w) for w in w13]
    w2_q = [quantize_weight_nvfp4(w) for w in w2]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bfloat16)
    for t in range(x.shape[0]):
        acc = torch.zeros(1, x.shape[1])
        for s in range(ids.shape[1]):
            e = int(ids[t, s]) - first_expert
            if not 0 <= e < w13.shape[0]:
                continue

            def gemm(a, g, b):
                return grouped_gemm_nvfp4(
                    a[0],
                    a[1],
                    b[0][None],
                    b[1][None],
                    one,
                    g.reshape(1),
                    b[2].reshape(1),
                    oracle=True,
                ).to(torch.bfloat16)

            l1 = gemm(quantize_nvfp4(x[t : t + 1], gs1[e]), gs1[e], w13_q[e])
            h = swiglu(l1, **kw) * wts[t, s].float()
            acc = acc + gemm(quantize_nvfp4(h, gs2[e]), gs2[e], w2_q[e]).float()
        out[t] = acc[0].to(torch.bfloat16)
    return out


def routing(t: int, gen: torch.Generator, n_ids: int = E, k: int = K_TOP):
    scores = torch.rand(t, n_ids, generator=gen)
    ids = scores.argsort(dim=1, descending=True)[:, :k].to(torch.int32)  # distinct per token
    wts = torch.rand(t, k, generator=gen)
    return ids, wts / wts.sum(1, keepdim=True)


ROUTINGS = ["random", "other_ranks_and_invalid", "empty_experts", "all_to_one"]


@pytest.mark.parametrize("t", [1, 5, 129])
@pytest.mark.parametrize("kind", ROUTINGS)
def test_routed_moe_matches_per_token_loop(gen, t, kind):
    x = torch.randn(t, H, generator=gen)
    w13 = torch.randn(E, H, 2 * INTER, generator=gen) / 6
    w2 = torch.randn(E, INTER, H, generator=gen) / 8
    first = 0
    ids, wts = routing(t, gen)
    if kind == "other_ranks_and_invalid":  # 3 ranks of E experts; this one is rank 1
        first = E
        ids, wts = routing(t, gen, n_ids=3 * E)
        ids[0, -1] = -1
    elif kind == "empty_experts":  # experts 1 and 3 get nothing
        ids = torch.where(ids % 2 == 1, ids - 1, ids)
        ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 2) % E, ids[:, 1])
    elif kind == "all_to_one":
        ids = torch.full_like(ids, 2)
        ids[:, 1] = -1
    kw = dict(first_expert=first, limit=10.0)
    gs1, gs2 = calibrate_routed_moe(x, ids, wts, w13, w2, oracle=True, **kw)
    st = routed_moe(x, ids, wts, w13, w2, gs1=gs1, gs2=gs2, oracle=True, **kw)
    assert list(st) == [
        "w13_q", "w2_q", "expert_offsets", "gather_index", "row_weight",
        "x_q", "l1_out", "act", "act_q", "l2_out", "out",
    ]  # fmt: skip
    want = naive_routed(x, ids, wts, w13, w2, gs1, gs2, first, limit=10.0)
    assert torch.equal(st["out"], want)
    # staging: grouped by local expert, stable by token; offsets are cumulative ENDs
    local = ids.long() - first
    valid = (local >= 0) & (local < E)
    counts = torch.bincount(local[valid], minlength=E)
    assert torch.equal(st["expert_offsets"], counts.cumsum(0).to(torch.int32))
    starts = [0, *st["expert_offsets"].tolist()[:-1]]
    for e, (s, end) in enumerate(zip(starts, st["expert_offsets"].tolist(), strict=True)):
        tokens = (local == e).any(1).nonzero().flatten()
        assert torch.equal(st["gather_index"][s:end], tokens)
    untouched = ~valid.any(1)
    assert bool((st["out"][untouched] == 0).all())
    if kind == "empty_experts":
        assert counts[1] == 0 and counts[3] == 0
    # calibrated scales on the sample reproduce the dynamic run
    dyn = routed_moe(x, ids, wts, w13, w2, oracle=True, **kw)
    assert torch.equal(dyn["out"], st["out"])


def test_routed_moe_vs_twin_within_derived_bounds(gen):
    t = 37
    x = grid_activation(t, H, gen)
    w13, w2 = grid_weight(E, H, 2 * INTER, gen), grid_weight(E, INTER, H, gen)
    ids, wts = routing(t, gen)
    wts = 2.0 ** -torch.randint(0, 3, wts.shape, generator=gen).float()  # exact routing weights
    dyn = routed_moe(x, ids, wts, w13, w2, gs1=1.0)
    gs2 = pow2_ceil(tensor_amax(dyn["act"]) / 2688)
    q = routed_moe(x, ids, wts, w13, w2, gs1=1.0, gs2=gs2)
    tw = routed_moe(x, ids, wts, w13, w2, quantized=False)
    assert list(tw) == [
        "expert_offsets", "gather_index", "row_weight", "l1_out", "act", "l2_out", "out"
    ]  # fmt: skip
    assert torch.equal(tw["gather_index"], q["gather_index"])
    check_against_twin(q, tw, x[q["gather_index"]], w13, w2, q["expert_offsets"])
    # the weight multiplies h before L2
    token = q["gather_index"]
    counts = torch.diff(q["expert_offsets"], prepend=q["expert_offsets"].new_zeros(1)).long()
    expert = torch.repeat_interleave(torch.arange(E), counts)
    slot = (ids[token].long() == expert[:, None]).int().argmax(1)
    assert torch.equal(q["act"], swiglu(q["l1_out"]) * wts[token, slot][:, None])
    assert torch.equal(q["row_weight"], wts[token, slot][:, None])
    # weight_after_w2: act unweighted, the weight on the fp32 L2 rows before the combine
    a = routed_moe(x, ids, wts, w13, w2, gs1=1.0, gs2=gs2, weight_after_w2=True)
    assert torch.equal(a["act"], swiglu(a["l1_out"]))
    want = torch.zeros(t, H)
    want.index_add_(0, token, a["l2_out"].float() * a["row_weight"])  # exact: grid values
    assert torch.equal(a["out"], want.to(torch.bfloat16))


def test_routed_scaling_factor_multiplies_the_routing_weight(gen):
    """The factor scales each row's weight in fp32; weights that already include it (factor 1)
    give the same bits, also through calibration; a bad factor is refused by name."""
    t = 9
    x = torch.randn(t, H, generator=gen) * 2
    w13 = torch.randn(E, H, 2 * INTER, generator=gen) / 6
    w2 = torch.randn(E, INTER, H, generator=gen) / 8
    ids, wts = routing(t, gen)
    for after in (False, True):
        kw = {"weight_after_w2": after}
        gs = calibrate_routed_moe(x, ids, wts, w13, w2, routed_scaling_factor=2.5, **kw)
        pre = calibrate_routed_moe(x, ids, wts.float() * 2.5, w13, w2, **kw)
        assert all(torch.equal(a, b) for a, b in zip(gs, pre, strict=True))
        f = routed_moe(x, ids, wts, w13, w2, routed_scaling_factor=2.5, gs1=gs[0], gs2=gs[1], **kw)
        p = routed_moe(x, ids, wts.float() * 2.5, w13, w2, gs1=gs[0], gs2=gs[1], **kw)
        one = routed_moe(x, ids, wts, w13, w2, gs1=gs[0], gs2=gs[1], **kw)
        assert torch.equal(f["row_weight"], one["row_weight"] * 2.5)
        for name in f:
            a, b = f[name], p[name]
            parts = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
            assert all(torch.equal(u, v) for u, v in parts), name
    for bad in (0, -1.0, float("inf"), float("nan"), True, "2.5"):
        with pytest.raises(ValueError, match="routed_scaling_factor must be a finite number"):
            routed_moe(x, ids, wts, w13, w2, routed_scaling_factor=bad)


def test_calibrate_routed_moe_scales(gen):
    t = 9
    x = torch.randn(t, H, generator=gen) * 2
    w13, w2 = (
        torch.randn(E, H, 2 * INTER, generator=gen) / 6,
        torch.randn(E, INTER, H, generator=gen) / 8,
    )
    ids, wts = routing(t, gen)
    ids[3] = -1  # token 3 is not routed here: it must not count in gs1
    x[3] *= 100
    gs1, gs2 = calibrate_routed_moe(x, ids, wts, w13, w2)
    routed = torch.tensor([i for i in range(t) if i != 3])
    assert gs1.shape == (E,) and torch.equal(gs1, (x[routed].abs().amax() / 2688).expand(E))
    st = routed_moe(x, ids, wts, w13, w2, gs1=gs1)
    assert torch.equal(gs2, (st["act"].abs().amax() / 2688).expand(E))


# --------------------------------------------------------------------------------------------
# grouped linear (wo_a)


@pytest.mark.parametrize("t", [1, 5, 129])
def test_grouped_linear_forms_and_per_group_reference(gen, t):
    g, heads, head_dim, r = 2, 4, 32, 48  # D = 2 * 32 * 2 = 128
    d = heads // g * head_dim
    o = torch.randn(t, heads, head_dim, generator=gen)
    w_bmm = torch.randn(g, d, r, generator=gen) / 8
    w_dense = w_bmm.transpose(1, 2).reshape(g * r, d)  # rows: group-major, each group [R, D]
    a = grouped_linear(o, w_bmm, n_groups=g, o_lora_rank=r)
    b = grouped_linear(o, w_dense, n_groups=g, o_lora_rank=r)
    assert list(a) == ["w_q", "x_q", "expert_offsets", "gemm_out", "out"]
    for name in ("w_q", "x_q"):
        assert all(torch.equal(u, v) for u, v in zip(a[name], b[name], strict=True)), name
    assert torch.equal(a["out"], b["out"]) and a["out"].shape == (t, g, r)
    assert torch.equal(a["expert_offsets"], torch.tensor([t, 2 * t], dtype=torch.int32))
    # per group: its own dynamic gs, E=1 grouped GEMM
    a = grouped_linear(o, w_bmm, n_groups=g, o_lora_rank=r, oracle=True)
    view = o.reshape(t, g, d)
    one = torch.tensor([t], dtype=torch.int32)
    for i in range(g):
        c, s, gs = quantize_nvfp4(view[:, i])
        wc, ws, wg = quantize_weight_nvfp4(w_bmm[i])
        z = grouped_gemm_nvfp4(
            c, s, wc[None], ws[None], one, gs.reshape(1), wg.reshape(1), oracle=True
        ).to(torch.bfloat16)
        assert torch.equal(a["out"][:, i], z), i
    # the twin is the "bhr,hdr->bhd" einsum of the dense form
    tw = grouped_linear(o, w_dense, n_groups=g, o_lora_rank=r, quantized=False)
    want = torch.einsum("bhr,hdr->bhd", view, w_dense.reshape(g, r, d))
    torch.testing.assert_close(tw["out"], want, rtol=1e-5, atol=1e-5)
    # static per-group scales
    gs = torch.tensor([0.01, 0.02])
    st = grouped_linear(o, w_bmm, n_groups=g, o_lora_rank=r, gs=gs)
    assert torch.equal(st["x_q"][2], gs)
    assert torch.equal(
        deq(st["x_q"], st["expert_offsets"])[:t],
        dequantize_nvfp4(*quantize_nvfp4(view[:, 0], 0.01)),
    )


# --------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_name_the_argument(gen):
    x = torch.randn(3, H)
    w13, w2 = torch.randn(H, 2 * INTER), torch.randn(INTER, H)
    cases = [
        (lambda: shared_expert(x.int(), w13, w2), "x must be"),
        (lambda: shared_expert(x, w13[:-16], w2), "H mismatch"),
        (lambda: shared_expert(x, w13[:, :-1], w2), "w13 last dim"),
        (lambda: shared_expert(x, w13, w2[:-16]), "w2 must be"),
        (lambda: shared_expert(x[:, :40], w13[:40], w2[:, :40]), "H .*multiple of 16"),
        (lambda: shared_expert(x, w13[:, : 2 * 24], w2[:24]), "I .*multiple of 16"),
        (lambda: shared_expert(x, w13, w2, gs1=torch.ones(2)), "gs1"),
        (lambda: shared_expert(x, w13, w2, gs2=0.0), "gs2"),
    ]
    ew13, ew2 = torch.randn(E, H, 2 * INTER), torch.randn(E, INTER, H)
    ids, wts = routing(3, gen)
    cases += [
        (lambda: routed_moe(x, ids.float(), wts, ew13, ew2), "topk_ids"),
        (lambda: routed_moe(x, ids, wts[:, :1], ew13, ew2), "topk_weights"),
        (lambda: routed_moe(x, ids[:2], wts[:2], ew13, ew2), "topk_ids"),
        (lambda: routed_moe(x, ids, wts, ew13, ew2[:2]), "expert count"),
        (lambda: routed_moe(x, ids, wts, ew13, ew2, first_expert=-1), "first_expert"),
        (lambda: routed_moe(x, ids, wts, ew13, ew2, gs1=torch.ones(3)), "gs1"),
    ]
    o = torch.randn(3, 4, 32)
    cases += [
        (lambda: grouped_linear(o, torch.randn(2, 32, 8), n_groups=2, o_lora_rank=8), "w.shape"),
        (lambda: grouped_linear(o, torch.randn(16, 32), n_groups=2, o_lora_rank=8), "w.shape"),
        (lambda: grouped_linear(o, torch.randn(3, 64, 8), n_groups=3, o_lora_rank=8), "n_groups"),
        (
            lambda: grouped_linear(o[:, :, :4], torch.randn(2, 8, 8), n_groups=2, o_lora_rank=8),
            "multiple of 16",
        ),
    ]
    for i, (fn, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            fn()
            pytest.fail(f"case {i} did not raise")
