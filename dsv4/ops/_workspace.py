"""Caller-owned scratch memory for the ops' temporaries, so a runner's run() allocates nothing.

A runner allocates one uint8 arena at finalize, sized with the ops' `*_workspace_bytes` helpers
for its largest shapes, and hands it to every op it calls (`workspace=`). Inside an op a
`Workspace` cuts the arena into typed views by bumping an offset: no allocator is involved, so
the same shapes give the same addresses call after call (what a CUDA graph replays into). An op's
temporaries live only while it runs, so each op starts again at the arena's beginning; an op that
calls another passes it `rest()`. Without an arena (`Workspace(None, device)`) `empty` allocates:
standalone calls keep working as before.

Sizing is single-source: each op declares its temporaries in one function that takes either a
`Workspace` or a `Sizer` (same `empty` interface), so the byte count and the views cannot drift
apart. An arena too small for a call raises (never a silent allocation).

`scalar(value, dtype)` gives cached 0-d CPU tensors for constants. A Python number passed where an
op takes a Tensor is wrapped into a fresh 0-d CPU tensor on every call (an allocation the CPU
profiler sees; on CUDA it stays on the host); a 0-d CPU tensor of the operand's dtype is used as
is, on CPU and, as a CPU scalar, by CUDA kernels too (the same kernel path as a wrapped number,
so the same bits).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

ALIGN = 64  # bytes; every view starts on a multiple (any dtype's alignment)


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


class Sizer:
    """Counts the bytes the declared temporaries need (returns meta tensors of their shape)."""

    def __init__(self) -> None:
        self.off = 0

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        self.off += -(-math.prod(shape) * _itemsize(dtype) // ALIGN) * ALIGN
        return torch.empty(tuple(shape), dtype=dtype, device="meta")

    def rest(self) -> Sizer:
        return self


class Workspace:
    """Typed views cut from a uint8 arena (or fresh tensors when the arena is None)."""

    __slots__ = ("buf", "device", "off")

    def __init__(self, buf: torch.Tensor | None, device: torch.device | None = None) -> None:
        if buf is not None and (buf.dtype != torch.uint8 or buf.dim() != 1):
            raise ValueError(
                f"workspace must be a 1-D uint8 tensor, got dtype={buf.dtype} "
                f"shape={tuple(buf.shape)}"
            )
        self.buf = buf
        self.device = buf.device if buf is not None else device
        self.off = 0

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        if self.buf is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        n = math.prod(shape) * _itemsize(dtype)
        start, end = self.off, self.off + n
        if end > self.buf.numel():
            raise ValueError(
                f"workspace too small: needs more than {end} bytes, got {self.buf.numel()} "
                f"(size it with the op's *_workspace_bytes helper)"
            )
        self.off = -(-end // ALIGN) * ALIGN
        return self.buf[start:end].view(dtype).view(shape)

    def rest(self) -> torch.Tensor | None:
        """The arena past the views handed out so far (for a nested op), or None."""
        return None if self.buf is None else self.buf[self.off :]


def as_workspace(workspace: Workspace | Sizer | torch.Tensor | None, device) -> Workspace | Sizer:
    if isinstance(workspace, (Workspace, Sizer)):
        return workspace
    return Workspace(workspace, device)


@functools.cache
def scalar(value: float | int, dtype: torch.dtype) -> torch.Tensor:
    """A cached 0-d CPU tensor holding `value` in `dtype` (never write to it)."""
    return torch.tensor(value, dtype=dtype)


def cumsum_small(src: torch.Tensor, out: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """Inclusive cumsum of a short 1-D `src` into `out`, allocation-free on CUDA too.

    torch.cumsum of a 1-D CUDA tensor runs cub, whose scratch comes from the caching allocator
    on every call; a scan along dim 0 of an [n, 2] tensor takes the outer-dim kernel, which
    needs none. `pair` is int scratch [2, n, 2]: src is its column, 0 the other one. Exact
    (integers), so the values equal torch.cumsum's.
    """
    a, b = pair[0], pair[1]
    a[:, 0].copy_(src)
    a[:, 1].zero_()
    torch.cumsum(a, dim=0, out=b)
    return out.copy_(b[:, 0])
