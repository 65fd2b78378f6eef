"""Scale and weight layouts of the block-scaled grouped GEMM (docs/design.md §3 "Scale layout").

A [R, C] scale matrix (R rows of M or N, C = K/16) is zero-padded to [round_up(R, 128),
round_up(C, 4)] and stored in 512-byte atoms ("128x4", tcgen05 / torch SWIZZLE_32_4_4):
byte (r, c) lives at ((r // 128) * n_cb + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4
+ c % 4, n_cb = round_up(C, 4) / 4. One reshape + permute of the padded matrix writes it.

Grouped 2Dx3D: activations (2-D side) are swizzled per group, each group's rows padded to 128 on
their own, so group g's scale rows start at sum_{j<g} round_up(T_j, 128) while its data rows start
at sum_{j<g} T_j. Weights (3-D side) are one swizzled block per expert of the transposed [N, K/16].
Scales move as raw bytes (a permutation, never a value cast); padding bytes are 0x00.

Two ways to assemble the 2-D side: from a host list of per-group tensors (shapes known on the
host), or `assemble_scales_2d_side_from_offsets` from one [T, C] tensor and device offsets, which
reads no value on the host. Its output length depends on the routing, so it fills a buffer of
`max_padded_rows(T, E)` rows (enough for any routing) instead of syncing to learn the exact size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv4.ops import _checks
from dsv4.ops._workspace import Sizer, Workspace, cumsum_small, scalar

ATOM_ROWS = 128  # rows of one 512-byte atom: 4 sub-blocks of 32 rows
ATOM_COLS = 4  # scale columns (K/16 blocks) of one atom


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def swizzled_numel(rows: int, cols: int) -> int:
    """Bytes of the swizzled [rows, cols] scale matrix, padding included."""
    return round_up(rows, ATOM_ROWS) * round_up(cols, ATOM_COLS)


def max_padded_rows(total_rows: int, n_groups: int) -> int:
    """Scale rows enough for `total_rows` data rows split into `n_groups` groups in any way.

    Each non-empty group pads at most 127 rows and at most min(n_groups, total_rows) groups are
    non-empty; the total is a multiple of 128. Size graph-safe 2-D-side buffers with this.
    """
    for name, v in (("total_rows", total_rows), ("n_groups", n_groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {name}={v!r}")
    return (total_rows + (ATOM_ROWS - 1) * min(n_groups, total_rows)) // ATOM_ROWS * ATOM_ROWS


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.view(torch.uint8)


def _swizzle_padded_into(padded: torch.Tensor, out: torch.Tensor) -> None:
    """padded bytes [..., Rp, Cp] -> out (same numel, contiguous) in 128x4 atom order.

    Row r = 128*rb + 32*r4 + r32 and column c = 4*cb + c4; an atom (rb, cb) stores r32 major,
    then r4, then c4: a permute (rb, r4, r32, cb, c4) -> (rb, cb, r32, r4, c4).
    """
    *lead, rp, cp = padded.shape
    src = padded.reshape(*lead, rp // 128, 4, 32, cp // 4, 4)
    n = len(lead)
    src = src.permute(*range(n), n, n + 3, n + 2, n + 1, n + 4)
    out.view(src.shape).copy_(src)


def _padded(
    scales: torch.Tensor, rows: int, cols: int, ws: Workspace | None = None
) -> torch.Tensor:
    """[..., R, C] bytes -> zero-padded [..., rows, cols] bytes (from `ws`, else allocated)."""
    *lead, r, c = scales.shape
    ws = ws or Workspace(None, scales.device)
    pad = ws.empty((*lead, rows, cols), torch.uint8).zero_()
    pad[..., :r, :c].copy_(_bytes(scales))
    return pad


def pad_and_swizzle_workspace_bytes(rows: int, cols: int) -> int:
    """Workspace bytes `pad_and_swizzle` needs for a [rows, cols] scale matrix."""
    sizer = Sizer()
    sizer.empty((round_up(rows, ATOM_ROWS), round_up(cols, ATOM_COLS)), torch.uint8)
    return sizer.off


def _check_out(name: str, out: torch.Tensor, numel: int, dev: torch.device) -> None:
    _checks.tensor(name, out, _checks.SCALE_DTYPES)
    if out.numel() != numel or not out.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous with {numel} elements, got {name}.shape="
            f"{tuple(out.shape)} contiguous={out.is_contiguous()}"
        )
    if out.device != dev:
        raise ValueError(f"{name} must be on {dev}, got {name}.device={out.device}")


# --------------------------------------------------------------------------------------------
# single matrix


def pad_and_swizzle(
    scales_2d: torch.Tensor,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """[R, C] scales -> 1-D [round_up(R, 128) * round_up(C, 4)] in the 128x4 layout, same dtype.

    With `out` and `workspace` (uint8, `pad_and_swizzle_workspace_bytes(R, C)` bytes, for the
    zero-padded copy) nothing is allocated."""
    _checks.tensor("scales_2d", scales_2d, _checks.SCALE_DTYPES, ndim=2)
    r, c = scales_2d.shape
    rp, cp = round_up(r, ATOM_ROWS), round_up(c, ATOM_COLS)
    if out is None:
        out = torch.empty(rp * cp, dtype=scales_2d.dtype, device=scales_2d.device)
    else:
        _check_out("out", out, rp * cp, scales_2d.device)
    _checks.workspace(workspace, scales_2d.device, pad_and_swizzle_workspace_bytes(r, c))
    ws = Workspace(workspace, scales_2d.device)  # None: the padded copy is a fresh tensor
    _swizzle_padded_into(_padded(scales_2d, rp, cp, ws), _bytes(out))
    return out


def unswizzle(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `pad_and_swizzle` on [..., round_up(rows,128) * round_up(cols,4)] bytes ->
    [..., rows, cols] (a view-and-permute: no value read on the host)."""
    rp, cp = round_up(rows, ATOM_ROWS), round_up(cols, ATOM_COLS)
    lead = swizzled.shape[:-1]
    atoms = swizzled.reshape(*lead, rp // 128, cp // 4, 32, 4, 4)
    n = len(lead)
    padded = atoms.permute(*range(n), n, n + 3, n + 2, n + 1, n + 4).reshape(*lead, rp, cp)
    return padded[..., :rows, :cols]


# --------------------------------------------------------------------------------------------
# offsets


def _check_counts(name: str, t: object) -> torch.Tensor:
    _checks.tensor(name, t, (torch.int32, torch.int64), ndim=1)
    return t


def compute_expert_offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Tokens per expert int [E] -> int32 [E] cumulative END offsets of the data rows.

    Values are not checked (that would read them on the host); counts must be >= 0.
    """
    t = _check_counts("tokens_per_expert", tokens_per_expert)
    return torch.cumsum(t, dim=0, dtype=torch.int32)


def compute_blockscale_offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Tokens per expert int [E] -> int32 [E] START rows of each group's swizzled scales:
    the exclusive cumsum of round_up(T_g, 128) (an empty group takes no rows)."""
    t = _check_counts("tokens_per_expert", tokens_per_expert)
    padded = (t.to(torch.int32) + (ATOM_ROWS - 1)) // ATOM_ROWS * ATOM_ROWS
    return torch.cumsum(padded, dim=0, dtype=torch.int32) - padded


def tokens_from_offsets(expert_offsets: torch.Tensor) -> torch.Tensor:
    """int32 cumulative END offsets [E] -> tokens per group [E] (int32), on the device."""
    ends = expert_offsets.to(torch.int32)
    return torch.diff(ends, prepend=ends.new_zeros(1))


# --------------------------------------------------------------------------------------------
# grouped 2Dx3D assembly


def assemble_scales_2d_side(
    scales_per_group: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group [T_g, C] scales -> (1-D swizzled bytes, int32 [G] scale row START offsets).

    Each group is padded to round_up(T_g, 128) rows and swizzled on its own; group g's block
    begins at byte start_g * round_up(C, 4). Shapes are read on the host (they are host ints).
    """
    if not isinstance(scales_per_group, (list, tuple)) or not scales_per_group:
        raise ValueError(
            f"scales_per_group must be a non-empty list of [T_g, C] tensors, got "
            f"{type(scales_per_group).__name__} of length {len(scales_per_group or ())}"
        )
    first = scales_per_group[0]
    for g, s in enumerate(scales_per_group):
        _checks.tensor(f"scales_per_group[{g}]", s, _checks.SCALE_DTYPES, ndim=2)
        if s.shape[1] != first.shape[1] or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(
                f"scales_per_group[{g}] must match scales_per_group[0] in C, dtype and device, "
                f"got shape={tuple(s.shape)} dtype={s.dtype} device={s.device} vs "
                f"shape={tuple(first.shape)} dtype={first.dtype} device={first.device}"
            )
    c = first.shape[1]
    cp = round_up(c, ATOM_COLS)
    rows = [round_up(s.shape[0], ATOM_ROWS) for s in scales_per_group]
    out = torch.empty(sum(rows) * cp, dtype=torch.uint8, device=first.device)
    starts, at = [], 0
    for s, rp in zip(scales_per_group, rows, strict=True):
        starts.append(at)
        if rp:
            _swizzle_padded_into(_padded(s, rp, cp), out[at * cp : (at + rp) * cp])
        at += rp
    return out.view(first.dtype), torch.tensor(starts, dtype=torch.int32, device=first.device)


def assemble_scales_2d_side_from_offsets(
    scales: torch.Tensor,
    expert_offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, C] scales of all groups back to back, int32 [E] END offsets -> (bytes, row starts).

    Graph-safe: no tensor value is read on the host. The assembled length depends on the
    routing, so `out` (1-D, contiguous, float8_e4m3fn or uint8) must hold at least
    `max_padded_rows(T, E) * round_up(C, 4)` bytes, a multiple of 128 * round_up(C, 4); every
    byte of it is written (group blocks, then zeros). With out=None such a buffer is allocated.
    Returns (out, int32 [E] scale row START offsets). Rows past expert_offsets[-1] are not read;
    offsets must be non-decreasing and <= T (not checked: that would read them).

    With `out` and `workspace` (uint8 1-D, at least `assemble_2d_workspace_bytes(T, C, E,
    out.numel())` bytes) nothing is allocated; the returned row starts are then a view into the
    workspace, valid until it is used again.

    Built as a gather: each padded scale row R finds its group g by searchsorted over the padded
    ends, and takes data row start_g + (R - scale_start_g), or a zero row when that is past T_g.
    """
    _checks.tensor("scales", scales, _checks.SCALE_DTYPES, ndim=2)
    _checks.tensor("expert_offsets", expert_offsets, (torch.int32,), ndim=1)
    if expert_offsets.numel() == 0:
        raise ValueError("expert_offsets must hold one END offset per group, got shape (0,)")
    _checks.same_device(scales=scales, expert_offsets=expert_offsets)
    t, c = scales.shape
    e = expert_offsets.numel()
    cp = round_up(c, ATOM_COLS)
    need = max_padded_rows(t, e)
    if out is None:
        out = torch.empty(need * cp, dtype=scales.dtype, device=scales.device)
    else:
        _checks.tensor("out", out, _checks.SCALE_DTYPES, ndim=1)
        _checks.same_device(scales=scales, out=out)
        if not out.is_contiguous() or out.numel() < need * cp or out.numel() % (ATOM_ROWS * cp):
            raise ValueError(
                f"out must be contiguous with at least max_padded_rows(T={t}, E={e}) * "
                f"round_up(C={c}, 4) = {need * cp} bytes, a multiple of {ATOM_ROWS * cp}, "
                f"got out.numel()={out.numel()} contiguous={out.is_contiguous()}"
            )
    rows_out = out.numel() // cp
    _checks.workspace(workspace, scales.device, assemble_2d_workspace_bytes(t, c, e, out.numel()))
    ws = Workspace(workspace, scales.device)  # None: every temporary is a fresh tensor
    starts = _group_start_buffers(ws, e)
    ends, tokens, ds, padded, se, ss, _, starts32 = starts
    r, g, tmp, local, m, m2, rows, gathered = _assemble_2d_buffers(ws, c, rows_out)
    i64 = torch.int64
    _group_starts_into(expert_offsets, starts)
    torch.arange(rows_out, out=r)
    torch.searchsorted(se, r, right=True, out=g).clamp_(max=e - 1)
    torch.index_select(ss, 0, g, out=tmp)
    torch.sub(r, tmp, out=local)
    torch.index_select(tokens, 0, g, out=tmp)
    torch.lt(local, tmp, out=m)
    torch.ge(local, scalar(0, i64), out=m2)
    m.logical_and_(m2)  # scale row r holds data row ds[g] + local; else a zero row
    gathered[:, c:].zero_()
    if t == 0:
        gathered.zero_()
    else:
        torch.index_select(ds, 0, g, out=tmp)
        tmp.add_(local).clamp_(0, t - 1)
        torch.index_select(_bytes(scales), 0, tmp, out=rows)
        rows.masked_fill_(m.logical_not_().unsqueeze(1), 0)
        gathered[:, :c].copy_(rows)
    _swizzle_padded_into(gathered, _bytes(out))
    return out, starts32


def _group_start_buffers(ws: Workspace | Sizer, e: int) -> tuple:
    """(ends, tokens, data starts, padded sizes, padded ends, padded starts, cumsum scratch,
    padded starts int32) of E groups."""
    i64 = torch.int64
    return (
        *(ws.empty((e,), i64) for _ in range(6)),
        ws.empty((2, e, 2), i64),  # cumsum scratch
        ws.empty((e,), torch.int32),
    )


def _group_starts_into(expert_offsets: torch.Tensor, bufs: tuple) -> None:
    """Fill _group_start_buffers' tensors from int32 END offsets (on the device)."""
    ends, tokens, ds, padded, se, ss, pair, starts32 = bufs
    i64 = torch.int64
    ends.copy_(expert_offsets)
    tokens[:1].copy_(ends[:1])
    torch.sub(ends[1:], ends[:-1], out=tokens[1:])
    torch.sub(ends, tokens, out=ds)  # data starts
    torch.add(tokens, scalar(ATOM_ROWS - 1, i64), out=padded)
    padded.div_(scalar(ATOM_ROWS, i64), rounding_mode="floor").mul_(scalar(ATOM_ROWS, i64))
    cumsum_small(padded, se, pair)
    torch.sub(se, padded, out=ss)
    starts32.copy_(ss)


def padded_group_starts(
    expert_offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """int32 [E] END offsets -> int32 [E] first scale row of each group in the 2-D-side layout
    (each group's rows padded to 128 on their own: assemble_scales_2d_side_from_offsets's row
    starts), on the device, graph-safe. With `out` (int32 [E]) and `workspace` (uint8 1-D,
    `padded_group_starts_workspace_bytes(E)` bytes) nothing is allocated."""
    _checks.tensor("expert_offsets", expert_offsets, (torch.int32,), ndim=1)
    e = expert_offsets.numel()
    if e == 0:
        raise ValueError("expert_offsets must hold one END offset per group, got shape (0,)")
    if out is None:
        out = torch.empty(e, dtype=torch.int32, device=expert_offsets.device)
    else:
        _checks.tensor("out", out, (torch.int32,), ndim=1)
        _checks.shape("out", out, (e,))
        _checks.same_device(expert_offsets=expert_offsets, out=out)
    _checks.workspace(workspace, expert_offsets.device, padded_group_starts_workspace_bytes(e))
    bufs = _group_start_buffers(Workspace(workspace, expert_offsets.device), e)
    _group_starts_into(expert_offsets, (*bufs[:-1], out))  # the int32 starts straight into out
    return out


def padded_group_starts_workspace_bytes(e: int) -> int:
    """Workspace bytes of `padded_group_starts` for E groups."""
    sizer = Sizer()
    _group_start_buffers(sizer, e)
    return sizer.off


def _assemble_2d_buffers(ws: Workspace | Sizer, c: int, rows_out: int) -> tuple:
    i64 = torch.int64
    return (
        *(ws.empty((rows_out,), i64) for _ in range(4)),
        ws.empty((rows_out,), torch.bool),
        ws.empty((rows_out,), torch.bool),
        ws.empty((rows_out, c), torch.uint8),
        ws.empty((rows_out, round_up(c, ATOM_COLS)), torch.uint8),
    )


def assemble_2d_workspace_bytes(t: int, c: int, e: int, out_numel: int | None = None) -> int:
    """Workspace bytes of `assemble_scales_2d_side_from_offsets` for T rows of C scale columns
    in E groups into an `out` of out_numel bytes (default: the minimum, max_padded_rows)."""
    cp = round_up(c, ATOM_COLS)
    rows_out = max_padded_rows(t, e) if out_numel is None else out_numel // cp
    sizer = Sizer()
    _group_start_buffers(sizer, e)
    _assemble_2d_buffers(sizer, c, rows_out)
    return sizer.off


def assemble_scales_3d_side(
    scales_per_expert: Sequence[torch.Tensor] | torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight side: per-expert [K/16, N] (a list, or one [E, K/16, N] tensor) ->
    [E, round_up(N, 128) * round_up(K/16, 4)]: each transposed to [N, K/16] and swizzled."""
    if isinstance(scales_per_expert, torch.Tensor):
        stacked = _checks.tensor(
            "scales_per_expert", scales_per_expert, _checks.SCALE_DTYPES, ndim=3
        )
    else:
        if not isinstance(scales_per_expert, (list, tuple)) or not scales_per_expert:
            raise ValueError(
                "scales_per_expert must be a non-empty list of [K/16, N] tensors or an "
                f"[E, K/16, N] tensor, got {type(scales_per_expert).__name__}"
            )
        first = scales_per_expert[0]
        for i, s in enumerate(scales_per_expert):
            _checks.tensor(f"scales_per_expert[{i}]", s, _checks.SCALE_DTYPES, ndim=2)
            if s.shape != first.shape or s.dtype != first.dtype or s.device != first.device:
                raise ValueError(
                    f"scales_per_expert[{i}] must match scales_per_expert[0] in shape, dtype "
                    f"and device, got shape={tuple(s.shape)} dtype={s.dtype} device={s.device} "
                    f"vs shape={tuple(first.shape)} dtype={first.dtype} device={first.device}"
                )
        stacked = torch.stack([_bytes(s) for s in scales_per_expert]).view(first.dtype)
    e, c, n = stacked.shape
    npad, cp = round_up(n, ATOM_ROWS), round_up(c, ATOM_COLS)
    if out is None:
        out = torch.empty((e, npad * cp), dtype=stacked.dtype, device=stacked.device)
    else:
        _check_out("out", out, e * npad * cp, stacked.device)
        if out.dim() != 2 or out.shape[0] != e:
            raise ValueError(
                f"out must be [E, Np*Cp]={(e, npad * cp)}, got out.shape={tuple(out.shape)}"
            )
    _swizzle_padded_into(_padded(stacked.transpose(1, 2), npad, cp), _bytes(out))
    return out


def make_b_k_major(b: torch.Tensor) -> torch.Tensor:
    """Packed weight codes [E, K/2, N] -> the same values with K/2 contiguous.

    Strides become (N*K/2, 1, K/2): storage [E, N, K/2] row-major, indexing still [e, k/2, n].
    The block-scaled MMA reads both operands K-major; this is done once at finalize.
    """
    _checks.tensor("b", b, (torch.uint8,), ndim=3)
    return b.transpose(1, 2).contiguous().transpose(1, 2)


TILE_ROWS, TILE_K = 16, 128  # make_b_tiled: weight rows and K elements of one 1 KiB chunk


def make_b_tiled(b: torch.Tensor) -> torch.Tensor:
    """Packed weight codes [E, K/2, N] -> the sm90 backend's tiled layout [E, N/16, K/128, 1024].

    Chunk [e, i, s] holds rows n = 16i .. 16i + 15, K elements 128s .. 128s + 127: rows 16i ..
    16i + 7 first, then 16i + 8 .. 16i + 15, 64 bytes each (byte c of row n at (n % 16 // 8) *
    512 + (n % 8) * 64 + c). That is the order of the swapped m16n8k16 MMA's weight fragments
    (row g and g + 8 of a 16-row tile, lane (g, t) holding 16 bytes of each): a warp's 16-byte
    loads of one K step read 512 contiguous bytes, where K-major rows give 8 runs of 64 bytes.
    Needs N % 16 == 0 and K % 128 == 0. Made once at finalize (`prepare_b`), like make_b_k_major.
    """
    _checks.tensor("b", b, (torch.uint8,), ndim=3)
    e, kh, n = b.shape
    if n % TILE_ROWS or (2 * kh) % TILE_K:
        raise ValueError(
            f"make_b_tiled needs N % {TILE_ROWS} == 0 and K % {TILE_K} == 0, got "
            f"b.shape={tuple(b.shape)} (K={2 * kh}, N={n})"
        )
    rows = b.transpose(1, 2).reshape(e, n // TILE_ROWS, 2, 8, 2 * kh // TILE_K, TILE_K // 2)
    return rows.permute(0, 1, 4, 2, 3, 5).reshape(e, n // TILE_ROWS, 2 * kh // TILE_K, 1024)


def b_dims(b: torch.Tensor) -> tuple[int, int, int]:
    """(E, K/2, N) of weight codes: [E, K/2, N] (any strides) or make_b_tiled's 4-D layout."""
    if b.dim() == 4:
        return b.shape[0], b.shape[2] * TILE_K // 2, b.shape[1] * TILE_ROWS
    e, kh, n = b.shape
    return e, kh, n
