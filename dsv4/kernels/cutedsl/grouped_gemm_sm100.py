"""NVFP4 grouped GEMM (2D x 3D) for sm_100a in CuTeDSL: tcgen05 block-scaled MMA, fp32 in TMEM.

Same operands as every backend (docs/backends.md): A codes [T, K/2] (E2M1, K-major), B codes
[E, K/2, N] K-major (`make_b_k_major`: memory [E, N, K/2]), scale_a the swizzled 2-D side (each
expert's rows padded to 128 on their own), scale_b [E, round_up(N,128) * round_up(K/16,4)],
int32 END offsets [E], fp32 global scales [E] or [1]. One persistent launch, warp-specialized:
warp 5 issues TMA loads of A, B, SFA, SFB into a ring of SMEM stages; warp 4 copies the scales
SMEM -> TMEM and issues `tcgen05.mma ... kind::mxf4nvf4.block_scale.block16` (E2M1 x E2M1, UE4M3
scales, 16 elements per scale) accumulating in TMEM; warps 0-3 read the accumulator TMEM ->
registers, multiply alpha = gsa[e] * gsb[e] in fp32 (reference.gemm's order: alpha on the whole
sum), round to bf16 and store rows < the expert's end only (predicated stores, no TMA store:
rows past offsets[-1] and other experts' rows stay untouched).

Tile schedule, on the device, identical in the three roles: the tiles are (expert, m-tile,
n-tile) in expert order, expert e owning cdiv(tokens_e, 128) * N/BN tiles; CTA b of G takes
tiles b, b+G, ...; every role walks the experts once, reading the offsets (no host sync, no
host-side tile count: graph-capturable); an empty expert owns no tile. Because each expert's
scale rows are padded to 128 (the layout, docs/design.md §3), the SFA tile of m-tile j of
expert e is the (sum_{i<e} cdiv(tokens_i,128) + j)-th 128-row atom block: no padded offsets
needed. A's tile starts at the expert's first row (TMA coordinates are elements); rows past its
end belong to the next expert (or lie past T: zero-filled) and are computed but never stored.

Status: compiles for sm_100a on a CPU-only machine and its PTX is checked in CI
(tests/test_sm100_compile.py); NOT run on hardware: its numerics and speed are unverified
until a B200 runs docs/blackwell.md.
Layers (STYLE.md rule 1): `Sm100GroupedGemmKernel` (config, `@cute.jit` launch, `@cute.kernel`
body), `compile_gemm` (cached by config and arch), `run_grouped_gemm` (validates, writes `out`).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as utils
import cutlass.utils.blackwell_helpers as sm100_utils
import cutlass.utils.blockscaled_layout as blockscaled_utils
from cutlass import Float32, Int32
from cutlass.cute.nvgpu import OperandMajorMode, cpasync, tcgen05
from cutlass.memory import SmemAllocator, TmemAllocator
from cutlass.utils.gemm.sm100 import transform_partitioned_tensor_layout

ARCH = "sm_100a"
TILE_M = 128  # one CTA, one 128-row MMA (2-CTA 256-row tiles: not offered yet)
K_TILE = 256  # K per SMEM stage: 4 MMAs of K=64 (FP4)
TILE_NS = (128, 256)
SMEM_RESERVE = 1024  # barriers and the TMEM pointer beside the stages
MAX_AB_STAGES = 8


class MmaKind(enum.Enum):
    """Which tcgen05 block-scaled MMA the kernel issues (value: the PTX kind it must emit)."""

    # the strings are those nvidia-cutlass-dsl 4.8.1 emits (MXF4 too goes through mxf4nvf4); the
    # scale type (UE4M3 / UE8M0) is in the instruction descriptor, a register, not the opcode
    NVF4 = "kind::mxf4nvf4.block_scale.block16"  # E2M1 x E2M1, UE4M3 scale per 16: ours
    MXF4 = "kind::mxf4nvf4.block_scale.block32"  # E2M1 x E2M1, UE8M0 scale per 32: not NVFP4

    @property
    def sf_vec(self) -> int:
        return 16 if self is MmaKind.NVF4 else 32

    @property
    def sf_dtype(self):
        return cutlass.Float8E4M3FN if self is MmaKind.NVF4 else cutlass.Float8E8M0FNU


@dataclass(frozen=True)
class GemmConfig:
    """Everything that changes generated code (the compile key, with the arch). Shapes (T, K,
    N, E) are runtime values: one compile serves every layer shape of a tile config."""

    tile_n: int = 128  # N per CTA tile (128 | 256)
    kind: MmaKind = MmaKind.NVF4

    def __post_init__(self) -> None:
        if self.tile_n not in TILE_NS:
            raise ValueError(f"GemmConfig.tile_n must be one of {TILE_NS}, got {self.tile_n=}")
        if not isinstance(self.kind, MmaKind):
            raise ValueError(f"GemmConfig.kind must be an MmaKind, got {self.kind=}")

    @property
    def name(self) -> str:
        return f"sm100_m{TILE_M}n{self.tile_n}k{K_TILE}_{self.kind.name.lower()}"


def plan(t: int, k: int, n: int, e: int) -> GemmConfig:
    """The tile config for A [T, K/2] x B [E, K/2, N]. Not tuned (no B200 here): 256-wide tiles
    once there are enough rows per expert to fill the SMs with them, else 128 (twice the CTAs)."""
    if n % 256 == 0 and t >= 128 * e and (t // 128) * (n // 256) >= 148:
        return GemmConfig(256)
    return GemmConfig(128)


def can_implement(
    t: int, k: int, n: int, e: int, cfg: GemmConfig | None = None
) -> tuple[bool, str]:
    """Whether the kernel handles these shapes: (ok, why not)."""
    cfg = plan(t, k, n, e) if cfg is None else cfg
    if k % K_TILE:
        return False, f"K must be a multiple of {K_TILE} (the K tile), got {k=}"
    if n % cfg.tile_n:
        return False, f"N must be a multiple of the tile N {cfg.tile_n} ({cfg.name}), got {n=}"
    if e < 1 or t < 0:
        return False, f"needs E >= 1 and T >= 0, got {e=} {t=}"
    if t * k // 2 >= 2**31 or e * n * k // 2 >= 2**31 or t * n >= 2**31:
        return False, f"tensors must hold fewer than 2^31 elements, got {t=} {k=} {n=} {e=}"
    return True, ""


# --------------------------------------------------------------------------------------------
# the tile schedule: plain arithmetic, traced into the kernel by all three roles (the same
# sequence in each) and run on Python ints by the tests


class ExpertTiles(NamedTuple):
    row0: Any  # the expert's first row (END offset of the expert before)
    rows: Any  # its rows
    m_tiles: Any  # cdiv(rows, TILE_M): also its share of SFA's 128-row atom blocks
    count: Any  # its tiles: m_tiles * n_tiles (0 for an empty expert: nothing to visit)
    first: Any  # the first of its tiles CTA `bid` of `grid` takes (then every grid-th)


def expert_tiles(offs, ei, prev_end, tile_base, bid, grid, n_tiles) -> ExpertTiles:
    """Expert ei's part of the schedule: tiles tile_base .. tile_base + count - 1 in (m-tile,
    n-tile) order; CTA bid takes those with tile % grid == bid."""
    rows = offs[ei] - prev_end
    m_tiles = (rows + (TILE_M - 1)) // TILE_M
    first = tile_base + (bid + grid - tile_base % grid) % grid
    return ExpertTiles(prev_end, rows, m_tiles, m_tiles * n_tiles, first)


def tile_coords(tile, tile_base, n_tiles):
    """(m-tile within the expert, n-tile) of a tile of the expert starting at tile_base."""
    return (tile - tile_base) // n_tiles, (tile - tile_base) % n_tiles


# --------------------------------------------------------------------------------------------
# the kernel


class Sm100GroupedGemmKernel:
    """out[rows of e] = bf16(alpha_e * A[rows of e] @ B[e]): one persistent, warp-specialized
    launch."""

    def __init__(self, cfg: GemmConfig) -> None:
        self.cfg = cfg
        self.acc_dtype = Float32
        self.sf_vec = cfg.kind.sf_vec
        self.cta_group = tcgen05.CtaGroup.ONE
        self.mma_inst_mn = (TILE_M, cfg.tile_n)
        self.epi_warps = (0, 1, 2, 3)
        self.mma_warp = 4
        self.tma_warp = 5
        self.threads = 32 * 6
        self.epi_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=32 * 4)
        self.tmem_barrier = pipeline.NamedBarrier(barrier_id=2, num_threads=32 * 5)
        self.smem_capacity = utils.get_smem_capacity_in_bytes("sm_100")
        self.tmem_cols = cute.arch.get_max_tmem_alloc_cols("sm_100")
        # per stage: A 128 x 256 and B tile_n x 256 FP4, their scales (one byte per 16 or 32)
        stage = (TILE_M + cfg.tile_n) * K_TILE // 2 + (TILE_M + cfg.tile_n) * K_TILE // self.sf_vec
        self.ab_stages = min(MAX_AB_STAGES, (self.smem_capacity - SMEM_RESERVE) // stage)
        # TMEM: 512 columns; the accumulator takes tile_n per stage, the scales 16 + tile_n/8
        sf_cols = (TILE_M // 32) * 4 + (cfg.tile_n // 32) * 4
        self.acc_stages = 2 if 2 * cfg.tile_n + sf_cols <= self.tmem_cols else 1
        self.sfa_tmem_cols = (TILE_M // 32) * 4
        self.acc_tmem_cols = cfg.tile_n * self.acc_stages

    def _tiled_mma(self):
        return sm100_utils.make_blockscaled_trivial_tiled_mma(
            cutlass.Float4E2M1FN,
            cutlass.Float4E2M1FN,
            OperandMajorMode.K,
            OperandMajorMode.K,
            self.cfg.kind.sf_dtype,
            self.sf_vec,
            self.cta_group,
            self.mma_inst_mn,
        )

    @cute.jit
    def __call__(
        self,
        a_ptr: cute.Pointer,
        b_ptr: cute.Pointer,
        sfa_ptr: cute.Pointer,
        sfb_ptr: cute.Pointer,
        offs_ptr: cute.Pointer,
        gsa_ptr: cute.Pointer,
        gsb_ptr: cute.Pointer,
        c_ptr: cute.Pointer,
        t: Int32,
        k: Int32,
        n: Int32,
        e: Int32,
        sfa_rows: Int32,
        gsa_step: Int32,
        gsb_step: Int32,
        grid_size: Int32,
        stream,
    ):
        cfg = self.cfg
        tiled_mma = self._tiled_mma()
        self.mma_tiler = (TILE_M, cfg.tile_n, K_TILE)
        self.cta_tile = self.mma_tiler
        self.c_dtype = cutlass.BFloat16
        self.c_layout = utils.LayoutEnum.ROW_MAJOR
        sf_dtype = cfg.kind.sf_dtype

        # (M, K, L) views, K-major; B's L is the expert
        a = cute.make_tensor(
            a_ptr,
            cute.make_ordered_layout((t, cute.assume(k, divby=K_TILE), 1), order=(1, 0, 2)),
        )
        b = cute.make_tensor(
            b_ptr,
            cute.make_ordered_layout(
                (cute.assume(n, divby=cfg.tile_n), cute.assume(k, divby=K_TILE), e),
                order=(1, 0, 2),
            ),
        )
        # N % tile_n: every row (and each thread's 32-column run) starts 16-byte aligned
        c = cute.make_tensor(
            c_ptr,
            cute.make_ordered_layout((t, cute.assume(n, divby=cfg.tile_n), 1), order=(1, 0, 2)),
        )
        # scales: the tcgen05 atom ((32,4),(sf_vec,4)) tiled K first, then M (= docs/design.md
        # §3's 128x4 offset), then L; SFA's M is every expert's padded rows, L = 1
        sfa = cute.make_tensor(
            sfa_ptr,
            blockscaled_utils.tile_atom_to_shape_SF(
                (cute.assume(sfa_rows, divby=TILE_M), k, 1), self.sf_vec
            ),
        )
        n_pad = (n + 127) // 128 * 128
        sfb = cute.make_tensor(
            sfb_ptr,
            blockscaled_utils.tile_atom_to_shape_SF(
                (cute.assume(n_pad, divby=128), k, e), self.sf_vec
            ),
        )
        offs = cute.make_tensor(offs_ptr, cute.make_layout(e))
        gsa = cute.make_tensor(gsa_ptr, cute.make_layout(e))
        gsb = cute.make_tensor(gsb_ptr, cute.make_layout(e))

        a_smem = sm100_utils.make_smem_layout_a(
            tiled_mma, self.mma_tiler, cutlass.Float4E2M1FN, self.ab_stages
        )
        b_smem = sm100_utils.make_smem_layout_b(
            tiled_mma, self.mma_tiler, cutlass.Float4E2M1FN, self.ab_stages
        )
        sfa_smem = blockscaled_utils.make_smem_layout_sfa(
            tiled_mma, self.mma_tiler, self.sf_vec, self.ab_stages
        )
        sfb_smem = blockscaled_utils.make_smem_layout_sfb(
            tiled_mma, self.mma_tiler, self.sf_vec, self.ab_stages
        )
        cluster_vmnk = cute.tiled_divide(cute.make_layout((1, 1, 1)), (tiled_mma.thr_id.shape,))
        one = (None, None, None, 0)
        tma_a, tma_ta = cute.nvgpu.make_tiled_tma_atom_A(
            cpasync.CopyBulkTensorTileG2SOp(self.cta_group),
            a,
            cute.slice_(a_smem, one),
            self.mma_tiler,
            tiled_mma,
            cluster_vmnk.shape,
        )
        tma_b, tma_tb = cute.nvgpu.make_tiled_tma_atom_B(
            cpasync.CopyBulkTensorTileG2SOp(self.cta_group),
            b,
            cute.slice_(b_smem, one),
            self.mma_tiler,
            tiled_mma,
            cluster_vmnk.shape,
        )
        tma_sfa, tma_tsfa = cute.nvgpu.make_tiled_tma_atom_A(
            cpasync.CopyBulkTensorTileG2SOp(self.cta_group),
            sfa,
            cute.slice_(sfa_smem, one),
            self.mma_tiler,
            tiled_mma,
            cluster_vmnk.shape,
            internal_type=cutlass.Int16,
        )
        tma_sfb, tma_tsfb = cute.nvgpu.make_tiled_tma_atom_B(
            cpasync.CopyBulkTensorTileG2SOp(self.cta_group),
            sfb,
            cute.slice_(sfb_smem, one),
            self.mma_tiler,
            tiled_mma,
            cluster_vmnk.shape,
            internal_type=cutlass.Int16,
        )
        self.tma_bytes = (
            cute.size_in_bytes(cutlass.Float4E2M1FN, cute.slice_(a_smem, one))
            + cute.size_in_bytes(cutlass.Float4E2M1FN, cute.slice_(b_smem, one))
            + cute.size_in_bytes(sf_dtype, cute.slice_(sfa_smem, one))
            + cute.size_in_bytes(sf_dtype, cute.slice_(sfb_smem, one))
        )
        self.epi_tile = sm100_utils.compute_epilogue_tile_shape(  # a kernel argument
            self.cta_tile, False, self.c_layout, self.c_dtype
        )

        @cute.struct
        class SharedStorage:
            ab_full: cute.struct.MemRange[cutlass.Int64, self.ab_stages]
            ab_empty: cute.struct.MemRange[cutlass.Int64, self.ab_stages]
            acc_full: cute.struct.MemRange[cutlass.Int64, self.acc_stages]
            acc_empty: cute.struct.MemRange[cutlass.Int64, self.acc_stages]
            tmem_ptr: Int32
            sA: cute.struct.Align[
                cute.struct.MemRange[cutlass.Float4E2M1FN, cute.cosize(a_smem.outer)], 1024
            ]
            sB: cute.struct.Align[
                cute.struct.MemRange[cutlass.Float4E2M1FN, cute.cosize(b_smem.outer)], 1024
            ]
            sSFA: cute.struct.Align[cute.struct.MemRange[sf_dtype, cute.cosize(sfa_smem)], 1024]
            sSFB: cute.struct.Align[cute.struct.MemRange[sf_dtype, cute.cosize(sfb_smem)], 1024]

        self.shared_storage = SharedStorage
        self.kernel(
            tiled_mma,
            tma_a,
            tma_ta,
            tma_b,
            tma_tb,
            tma_sfa,
            tma_tsfa,
            tma_sfb,
            tma_tsfb,
            c,
            offs,
            gsa,
            gsb,
            gsa_step,
            gsb_step,
            n // cfg.tile_n,
            a_smem,
            b_smem,
            sfa_smem,
            sfb_smem,
            self.epi_tile,
        ).launch(
            grid=[grid_size, 1, 1],
            block=[self.threads, 1, 1],
            cluster=[1, 1, 1],
            stream=stream,
            min_blocks_per_mp=1,
        )

    @cute.kernel
    def kernel(
        self,
        tiled_mma: cute.TiledMma,
        tma_a: cute.CopyAtom,
        mA: cute.Tensor,
        tma_b: cute.CopyAtom,
        mB: cute.Tensor,
        tma_sfa: cute.CopyAtom,
        mSFA: cute.Tensor,
        tma_sfb: cute.CopyAtom,
        mSFB: cute.Tensor,
        mC: cute.Tensor,
        offs: cute.Tensor,
        gsa: cute.Tensor,
        gsb: cute.Tensor,
        gsa_step: Int32,
        gsb_step: Int32,
        n_tiles: Int32,
        a_smem: cute.ComposedLayout,
        b_smem: cute.ComposedLayout,
        sfa_smem: cute.Layout,
        sfb_smem: cute.Layout,
        epi_tile: cute.Tile,
    ):
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        n_experts = cute.size(offs)
        k_tiles = cute.size(mA, mode=[1]) // K_TILE

        if warp == self.tma_warp:
            for atom in (tma_a, tma_b, tma_sfa, tma_sfb):
                cpasync.prefetch_descriptor(atom)

        smem = SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        ab_pipe = pipeline.PipelineTmaUmma.create(
            barrier_storage=storage.ab_full.data_ptr(),
            num_stages=self.ab_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
            tx_count=self.tma_bytes,
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
        )
        acc_pipe = pipeline.PipelineUmmaAsync.create(
            barrier_storage=storage.acc_full.data_ptr(),
            num_stages=self.acc_stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 32 * 4),
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
        )
        tmem = TmemAllocator(
            storage.tmem_ptr.ptr,
            barrier_for_retrieve=self.tmem_barrier,
            allocator_warp_id=self.epi_warps[0],
        )

        sA = storage.sA.get_tensor(a_smem.outer, swizzle=a_smem.inner)
        sB = storage.sB.get_tensor(b_smem.outer, swizzle=b_smem.inner)
        sSFA = storage.sSFA.get_tensor(sfa_smem)
        sSFB = storage.sSFB.get_tensor(sfb_smem)

        thr_mma = tiled_mma.get_slice(0)
        tile_mk = cute.slice_(self.mma_tiler, (None, 0, None))
        tile_nk = cute.slice_(self.mma_tiler, (0, None, None))
        tile_mn = cute.slice_(self.mma_tiler, (None, None, 0))
        acc_shape = tiled_mma.partition_shape_C(self.mma_tiler[:2])
        tCtAcc_fake = tiled_mma.make_fragment_C(cute.append(acc_shape, self.acc_stages))
        cta1 = cute.make_layout(1)

        # B and both scales are tiled once: their tiles are selected by index per work tile
        tBsB, tBgB = cpasync.tma_partition(
            tma_b,
            0,
            cta1,
            cute.group_modes(sB, 0, 3),
            cute.group_modes(thr_mma.partition_B(cute.local_tile(mB, tile_nk, (None,) * 3)), 0, 3),
        )
        tAsSFA, tAgSFA = cpasync.tma_partition(
            tma_sfa,
            0,
            cta1,
            cute.group_modes(sSFA, 0, 3),
            cute.group_modes(
                thr_mma.partition_A(cute.local_tile(mSFA, tile_mk, (None,) * 3)), 0, 3
            ),
        )
        tAsSFA = cute.filter_zeros(tAsSFA)
        tAgSFA = cute.filter_zeros(tAgSFA)
        tBsSFB, tBgSFB = cpasync.tma_partition(
            tma_sfb,
            0,
            cta1,
            cute.group_modes(sSFB, 0, 3),
            cute.group_modes(
                thr_mma.partition_B(cute.local_tile(mSFB, tile_nk, (None,) * 3)), 0, 3
            ),
        )
        tBsSFB = cute.filter_zeros(tBsSFB)
        tBgSFB = cute.filter_zeros(tBgSFB)

        # ---------------------------------------------------------------- TMA producer warp
        if warp == self.tma_warp:
            ab_state = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Producer, self.ab_stages
            )
            tile_base = Int32(0)
            mt_base = Int32(0)
            prev_end = Int32(0)
            for ei in cutlass.range(n_experts, unroll=1):
                x = expert_tiles(offs, ei, prev_end, tile_base, bid, grid, n_tiles)
                prev_end = x.row0 + x.rows
                # A from the expert's first row: a domain offset of the TMA coordinates
                gA = cute.local_tile(cute.domain_offset((x.row0, 0, 0), mA), tile_mk, (None,) * 3)
                tAsA, tAgA = cpasync.tma_partition(
                    tma_a,
                    0,
                    cta1,
                    cute.group_modes(sA, 0, 3),
                    cute.group_modes(thr_mma.partition_A(gA), 0, 3),
                )
                for tile in cutlass.range(x.first, tile_base + x.count, grid, unroll=1):
                    m_local, n_tile = tile_coords(tile, tile_base, n_tiles)
                    a_k = tAgA[(None, m_local, None, 0)]
                    b_k = tBgB[(None, n_tile, None, ei)]
                    sfa_k = tAgSFA[(None, mt_base + m_local, None, 0)]
                    sfb_k = tBgSFB[(None, n_tile, None, ei)]
                    for kt in cutlass.range(k_tiles, unroll=1):
                        ab_pipe.producer_acquire(ab_state)
                        bar = ab_pipe.producer_get_barrier(ab_state)
                        s = ab_state.index
                        cute.copy(tma_a, a_k[(None, kt)], tAsA[(None, s)], tma_bar_ptr=bar)
                        cute.copy(tma_b, b_k[(None, kt)], tBsB[(None, s)], tma_bar_ptr=bar)
                        cute.copy(tma_sfa, sfa_k[(None, kt)], tAsSFA[(None, s)], tma_bar_ptr=bar)
                        cute.copy(tma_sfb, sfb_k[(None, kt)], tBsSFB[(None, s)], tma_bar_ptr=bar)
                        ab_state.advance()
                tile_base = tile_base + x.count
                mt_base = mt_base + x.m_tiles
            ab_pipe.producer_tail(ab_state)

        # ---------------------------------------------------------------- MMA warp
        if warp == self.mma_warp:
            tmem.wait_for_alloc()
            acc_ptr = tmem.retrieve_ptr(self.acc_dtype)
            tCtAcc_base = cute.make_tensor(acc_ptr, tCtAcc_fake.layout)
            sfa_layout = blockscaled_utils.make_tmem_layout_sfa(
                tiled_mma, self.mma_tiler, self.sf_vec, cute.slice_(sfa_smem, (None,) * 3 + (0,))
            )
            tCtSFA = cute.make_tensor(
                cute.recast_ptr(acc_ptr + self.acc_tmem_cols, dtype=self.cfg.kind.sf_dtype),
                sfa_layout,
            )
            sfb_layout = blockscaled_utils.make_tmem_layout_sfb(
                tiled_mma, self.mma_tiler, self.sf_vec, cute.slice_(sfb_smem, (None,) * 3 + (0,))
            )
            tCtSFB = cute.make_tensor(
                cute.recast_ptr(
                    acc_ptr + self.acc_tmem_cols + self.sfa_tmem_cols,
                    dtype=self.cfg.kind.sf_dtype,
                ),
                sfb_layout,
            )
            s2t_sfa, tCsSFA_s2t, tCtSFA_s2t = self._s2t(sSFA, tCtSFA)
            s2t_sfb, tCsSFB_s2t, tCtSFB_s2t = self._s2t(sSFB, tCtSFB)
            tCrA = tiled_mma.make_fragment_A(sA)
            tCrB = tiled_mma.make_fragment_B(sB)
            ab_state = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Consumer, self.ab_stages
            )
            acc_state = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Producer, self.acc_stages
            )
            tile_base = Int32(0)
            prev_end = Int32(0)
            for ei in cutlass.range(n_experts, unroll=1):
                x = expert_tiles(offs, ei, prev_end, tile_base, bid, grid, n_tiles)
                prev_end = x.row0 + x.rows
                for _tile in cutlass.range(x.first, tile_base + x.count, grid, unroll=1):
                    tCtAcc = tCtAcc_base[(None, None, None, acc_state.index)]
                    acc_pipe.producer_acquire(acc_state)
                    for kt in cutlass.range(k_tiles, unroll=1):
                        ab_pipe.consumer_wait(ab_state)
                        s2t_stage = (None, None, None, None, ab_state.index)
                        cute.copy(s2t_sfa, tCsSFA_s2t[s2t_stage], tCtSFA_s2t)
                        cute.copy(s2t_sfb, tCsSFB_s2t[s2t_stage], tCtSFB_s2t)
                        for kb in cutlass.range_constexpr(cute.size(tCrA, mode=[2])):
                            # the first MMA of a tile overwrites the accumulator
                            tiled_mma.set(tcgen05.Field.ACCUMULATE, (kt != 0) if kb == 0 else True)
                            kc = (None, None, kb, ab_state.index)
                            cute.gemm(
                                tiled_mma,
                                tCtAcc,
                                [tCrA[kc], tCtSFA[(None, None, kb)]],
                                [tCrB[kc], tCtSFB[(None, None, kb)]],
                                tCtAcc,
                            )
                        ab_pipe.consumer_release(ab_state)
                        ab_state.advance()
                    acc_pipe.producer_commit(acc_state)
                    acc_state.advance()
                tile_base = tile_base + x.count
            acc_pipe.producer_tail(acc_state)

        # ---------------------------------------------------------------- epilogue warps
        if warp < self.mma_warp:
            tmem.allocate(self.tmem_cols)
            tmem.wait_for_alloc()
            acc_ptr = tmem.retrieve_ptr(self.acc_dtype)
            tCtAcc = transform_partitioned_tensor_layout(
                cute.make_tensor(acc_ptr, tCtAcc_fake.layout)
            )
            copy_t2r = sm100_utils.get_tmem_load_op(
                self.cta_tile, self.c_layout, self.c_dtype, self.acc_dtype, epi_tile, False
            )
            tAcc_epi = cute.flat_divide(tCtAcc, epi_tile)
            tiled_t2r = tcgen05.make_tmem_copy(copy_t2r, tAcc_epi[(None, None, 0, 0, 0)])
            thr_t2r = tiled_t2r.get_slice(tidx)
            tTR_tAcc_base = thr_t2r.partition_S(tAcc_epi)  # (T2R, M, N, EPI_M, EPI_N, STAGE)
            # coordinates of the C tile (rows relative to the expert's first row)
            cC = cute.make_identity_tensor(mC.shape)
            tCcC = transform_partitioned_tensor_layout(
                thr_mma.partition_C(cute.local_tile(cC, tile_mn, (None,) * 3))
            )
            tTR_cC_all = thr_t2r.partition_D(cute.flat_divide(tCcC, epi_tile))
            acc_state = pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Consumer, self.acc_stages
            )
            tile_base = Int32(0)
            prev_end = Int32(0)
            for ei in cutlass.range(n_experts, unroll=1):
                x = expert_tiles(offs, ei, prev_end, tile_base, bid, grid, n_tiles)
                prev_end = x.row0 + x.rows
                alpha = gsa[ei * gsa_step] * gsb[ei * gsb_step]
                gC = cute.local_tile(cute.domain_offset((x.row0, 0, 0), mC), tile_mn, (None,) * 3)
                tCgC = transform_partitioned_tensor_layout(thr_mma.partition_C(gC))
                tTR_gC_all = thr_t2r.partition_D(cute.flat_divide(tCgC, epi_tile))
                for tile in cutlass.range(x.first, tile_base + x.count, grid, unroll=1):
                    m_local, n_tile = tile_coords(tile, tile_base, n_tiles)
                    self._store_tile(
                        tiled_t2r,
                        tTR_tAcc_base[(None, None, None, None, None, acc_state.index)],
                        tTR_gC_all[(None, None, None, None, None, m_local, n_tile, 0)],
                        tTR_cC_all[(None, None, None, None, None, m_local, n_tile, 0)],
                        alpha,
                        x.rows,
                        acc_pipe,
                        acc_state,
                    )
                    acc_state.advance()
                tile_base = tile_base + x.count
            tmem.relinquish_alloc_permit()
            self.epi_barrier.arrive_and_wait()
            tmem.free(acc_ptr)

    @cute.jit
    def _store_tile(self, tiled_t2r, tAcc, gC, cC, alpha, rows, acc_pipe, acc_state):
        """TMEM -> registers, * alpha in fp32, -> bf16, store the rows < `rows` of the expert."""
        tAcc = cute.group_modes(tAcc, 3, cute.rank(tAcc))
        gC = cute.group_modes(gC, 3, cute.rank(gC))
        cC = cute.group_modes(cC, 3, cute.rank(cC))
        r_acc = cute.make_rmem_tensor(gC[(None, None, None, 0)].shape, self.acc_dtype)
        r_c = cute.make_rmem_tensor(gC[(None, None, None, 0)].shape, self.c_dtype)
        # 16-byte stores (8 bf16): a thread's run of columns is contiguous and aligned
        store = cute.make_copy_atom(
            cute.nvgpu.CopyUniversalOp(), self.c_dtype, num_bits_per_copy=128
        )
        acc_pipe.consumer_wait(acc_state)
        subtiles = cute.size(tAcc.shape, mode=[3])
        for st in cutlass.range(subtiles):
            cute.copy(tiled_t2r, tAcc[(None, None, None, st)], r_acc)
            if st == subtiles - 1:  # the accumulator is in registers: hand TMEM back
                cute.arch.fence_view_async_tmem_load()
                acc_pipe.consumer_release(acc_state)
            r_c.store((r_acc.load() * alpha).to(self.c_dtype))  # alpha on the fp32 sum
            c_sub = cC[(None, None, None, st)]
            # one predicate per vector of the copy (a thread's vector lies in one row)
            pred = cute.make_rmem_tensor((1, *c_sub.shape[1:]), cutlass.Boolean)
            for mi in cutlass.range_constexpr(c_sub.shape[1]):
                for ni in cutlass.range_constexpr(c_sub.shape[2]):
                    pred[(0, mi, ni)] = c_sub[(0, mi, ni)][0] < rows
            cute.copy(store, r_c, gC[(None, None, None, st)], pred=pred)

    def _s2t(self, sSF: cute.Tensor, tSF: cute.Tensor):
        """The SMEM -> TMEM copy of one stage of scales (tcgen05.cp 4x32x128b)."""
        tCsSF = cute.filter_zeros(sSF)
        tCtSF = cute.filter_zeros(tSF)
        atom = cute.make_copy_atom(tcgen05.Cp4x32x128bOp(self.cta_group), self.cfg.kind.sf_dtype)
        tiled = tcgen05.make_s2t_copy(atom, tCtSF)
        thr = tiled.get_slice(0)
        src = tcgen05.get_s2t_smem_desc_tensor(tiled, thr.partition_S(tCsSF))
        return tiled, src, thr.partition_D(tCtSF)


# --------------------------------------------------------------------------------------------
# compile (cached) and the fake-tensor compile used by CI


def _ptr_types(cfg: GemmConfig):
    sf = cfg.kind.sf_dtype
    return (
        (cutlass.Float4E2M1FN, 16),
        (cutlass.Float4E2M1FN, 16),
        (sf, 16),
        (sf, 16),
        (Int32, 4),
        (Float32, 4),
        (Float32, 4),
        (cutlass.BFloat16, 16),
    )


def _fake_args(cfg: GemmConfig):
    from cutlass.cute.runtime import make_ptr
    from cutlass.runtime import make_fake_stream

    ptrs = [make_ptr(t, 0, cute.AddressSpace.gmem, assumed_align=a) for t, a in _ptr_types(cfg)]
    return (*ptrs, *(Int32(1) for _ in range(8)), make_fake_stream())


@functools.cache
def compile_gemm(cfg: GemmConfig, arch: str = ARCH, extra_options: str = ""):
    """Compile the kernel for `arch` (sm_100a only); cached by (cfg, arch, options). Needs no
    GPU. A failed compile raises naming the configuration."""
    if arch != ARCH:
        raise ValueError(f"the tcgen05 grouped GEMM compiles for {ARCH} only, got {arch=}")
    from dsv4.kernels.cutedsl.ptx_check import compile_named

    return compile_named(
        Sm100GroupedGemmKernel(cfg), _fake_args(cfg), arch, extra_options,
        f"CuTeDSL grouped GEMM {cfg.name} ({cfg})",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# runner: validates metadata, writes caller-owned `out`, launches on the current stream


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def _need(cond: bool, msg) -> None:
    """ValueError(msg()) unless cond (built only on failure: formatting reads no tensor)."""
    if not cond:
        raise ValueError(msg())


def run_grouped_gemm(
    mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out, cfg: GemmConfig | None = None
) -> None:
    """out[rows of e] = bf16(gsa[e] * gsb[e] * A[rows of e] @ B[e]) on an sm_100 device.

    The operands of dsv4.ops.run_nvfp4_grouped_gemm, already validated there (shapes, dtypes,
    devices); checked here: the device, the shapes `can_implement` accepts, mat_b K-major and
    dense per expert ([E, N, K/2] in memory), 16-byte aligned starts. Reads no value on the host
    (the offsets are read by the kernel): CUDA-graph capturable. Rows past offsets[-1] are not
    written.
    """
    import torch
    from cutlass.cute.runtime import make_ptr

    t, kh = mat_a.shape
    e, _, n = mat_b.shape
    k = 2 * kh
    cfg = plan(t, k, n, e) if cfg is None else cfg
    dev = mat_a.device
    _need(
        dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] == 10,
        lambda: f"the tcgen05 grouped GEMM needs an sm_100 device, got {dev}",
    )
    ok, why = can_implement(t, k, n, e, cfg)
    _need(ok, lambda: why)
    _need(
        mat_b.stride() == (n * kh, 1, kh) and mat_a.stride() == (kh, 1),
        lambda: (
            f"mat_a must be contiguous and mat_b K-major dense per expert (make_b_k_major of a "
            f"contiguous [E, N, K/2]), got mat_a.stride()={mat_a.stride()} "
            f"mat_b.stride()={mat_b.stride()}"
        ),
    )
    _need(
        out.is_contiguous() and scale_a.is_contiguous() and scale_b.is_contiguous(),
        lambda: "out, scale_a and scale_b must be contiguous",
    )
    tensors = {"mat_a": mat_a, "mat_b": mat_b, "scale_a": scale_a, "scale_b": scale_b, "out": out}
    bad = [name for name, v in tensors.items() if v.data_ptr() % 16]
    _need(not bad, lambda: f"{', '.join(bad)} must start 16-byte aligned")
    if t == 0:
        return
    cp = (k // 16 + 3) // 4 * 4
    kernel = compile_gemm(cfg)
    ptrs = [
        make_ptr(ty, v.data_ptr(), cute.AddressSpace.gmem, assumed_align=a)
        for (ty, a), v in zip(
            _ptr_types(cfg),
            (mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out),
            strict=True,
        )
    ]
    from cuda.bindings import driver

    stream = driver.CUstream(torch.cuda.current_stream(dev).cuda_stream)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    kernel(
        *ptrs,
        Int32(t),
        Int32(k),
        Int32(n),
        Int32(e),
        Int32(scale_a.numel() // cp),  # every expert's padded scale rows
        Int32(0 if gsa.numel() == 1 else 1),
        Int32(0 if gsb.numel() == 1 else 1),
        Int32(_sm_count(index)),  # persistent: one CTA per SM, tiles found on the device
        stream,
    )
