"""Scale and weight layouts the block-scaled grouped GEMM reads (docs/design.md §3 "Scale layout").

A [R, C] scale matrix (R = rows of M or N, C = K/16) is zero-padded to [round_up(R, 128),
round_up(C, 4)] and stored as 512-byte atoms ("128x4", torch SWIZZLE_32_4_4, tcgen05 layout):
`swizzle_offset` is the closed form; `swizzle_scales` gets there by one reshape + permute of the
padded matrix, so the two are independent statements of the same layout and the tests pit them
against each other. Everything works on raw bytes (float8_e4m3fn viewed as uint8): moving scales
is a permutation, never a value cast, and padding bytes are 0x00 (+0.0).

Grouped 2Dx3D: the 2-D side (activations) pads and swizzles each group on its own, so group g's
scale rows start at sum_{j<g} round_up(T_j, 128) while its data rows start at sum_{j<g} T_j; the
3-D side (weights) is one swizzled block per expert of the transposed [N, K/16] scales. Offsets
are computed on the host from shapes: this is the oracle, not the graph-safe production path.
"""

from __future__ import annotations

import torch

ATOM_ROWS = 128  # rows of one 512-byte atom: 4 sub-blocks of 32 rows
ATOM_COLS = 4  # scale columns (K/16 blocks) of one atom
ATOM_BYTES = ATOM_ROWS * ATOM_COLS
_SCALE_DTYPES = (torch.float8_e4m3fn, torch.uint8)


# --------------------------------------------------------------------------------------------
# validation


def _check_scales(name: str, x: object, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name} must be float8_e4m3fn or uint8, got {name}.dtype={x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {name}.shape={tuple(x.shape)}")
    return x


def _check_count(name: str, v: object) -> int:
    # bool is an int subclass; True as a row count is a bug, not a 1
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {name}={v!r}")
    return v


def _check_counts_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {name}.dtype={t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got {name}.shape={tuple(t.shape)}")
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {name}={t.tolist()}")
    return t


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.view(torch.uint8)


# --------------------------------------------------------------------------------------------
# single matrix


def round_up(x: int, m: int) -> int:
    """Smallest multiple of m that is >= x (x >= 0, m > 0)."""
    _check_count("x", x)
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"m must be a positive int, got m={m!r}")
    return (x + m - 1) // m * m


def swizzled_numel(rows: int, cols: int) -> int:
    """Bytes of the swizzled layout of a [rows, cols] scale matrix, padding included."""
    return round_up(rows, ATOM_ROWS) * round_up(cols, ATOM_COLS)


def swizzle_offset(r: int, c: int, cols: int) -> int:
    """Closed-form byte offset of scale (r, c) of a matrix with `cols` columns.

    c may reach into the column padding (c < round_up(cols, 4)); any r >= 0 is an offset in the
    row padding or in a later row block.
    """
    _check_count("r", r)
    _check_count("c", c)
    _check_count("cols", cols)
    if c >= round_up(cols, ATOM_COLS):
        raise ValueError(f"c must be < round_up(cols, 4), got c={c} cols={cols}")
    n_cb = round_up(cols, ATOM_COLS) // ATOM_COLS
    return ((r // 128) * n_cb + c // 4) * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4


def pad_scales(scales: torch.Tensor) -> torch.Tensor:
    """[R, C] -> [round_up(R, 128), round_up(C, 4)], zero bytes in the padding, same dtype."""
    _check_scales("scales", scales, 2)
    rows, cols = scales.shape
    out = torch.zeros(
        round_up(rows, ATOM_ROWS),
        round_up(cols, ATOM_COLS),
        dtype=torch.uint8,
        device=scales.device,
    )
    out[:rows, :cols] = _as_bytes(scales)
    return out.view(scales.dtype)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """[R, C] scales -> 1-D [round_up(R, 128) * round_up(C, 4)] in the 128x4 layout, same dtype.

    The padded [Rp, Cp] matrix viewed as [Rp/128, 4, 32, Cp/4, 4] has row r = 128*rb + 32*r4 + r32
    and column c = 4*cb + c4; the atom stores (rb, cb) blocks in row-major order and, inside one,
    r32 major, then r4, then c4 — a permute to (rb, cb, r32, r4, c4).
    """
    _check_scales("scales", scales, 2)
    padded = _as_bytes(pad_scales(scales))
    rp, cp = padded.shape
    atoms = padded.reshape(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return atoms.reshape(-1).view(scales.dtype)


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `swizzle_scales`: 1-D swizzled bytes -> [rows, cols], padding dropped."""
    _check_scales("swizzled", swizzled, 1)
    _check_count("rows", rows)
    _check_count("cols", cols)
    need = swizzled_numel(rows, cols)
    if swizzled.numel() != need:
        raise ValueError(
            f"swizzled has {swizzled.numel()} elements but rows={rows} cols={cols} need "
            f"round_up(rows, 128) * round_up(cols, 4) = {need}"
        )
    rp, cp = round_up(rows, ATOM_ROWS), round_up(cols, ATOM_COLS)
    atoms = _as_bytes(swizzled).reshape(rp // 128, cp // 4, 32, 4, 4)
    padded = atoms.permute(0, 3, 2, 1, 4).reshape(rp, cp)  # back to (rb, r4, r32, cb, c4)
    return padded[:rows, :cols].contiguous().view(swizzled.dtype)


# --------------------------------------------------------------------------------------------
# grouped GEMM: offsets


def compute_expert_offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Tokens per expert [E] -> int32 [E] cumulative END offsets of each expert's data rows."""
    t = _check_counts_tensor("tokens_per_expert", tokens_per_expert)
    return torch.cumsum(t.to(torch.int64), dim=0).to(torch.int32)


def compute_blockscale_offsets(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Tokens per expert [E] -> int32 [E] START offsets of each group's swizzled scale rows.

    Exclusive cumsum of round_up(t, 128): every group is padded to whole 128-row atoms on its own,
    so the scale row start differs from the data row start as soon as one group is not a multiple
    of 128 (an empty group takes no rows).
    """
    t = _check_counts_tensor("tokens_per_expert", tokens_per_expert).to(torch.int64)
    padded = (t + ATOM_ROWS - 1) // ATOM_ROWS * ATOM_ROWS
    return (torch.cumsum(padded, dim=0) - padded).to(torch.int32)


# --------------------------------------------------------------------------------------------
# grouped GEMM: assembly


def assemble_scales_2d_side(
    scales_per_group: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation side: per-group [T_g, C] -> (1-D swizzled bytes, int32 [G] scale row starts).

    Each group is padded to round_up(T_g, 128) rows and swizzled independently, then the blocks
    are concatenated; group g's block begins at byte start_g * round_up(C, 4).
    """
    if not isinstance(scales_per_group, (list, tuple)) or not scales_per_group:
        raise ValueError(
            f"scales_per_group must be a non-empty list of [T_g, C] tensors, "
            f"got {scales_per_group!r}"
        )
    for g, s in enumerate(scales_per_group):
        _check_scales(f"scales_per_group[{g}]", s, 2)
    first = scales_per_group[0]
    for g, s in enumerate(scales_per_group):
        if s.shape[1] != first.shape[1] or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(
                f"scales_per_group[{g}] must match scales_per_group[0] in C, dtype and device, got "
                f"shape={tuple(s.shape)} dtype={s.dtype} device={s.device} vs "
                f"shape={tuple(first.shape)} dtype={first.dtype} device={first.device}"
            )
    tokens = torch.tensor([s.shape[0] for s in scales_per_group], dtype=torch.int64)
    starts = compute_blockscale_offsets(tokens).to(first.device)
    blocks = [_as_bytes(swizzle_scales(s)) for s in scales_per_group]
    return torch.cat(blocks).view(first.dtype), starts


def assemble_scales_2d_side_from_offsets(
    scales: torch.Tensor, expert_offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_total, C] scales split at int32 [E] cumulative END offsets, then assembled per group."""
    _check_scales("scales", scales, 2)
    offs = _check_counts_tensor("expert_offsets", expert_offsets)
    if offs.numel() == 0:
        raise ValueError(f"expert_offsets must hold one end offset per group, got {offs.tolist()}")
    ends = offs.tolist()  # host copy: the oracle may sync
    if any(b < a for a, b in zip(ends[:-1], ends[1:], strict=True)) or ends[-1] != scales.shape[0]:
        raise ValueError(
            f"expert_offsets must be non-decreasing and end at scales.shape[0]={scales.shape[0]}, "
            f"got expert_offsets={ends}"
        )
    starts = [0, *ends[:-1]]
    return assemble_scales_2d_side([scales[a:b] for a, b in zip(starts, ends, strict=True)])


def assemble_scales_3d_side(scales_per_expert: list[torch.Tensor]) -> torch.Tensor:
    """Weight side: per-expert [K/16, N] -> [E, round_up(N, 128) * round_up(K/16, 4)].

    The weight's scales come blocked along K (rows) but the MMA reads them with N as the row
    (M/N) dim, so each is transposed to [N, K/16] before it is swizzled.
    """
    if not isinstance(scales_per_expert, (list, tuple)) or not scales_per_expert:
        raise ValueError(
            f"scales_per_expert must be a non-empty list of [K/16, N] tensors, "
            f"got {scales_per_expert!r}"
        )
    for e, s in enumerate(scales_per_expert):
        _check_scales(f"scales_per_expert[{e}]", s, 2)
    first = scales_per_expert[0]
    for e, s in enumerate(scales_per_expert):
        if s.shape != first.shape or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(
                f"scales_per_expert[{e}] must match scales_per_expert[0] in shape, dtype and "
                f"device, got shape={tuple(s.shape)} dtype={s.dtype} device={s.device} vs "
                f"shape={tuple(first.shape)} dtype={first.dtype} device={first.device}"
            )
    blocks = [_as_bytes(swizzle_scales(s.t())) for s in scales_per_expert]
    return torch.stack(blocks).view(first.dtype)


def make_b_k_major(b: torch.Tensor) -> torch.Tensor:
    """Packed weight codes [E, K/2, N] -> same shape and values, K/2 the contiguous dim.

    The block-scaled MMA wants both operands K-major (K contiguous); the weights arrive N-major
    from `quantize_weight_nvfp4`. The returned view has strides (N*K/2, 1, K/2): the storage is
    [E, N, K/2] row-major, so stride(-2) == 1 while indexing stays [e, k/2, n].
    """
    if not isinstance(b, torch.Tensor):
        raise ValueError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.dtype != torch.uint8:
        raise ValueError(f"b must be uint8 packed E2M1 codes, got b.dtype={b.dtype}")
    if b.dim() != 3:
        raise ValueError(f"b must be 3-D [E, K/2, N], got b.shape={tuple(b.shape)}")
    return b.transpose(-1, -2).contiguous().transpose(-1, -2)
