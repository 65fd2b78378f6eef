"""The portable `torch` grouped-GEMM backend (any device, CPU in CI), registered at priority 0.

It unswizzles both scale layouts itself, dequantizes both operands to fp32 (code * scale is
exact, docs/design.md §3), multiplies per expert in fp32, applies alpha = gsa[e] * gsb[e] in fp32
and casts once to bf16. Trade-off: to slice each expert's rows it reads the offsets on the host
(free on CPU, one device-to-host copy on CUDA). On CUDA it takes by default a sync-free form that
multiplies every row by every expert and keeps each row's own result: E times the FLOPs,
graph-capturable. One body serves both call forms: with a `workspace` (bytes from
`torch_gemm_workspace_bytes`) it allocates nothing, without one its temporaries are fresh tensors.
"""

from __future__ import annotations

import torch

from dsv4.ops._workspace import Sizer, Workspace, cumsum_small, scalar
from dsv4.ops.gemm import any_device, register_backend
from dsv4.ops.layouts import ATOM_COLS, ATOM_ROWS, round_up
from dsv4.ops.quantize import BLOCK


def _host_ends(offsets: torch.Tensor, t: int, scale_a: torch.Tensor, c: int) -> list[int]:
    """Offsets as host ints, checked (the host path has them anyway, so it checks them)."""
    ends = offsets.tolist()
    prev, need = 0, 0
    for i, end in enumerate(ends):
        if end < prev:
            raise ValueError(
                f"expert_offsets must be non-decreasing and >= 0, got expert_offsets[{i}]={end} "
                f"after {prev}"
            )
        need += round_up(end - prev, ATOM_ROWS)
        prev = end
    if ends[-1] > t:
        raise ValueError(f"expert_offsets[-1]={ends[-1]} exceeds T={t} (mat_a.shape[0])")
    need *= round_up(c, ATOM_COLS)
    if scale_a.numel() < need:
        raise ValueError(
            f"scale_a holds {scale_a.numel()} bytes but expert_offsets={ends} need {need}"
        )
    return ends


def _gemm_buffers(ws: Workspace | Sizer, t: int, k: int, n: int, e: int, n_gs: int) -> tuple:
    c, i64, f32 = k // BLOCK, torch.int64, torch.float32
    return (
        ws.empty((n_gs,), f32),  # alpha
        ws.empty((16,), f32),  # E2M1 table
        *(ws.empty((e,), i64) for _ in range(4)),  # ends, tokens, padded, scale starts
        ws.empty((2, e, 2), i64),  # cumsum scratch
        *(ws.empty((t,), i64) for _ in range(4)),  # rows, group, scale row, scratch
        *(ws.empty((c,), i64) for _ in range(2)),  # column part of A's scale offsets
        ws.empty((t, c), i64),  # A's scale offsets
        ws.empty((t, c), torch.uint8),  # A's scale bytes
        ws.empty((t, c), f32),  # A's scales
        ws.empty((max(t, n), k // 2, 2), torch.uint8),  # nibbles (A, then each B)
        ws.empty((max(t, n), k // 2, 2), i64),  # nibble codes as indices
        ws.empty((t, k), f32),  # A dequantized
        ws.empty((round_up(n, ATOM_ROWS), round_up(c, ATOM_COLS)), torch.uint8),  # B's scales
        ws.empty((n, c), f32),
        ws.empty((n, k), f32),  # B dequantized, [N, K] storage: read as [K, N] (1, K) strides
        ws.empty((t, n), f32),  # accumulator
        ws.empty((t, n), torch.bfloat16),  # sync-free form: one expert's rows
        ws.empty((t, 1), torch.bool),
        ws.empty((t,), torch.int32),
    )


def torch_gemm_workspace_bytes(t: int, k: int, n: int, e: int, n_gs: int | None = None) -> int:
    """Workspace bytes of the torch backend for A [T, K/2] x B [E, K/2, N] (n_gs: entries of
    the larger global-scale vector, E by default)."""
    sizer = Sizer()
    _gemm_buffers(sizer, t, k, n, e, e if n_gs is None else n_gs)
    return sizer.off


def _e2m1_table_into(tab: torch.Tensor) -> torch.Tensor:
    """The 16 E2M1 values by code (8 is -0.0) written by scalar fills: no host copy."""
    for code, v in enumerate((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)):
        tab[code].fill_(v)
    return torch.neg(tab[:8], out=tab[8:])


def _decode_into(packed, tab, nib, idx, out) -> None:
    """Packed codes [R, K/2] -> values out [R, K] (fp32) via the table; nib / idx [R, K/2, 2]."""
    torch.bitwise_and(packed, scalar(0xF, torch.uint8), out=nib[..., 0])
    torch.bitwise_right_shift(packed, scalar(4, torch.uint8), out=nib[..., 1])
    idx.copy_(nib)
    torch.index_select(tab, 0, idx.view(-1), out=out.view(-1))


def _torch_gemm_ws(
    mat_a, mat_b, scale_a, scale_b, expert_offsets, gsa, gsb, out, ws, sync_free, ends
) -> None:
    """The torch backend's one body: every temporary comes from `ws` (an arena: nothing is
    allocated; `Workspace(None)`: fresh tensors). A and B are dequantized exactly in fp32 and
    each expert's rows are one fp32 matmul, alpha on the fp32 accumulator."""
    t, kh = mat_a.shape
    e, _, n = mat_b.shape
    k, c = 2 * kh, 2 * kh // BLOCK
    i64 = torch.int64
    n_gs = max(gsa.numel(), gsb.numel())
    (
        alpha_buf,
        tab,
        ends_d,
        tokens,
        padded,
        sstart,
        pair,
        rows,
        group,
        big_r,
        x,
        colp,
        colx,
        sidx,
        sbytes,
        sa,
        nib,
        idx,
        a,
        bsc,
        sb,
        bnk,
        acc,
        one,
        mask,
        rows32,
    ) = _gemm_buffers(ws, t, k, n, e, n_gs)
    torch.mul(gsa.reshape(-1), gsb.reshape(-1), out=alpha_buf)
    alpha = alpha_buf.expand(e)  # fp32
    _e2m1_table_into(tab)
    # A's scale byte offsets: data row r of group g at scale row R = start_g + r - data_start_g
    ends_d.copy_(expert_offsets)
    tokens[:1].copy_(ends_d[:1])
    torch.sub(ends_d[1:], ends_d[:-1], out=tokens[1:])
    torch.add(tokens, scalar(ATOM_ROWS - 1, i64), out=padded)
    padded.div_(scalar(ATOM_ROWS, i64), rounding_mode="floor").mul_(scalar(ATOM_ROWS, i64))
    cumsum_small(padded, sstart, pair).sub_(padded)  # scale row starts
    torch.arange(t, out=rows)
    torch.searchsorted(ends_d, rows, right=True, out=group).clamp_(max=e - 1)
    torch.index_select(sstart, 0, group, out=big_r).add_(rows)
    torch.index_select(ends_d, 0, group, out=x)
    big_r.sub_(x)
    torch.index_select(tokens, 0, group, out=x)
    big_r.add_(x)  # R = start_g + r - (end_g - tokens_g), >= 0
    # 128x4 offset of (R, col): ((R // 128) * n_cb + col // 4) * 512 + (R % 32) * 16
    # + ((R // 32) % 4) * 4 + col % 4, split into a row part and a column part (R, col >= 0)
    n_cb = round_up(c, ATOM_COLS) // ATOM_COLS
    torch.arange(c, out=colp)
    torch.bitwise_right_shift(colp, scalar(2, i64), out=colx).mul_(scalar(512, i64))
    colp.bitwise_and_(scalar(3, i64)).add_(colx)
    torch.bitwise_right_shift(big_r, scalar(7, i64), out=rows).mul_(scalar(n_cb * 512, i64))
    torch.bitwise_and(big_r, scalar(31, i64), out=x).mul_(scalar(16, i64))
    rows.add_(x)
    torch.bitwise_right_shift(big_r, scalar(5, i64), out=x).bitwise_and_(scalar(3, i64))
    rows.add_(x.mul_(scalar(4, i64)))
    torch.add(rows.unsqueeze(1), colp.unsqueeze(0), out=sidx).clamp_(max=scale_a.numel() - 1)
    torch.take(scale_a.view(torch.uint8), sidx, out=sbytes)
    sa.copy_(sbytes.view(torch.float8_e4m3fn))
    _decode_into(mat_a, tab, nib[:t], idx[:t], a)
    a.view(t, c, BLOCK).mul_(sa.unsqueeze(-1))
    # B per expert: unswizzle its scales, decode, scale (all exact), then the same matmul
    n_pad, c_pad = bsc.shape
    b = bnk.t()  # [K, N], strides (1, K)
    if sync_free:
        torch.arange(t, out=rows32)
        torch.searchsorted(expert_offsets, rows32, right=True, out=group)
    for ei in range(e):
        if not sync_free and (ends[ei] == (ends[ei - 1] if ei else 0)):
            continue
        atoms = scale_b[ei].view(torch.uint8).view(n_pad // 128, c_pad // 4, 32, 4, 4)
        bsc.view(n_pad // 128, 4, 32, c_pad // 4, 4).copy_(atoms.permute(0, 3, 2, 1, 4))
        sb.copy_(bsc[:n, :c].view(torch.float8_e4m3fn))
        _decode_into(mat_b[ei].t(), tab, nib[:n], idx[:n], bnk)
        bnk.view(n, c, BLOCK).mul_(sb.unsqueeze(-1))
        if sync_free:
            torch.mm(a, b, out=acc)
            acc.mul_(alpha[ei])
            one.copy_(acc)
            torch.eq(group, scalar(ei, i64), out=mask.view(-1))
            torch.where(mask, one, out, out=out)
        else:
            start, end = (ends[ei - 1] if ei else 0), ends[ei]
            rows_acc = acc[: end - start]
            torch.mm(a[start:end], b, out=rows_acc)
            rows_acc.mul_(alpha[ei])  # alpha on the fp32 accumulator
            out[start:end].copy_(rows_acc)


def torch_grouped_gemm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    expert_offsets: torch.Tensor,
    global_scale_a: torch.Tensor,
    global_scale_b: torch.Tensor,
    out: torch.Tensor,
    *,
    sync_free: bool | None = None,
    workspace: torch.Tensor | None = None,
) -> None:
    """The torch backend; `sync_free=None` means sync-free on CUDA, host-sliced on CPU.

    With `workspace` (uint8 1-D, `torch_gemm_workspace_bytes(T, K, N, E)` bytes) every
    temporary lives there: nothing is allocated. The host-sliced form reads the offsets on the
    host (`tolist`) and runs each expert on its own rows: free on CPU, but a device-to-host copy
    and a stream sync on CUDA. So on CUDA the default is the sync-free form (every row times
    every expert, each row keeping its own expert's result: E times the FLOPs), which keeps the
    runners' promise that run() never syncs; a caller who prefers speed to that promise passes
    sync_free=False. The sm90 / sm100 backends read the offsets on the device instead."""
    t, kh = mat_a.shape
    e, _, n = mat_b.shape
    c = 2 * kh // BLOCK
    if sync_free is None:
        sync_free = out.device.type == "cuda"
    ends = None if sync_free else _host_ends(expert_offsets, t, scale_a, c)
    if t == 0 or scale_a.numel() == 0:  # no tokens, or no group holds a row (offsets[-1] == 0)
        return
    ws = Workspace(workspace, out.device)  # None: every temporary is a fresh tensor
    _torch_gemm_ws(
        mat_a,
        mat_b,
        scale_a,
        scale_b,
        expert_offsets,
        global_scale_a,
        global_scale_b,
        out,
        ws,
        sync_free,
        ends,
    )


register_backend(
    "torch", torch_grouped_gemm, any_device, workspace_bytes=torch_gemm_workspace_bytes
)
