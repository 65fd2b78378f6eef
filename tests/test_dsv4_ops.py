"""dsv4.ops judged by the oracle: through the harness (stage cases, dsv4-torch) and directly.

The harness part runs the stage cases of cases/smoke.yaml and a sweep written here over the
layout-breaking token counts (1, 5, 127, 128, 129, 300) and SwiGLU limits (none, 10, 1) with
`harness.runner`; quantize and SwiGLU-requant must be bit-exact (dsv4 follows the reference's
order of operations, so no mismatch class is needed on the same device), layouts exact, GEMM
within the derived bound. The direct part checks the element formats exhaustively around every
rounding midpoint, the layouts against reference/, the backend registry, the custom ops under
torch.compile, the "no allocation / no host sync" claims (meta tensors on CPU, CUDA graphs and
sync-debug mode on a GPU), argument validation and import hygiene.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dsv4.ops as ops
import reference as ref
from dsv4.ops import gemm as dgemm
from dsv4.ops import gemm_torch
from dsv4.ops import quantize as dq
from harness.cases import Stage, load_cases
from harness.runner import SweepOptions, run_one, run_sweep
from reference import gemm as rgemm
from reference import layouts as rlay
from reference.activation import swiglu as ref_swiglu
from tests.gemm_problems import gemm_problem, within_bound

REPO = Path(__file__).resolve().parents[1]
TOKENS = [1, 5, 127, 128, 129, 300]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CPU-only machine)")


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.view(torch.uint8)


# --------------------------------------------------------------------------------------------
# through the harness


def _sweep_yaml(device: str) -> dict:
    both = ["normal", "outliers"]
    return {
        "name": "dsv4_ops",
        "defaults": {"shape": "tiny", "backends": ["dsv4-torch"], "device": device},
        "sweeps": [
            {
                "stage": "quantize",
                "tokens": TOKENS,
                "distributions": [
                    "normal",
                    "outliers",
                    "sparse",
                    "zero_blocks",
                    "nan_one",
                    "inf_one",
                ],
                "scale_ratios": [None, 2],
            },
            {
                "stage": "quantize",
                "tokens": [129, 300],
                "distributions": both,
                "scale_ratios": [100],
            },
            {"stage": "quantize", "tokens": TOKENS, "distributions": ["midpoints", "fp4_grid"]},
            {
                "stage": "scale_assembly",
                "tokens": TOKENS,
                "routing": ["uniform", "empty_experts", "one_expert"],
            },
            {
                "stage": "grouped_gemm",
                "tokens": TOKENS,
                "routing": ["uniform", "empty_experts", "one_expert"],
            },
            {"stage": "grouped_gemm", "tokens": [129], "distributions": ["outliers"]},
            {"stage": "swiglu_requant", "tokens": TOKENS, "limits": [None, 10, 1]},
            {"stage": "swiglu_requant", "tokens": [129], "distributions": ["outliers"]},
        ],
    }


def _load_sweep(tmp_path_factory, device: str):
    path = tmp_path_factory.mktemp("cases") / f"dsv4_ops_{device}.yaml"
    path.write_text(yaml.safe_dump(_sweep_yaml(device)))
    return load_cases(path)[1]


@pytest.fixture(scope="module")
def sweep_cases(tmp_path_factory):
    return _load_sweep(tmp_path_factory, "cpu")


def _run_stage(cases, stage: Stage) -> None:
    todo = [c for c in cases if c.stage is stage]
    assert todo, f"no {stage.value} cases"
    failures = []
    for case in todo:
        rows = run_one(case, "dsv4-torch")
        final = rows[-1]
        if final.outcome != "pass":
            tb = final.metrics.get("traceback", "")
            failures.append(f"{case.id}: {final['outcome']}: {final['message']}\n{tb}")
            continue
        if stage in (Stage.QUANTIZE, Stage.SWIGLU_REQUANT):
            for r in rows[:-1]:  # same order of operations as the oracle: bit-exact, no classes
                if r.compare.endswith((".codes", ".scales")) and not r.metrics["equal"]:
                    failures.append(f"{case.id}: {r['compare']} not bit-exact: {r['metrics']}")
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize(
    "stage",
    [Stage.QUANTIZE, Stage.SCALE_ASSEMBLY, Stage.GROUPED_GEMM, Stage.SWIGLU_REQUANT],
    ids=lambda s: s.value,
)
def test_harness_stage_cases_pass(sweep_cases, stage):
    _run_stage(sweep_cases, stage)


def test_harness_smoke_stage_cases_pass(tmp_path):
    cases = [c for c in load_cases(REPO / "cases" / "smoke.yaml")[1] if not c.stage.is_layer]
    opts = SweepOptions(backends=("dsv4-torch",), progress=False, resume=False)
    counts = run_sweep(cases, tmp_path / "results", opts, label="dsv4-smoke")
    assert counts["pass"] == len(cases), dict(counts)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "stage",
    [Stage.QUANTIZE, Stage.SCALE_ASSEMBLY, Stage.GROUPED_GEMM, Stage.SWIGLU_REQUANT],
    ids=lambda s: s.value,
)
def test_harness_stage_cases_pass_cuda(tmp_path_factory, stage):
    _run_stage(_load_sweep(tmp_path_factory, "cuda"), stage)


# --------------------------------------------------------------------------------------------
# element formats, exhaustively around every rounding midpoint


def _neighbours(values: torch.Tensor, ulps: int = 2) -> torch.Tensor:
    """values and their fp32 neighbours up to `ulps` steps either way."""
    out, lo, hi = [values], values, values
    for _ in range(ulps):
        lo = torch.nextafter(lo, torch.full_like(lo, -math.inf))
        hi = torch.nextafter(hi, torch.full_like(hi, math.inf))
        out += [lo, hi]
    return torch.cat(out)


def _random_fp32_bits(n: int, seed: int) -> torch.Tensor:
    """Uniform random fp32 bit patterns: every exponent, subnormals, Inf and NaN included."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64)
        .to(torch.int32)
        .view(torch.float32)
    )


DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.gpu])]


@pytest.mark.parametrize("device", DEVICES)
def test_e2m1_codes_match_reference_around_every_midpoint(device):
    grid = torch.tensor(ref.E2M1_VALUES + ref.E2M1_MIDPOINTS + (7.0, 1e30), dtype=torch.float32)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45])
    q = torch.cat([_neighbours(grid, 3), -_neighbours(grid, 3), special])
    q = torch.cat([q, _random_fp32_bits(1 << 20, 0), torch.rand(1 << 18) * 14 - 7])
    ours, theirs = dq.e2m1_codes(q.to(device)).cpu(), ref.encode_e2m1(q)
    bad = (ours != theirs).nonzero().flatten()
    assert bad.numel() == 0, (
        f"first mismatch q={q[bad[0]].item()!r}: {ours[bad[0]]} vs {theirs[bad[0]]}"
    )


@pytest.mark.parametrize("device", DEVICES)
def test_e4m3_scale_bytes_match_reference_around_every_midpoint(device):
    # every positive finite e4m3 value, the midpoints between neighbours (ties to even, the
    # subnormal range included), 0 to the smallest subnormal, and the overflow range to 464+
    vals = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2  # exact in fp32
    edges = torch.tensor([2.0**-10, 448.0, 456.0, 464.0, 480.0, 1e6, 3.0e38])
    s = torch.cat([_neighbours(torch.cat([vals, mids, edges]), 3)])
    s = torch.cat([s, torch.tensor([0.0, -0.0, math.inf, math.nan, -math.nan])])
    rnd = _random_fp32_bits(1 << 20, 1).abs()  # non-negative, as amax / 6 always is
    s = torch.cat([s, rnd, torch.exp2(torch.rand(1 << 18) * 30 - 21)])
    # on CUDA this checks torch's device cast (rounding, subnormals) against the oracle on CPU
    ours = dq.e4m3_scale_bytes(s.to(device)).cpu()
    theirs = ref.encode_block_scales(s).view(torch.uint8)
    bad = (ours != theirs).nonzero().flatten()
    assert bad.numel() == 0, (
        f"first mismatch s={s[bad[0]].item()!r}: {ours[bad[0]]} vs {theirs[bad[0]]}"
    )


def _one_block(values: list[float]) -> torch.Tensor:
    assert len(values) == 16
    return torch.tensor([values], dtype=torch.float32)


def test_named_ties_signed_zero_and_saturation():
    # gs = 1 and amax 6: the block scale is exactly 1.0, so q = x and each tie is seen directly
    x = _one_block(
        [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.0, 5.5, -5, 0.1, -1.75, 4.0, -6.0]
    )
    codes, scales = ops.quantize_activation_nvfp4(x, torch.tensor(1.0))
    unpacked = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten().tolist()
    # 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0, -0.25->-0 (0x8),
    # -0.0 -> 0x8, 5.5 -> 6, -5 -> -4 (0xE), 0.1 -> 0, -1.75 -> -2.0 (0xC); codes index
    # the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
    assert unpacked == [7, 0, 2, 2, 4, 4, 6, 6, 8, 8, 7, 14, 0, 12, 6, 15]
    assert scales.view(torch.uint8).tolist() == [[0x38]]  # e4m3 1.0


def test_nan_inf_and_zero_blocks():
    x = torch.zeros(1, 64)
    x[0, 3] = math.nan  # block 0: NaN amax
    x[0, 16:32] = torch.linspace(-1, 1, 16)
    x[0, 20] = math.inf  # block 1: Inf amax saturates the scale
    x[0, 40] = 1.0  # block 2 normal, block 3 all zero
    gs = torch.tensor(1.0)
    codes, scales = ops.quantize_activation_nvfp4(x, gs)
    rc, rs, _ = ref.quantize_nvfp4(x, gs)
    assert torch.equal(codes, rc) and torch.equal(_bytes(scales), _bytes(rs))
    sb = _bytes(scales)[0].tolist()
    assert sb[0] == 0x7F  # NaN block amax stays visible as the scale byte
    assert sb[1] == 0x7E  # Inf -> 448 (clamped before the cast), not NaN
    assert sb[3] == 0 and codes[0, 24:].eq(0).all()
    assert codes[0, :8].eq(0x77).all()  # NaN policy: +6 for every element of a NaN block


def test_static_scale_saturates_instead_of_nan():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 256, generator=g)
    gs = ref.global_scale_from_amax(x.abs().amax() / 100)  # live amax 100x the calibrated one
    codes, scales = ops.quantize_activation_nvfp4(x, gs)
    assert not (_bytes(scales) == 0x7F).any()
    rc, rs, _ = ref.quantize_nvfp4(x, gs)
    assert torch.equal(codes, rc) and torch.equal(_bytes(scales), _bytes(rs))


@pytest.mark.parametrize("shape", [(0, 64), (1, 16), (7, 96), (2, 3, 256), (300, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dynamic_quantize_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 5).to(dtype)
    codes, scales, gs = ops.quantize_to_nvfp4(x)
    rc, rs, rgs = ref.quantize_nvfp4(x)
    assert gs.dtype == torch.float32 and gs.shape == () and gs.item() == rgs.item()
    assert torch.equal(codes, rc) and torch.equal(_bytes(scales), _bytes(rs))


def test_all_zero_input_has_unit_global_scale():
    codes, scales, gs = ops.quantize_to_nvfp4(torch.zeros(2, 32))
    assert gs.item() == 1.0 and not codes.any() and not _bytes(scales).any()


def test_weight_quantize_matches_reference():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 96, generator=g) * 0.02
    codes, scales, gs = ops.quantize_weight_to_nvfp4(w)
    rc, rs, rgs = ref.quantize_weight_nvfp4(w)
    assert codes.shape == (128, 96) and scales.shape == (16, 96)
    assert torch.equal(codes, rc) and torch.equal(_bytes(scales), _bytes(rs)) and gs == rgs
    c2, s2, gs2 = ops.quantize_weight_to_nvfp4(w, global_scale=rgs * 2)
    rc2, rs2, _ = ref.quantize_weight_nvfp4(w, rgs * 2)
    assert torch.equal(c2, rc2) and torch.equal(_bytes(s2), _bytes(rs2))


def test_dequantize_roundtrip_matches_reference():
    x = torch.randn(5, 64)
    codes, scales, gs = ops.quantize_to_nvfp4(x)
    ours = ops.dequantize_nvfp4(codes, scales, gs)
    assert torch.equal(ours, ref.dequantize_nvfp4(codes, scales, gs))


# --------------------------------------------------------------------------------------------
# static paths: written in place, no allocation for results, no host reads


def test_static_quantize_writes_into_given_outputs_under_inference_mode():
    x = torch.randn(129, 256)
    gs = ref.global_scale_from_amax(x.abs().amax())
    codes_buf = torch.full((129, 256), 0xFF, dtype=torch.uint8)
    scale_buf = torch.full((129, 64), 0xFF, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes_out, scales_out = codes_buf[:, :128], scale_buf[:, 16:32]  # strided views
    ptrs = (codes_out.data_ptr(), scales_out.data_ptr())
    with torch.inference_mode():
        c, s = ops.quantize_activation_nvfp4(x, gs, codes_out, scales_out)
    assert c is codes_out and s is scales_out
    assert (c.data_ptr(), s.data_ptr()) == ptrs
    rc, rs, _ = ref.quantize_nvfp4(x, gs)
    assert torch.equal(c, rc) and torch.equal(_bytes(s), _bytes(rs))
    assert codes_buf[:, 128:].eq(0xFF).all() and _bytes(scale_buf)[:, 32:].eq(0xFF).all()


def test_graph_safe_paths_read_no_tensor_value_on_meta_device():
    """A host read (.item(), .tolist(), bool(t)) raises on meta tensors: these paths have none."""
    meta = torch.device("meta")
    x = torch.empty(300, 256, device=meta)
    gs = torch.empty((), device=meta)
    codes = torch.empty(300, 128, dtype=torch.uint8, device=meta)
    scales = torch.empty(300, 16, dtype=torch.float8_e4m3fn, device=meta)
    dq.quantize_into(x, gs, codes, scales)
    ops.swiglu(torch.empty(300, 512, device=meta), 10.0)
    counts = torch.empty(4, dtype=torch.int32, device=meta)
    offsets = ops.compute_expert_offsets(counts)
    ops.compute_blockscale_offsets(counts)
    out2d = torch.empty(ops.max_padded_rows(300, 4) * 16, dtype=torch.uint8, device=meta)
    ops.assemble_scales_2d_side_from_offsets(scales, offsets, out=out2d)
    b = torch.empty(4, 128, 64, dtype=torch.uint8, device=meta)
    sb = torch.empty(4, 128 * 16, dtype=torch.uint8, device=meta)
    g4 = torch.empty(4, device=meta)
    out = torch.empty(300, 64, dtype=torch.bfloat16, device=meta)
    gemm_torch.torch_grouped_gemm(codes, b, out2d, sb, offsets, g4, g4, out, sync_free=True)


# --------------------------------------------------------------------------------------------
# layouts


def _rand_scale_bytes(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # 1..255: no data byte looks like padding
    return torch.randint(1, 256, (rows, cols), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("rows", [1, 5, 127, 128, 129, 300])
@pytest.mark.parametrize("cols", [1, 3, 4, 5, 16, 28])
def test_pad_and_swizzle_matches_reference(rows, cols):
    s = _rand_scale_bytes(rows, cols, rows * cols).view(torch.float8_e4m3fn)
    ours = ops.pad_and_swizzle(s)
    assert ours.dtype == s.dtype and ours.dim() == 1
    assert torch.equal(_bytes(ours), _bytes(rlay.swizzle_scales(s)))
    out = torch.full((ops.swizzled_numel(rows, cols),), 0xFF, dtype=torch.uint8)
    assert ops.pad_and_swizzle(s.view(torch.uint8), out=out) is out
    assert torch.equal(out, _bytes(ours))
    assert torch.equal(ops.unswizzle(out, rows, cols), _bytes(s))


def test_assemble_2d_side_list_matches_reference():
    groups = [_rand_scale_bytes(t, 16, t).view(torch.float8_e4m3fn) for t in (5, 0, 128, 129, 1)]
    b, starts = ops.assemble_scales_2d_side(groups)
    rb, rstarts = rlay.assemble_scales_2d_side(groups)
    assert b.dtype == torch.float8_e4m3fn and starts.dtype == torch.int32
    assert torch.equal(_bytes(b), _bytes(rb)) and torch.equal(starts, rstarts)
    assert starts.tolist() == [0, 128, 128, 256, 512]


@pytest.mark.parametrize("seed", range(12))
def test_assemble_2d_side_from_offsets_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    e = int(torch.randint(1, 7, (1,), generator=g))
    counts = torch.randint(0, 200, (e,), generator=g)
    counts[torch.rand(e, generator=g) < 0.3] = 0  # empty groups
    if seed == 0:
        counts = torch.tensor([1, 127, 128, 129, 0, 300])
        e = 6
    extra = int(torch.randint(0, 5, (1,), generator=g))  # rows past offsets[-1]: never read
    t, c = int(counts.sum()), int(torch.randint(1, 30, (1,), generator=g))
    scales = _rand_scale_bytes(t + extra, c, seed).view(torch.float8_e4m3fn)
    offsets = ops.compute_expert_offsets(counts.to(torch.int32))
    rb, rstarts = rlay.assemble_scales_2d_side_from_offsets(scales[:t], offsets)
    cp = (c + 3) // 4 * 4
    n = ops.max_padded_rows(t + extra, e) * cp
    assert n >= rb.numel()
    out = torch.full((n,), 0xFF, dtype=torch.uint8).view(torch.float8_e4m3fn)
    res, starts = ops.assemble_scales_2d_side_from_offsets(scales, offsets, out=out)
    assert res is out and torch.equal(starts, rstarts)
    assert torch.equal(_bytes(out)[: rb.numel()], _bytes(rb))
    assert not _bytes(out)[rb.numel() :].any()  # every byte written: the tail is zero
    alloc, _ = ops.assemble_scales_2d_side_from_offsets(scales, offsets)
    assert torch.equal(_bytes(alloc), _bytes(out))


def test_max_padded_rows_bounds_every_split():
    g = torch.Generator().manual_seed(5)
    for _ in range(200):
        e = int(torch.randint(1, 9, (1,), generator=g))
        counts = torch.randint(0, 300, (e,), generator=g)
        used = sum(rlay.round_up(int(t), 128) for t in counts)
        assert used <= ops.max_padded_rows(int(counts.sum()), e)
    assert ops.max_padded_rows(300, 4) == 128 * 3 + 384  # 1 + 1 + 1 + 297: tight
    assert ops.max_padded_rows(0, 4) == 0 and ops.max_padded_rows(2, 48) == 256


def test_offsets_match_reference():
    counts = torch.tensor([3, 0, 128, 129, 1], dtype=torch.int32)
    assert torch.equal(ops.compute_expert_offsets(counts), rlay.compute_expert_offsets(counts))
    assert ops.compute_expert_offsets(counts).dtype == torch.int32
    assert torch.equal(
        ops.compute_blockscale_offsets(counts), rlay.compute_blockscale_offsets(counts)
    )
    assert ops.compute_expert_offsets(counts.long()).dtype == torch.int32


def test_assemble_3d_side_matches_reference():
    b = torch.stack([_rand_scale_bytes(16, 200, i) for i in range(3)]).view(torch.float8_e4m3fn)
    expected = _bytes(rlay.assemble_scales_3d_side(list(b)))
    assert torch.equal(_bytes(ops.assemble_scales_3d_side(list(b))), expected)
    out = torch.full(tuple(expected.shape), 0xFF, dtype=torch.uint8)
    assert ops.assemble_scales_3d_side(b, out=out) is out
    assert torch.equal(out, expected)


def test_make_b_k_major_is_a_k_contiguous_view_of_the_same_values():
    b = torch.randint(0, 256, (3, 64, 40), dtype=torch.uint8)
    km = ops.make_b_k_major(b)
    assert km.shape == b.shape and km.stride() == (64 * 40, 1, 64) and torch.equal(km, b)
    assert km.stride() == rlay.make_b_k_major(b).stride()


def test_make_b_tiled_puts_each_byte_where_its_docstring_says():
    e, k, n = 2, 384, 48
    b = torch.randint(0, 256, (e, k // 2, n), dtype=torch.uint8)
    tiled = ops.make_b_tiled(b)
    assert tiled.shape == (e, n // 16, k // 128, 1024) and tiled.is_contiguous()
    assert ops.b_dims(tiled) == ops.b_dims(b) == (e, k // 2, n)
    assert torch.equal(ops.make_b_tiled(ops.make_b_k_major(b)), tiled)  # any strides
    ee, kb, nn = torch.meshgrid(
        torch.arange(e), torch.arange(k // 2), torch.arange(n), indexing="ij"
    )
    at = (nn // 16) * (k // 128 * 1024) + kb // 64 * 1024 + nn % 16 // 8 * 512 + nn % 8 * 64
    assert torch.equal(tiled.reshape(e, -1)[ee, at + kb % 64], b)
    with pytest.raises(ValueError, match=r"N % 16 == 0 and K % 128 == 0, got b.shape=\(2, 64, 40"):
        ops.make_b_tiled(torch.zeros(2, 64, 40, dtype=torch.uint8))


def test_prepare_weight_codes_gives_each_backend_its_declared_layout():
    b = torch.randint(0, 256, (2, 128, 32), dtype=torch.uint8)
    assert ops.prepare_weight_codes(b, "torch") is b  # any strides
    assert torch.equal(ops.prepare_weight_codes(b, "sm90"), ops.make_b_tiled(b))  # no GPU needed
    odd = torch.randint(0, 256, (2, 128, 40), dtype=torch.uint8)  # N % 16: no whole tile
    km = ops.prepare_weight_codes(odd, "sm90")
    assert km.stride(1) == 1 and torch.equal(km, odd)
    assert ops.prepare_weight_codes(b).shape == b.shape  # CPU: the torch backend's
    with pytest.raises(ValueError, match=r"backend='nope' is not registered; registered: "):
        ops.prepare_weight_codes(b, "nope")


def test_a_backend_that_does_not_read_tiled_weights_refuses_them_by_name():
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([3, 2], k=256, n=64, seed=4)
    tiled = ops.make_b_tiled(b)
    with pytest.raises(ValueError, match=r"make_b_tiled's layout .* backend 'torch' does not"):
        ops.run_nvfp4_grouped_gemm(a, tiled, a_sw, b_sw, offs, gsa, gsb, backend="torch")
    with pytest.raises(ValueError, match=r"mat_b must be \[E, K/2, N\] \(or make_b_tiled's"):
        ops.run_nvfp4_grouped_gemm(a, tiled[..., :512], a_sw, b_sw, offs, gsa, gsb)


# --------------------------------------------------------------------------------------------
# grouped GEMM


@pytest.mark.parametrize("counts", [[1, 0, 0, 0], [5, 0, 3, 2], [127, 1, 128, 0], [129, 300, 0, 2]])
@pytest.mark.parametrize("k_major", [False, True], ids=["n_major", "k_major"])
def test_grouped_gemm_within_derived_bound(counts, k_major):
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem(counts, seed=sum(counts))
    if k_major:
        b = ops.make_b_k_major(b)
    out = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(counts), 192)
    within_bound(plain, out, sum(counts))


def test_grouped_gemm_leaves_rows_past_last_offset_untouched():
    counts = [5, 0, 130]
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem(counts, extra=7, seed=1)
    out = torch.full((a.shape[0], 192), 12.5, dtype=torch.bfloat16)
    res = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out=out)
    assert res is out and out[135:].eq(12.5).all()
    within_bound(plain, out, 135)


@pytest.mark.parametrize("sync_free", [False, True])
def test_grouped_gemm_with_no_routed_rows_writes_nothing(sync_free):
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([0, 0], extra=3, seed=12)
    assert a.shape[0] == 3 and a_sw.numel() == 0
    out = torch.full((3, 192), 2.0, dtype=torch.bfloat16)
    gemm_torch.torch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out, sync_free=sync_free)
    assert out.eq(2.0).all()


def test_grouped_gemm_sync_free_form_matches_host_form():
    counts = [5, 0, 130, 1]
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem(counts, extra=3, seed=2)
    host = torch.full((a.shape[0], 192), 7.0, dtype=torch.bfloat16)
    free = host.clone()
    gemm_torch.torch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, host, sync_free=False)
    gemm_torch.torch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, free, sync_free=True)
    within_bound(plain, free, 136)
    assert free[136:].eq(7.0).all()


@pytest.mark.parametrize("counts", [[5, 0, 130, 1], [1, 0, 0, 0], [0, 0, 3, 0]])
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("k_major", [False, True], ids=["n_major", "k_major"])
def test_grouped_gemm_workspace_form_is_bit_identical(counts, sync_free, k_major):
    """With a dirty workspace (what the runners pass) the bits are those of a call that
    allocates its temporaries, NaN-free or not, and a workspace one byte too small is refused
    before anything is written."""
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem(counts, extra=3, seed=len(counts))
    if k_major:
        b = ops.make_b_k_major(b)
    t, e, n = a.shape[0], b.shape[0], b.shape[2]
    need = ops.grouped_gemm_workspace_bytes("torch", t, 2 * a.shape[1], n, e)
    want = torch.full((t, n), 7.0, dtype=torch.bfloat16)
    got = want.clone()
    gemm_torch.torch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, want, sync_free=sync_free)
    ws = torch.full((need,), 0xAB, dtype=torch.uint8)  # stale bytes must not leak in
    gemm_torch.torch_grouped_gemm(
        a, b, a_sw, b_sw, offs, gsa, gsb, got, sync_free=sync_free, workspace=ws
    )
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    if not sync_free:
        out = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, workspace=ws)
        assert torch.equal(out[: sum(counts)], want[: sum(counts)])
        with pytest.raises(ValueError, match="workspace"):
            ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, workspace=ws[:-1])


@pytest.mark.parametrize("t", [1, 5, 129])
def test_ops_workspace_forms_are_bit_identical(t):
    """quantize, swiglu(+quantize), pad_and_swizzle and the 2-D-side assembly write the same
    bytes with a (dirty) workspace as without, specials included."""
    g = torch.Generator().manual_seed(t)
    x = (torch.randn(t, 256, generator=g) * 3).to(torch.bfloat16)
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, 1e6, -1e-30])
    gs = torch.tensor([0.01])

    def dirty(n):
        return torch.full((n,), 0xCD, dtype=torch.uint8)

    want = ops.quantize_activation_nvfp4(x, gs)
    got = ops.quantize_activation_nvfp4(
        x,
        gs,
        torch.empty_like(want[0]),
        torch.empty_like(want[1]),
        workspace=dirty(ops.quantize_workspace_bytes(tuple(x.shape))),
    )
    assert torch.equal(got[0], want[0]) and torch.equal(_bytes(got[1]), _bytes(want[1]))
    want = ops.swiglu_quantize(x, gs, 1.0)
    need = ops.swiglu_quantize_workspace_bytes(tuple(x.shape))
    got = ops.swiglu_quantize(
        x, gs, 1.0, torch.empty_like(want[0]), torch.empty_like(want[1]), dirty(need)
    )
    assert torch.equal(got[0], want[0]) and torch.equal(_bytes(got[1]), _bytes(want[1]))
    h = ops.swiglu(x, None)
    h2 = ops.swiglu(x, None, out=torch.empty_like(h), workspace=dirty(need))
    assert torch.equal(h.view(torch.int32), h2.view(torch.int32))
    scales = want[1]
    ws = dirty(ops.pad_and_swizzle_workspace_bytes(*scales.shape))
    assert torch.equal(
        _bytes(ops.pad_and_swizzle(scales)),
        _bytes(ops.pad_and_swizzle(scales, torch.empty_like(ops.pad_and_swizzle(scales)), ws)),
    )
    offs = torch.tensor([0, t // 2, t // 2, t], dtype=torch.int32)
    n = ops.max_padded_rows(t, 4) * 8
    w_out, w_starts = ops.assemble_scales_2d_side_from_offsets(
        scales, offs, torch.empty(n + 1024, dtype=torch.uint8)
    )
    ws = dirty(ops.assemble_2d_workspace_bytes(t, scales.shape[1], 4, n + 1024))
    g_out, g_starts = ops.assemble_scales_2d_side_from_offsets(
        scales, offs, torch.empty(n + 1024, dtype=torch.uint8), workspace=ws
    )
    assert torch.equal(g_out, w_out) and torch.equal(g_starts, w_starts)


def test_grouped_gemm_exact_on_exactly_summable_inputs():
    """Unit block scales and gs = 1: every partial sum is a small multiple of 1/4, exact in fp32,
    so any summation order gives the reference's bits."""
    g = torch.Generator().manual_seed(6)
    counts, k, n, e = [3, 0, 129], 128, 160, 3
    t = sum(counts)
    a = torch.randint(0, 256, (t, k // 2), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (e, k // 2, n), generator=g, dtype=torch.uint8)
    one = torch.tensor(0x38, dtype=torch.uint8)  # e4m3 1.0
    a_s = one.expand(t, k // 16).contiguous().view(torch.float8_e4m3fn)
    b_s = one.expand(e, k // 16, n).contiguous().view(torch.float8_e4m3fn)
    offs = rlay.compute_expert_offsets(torch.tensor(counts))
    gs = torch.ones(e)
    expected = rgemm.grouped_gemm_nvfp4(a, a_s, b, b_s, offs, gs, gs)
    a_sw, _ = ops.assemble_scales_2d_side_from_offsets(a_s, offs)
    out = ops.run_nvfp4_grouped_gemm(a, b, a_sw, ops.assemble_scales_3d_side(b_s), offs, gs, gs)
    assert torch.equal(out, expected)


def test_grouped_gemm_global_scales_broadcast_from_one_entry():
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([5, 9], seed=3)
    full = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb)
    one = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa[:1].clone(), gsb)
    assert torch.equal(full, one)


# --------------------------------------------------------------------------------------------
# backend registry


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: tests may register fakes without leaking them."""
    monkeypatch.setattr(dgemm, "_BACKENDS", dict(dgemm._BACKENDS))
    return dgemm


def test_torch_backend_is_registered_and_selected_on_cpu():
    assert "torch" in ops.available_backends()
    assert ops.select_backend("cpu") == "torch"
    assert ops.select_backend(torch.device("cpu"), "torch") == "torch"
    assert ops.available_backends("cpu") == ["torch"]


def test_selection_prefers_capable_backends_by_priority(registry):
    calls = []

    def fake(*args):
        calls.append(len(args))
        args[-1].fill_(1.0)

    ops.register_backend("sm90", fake, ops.requires_capability(9, 0))  # default priorities
    ops.register_backend("sm100", fake, ops.requires_capability(10, 0))
    assert ops.available_backends() == ["sm100", "sm90", "torch"]
    assert ops.select_backend("cpu") == "torch"  # neither capability on a CPU
    ops.register_backend("fast-cpu", fake, lambda d: (d.type == "cpu", "cpu only"), priority=50)
    assert ops.select_backend("cpu") == "fast-cpu"
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([2, 3], seed=4)
    out = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb)
    assert calls == [8] and out.eq(1.0).all()  # the custom op dispatched to the fake
    out = ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, backend="torch")
    assert calls == [8] and not out.eq(1.0).all()


def test_override_missing_capability_names_it(registry):
    ops.register_backend("sm100", lambda *a: None, ops.requires_capability(10, 0), priority=100)
    with pytest.raises(ops.BackendUnavailableError, match=r"backend 'sm100' needs sm_100, got cpu"):
        ops.select_backend("cpu", "sm100")
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([2], seed=5)
    with pytest.raises(ops.BackendUnavailableError, match="needs sm_100"):
        ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, backend="sm100")


def test_override_unknown_or_planned_backend(registry, monkeypatch):
    monkeypatch.setitem(registry.PLANNED_BACKENDS, "sm120", "a future backend")
    with pytest.raises(
        ValueError,
        match=r"backend='sm120' is not implemented yet \(a future backend\); registered: sm100",
    ):
        ops.select_backend("cpu", "sm120")
    with pytest.raises(ValueError, match=r"backend='nope' is not registered"):
        ops.select_backend("cpu", "nope")


def test_adapter_reports_missing_capability_as_unsupported(registry, sweep_cases):
    from harness.backends.dsv4 import Dsv4Adapter

    ops.register_backend("sm100", lambda *a: None, ops.requires_capability(10, 0), priority=100)
    case = next(c for c in sweep_cases if c.stage is Stage.GROUPED_GEMM)
    ok, why = Dsv4Adapter("sm100").can_implement(case)
    assert not ok and why == "backend 'sm100' needs sm_100, got cpu"
    ok, why = Dsv4Adapter("sm90").can_implement(case)
    assert not ok and why == "backend 'sm90' needs sm_90, got cpu"
    ok, why = Dsv4Adapter("sm7").can_implement(case)
    assert not ok and why.startswith("backend='sm7' is not registered")
    assert Dsv4Adapter("torch").can_implement(case) == (True, "")


def test_adapter_takes_its_layer_methods_from_the_layer_mixin(sweep_cases):
    from harness.backends.dsv4 import Dsv4Adapter, LayerAdapterMixin

    adapter = Dsv4Adapter("torch")
    assert isinstance(adapter, LayerAdapterMixin) and adapter.backend == "torch"
    for case in load_cases(REPO / "cases" / "smoke.yaml")[1]:
        assert adapter.can_implement(case) == (True, ""), case.id


# --------------------------------------------------------------------------------------------
# custom ops and torch.compile


def _opcheck_args():
    # Scale bytes travel as uint8 here: opcheck's schema test compares tensors with arithmetic
    # that torch 2.13 lacks for float8_e4m3fn ("mul_cpu_reduced_float" not implemented). The
    # ops take either dtype (they move and read scales through byte views).
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([3, 0, 5], k=64, n=32, seed=7)
    a_sw, b_sw = a_sw.view(torch.uint8), b_sw.view(torch.uint8)
    out = torch.zeros(8, 32, dtype=torch.bfloat16)
    x = torch.randn(8, 64)
    gs = ref.global_scale_from_amax(x.abs().amax()).reshape(1)
    codes = torch.empty(8, 32, dtype=torch.uint8)
    scales = torch.empty(8, 4, dtype=torch.uint8)
    l1 = torch.randn(8, 128)
    # workspace: a required (Optional) argument of each op; None, then scratch of the op's size
    ws_gemm = torch.zeros(
        ops.grouped_gemm_workspace_bytes("torch", 8, 64, 32, 3), dtype=torch.uint8
    )
    ws_q = torch.zeros(ops.quantize_workspace_bytes((8, 64)), dtype=torch.uint8)
    ws_s = torch.zeros(ops.swiglu_quantize_workspace_bytes((8, 128)), dtype=torch.uint8)
    gemm_args = (a, b, a_sw, b_sw, offs, gsa, gsb, out, "torch")
    return [
        (torch.ops.dsv4.nvfp4_grouped_gemm.default, (*gemm_args, None)),
        (torch.ops.dsv4.nvfp4_grouped_gemm.default, (*gemm_args, ws_gemm)),
        (torch.ops.dsv4.quantize_nvfp4_static.default, (x, gs, codes, scales, None)),
        (torch.ops.dsv4.quantize_nvfp4_static.default, (x, gs, codes, scales, ws_q)),
        (torch.ops.dsv4.swiglu_quantize_nvfp4.default, (l1, gs, 10.0, codes, scales, None)),
        (torch.ops.dsv4.swiglu_quantize_nvfp4.default, (l1, gs, 10.0, codes, scales, ws_s)),
    ]


def test_custom_ops_pass_opcheck():
    for op, args in _opcheck_args():
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)
    # the dynamic op returns float8 scales, which the schema test cannot compare (above)
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.dsv4.quantize_nvfp4_dynamic.default, (torch.randn(8, 64),), test_utils=tests
    )


def test_torch_compile_fullgraph_treats_ops_as_opaque():
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([3, 0, 130], seed=8)
    x = torch.randn(133, 256)
    gs = ref.global_scale_from_amax(x.abs().amax())
    codes = torch.empty(133, 128, dtype=torch.uint8)
    scales = torch.empty(133, 16, dtype=torch.float8_e4m3fn)

    def step(x, out):
        ops.quantize_activation_nvfp4(x, gs, codes, scales)
        return ops.run_nvfp4_grouped_gemm(
            a, b, a_sw, b_sw, offs, gsa, gsb, out=out, backend="torch"
        )

    eager_out = step(x, torch.zeros(133, 192, dtype=torch.bfloat16))
    eager_codes = codes.clone()
    codes.fill_(0)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = compiled(x, torch.zeros(133, 192, dtype=torch.bfloat16))
    assert torch.equal(out, eager_out) and torch.equal(codes, eager_codes)


# --------------------------------------------------------------------------------------------
# validation: ValueError naming the argument


def _bad_gemm_calls():
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([2, 3], k=64, n=32, seed=9)
    good = dict(
        mat_a=a, mat_b=b, scale_a=a_sw, scale_b=b_sw, expert_offsets=offs,
        global_scale_a=gsa, global_scale_b=gsb,
    )  # fmt: skip
    return [
        (dict(good, mat_a=a.float()), r"mat_a must be uint8, got mat_a.dtype=torch.float32"),
        (dict(good, mat_b=b[:, :16]), r"K mismatch: mat_a.shape=\(5, 32\)"),
        (dict(good, expert_offsets=offs.long()), r"expert_offsets must be int32"),
        (dict(good, expert_offsets=offs[:1]), r"expert_offsets must hold E=2 entries"),
        (dict(good, scale_b=b_sw[:, :-1]), r"scale_b must be \[E, round_up"),
        (dict(good, scale_a=a_sw[:-1]), r"scale_a must be the swizzled 2-D side"),
        (dict(good, global_scale_a=gsa.double()), r"global_scale_a must be float32"),
        (dict(good, global_scale_b=gsb[:1].expand(3)), r"global_scale_b must hold E=2"),
        (dict(good, out=torch.zeros(5, 32)), r"out must be bfloat16"),
        (
            dict(good, out=torch.zeros(4, 32, dtype=torch.bfloat16)),
            r"out must have shape \(5, 32\)",
        ),
        (dict(good, expert_offsets=torch.tensor([3, 2], dtype=torch.int32)), r"non-decreasing"),
        (dict(good, expert_offsets=torch.tensor([2, 6], dtype=torch.int32)), r"exceeds T=5"),
    ]


@pytest.mark.parametrize("i", range(12))
def test_grouped_gemm_rejects_bad_arguments(i):
    kwargs, pattern = _bad_gemm_calls()[i]
    with pytest.raises(ValueError, match=pattern):
        ops.run_nvfp4_grouped_gemm(**kwargs)


def test_quantize_and_layout_functions_reject_bad_arguments():
    x, gs = torch.randn(4, 64), torch.tensor(1.0)
    cases = [
        (lambda: ops.quantize_to_nvfp4(torch.randn(4, 40)), r"x last dim must be a multiple of 16"),
        (lambda: ops.quantize_to_nvfp4(x.to(torch.int32)), r"x must be float32 or bfloat16"),
        (lambda: ops.quantize_activation_nvfp4(x, 1.0), r"global_scale must be a torch.Tensor"),
        (lambda: ops.quantize_activation_nvfp4(x, torch.ones(2)), r"global_scale must hold one"),
        (lambda: ops.quantize_activation_nvfp4(x, gs.double()), r"global_scale must be float32"),
        (
            lambda: ops.quantize_activation_nvfp4(
                x,
                gs,
                torch.empty(4, 31, dtype=torch.uint8),
                torch.empty(4, 4).to(torch.float8_e4m3fn),
            ),
            r"codes_out must have shape \(4, 32\)",
        ),
        (
            lambda: ops.quantize_activation_nvfp4(
                x, gs, torch.empty(4, 32, dtype=torch.uint8), torch.empty(4, 4, dtype=torch.uint8)
            ),
            r"scales_out must be float8_e4m3fn",
        ),
        (
            lambda: ops.quantize_activation_nvfp4(x, gs, torch.empty(4, 32, dtype=torch.uint8)),
            r"given together",
        ),
        (lambda: ops.quantize_weight_to_nvfp4(torch.randn(40, 8)), r"K a multiple of 16"),
        (lambda: ops.swiglu_quantize(torch.randn(4, 48), gs), r"l1_out last dim must be 2\*I"),
        (
            lambda: ops.swiglu_quantize(torch.randn(4, 64), gs, limit=0),
            r"limit must be a number > 0",
        ),
        (
            lambda: ops.pad_and_swizzle(torch.randn(4, 4)),
            r"scales_2d must be float8_e4m3fn or uint8",
        ),
        (
            lambda: ops.assemble_scales_2d_side_from_offsets(
                torch.zeros(300, 16, dtype=torch.uint8),
                torch.tensor([100, 300], dtype=torch.int32),
                out=torch.zeros(128 * 16, dtype=torch.uint8),
            ),
            r"out must be contiguous with at least max_padded_rows\(T=300, E=2\)",
        ),
        (
            lambda: ops.assemble_scales_2d_side_from_offsets(
                torch.zeros(3, 16, dtype=torch.uint8), torch.tensor([3])
            ),
            r"expert_offsets must be int32",
        ),
        (lambda: ops.assemble_scales_2d_side([]), r"scales_per_group must be a non-empty list"),
        (lambda: ops.compute_expert_offsets(torch.ones(3)), r"tokens_per_expert must be int32"),
        (lambda: ops.make_b_k_major(torch.zeros(2, 2)), r"b must be uint8"),
        (lambda: ops.max_padded_rows(-1, 2), r"total_rows must be a non-negative int"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


# --------------------------------------------------------------------------------------------
# import hygiene


def test_dsv4_ops_have_no_env_reads_prints_or_host_syncs():
    pattern = re.compile(r"os\.environ|getenv|\bprint\(|\.item\(\)")
    bad = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for p in sorted((REPO / "dsv4" / "ops").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, bad


@pytest.mark.skipif(
    not HAS_CUDA, reason="CUDA cannot be initialised without a GPU: nothing to check"
)
def test_importing_dsv4_does_not_initialise_cuda():
    code = (
        "import torch, dsv4, dsv4.ops, dsv4.layers, harness.backends.dsv4\n"
        "assert not torch.cuda.is_initialized(), 'importing dsv4 initialised CUDA'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------------------------
# CUDA graphs and sync-free claims on a GPU


@needs_cuda
@pytest.mark.gpu
def test_static_paths_capture_in_a_cuda_graph_and_never_sync():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(10)
    x_host = torch.randn(129, 256, generator=g)
    gs = ref.global_scale_from_amax(x_host.abs().amax()).to(dev)
    x = torch.zeros(129, 256, device=dev)
    l1 = torch.zeros(129, 512, device=dev)
    codes = torch.empty(129, 128, dtype=torch.uint8, device=dev)
    scales = torch.empty(129, 16, dtype=torch.float8_e4m3fn, device=dev)
    codes2 = torch.empty(129, 128, dtype=torch.uint8, device=dev)
    scales2 = torch.empty(129, 16, dtype=torch.float8_e4m3fn, device=dev)
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([5, 0, 130], extra=2, seed=11)
    a, b, a_sw, b_sw, offs, gsa, gsb = (v.to(dev) for v in (a, b, a_sw, b_sw, offs, gsa, gsb))
    out = torch.full((137, 192), 3.0, dtype=torch.bfloat16, device=dev)
    s2d = torch.empty(ops.max_padded_rows(137, 3) * 16, dtype=torch.uint8, device=dev)
    a_scales = torch.randint(1, 255, (137, 16), dtype=torch.uint8, device=dev)

    def body():
        ops.quantize_activation_nvfp4(x, gs, codes, scales)
        ops.swiglu_quantize(l1, gs, 10.0, codes2, scales2)
        ops.assemble_scales_2d_side_from_offsets(a_scales, offs, out=s2d)
        ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out=out, backend="torch")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.quantize_activation_nvfp4(x, gs, codes, scales)
            ops.swiglu_quantize(l1, gs, 10.0, codes2, scales2)
            ops.assemble_scales_2d_side_from_offsets(a_scales, offs, out=s2d)
            gemm_torch.torch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out, sync_free=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    ptrs = (codes.data_ptr(), scales.data_ptr(), out.data_ptr())
    x.copy_(x_host.to(dev))
    l1.copy_(torch.randn(129, 512, generator=g).to(dev) * 6)
    graph.replay()
    torch.cuda.synchronize()
    assert (codes.data_ptr(), scales.data_ptr(), out.data_ptr()) == ptrs
    rc, rs, _ = ref.quantize_nvfp4(x, gs)
    assert torch.equal(codes, rc) and torch.equal(_bytes(scales), _bytes(rs))
    rc2, rs2, _ = ref.quantize_nvfp4(ref_swiglu(l1, 10.0), gs)
    assert torch.equal(codes2, rc2) and torch.equal(_bytes(scales2), _bytes(rs2))
    r2d, _ = rlay.assemble_scales_2d_side_from_offsets(a_scales[:135], offs)
    assert torch.equal(s2d[: r2d.numel()], _bytes(r2d)) and not s2d[r2d.numel() :].any()
    within_bound(plain, out.cpu(), 135)
    assert out[135:].eq(3.0).all()
