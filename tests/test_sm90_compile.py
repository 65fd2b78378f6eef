"""The sm90 kernels compile for sm_90 on a CPU-only machine, and their PTX is what the design says.

`grouped_gemm_sm90.compile_for` runs `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))` for the plans `plan()` picks at the issue's regimes (docs/design.md §4): decode (one
expert, 16 rows of K=7168 N=6144: 16-row tiles on mma.sync, split-K with its finishing kernel; and
64 rows: the swapped loop, the decoded weight as wgmma's register operand) and prefill (8
experts of 1024 rows: 128-row tiles on wgmma). Checked in the PTX: the MMA is
there; no local memory (`ld.local` / `st.local`: spills or stack arrays in the K loop would
cost more than the decode saves); no `.ftz` (the fp16 -> fp32 conversion of the decoded FP4
must keep fp16 subnormals, codes 1 and 9: fp4_bits). A compile failure names the kernel and
the configuration. Compiling is not running: the numerics are checked on a GPU by
tests/test_sm90_gemm.py (docs/backends.md).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

pytest.importorskip("triton", reason="the sm90 kernels need triton (pip install '.[sm90]')")

from dsv4.kernels.triton import grouped_gemm_sm90 as g  # noqa: E402

H200_SMS = 132
REGIMES = {  # (T, K, N, E), the MMA the tile size must give
    "decode_m16": ((16, 7168, 6144, 1), "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
    # swapped operands: the decoded weight tile is wgmma's A, taken from registers ({%r...})
    "decode_m64": ((64, 7168, 6144, 1), "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16"),
    "prefill_8x1024": ((8192, 7168, 6144, 8), "wgmma.mma_async.sync.aligned"),
    "prefill_dense": ((8192, 7168, 6144, 1), None),  # one expert: dequantize + cuBLAS
    # the routed MoE's L1 at 128 tokens x top-6 over 48 experts: 16-row tiles, no split-K
    "moe_768x48": ((768, 7168, 6144, 48), "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_kernels_compile_for_sm90_with_the_mma_and_no_local_memory(regime):
    (t, k, n, e), mma = REGIMES[regime]
    p = g.plan(t, k, n, e, H200_SMS, stream=False)  # the Triton plans (tests/test_sm90_stream.py:
    # the stream path's, taken instead at <= 16 rows per expert where nvidia-cutlass-dsl is)
    assert (p.split_k > 1) == regime.startswith("decode"), p  # decode fills the SMs by split-K
    assert p.swap_ab == (regime == "decode_m64"), p
    assert p.dense == (mma is None), p
    kernels = g.compile_for(p, e)
    want = {"dequant_a", "dequant_b", "finish"} if p.dense else {"dequant_a", "grouped_gemm"}
    assert set(kernels) == want | ({"finish"} if p.split_k > 1 else set())
    for name, kern in kernels.items():
        ptx = kern.asm["ptx"]
        assert ".target sm_90" in ptx, name
        for bad in ("ld.local", "st.local", ".ftz"):
            assert bad not in ptx, f"{name} ({p}): {bad} in its PTX"
    if p.dense:  # the product is cuBLAS's
        return
    ptx = kernels["grouped_gemm"].asm["ptx"]
    assert mma in ptx, f"grouped_gemm ({p}): no {mma}"
    assert "red.global" in ptx or "atom.global" in ptx or p.split_k == 1  # split-K adds
    if p.swap_ab:  # after the accumulator list, A is a register list, not a smem descriptor
        assert re.search(r"wgmma\.mma_async\S+ \{[^}]*\}, \{%r", ptx), "A not from registers"


@pytest.mark.parametrize("kind", ["swap", "dense_grouped"])
def test_prefill_candidates_compile_for_sm90_on_wgmma_without_local_memory(kind):
    """bench --plans' prefill candidates (not plan()'s yet): the swapped loop's decoded weight
    is wgmma's register operand; the grouped dense plan's GEMM is fp16 wgmma fed by cp.async."""
    plans = [
        p
        for p in g.candidate_plans(8192, 7168, 6144, 8, H200_SMS)
        if (p.swap_ab if kind == "swap" else p.dense_group > 0)
    ]
    assert plans, f"no {kind} candidate at 8 x 1024 rows"
    p = plans[0]
    kernels = g.compile_for(p, 8, tiled_b=True)
    name = "grouped_gemm" if kind == "swap" else "dense_grouped"
    ptx = kernels[name].asm["ptx"]
    assert "wgmma.mma_async.sync.aligned" in ptx, p
    for kern in kernels.values():
        for bad in ("ld.local", "st.local", ".ftz"):
            assert bad not in kern.asm["ptx"], f"{p}: {bad}"
    if kind == "swap":
        assert re.search(r"wgmma\.mma_async\S+ \{[^}]*\}, \{%r", ptx), "A not from registers"
    else:
        assert "cp.async" in ptx and set(kernels) == {"dequant_a", "dequant_b", name}


_LOAD = re.compile(r"\b(ld\.global[\w.:]*|cp\.async\.c[ag]\.shared\.global)")


@pytest.mark.parametrize("t,e", [(16, 1), (64, 1), (8192, 8), (8192, 1), (768, 48), (1, 1)])
def test_tiled_b_keeps_every_kernel_s_load_widths(t, e):
    # make_b_tiled's offsets (a tile's, a half's and a row's start + (j // 16) * 256 + j % 16)
    # must not cost Triton its proof of contiguous words: each kernel's PTX has the same loads
    # and 16-byte async copies (cp.async.cg), of the same widths, as on K-major rows
    p = g.plan(t, 7168, 6144, e, H200_SMS, stream=False)
    k_major, tiled = g.compile_for(p, e), g.compile_for(p, e, tiled_b=True)
    for name, kern in tiled.items():
        want = Counter(_LOAD.findall(k_major[name].asm["ptx"]))
        got = Counter(_LOAD.findall(kern.asm["ptx"]))
        assert want and got == want, f"{name} ({p}): loads {got} with B tiled, {want} K-major"
        assert "ld.local" not in kern.asm["ptx"], name


def test_a_failed_compile_names_the_kernel_and_configuration():
    bad = g.Plan(bm=16, bn=128, bj=4, split_k=1, num_warps=4, num_stages=2, programs=1)  # K < 16
    with pytest.raises(RuntimeError, match=r"sm90 kernel 'grouped_gemm' failed .*bj=4.*e=2"):
        g.compile_for(bad, 2)


@pytest.mark.parametrize("t,e", [(1, 1), (2, 1), (6, 48)])  # M=1, M=2, one token's top-6
def test_few_rows_path_compiles_to_fp16x2_fmas_and_no_mma(t, e):
    p = g.plan(t, 7168, 6144, e, H200_SMS, stream=False)
    assert p.hfma and p.split_k == 1 and p.bm == (t if e == 1 else 1), p
    kernels = g.compile_for(p, e)
    assert set(kernels) == {"hfma"}  # one launch: no dequantize, no finishing kernel
    ptx = kernels["hfma"].asm["ptx"]
    assert "fma.rn.f16x2" in ptx, "the code products are not fp16x2 FMAs"
    for bad in ("mma.sync", "wgmma", "ld.local", "st.local", ".ftz", "atom.global"):
        assert bad not in ptx, f"hfma ({p}): {bad} in its PTX"
