"""The sm90 backend's stream path (dsv4/kernels/cutedsl/grouped_gemm_stream.py): weights loaded
straight into mma.sync registers, for few rows per expert.

On CPU (CI): every tile configuration the plans offer compiles for sm_90a; the PTX has the
swapped mma.sync, 16-byte non-coherent loads, no local memory and no spills; bad shapes and tiles
are refused by name. On an sm_90 GPU (skipped elsewhere, with the reason): every E2M1 code times
every finite scale byte bit for bit, ragged experts within the derived bound (rows past the
routed ones untouched), and CUDA-graph capture with no allocation and no host sync.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.gemm_problems import (
    check_graph_no_alloc_no_sync,
    cuda_problem,
    every_product_problem,
    within_bound,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cutlass") is None,
    reason="needs nvidia-cutlass-dsl (pip install '.[cutedsl]')",
)


def _stream_plans():
    """Every stream plan candidate_plans offers (for one expert of 16 rows, K 7168, N 6144)."""
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    if not g.stream_available():
        return []
    return [p for p in g.candidate_plans(16, 7168, 6144, 1, 132) if p.stream]


def _plan_id(p) -> str:
    split = f"-splitn{p.stage}" if p.split_n else ""
    return f"{p.bn}x{p.bm}-w{p.num_warps}-st{p.num_stages}-u{p.unroll}{split}"


@pytest.mark.parametrize("p", _stream_plans(), ids=_plan_id)
def test_every_stream_plan_compiles_for_sm90a_with_mma_sync_and_no_local_memory(p):
    from dsv4.kernels.cutedsl import grouped_gemm_stream as gst
    from dsv4.kernels.cutedsl.ptx_check import compile_report
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    cfg = g.stream_config(p, 7168, 6144, 48)
    mt, nt, ring = cfg.mt, cfg.nt, cfg.ring
    rep = compile_report(lambda opts: gst.compile_stream(cfg, gst.ARCH, opts), gst.ARCH)
    assert not rep.uses_local_memory, f"{cfg}: local memory in the PTX"
    # a few bytes of spills are ptxas's choice at 128 registers; more mean the K loop's
    # registers do not fit (such plans are not offered: _STREAM_SPILLS, _SPLIT_N_TILES)
    assert rep.spill_store_bytes <= 16 and rep.spill_load_bytes <= 16, f"{cfg}: spills"
    if cfg.split_n:  # one copy of a stage's steps; the token fragments decoded at two sites
        # (the first stage's, the next stage's in the loop) and read back from shared memory
        st = cfg.stage_steps
        mma = rep.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
        assert mma == st * 8 * mt * nt, f"{cfg}: {mma} mma.sync"
        loads = rep.count("ld.global.nc.L1::no_allocate.v4.u32")
        assert loads == st * 2 * mt + 2 * st * nt, f"{cfg}: {loads} 16-byte loads"
        assert rep.count("st.shared.v4.u32") == 2 * st * nt * 4
        assert rep.count("ld.shared.v4.u32") == st * nt * 4
        assert rep.count("mul.rn.f16x2") == st * 32 * mt + 2 * st * nt * 16
        assert rep.count("bar.sync") == 2  # after the first stage, after each stage
        return
    # copies of the K step: the unrolled loop and its remainder (the ring's loop: one)
    # (unroll 0: one copy per step of a warp's)
    copies = 1 if ring else p.unroll + (p.unroll > 1)
    if p.unroll == 0:
        copies = -(-7168 // gst.K_STEP // p.num_warps)
    chunks = 2 * mt + nt  # 16-byte loads a step: weight row halves and token tiles
    mma = rep.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
    assert mma == copies * 8 * mt * nt, f"{cfg}: {mma} mma.sync"
    loads = rep.count("ld.global.nc.L1::no_allocate.v4.u32")
    copies16 = rep.count("cp.async.cg.shared.global")
    if ring:  # ring - 1 steps issued ahead, one a step: through shared memory, not registers
        assert (loads, copies16) == (0, ring * chunks), f"{cfg}: {loads} loads {copies16} copies"
        assert rep.count("cp.async.ca.shared.global") == ring * chunks  # the scale words
        assert rep.count("cp.async.wait_group") == 2  # the step's wait, the chunk's drain
        assert rep.count("ld.shared.v4.u32") == chunks
    else:  # the prefetch's first step, then each copy's
        assert loads == (copies + cfg.prefetch) * chunks, f"{cfg}: {loads} 16-byte loads"
        assert copies16 == 0
    assert rep.count("mul.rn.f16x2") == copies * 16 * chunks  # each pair times its scale


@pytest.mark.parametrize(
    "kw",
    [  # plan()'s defaults (M=1, M=16, 48 x 4, 48 x 16), a prefetch and a ring
        dict(mt=1, nt=1, warps=8, unroll=2), dict(mt=2, nt=2, warps=8, unroll=2),
        dict(mt=1, nt=1, warps=8, split_n=True, stage=4, unroll=1),
        dict(mt=2, nt=2, warps=4, split_n=True, stage=2, unroll=1),
        dict(mt=2, nt=2, warps=8, prefetch=True, unroll=1), dict(mt=2, nt=1, warps=8, ring=4),
    ],
    ids=lambda kw: "-".join(f"{k}{int(v)}" for k, v in kw.items()),
)  # fmt: skip
def test_tiled_b_compiles_to_the_same_loads_and_mmas_as_k_major(kw):
    from dsv4.kernels.cutedsl import grouped_gemm_stream as gst
    from dsv4.kernels.cutedsl.ptx_check import compile_report

    e = 48 if kw.get("split_n") else 1
    reps = []
    for tiled in (False, True):
        cfg = gst.StreamConfig(7168, 6144, e, b_tiled=tiled, **kw)
        reps.append(compile_report(lambda o, c=cfg: gst.compile_stream(c, gst.ARCH, o), gst.ARCH))
    k_major, tiled = reps
    assert not tiled.uses_local_memory
    assert tiled.spill_store_bytes <= 16 and tiled.spill_load_bytes <= 16
    for op in (
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "ld.global.nc.L1::no_allocate.v4.u32",
        "cp.async.cg.shared.global",
        "mul.rn.f16x2",
    ):
        assert tiled.count(op) == k_major.count(op), op


def test_stream_decode_ptx_makes_the_fp16_patterns_of_every_nibble_pair():
    """The kernel's decode PTX, run by tests/ptx_emu.py on words whose halves take every 16-bit
    value (the scale 1.0), gives the fp16x2 patterns of fp4_bits (elements p and p + 4, value *
    2^-14)."""
    import numpy as np

    from dsv4.kernels.cutedsl import grouped_gemm_stream as gst
    from dsv4.kernels.triton import fp4_bits
    from tests.ptx_emu import run_ptx

    lo = np.arange(1 << 16, dtype=np.int64)
    words = lo | ((lo * 40503) % (1 << 16)) << 16  # both halves: every value
    one = np.full(words.shape, 0x3C003C00, dtype=np.uint32)  # the scale 1.0 in both halves: the
    regs = run_ptx(gst._DECODE_PTX, {4: words, 5: one})  # products are the patterns themselves
    got = [regs[f"${p}"] for p in range(4)]
    w32 = torch.from_numpy(words.astype(np.uint32).view(np.int32))
    for p in range(fp4_bits.PAIRS):
        want = fp4_bits.word_pairs(w32, p).numpy().astype(np.uint32)
        bad = np.flatnonzero(got[p].astype(np.uint32) != want)
        assert bad.size == 0, f"pair {p}: word {words[bad[0]]:#010x}"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=7168 + 64, n=6144, e=1), r"K % 128 == 0, got K=7232"),
        (dict(k=7168, n=6144 + 16, e=1, mt=2), r"N % 32 == 0, got N=6160"),
        (dict(k=7168, n=6144, e=1, nt=5), r"nt in \(1, 2, 3, 4, 8\)"),
        (dict(k=7168, n=6144 + 128, e=1, mt=2, split_n=True), r"N % 256 == 0, got N=6272"),
        (dict(k=7168, n=6144, e=1, split_n=True, ring=3), r"split_n loads weights at use"),
        (dict(k=7168, n=6144, e=1, split_n=True, stage=3), r"stage in \(1, 2, 4, 8\)"),
    ],
)
def test_stream_config_refuses_shapes_it_cannot_tile(kwargs, match):
    from dsv4.kernels.cutedsl import grouped_gemm_stream as gst

    with pytest.raises(ValueError, match=match):
        gst.StreamConfig(**kwargs)


@pytest.mark.parametrize("tile", [(1, 8, 2, 2), (1, 8, 4, 2)])
def test_wide_split_n_tiles_compile_without_spills_past_32_rows(tile):
    """The 64-token split-N tiles (sm90_plans._SPLIT_N_WIDE), offered at M=64 only."""
    from dsv4.kernels.cutedsl import grouped_gemm_stream as gst
    from dsv4.kernels.cutedsl.ptx_check import compile_report
    from dsv4.kernels.triton import grouped_gemm_sm90 as g
    from dsv4.kernels.triton import sm90_plans

    assert tile in sm90_plans._SPLIT_N_WIDE
    mt, nt, warps, stage = tile
    p = g._stream_plan(64, 1, mt, nt, warps, 1, 1, stage)
    assert p in g.candidate_plans(64, 7168, 6144, 1, 132)
    assert p not in g.candidate_plans(32, 7168, 6144, 1, 132)
    cfg = g.stream_config(p, 7168, 6144, 1, tiled=True)
    rep = compile_report(lambda opts: gst.compile_stream(cfg, gst.ARCH, opts), gst.ARCH)
    assert rep.spill_store_bytes <= 16 and not rep.uses_local_memory, rep
    mma = rep.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
    assert mma == stage * 8 * mt * nt, mma


def test_candidate_plans_offer_stream_tiles_only_where_they_tile():
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    got = [p for p in g.candidate_plans(16, 7168, 6144, 1, 132) if p.stream]
    split = [p for p in got if p.split_n]
    all_loads = [p for p in got if p.unroll == 0]
    got = [p for p in got if not p.split_n and p.unroll > 0]
    assert {(p.bn // 16, p.bm // 8, p.num_warps) for p in got} == set(g._STREAM_TILES)
    assert {(p.num_stages, p.unroll) for p in got} == {(1, 2), (2, 1), (2, 2), (3, 1), (4, 1)}
    assert {(p.bn // 16, p.bm // 8, p.num_warps) for p in all_loads} == set(g._STREAM_ALL_LOADS)
    assert {p.num_stages for p in all_loads} == {1}
    assert all(g.smem_bytes(p) <= g.SMEM_LIMIT for p in got + split)
    # 64 weight rows x 16 tokens, 8 warps, a 4-step ring: 237,568 bytes (its launch failed on the
    # H200): not offered
    assert g._stream_plan(16, 1, 4, 2, 8, 4, 1) not in got
    assert len(got) == 5 * len(g._STREAM_TILES) - len(g._STREAM_SPILLS) - 1
    # split_n: every tile whose CTA rows (16 * mt * warps) divide N, loads at use
    want = {(mt, nt, w, st) for mt, nt, w, st in g._SPLIT_N_TILES if 6144 % (16 * mt * w) == 0}
    assert {(p.bn // 16, p.bm // 8, p.num_warps, p.stage) for p in split} == want
    assert {(p.num_stages, p.unroll) for p in split} == {(1, 1)}
    assert not [p for p in g.candidate_plans(16, 7168, 6144 + 16, 1, 132) if p.split_n]
    assert not [p for p in g.candidate_plans(16, 7168 + 64, 6144, 1, 132) if p.stream]
    assert not [p for p in g.candidate_plans(8192, 7168, 6144, 1, 132) if p.stream]


@pytest.mark.parametrize(
    "t,k,n,e,want",
    [  # (weight rows a CTA, tokens a chunk, split_n's stage: 0 = the warps split K)
        (1, 7168, 6144, 1, (16, 8, 0)),  # M=1: 16 weight rows x 8 tokens
        (4, 7168, 6144, 1, (16, 8, 0)),
        (16, 7168, 6144, 1, (32, 16, 0)),  # M=16
        (192, 7168, 6144, 48, (128, 8, 4)),  # 48 experts x 4 rows: split N
        (768, 7168, 6144, 48, (256, 16, 2)),  # the routed MoE's L1 at 128 tokens: 8 warps
        (768, 3072, 7168, 48, (256, 16, 2)),  # and its L2
        (768, 3072, 7168 + 128, 48, (128, 16, 2)),  # N % 256 != 0: 4 warps
        (768, 3072, 7168 + 64, 48, (32, 16, 0)),  # N not a multiple of 128: K split
        (16, 7168, 6160, 1, (16, 16, 0)),  # N not a multiple of 32: the 16-row tile
        (6, 7168, 6144, 48, None),  # one token's top-6: the few-rows path
        (64, 7168, 6144, 1, None),  # past 16 rows: the MMA tiles
        (16, 7168 + 64, 6144, 1, None),  # K % 128: the MMA tiles
    ],
)
def test_plan_takes_the_measured_stream_tiles(t, k, n, e, want):
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    p = g.plan(t, k, n, e, 132)
    got = (p.bn * (p.num_warps if p.split_n else 1), p.bm, p.stage if p.split_n else 0)
    assert got == want if want else not p.stream, p
    assert not g.plan(t, k, n, e, 132, stream=False).stream  # off CUDA: the Triton plans


# --------------------------------------------------------------------------------------------
# on an sm_90 GPU


def _on_sm90() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs an sm_90 CUDA GPU (CPU-only machine)"
    from dsv4 import ops

    return ops.sm90_supports(torch.device("cuda"))


needs_sm90 = pytest.mark.skipif(not _on_sm90()[0], reason=_on_sm90()[1] or "needs sm_90")
# (weight tiles, token tiles, warps, stages, unroll, split_n stage)
GPU_TILES = [
    (1, 1, 8, 1, 2, 0), (2, 2, 8, 1, 2, 0), (4, 2, 8, 2, 1, 0), (2, 4, 8, 2, 2, 0),
    (4, 4, 4, 1, 2, 0), (1, 1, 16, 2, 2, 0), (1, 2, 8, 2, 1, 0), (1, 1, 8, 4, 1, 0),
    (2, 2, 8, 3, 1, 0), (2, 4, 8, 4, 1, 0),
    (1, 1, 8, 1, 1, 4), (2, 2, 8, 1, 1, 2), (1, 4, 8, 1, 1, 2), (2, 2, 4, 1, 1, 2),
    (1, 1, 4, 1, 1, 8), (1, 1, 4, 1, 0, 0), (2, 2, 8, 1, 0, 0), (2, 3, 8, 1, 1, 2),
    (1, 8, 2, 1, 1, 2),
]  # fmt: skip


def _plan(mt: int, nt: int, warps: int, stages: int, unroll: int, split_n: int = 0):
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    return g._stream_plan(1, 1, mt, nt, warps, stages, unroll, split_n)


@needs_sm90
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("tiled", [False, True], ids=["k-major", "tiled"])
@pytest.mark.parametrize("tile", GPU_TILES)
def test_stream_on_gpu_every_code_times_every_scale_is_exact(tile, tiled):
    from dsv4 import ops
    from dsv4.kernels.triton import grouped_gemm_sm90 as g
    from reference import gemm as rgemm

    plain, gemm = every_product_problem()  # 256 one-hot rows: 8 * nt tokens a chunk
    a, b, a_sw, b_sw, offs, gsa, gsb = (v.cuda() for v in gemm)
    want = rgemm.grouped_gemm_nvfp4(*plain, oracle=True).to(torch.bfloat16)
    out = torch.full(want.shape, 7.0, dtype=torch.bfloat16, device="cuda")
    b = ops.make_b_tiled(b) if tiled else ops.make_b_k_major(b)
    g.launch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out, the_plan=_plan(*tile))
    got = out.cpu()
    bad = (got != want).nonzero()
    assert not len(bad), (
        f"{len(bad)} products differ, first at [t, n] = {bad[0].tolist()}: "
        f"got {got[tuple(bad[0])].item()!r}, want {want[tuple(bad[0])].item()!r}"
    )


@needs_sm90
@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("tile", GPU_TILES)
@pytest.mark.parametrize(
    "counts,k,n",
    [  # K=1152: 9 steps, which no warp count divides (the last step of some warps masked)
        ([1], 7168, 512), ([16, 0, 3], 2048, 640), ([0, 70, 1, 0, 33], 1024, 384),
        ([5, 2], 1152, 256),
    ],
)  # fmt: skip
def test_stream_on_gpu_within_the_derived_bound(tile, counts, k, n):
    from dsv4 import ops
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    mt = tile[0]
    rows = 16 * mt * (tile[2] if tile[5] else 1)  # a CTA's weight rows
    if n % rows:
        pytest.skip(f"N={n} is not a multiple of {rows} (the plans do not offer it)")
    plain, (a, b, a_sw, b_sw, offs, gsa, gsb) = cuda_problem(counts, k, n, seed=sum(counts) + mt)
    out = torch.full((a.shape[0], n), 7.0, dtype=torch.bfloat16, device="cuda")
    g.launch_grouped_gemm(a, b, a_sw, b_sw, offs, gsa, gsb, out, the_plan=_plan(*tile))
    within_bound(plain, out.cpu(), sum(counts))
    assert (out[sum(counts) :] == 7.0).all(), "rows past the routed ones written"
    tiled = torch.full_like(out, 7.0)  # make_b_tiled's layout: the same sums, the same bits
    g.launch_grouped_gemm(
        a, ops.make_b_tiled(b), a_sw, b_sw, offs, gsa, gsb, tiled, the_plan=_plan(*tile)
    )
    bad = (tiled.view(torch.int16) != out.view(torch.int16)).sum().item()
    assert bad == 0, f"{bad} outputs differ with B tiled"


@needs_sm90
@pytest.mark.gpu
@pytest.mark.sm90
def test_stream_captures_in_a_graph_allocates_nothing_and_never_syncs(monkeypatch):
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    for tile in ((2, 2, 8, 2, 2, 0), (2, 2, 4, 1, 1, 2)):  # K split, N split
        monkeypatch.setattr(g, "plan", lambda *args, tile=tile, **kwargs: _plan(*tile))
        check_graph_no_alloc_no_sync("sm90", [13, 0, 2], 512, 256, seed=3, same_bits=True)
