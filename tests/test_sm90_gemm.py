"""The sm90 grouped GEMM, proven on CPU: its FP4 decode and the kernels run by Triton's interpreter.

1. The bit tricks (dsv4/kernels/triton/fp4_bits.py, the constants the kernel uses) modelled in
   torch and checked against reference/ for every packed byte at every position of a word, times
   every finite e4m3 scale byte (NaN scales must give NaN): bit for bit, signed zeros included,
   for both decodes (fp32 scale; the half decode's fp16 product, subnormals included).
2. The three kernels run by TRITON_INTERPRET=1 (in a child process: the variable is read when
   Triton decorates the kernels) on tiny CPU problems, judged by reference.gemm's derived bound:
   empty experts (first, middle, last), M not a multiple of the tile, N not a multiple of BN,
   split-K with a dirty workspace, a persistent grid smaller than the tile count, one global
   scale for all experts, rows past offsets[-1] untouched, no routed row at all, the half decode;
   and every_product_problem (every code times every finite scale byte, one product per output)
   equal to the oracle bit for bit.
The registry side (sm90 the default on sm_90, its capability message on CPU, the K-major
requirement) follows.
On an sm_90 GPU (skipped elsewhere, with the reason): every_product_problem bit for bit through
mma.sync and wgmma tiles, split-K and both decodes (fp16 subnormal products are kept: passed on
an H200, 2026-12-03), the derived bound on CUDA, CUDA-graph
capture, no allocation with the registry's workspace, no host sync (passed on an H200 with
Triton 3.6: docs/backends.md). Speed is bench/gemm.py's, never a test's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4.ops as ops
import reference as ref

pytest.importorskip("triton", reason="the sm90 kernels need triton (pip install '.[sm90]')")

from dsv4.kernels.triton import fp4_bits  # noqa: E402  (no Triton import inside)
from tests.gemm_problems import (  # noqa: E402
    check_graph_no_alloc_no_sync,
    cuda_problem,
    every_product_problem,
    gemm_problem,
    within_bound,
)
from tests.triton_interp import needs_interpreter, run_interpreted  # noqa: E402


@pytest.mark.parametrize("half", [False, True], ids=["fp32-scale", "half"])
def test_decode_bit_tricks_match_reference_for_every_byte_and_scale(half):
    # word i holds bytes i, i+1, i+2, i+3 (mod 256): every byte value at every word position
    idx = (torch.arange(256)[:, None] + torch.arange(4)[None, :]) % 256
    packed = idx.to(torch.uint8)  # [256 words, 4 bytes]
    words = fp4_bits.pack_words(packed)[:, 0]  # [256]
    scale_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = fp4_bits.decode_words(
        words[:, None].expand(256, 256), scale_bytes[None, :].expand(256, 256), half=half
    )
    if half:  # value * scale * 2^-14 in fp16 (subnormals below 2^-14): unfold it exactly
        got = got.double() * fp4_bits.SCALE_FOLD
    values = ref.decode_e2m1(ref.unpack_e2m1(packed))  # [256, 8] fp32, element order
    scales = scale_bytes.view(torch.float8_e4m3fn).float()  # every e4m3 byte, NaNs too
    want = values[:, None, :] * scales[None, :, None]  # exact in fp32
    finite = scales.isfinite()
    assert int(finite.sum()) == 254  # 0x7F and 0xFF are e4m3fn's NaNs
    g, w = got[:, finite].float(), want[:, finite]
    assert torch.equal(g, w), f"first mismatch at {(g != w).nonzero()[0].tolist()}"
    assert torch.equal(g.signbit(), w.signbit())  # -0 stays -0 (code 8)
    assert got[:, ~finite].isnan().all()  # a NaN scale stays visible in every element


def test_decode_lanes_pair_element_p_with_element_p_plus_4():
    # one nibble set at a time: pair p's low lane is element p, its high lane element p + 4
    for q in range(8):
        word = torch.tensor([0x2 << (4 * q)], dtype=torch.int32)  # code 2 (1.0) at element q
        for p in range(fp4_bits.PAIRS):
            lo, hi = fp4_bits.fp16_lanes(fp4_bits.word_pairs(word, p))
            assert lo.float().item() * 2**14 == (1.0 if q == p else 0.0)
            assert hi.float().item() * 2**14 == (1.0 if q == p + 4 else 0.0)


# --------------------------------------------------------------------------------------------
# the kernels under the interpreter (child process)


def _interpret_main() -> None:
    """Run in the child: every check raises AssertionError naming its case."""
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    cases = [  # (name, counts, k, n, extra rows, plan or None (plan()), num_sms, dirty ws)
        ("mid_empty_split1", [5, 0, 3, 17], 256, 96, 3, g.Plan(16, 64, 16, 1, 4, 1, 3), 3, False),
        ("mid_empty_split3", [5, 0, 3, 17], 256, 96, 3, g.Plan(16, 64, 16, 3, 4, 1, 3), 3, True),
        ("ends_empty_plan", [0, 33, 0], 128, 80, 0, None, 8, True),
        ("bm32_one_gs", [40, 1], 384, 64, 2, g.Plan(32, 32, 16, 2, 4, 1, 2), 2, False),
        ("swap_split3", [5, 0, 3, 17], 256, 96, 3, g.Plan(16, 64, 16, 3, 4, 1, 3, True), 3, True),
        ("swap_bm32", [40, 0, 1], 384, 80, 2, g.Plan(32, 64, 16, 1, 4, 1, 2, True), 2, False),
        ("dense_plan", [515], 256, 96, 4, None, 2, True),  # one expert past the decode rows
        ("small_past_512", [10] * 50 + [0, 25], 128, 32, 2, None, 2, True),  # BM 16, no split
        # the half decode (fp16 products, the accumulator unfolded by 2^14 before alpha)
        (
            "half_split3",
            [5, 0, 3, 17],
            256,
            96,
            3,
            g.Plan(16, 64, 16, 3, 4, 1, 3, half_decode=True),
            3,
            True,
        ),
        (
            "half_swap_bm32",
            [40, 0, 1],
            384,
            80,
            2,
            g.Plan(32, 64, 16, 1, 4, 1, 2, True, half_decode=True),
            2,
            False,
        ),
        # the few-rows path: fp16x2 code products on the CUDA cores, whole-K tiles, one launch
        ("hfma_bm1", [1, 0, 2, 1], 256, 96, 3, g.Plan(1, 8, 16, 1, 2, 1, 5, hfma=True), 5, True),
        (
            "hfma_bm2_ragged",
            [3, 0, 1],
            384,
            80,
            2,
            g.Plan(2, 32, 32, 1, 4, 1, 3, hfma=True),
            3,
            False,
        ),  # K and N not multiples of the tile: the masked steps
        ("hfma_plan", [1, 1, 0, 1], 256, 64, 1, None, 4, True),  # plan(): one row per expert
        (  # the grouped dense plan: weights dequantized 2 experts a pass, an fp16 grouped GEMM
            "dense_grouped_2_a_pass",
            [40, 0, 17, 130, 3],
            256,
            96,
            2,
            g.Plan(32, 32, 4, 1, 4, 1, 2, dense=True, dense_group=2),
            2,
            True,
        ),
        (  # the swapped K loop at prefill tiles: 128 tokens x 128 weight rows, a ragged expert
            "swap_prefill_half",
            [130, 0, 7],
            256,
            128,
            2,
            g.Plan(128, 128, 16, 1, 8, 1, 2, swap_ab=True, half_decode=True),
            2,
            False,
        ),
    ]
    # the dense plan's cuBLAS call is CUDA-only: stood in for by an fp32 product of the same
    # exact fp16 operands (its dequantize kernels, layout and finishing kernel run as compiled)
    g._mm_fp32 = lambda a16, b16, acc: acc.copy_(a16.float() @ b16.float())
    for name, counts, k, n, extra, the_plan, sms, dirty in cases:
        plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem(
            counts, k=k, n=n, seed=len(name), extra=extra
        )
        if name.endswith("one_gs"):  # one global scale pair broadcast to every expert
            gsa, gsb = gsa[:1].contiguous(), gsb[:1].contiguous()
            plain = (*plain[:5], gsa.expand(len(counts)), gsb.expand(len(counts)))
        b = ops.make_b_k_major(b)
        t = a.shape[0]
        chosen = the_plan or g.plan(t, k, n, len(counts), sms, stream=False)  # as on CPU
        assert chosen.dense == name.startswith("dense")
        assert chosen.hfma == name.startswith("hfma"), (name, chosen)
        out = torch.full((t, n), 7.0, dtype=torch.bfloat16)
        ws = None
        if dirty:
            need = g.plan_workspace_bytes(chosen, t, k, n, len(counts))
            ws = torch.full((need,), 0xFF, dtype=torch.uint8)
        g.launch_grouped_gemm(
            a, b, a_sw, b_sw, offs, gsa, gsb, out, workspace=ws, num_sms=sms, the_plan=the_plan
        )
        try:
            within_bound(plain, out, sum(counts))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err
        assert (out[sum(counts) :] == 7.0).all(), f"{name}: rows past offsets[-1] written"
        if k % 128 == 0 and n % 16 == 0:  # the same plan on make_b_tiled's layout: same bits
            tiled = out.clone().fill_(7.0)
            g.launch_grouped_gemm(
                a, ops.make_b_tiled(b), a_sw, b_sw, offs, gsa, gsb, tiled, workspace=ws,
                num_sms=sms, the_plan=the_plan,
            )  # fmt: skip
            bad = (tiled.view(torch.int16) != out.view(torch.int16)).sum().item()
            assert bad == 0, f"{name}: {bad} outputs differ with B tiled"
    # mma.sync tiles, split-K, the few-rows path at 4 rows per tile (fewer interpreted tiles)
    for the_plan in (p for p in EVERY_PRODUCT_PLANS if p.bm in (4, 16)):
        _every_product_exact(the_plan, "cpu", num_sms=4)
        _every_product_exact(the_plan, "cpu", num_sms=4, tiled=True)
    # no routed row: nothing written
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([3], k=128, n=32, seed=9)
    offs = torch.zeros_like(offs)
    out = torch.full((3, 32), 7.0, dtype=torch.bfloat16)
    g.launch_grouped_gemm(a, ops.make_b_k_major(b), a_sw, b_sw, offs, gsa, gsb, out, num_sms=2)
    assert (out == 7.0).all(), "offsets all 0: rows written"
    print("interpreter cases passed")


def _every_product_plans():
    from dsv4.kernels.triton.grouped_gemm_sm90 import Plan

    base = [
        Plan(16, 64, 32, 1, 4, 3, 8),  # mma.sync tiles
        Plan(16, 64, 32, 4, 4, 3, 8),  # split-K: fp32 atomics, then the finishing kernel
        Plan(64, 128, 16, 2, 4, 3, 8, swap_ab=True),  # wgmma, decoded weight from registers
        Plan(128, 256, 16, 1, 8, 3, 2),  # wgmma prefill tiles
        Plan(256, 128, 16, 1, 8, 3, 2, swap_ab=True),  # swapped prefill: weight from registers
        Plan(128, 128, 8, 1, 8, 3, 2, dense=True, dense_group=1),  # grouped dense, 1 a pass
    ]
    few_rows = [  # fp16x2 code sums on the CUDA cores, at 1, 2 and 4 rows per tile
        Plan(1, 8, 32, 1, 2, 3, 8, hfma=True),
        Plan(1, 16, 128, 1, 4, 2, 8, hfma=True),  # plan()'s tiles at M=1
        Plan(2, 16, 64, 1, 4, 2, 8, hfma=True),
        Plan(4, 32, 32, 1, 4, 1, 8, hfma=True),
    ]
    half = [dataclasses.replace(p, half_decode=True) for p in base if not p.dense]
    return base + half + few_rows


EVERY_PRODUCT_PLANS = _every_product_plans()


def _every_product_exact(
    the_plan, device: str, num_sms: int | None = None, tiled: bool = False
) -> None:
    """every_product_problem through one plan (B K-major, or make_b_tiled's layout): out
    equals the oracle bit for bit."""
    from dsv4.kernels.triton import grouped_gemm_sm90 as g
    from reference import gemm as rgemm

    plain, gemm = every_product_problem()
    a, b, a_sw, b_sw, offs, gsa, gsb = (v.to(device) for v in gemm)
    b = ops.make_b_tiled(b) if tiled else ops.make_b_k_major(b)
    want = rgemm.grouped_gemm_nvfp4(*plain, oracle=True).to(torch.bfloat16)  # exact in bf16
    out = torch.full(want.shape, 7.0, dtype=torch.bfloat16, device=device)
    g.launch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out, num_sms=num_sms, the_plan=the_plan)
    got = out.cpu()
    bad = (got != want).nonzero()
    assert not len(bad), (
        f"{the_plan}: {len(bad)} products differ, first at [t, n] = {bad[0].tolist()}: "
        f"got {got[tuple(bad[0])].item()!r}, want {want[tuple(bad[0])].item()!r}"
    )


@needs_interpreter
def test_kernels_under_the_triton_interpreter_within_the_derived_bound():
    run_interpreted("tests.test_sm90_gemm", "_interpret_main", "interpreter cases passed")


# --------------------------------------------------------------------------------------------
# registry


def test_sm90_is_registered_above_torch_and_names_what_cpu_lacks():
    assert "sm90" in ops.available_backends()
    assert ops.available_backends("cpu") == ["torch"]
    assert ops.select_backend("cpu") == "torch"
    with pytest.raises(ops.BackendUnavailableError, match=r"backend 'sm90' needs sm_90, got cpu"):
        ops.select_backend("cpu", "sm90")
    # verified on an H200: on an sm_90 device it is the default, torch the portable path
    from dsv4.ops import gemm as dgemm

    assert dgemm._BACKENDS["sm90"].priority > dgemm._BACKENDS["torch"].priority
    assert dgemm._BACKENDS["sm90"].b_k_major


def test_k_major_backend_refuses_an_n_major_weight(monkeypatch):
    from dsv4.ops import gemm as dgemm

    monkeypatch.setattr(dgemm, "_BACKENDS", dict(dgemm._BACKENDS))
    calls = []
    ops.register_backend(
        "kmajor", lambda *a: calls.append(a), lambda d: (True, ""), priority=1, b_k_major=True
    )
    _, (a, b, a_sw, b_sw, offs, gsa, gsb) = gemm_problem([2, 3], seed=4)
    with pytest.raises(ValueError, match=r"backend 'kmajor' reads mat_b K-major .*stride"):
        ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, backend="kmajor")
    ops.run_nvfp4_grouped_gemm(a, ops.make_b_k_major(b), a_sw, b_sw, offs, gsa, gsb)
    assert len(calls) == 1  # selected by priority, K-major accepted


# --------------------------------------------------------------------------------------------
# on an sm_90 GPU (skipped elsewhere): numerics, graph capture, no allocation, no host sync


def _on_sm90() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs an sm_90 CUDA GPU (CPU-only machine)"
    return ops.sm90_supports(torch.device("cuda"))


needs_sm90 = pytest.mark.skipif(not _on_sm90()[0], reason=_on_sm90()[1] or "needs sm_90")


@needs_sm90
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize(
    "counts,k,n",
    [
        ([1], 7168, 512),
        ([16, 0, 3], 2048, 640),
        ([0, 300, 1, 0], 1024, 384),
        ([600, 7], 512, 256),
        ([700], 1024, 384),  # one expert, prefill rows: the dense plan
    ],
)
def test_sm90_on_gpu_within_the_derived_bound(counts, k, n):
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = cuda_problem(counts, k, n, seed=sum(counts))
    out = torch.full((a.shape[0], n), 7.0, dtype=torch.bfloat16, device="cuda")
    ops.run_nvfp4_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out=out, backend="sm90")
    within_bound(plain, out.cpu(), sum(counts))
    assert (out[sum(counts) :] == 7.0).all()


@needs_sm90
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("tiled", [False, True], ids=["k-major", "tiled"])
@pytest.mark.parametrize(
    "the_plan",
    EVERY_PRODUCT_PLANS,
    ids=lambda p: (
        f"bm{p.bm}-split{p.split_k}{'-swap' if p.swap_ab else ''}{'-half' if p.half_decode else ''}"
        f"{'-hfma' if p.hfma else ''}"
    ),
)
def test_sm90_on_gpu_every_code_times_every_scale_is_exact(the_plan, tiled):
    # subnormal fp16 products (the half decode's value * scale * 2^-14) through mma.sync and
    # wgmma: a flush to zero or a lost sign would be a wrong bit here
    _every_product_exact(the_plan, "cuda", tiled=tiled)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("t,e", [(5, 3), (700, 3), (700, 1)])  # split-K, 128-row, dense plans
def test_sm90_captures_in_a_graph_allocates_nothing_and_never_syncs(t, e):
    counts = [t - 2, 0, 2] if e == 3 else [t]
    # one program owns each output tile past the split-K rows: replay gives the same bits
    check_graph_no_alloc_no_sync("sm90", counts, 512, 256, seed=t + e, same_bits=t > 512)
