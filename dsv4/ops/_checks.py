"""Argument checks shared by the ops: each raises ValueError naming the argument and its value.

They read only tensor metadata (dtype, shape, device), never tensor values, so calling them costs
no host sync and is safe inside CUDA-graph capture and torch.compile tracing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.float8_e4m3fn, torch.uint8)  # scale bytes, as e4m3 or raw


def need(cond: bool, msg: Callable[[], str]) -> None:
    """ValueError(msg()) unless cond: the message is built only on failure (formatting a CUDA
    tensor would read it on the host, which graph capture forbids, and costs time per call)."""
    if not cond:
        raise ValueError(msg())


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(
    name: str,
    x: object,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    min_ndim: int | None = None,
) -> torch.Tensor:
    """x must be a tensor of one of `dtypes`, with `ndim` (or at least `min_ndim`) dims."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must be {_names(dtypes)}, got {name}.dtype={x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {name}.shape={tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dims, got {name}.shape={tuple(x.shape)}"
        )
    return x


def shape(name: str, x: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)}, got {name}.shape={tuple(x.shape)}"
        )


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it. None entries are skipped."""
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        got = " ".join(f"{k}.device={v}" for k, v in devs.items())
        raise ValueError(f"tensors must be on one device, got {got}")
    return next(iter(devs.values()))


def global_scale(name: str, gs: object, device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor on `device` (a 0-d view of it); floats are not accepted here.

    A Python float would need a host-to-device copy per call, which the graph-safe paths must not
    do; callers that accept floats convert them before calling this.
    """
    tensor(name, gs, (torch.float32,))
    if gs.numel() != 1:
        raise ValueError(f"{name} must hold one value, got {name}.shape={tuple(gs.shape)}")
    if gs.device != device:
        raise ValueError(f"{name} must be on {device}, got {name}.device={gs.device}")
    return gs.reshape(())


def positive_limit(name: str, limit: object) -> float | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise ValueError(f"{name} must be a number > 0 or None, got {name}={limit!r}")
    return float(limit)


def workspace(workspace: object, device: torch.device, need: int) -> None:
    """None, or a 1-D uint8 tensor on `device` of at least `need` bytes (metadata only)."""
    if workspace is None:
        return
    tensor("workspace", workspace, (torch.uint8,), ndim=1)
    if workspace.device != device or workspace.numel() < need:
        raise ValueError(
            f"workspace must be on {device} with at least {need} bytes, got "
            f"workspace.device={workspace.device} workspace.numel()={workspace.numel()}"
        )
