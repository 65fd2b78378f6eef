"""The sm100 grouped GEMM compiles for sm_100a in CI (CPU, fake tensors) and issues NVFP4 MMAs.

Every grouped GEMM the three layers run at the published V4-Pro / V4-Flash shapes and the seed's
wo_a preset (`LAYER_GEMMS`, derived from harness.cases presets through `Case.gemm_shapes`, at
the token counts docs/design.md §3 lists) is implementable by the kernel, and the tile config
`plan` gives it compiles; shapes are runtime values, so each distinct config compiles once (a
session fixture). Its PTX must hold `tcgen05.mma` of kind `kind::mxf4nvf4.block_scale.block16`
and nothing else, 4 MMAs (K 256 per stage), the TMA loads of A, B and both scale tensors, the
scale copies SMEM -> TMEM and the TMEM loads of the epilogue. A config asking for another kind
(MXF4: UE8M0 per 32) fails that check with a message naming it. What this does NOT show: any
number the kernel computes, or its speed (no B200 here: docs/blackwell.md).
"""

from __future__ import annotations

import functools

import pytest

from dsv4.kernels.cutedsl import available
from harness.cases import PRESETS, Case, Stage

HAS_DSL, WHY_NO_DSL = available()
pytestmark = pytest.mark.skipif(not HAS_DSL, reason=WHY_NO_DSL)

LAYER_PRESETS = ("v4_pro", "v4_flash", "v4_pro_seed_wo_a")
LAYER_STAGES = (Stage.SHARED_EXPERT, Stage.ROUTED_MOE, Stage.GROUPED_LINEAR)
TOKENS = (1, 2, 3, 5, 31, 32, 33, 127, 128, 129, 255, 256, 4095, 4096, 4097, 8192)


def layer_gemms() -> dict[tuple[int, int, int, int], str]:
    """(T, K, N, E) of every layer GEMM at the published shapes -> a case id that runs it."""
    out: dict[tuple[int, int, int, int], str] = {}
    for preset in LAYER_PRESETS:
        for stage in LAYER_STAGES:
            for t in TOKENS:
                case = Case(stage, PRESETS[preset], t)
                for shape in case.gemm_shapes():
                    out.setdefault(shape, f"{preset}:{case.id}")
    return out


LAYER_GEMMS = layer_gemms()


def _configs():
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import plan

    return sorted({plan(*s) for s in LAYER_GEMMS}, key=lambda c: c.name)


@functools.cache
def _report(cfg):
    """Compile once per process (the session's cache): PTX and ptxas's numbers."""
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import ARCH, compile_gemm
    from dsv4.kernels.cutedsl.ptx_check import compile_report

    return compile_report(lambda opts: compile_gemm(cfg, ARCH, opts), ARCH)


def test_every_layer_gemm_is_implementable():
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import can_implement

    assert len(LAYER_GEMMS) > 50  # 3 presets x 3 layers x 16 token counts, deduplicated
    refused = {s: why for s in LAYER_GEMMS for ok, why in [can_implement(*s)] if not ok}
    assert not refused, {LAYER_GEMMS[s]: why for s, why in refused.items()}


def test_layer_gemms_use_both_tile_widths():
    assert {c.tile_n for c in _configs()} == {128, 256}


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: c.name)
def test_layer_config_compiles_to_nvfp4_tcgen05(cfg):
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import MmaKind
    from dsv4.kernels.cutedsl.ptx_check import check_mma_kind

    rep = _report(cfg)
    check_mma_kind(rep, MmaKind.NVF4.value, cfg.name)
    assert MmaKind.NVF4.value == "kind::mxf4nvf4.block_scale.block16"
    mmas = rep.ptx.count("tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16")
    assert mmas == 4, f"{cfg.name}: {mmas} MMAs per K stage, want 256 / 64"
    # TMA loads: A, B, SFA, SFB (one instruction each, in the producer warp's loop)
    assert rep.ptx.count("cp.async.bulk.tensor") == 4, cfg.name
    assert rep.count("tcgen05.cp.cta_group::1.32x128b.warpx4") >= 2  # scales to TMEM
    assert "tcgen05.ld.sync.aligned" in rep.ptx and "tcgen05.alloc" in rep.ptx
    assert "tcgen05.dealloc" in rep.ptx
    assert rep.ptx.count("st.global") > 0  # predicated direct stores, no TMA store
    assert "cp.async.bulk.tensor.2d.global.shared" not in rep.ptx
    assert (rep.stack_bytes, rep.spill_store_bytes, rep.spill_load_bytes) == (0, 0, 0), rep
    assert not rep.uses_local_memory, cfg.name


def test_check_fails_when_the_config_asks_for_another_mma_kind():
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import GemmConfig, MmaKind
    from dsv4.kernels.cutedsl.ptx_check import MmaKindMismatch, check_mma_kind

    cfg = GemmConfig(128, MmaKind.MXF4)
    rep = _report(cfg)
    with pytest.raises(MmaKindMismatch, match=cfg.name) as err:
        check_mma_kind(rep, MmaKind.NVF4.value, cfg.name)
    assert "block32" in str(err.value) and "expected only 'kind::mxf4nvf4" in str(err.value)
    check_mma_kind(rep, MmaKind.MXF4.value, cfg.name)  # it is the kind it asked for


def test_mma_kind_parser_reads_qualifiers():
    from dsv4.kernels.cutedsl.ptx_check import tcgen05_mma_kinds

    ptx = (
        "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16.collector::a::discard "
        "[%r1], ...;\n\ttcgen05.mma.cta_group::2.kind::f16 [%r2];\ntcgen05.commit.x"
    )
    assert tcgen05_mma_kinds(ptx) == {"kind::mxf4nvf4.block_scale.block16", "kind::f16"}
    assert tcgen05_mma_kinds("tcgen05.commit.cta_group::1") == set()


def test_failed_compile_names_the_configuration(monkeypatch):
    import cutlass.cute as cute

    from dsv4.kernels.cutedsl import grouped_gemm_sm100 as g

    def broken(*args, **kwargs):
        raise TypeError("no such op")

    monkeypatch.setattr(cute, "compile", broken)
    cfg = g.GemmConfig(256)
    g.compile_gemm.cache_clear()
    with pytest.raises(RuntimeError, match=r"sm100_m128n256k256_nvf4 .* sm_100a: TypeError"):
        g.compile_gemm(cfg)
    g.compile_gemm.cache_clear()
    with pytest.raises(ValueError, match="sm_100a only, got arch='sm_90a'"):
        g.compile_gemm(cfg, "sm_90a")


def test_can_implement_names_what_it_refuses():
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import GemmConfig, can_implement

    assert can_implement(16, 7168, 6144, 48) == (True, "")
    ok, why = can_implement(16, 7168 + 128, 6144, 48)
    assert not ok and "K must be a multiple of 256" in why and "k=7296" in why
    ok, why = can_implement(16, 7168, 6144 + 128, 48, GemmConfig(256))
    assert not ok and "tile N 256" in why and "n=6272" in why
    with pytest.raises(ValueError, match="tile_n must be one of"):
        GemmConfig(192)


def test_kernel_scale_layout_is_the_design_128x4_swizzle():
    """The layout the kernel gives both scale tensors (`tile_atom_to_shape_SF`, evaluated at
    trace time) maps (row, K element, expert) to docs/design.md §3's byte offset, per expert
    blocks of round_up(rows, 128) * round_up(K/16, 4) bytes: what assemble_scales_*_side write."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.utils import blockscaled_layout as bl

    rows, k, experts = 256, 320, 2  # K/16 = 20 columns: 5 column blocks of 4
    n_cb, per_expert = 5, 256 * 20
    got: dict[tuple[int, int, int], int] = {}

    @cute.jit
    def probe():
        lay = bl.tile_atom_to_shape_SF((rows, k, experts), 16)
        for r in cutlass.range_constexpr(rows):
            for c in cutlass.range_constexpr(k // 16):
                for e in cutlass.range_constexpr(experts):
                    got[(r, c, e)] = cute.crd2idx((r, c * 16 + (r + c) % 16, e), lay)

    cute.compile(probe, options="--gpu-arch=sm_100a")
    assert len(got) == rows * (k // 16) * experts
    for (r, c, e), off in got.items():
        want = ((r // 128) * n_cb + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4
        assert off == e * per_expert + want, (r, c, e, off)
    # and what the production layout code writes there: [E, K/16, N] -> [E, N*K/16] swizzled
    import torch

    from dsv4.ops import assemble_scales_3d_side

    e_, c_, n_ = torch.meshgrid(
        torch.arange(experts), torch.arange(k // 16), torch.arange(rows), indexing="ij"
    )
    for value in (n_, c_ + 20 * e_):  # row, then (column, expert): together unique
        flat = assemble_scales_3d_side(value.to(torch.uint8)).reshape(-1)
        for (r, c, e), off in got.items():
            assert flat[off] == value[e, c, r], (r, c, e, off)


@pytest.mark.parametrize(
    "counts,n_tiles,grid",
    [([5], 48, 148), ([0, 300, 1, 0, 129], 3, 4), ([128] * 48, 24, 148), ([0, 0, 7], 1, 1)],
)
def test_tile_schedule_visits_every_tile_of_every_nonempty_expert_once(counts, n_tiles, grid):
    """The schedule arithmetic the kernel traces (`expert_tiles`, `tile_coords`), run on ints:
    over the persistent grid each (expert, m-tile, n-tile) is visited by exactly one CTA, in
    increasing order within a CTA, and SFA's atom block of an m-tile is the running count."""
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import TILE_M, expert_tiles, tile_coords

    offs = [sum(counts[: i + 1]) for i in range(len(counts))]
    seen = []
    for bid in range(grid):
        tile_base = mt_base = prev_end = 0
        mine = []
        for ei in range(len(counts)):
            x = expert_tiles(offs, ei, prev_end, tile_base, bid, grid, n_tiles)
            prev_end = x.row0 + x.rows
            assert x.rows == counts[ei] and x.m_tiles == -(-counts[ei] // TILE_M)
            for tile in range(x.first, tile_base + x.count, grid):
                assert tile % grid == bid
                m_local, n_tile = tile_coords(tile, tile_base, n_tiles)
                mine.append(tile)
                seen.append((ei, m_local, n_tile, mt_base + m_local))
            tile_base += x.count
            mt_base += x.m_tiles
        assert mine == sorted(mine)
    import torch

    from reference.layouts import assemble_scales_2d_side_from_offsets

    # where the 2-D side's assembly starts each group's scale rows (in 128-row atom blocks)
    _, starts = assemble_scales_2d_side_from_offsets(
        torch.zeros(sum(counts), 4, dtype=torch.uint8), torch.tensor(offs, dtype=torch.int32)
    )
    want = []
    for ei, c in enumerate(counts):
        first_block = int(starts[ei]) // TILE_M
        for m in range(-(-c // TILE_M)):
            want += [(ei, m, n, first_block + m) for n in range(n_tiles)]
    assert sorted(seen) == sorted(want) and len(seen) == len(set(seen))
