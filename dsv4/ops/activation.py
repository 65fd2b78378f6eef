"""DeepSeek V4 SwiGLU with a limit, fused with the static NVFP4 requantization of its output.

On the L1 output [..., 2I] (gate = first half, up = second half), in fp32 (docs/design.md §3):
gate = min(gate, L); up = clamp(up, -L, L); h = silu(gate) * up; then h is quantized with the
calibrated global scale exactly as `quantize_activation_nvfp4` does. `limit=None` clamps nothing.
silu is torch's (x * sigmoid(x) as F.silu computes it on that device), so a fused kernel that
evaluates it differently may differ by an ulp before quantization: the harness classifies that.
This torch version composes the steps; it allocates only temporaries and reads no value on the
host, so with outputs given it is CUDA-graph capturable. It is a custom op, opaque to compile.
`swiglu_quantize(..., row_weight=w)` multiplies each row by w (the routed MoE's routing weight)
after the SwiGLU, before the quantization. `impl="cutedsl"` runs the one fused kernel of
dsv4/kernels/cutedsl instead (`select_quant_impl`); its silu is g / (1 + exp(-g)) as torch's
CUDA kernel evaluates it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsv4.ops import _checks
from dsv4.ops._workspace import Sizer, Workspace, as_workspace
from dsv4.ops.quantize import (
    BLOCK,
    _cutedsl_quantize,
    quantize_into,
    quantize_workspace_bytes,
    select_quant_impl,
)

DEFAULT_SWIGLU_LIMIT = 10.0


def swiglu(
    l1_out: torch.Tensor,
    limit: float | None = DEFAULT_SWIGLU_LIMIT,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., 2I] -> fp32 [..., I]: silu(min(gate, L)) * clamp(up, -L, L), gate first.

    With `out` (fp32 [..., I]) and `workspace` (uint8, `swiglu_workspace_bytes(l1_out.shape)`
    bytes) nothing is allocated; same bits either way.
    """
    _check_l1("l1_out", l1_out, multiple=1)
    lim = _checks.positive_limit("limit", limit)
    lead, i = tuple(l1_out.shape[:-1]), l1_out.shape[-1] // 2
    if out is None:
        out = torch.empty((*lead, i), dtype=torch.float32, device=l1_out.device)
    _checks.tensor("out", out, (torch.float32,))
    _checks.shape("out", out, (*lead, i))
    _checks.same_device(l1_out=l1_out, out=out)
    _checks.workspace(workspace, l1_out.device, swiglu_workspace_bytes(tuple(l1_out.shape)))
    ws = as_workspace(workspace, l1_out.device)
    _swiglu_into(l1_out, lim, out, _swiglu_buffers(ws, tuple(l1_out.shape)))
    return out


def _swiglu_buffers(ws: Workspace | Sizer, shape: tuple[int, ...]) -> torch.Tensor:
    return ws.empty(shape, torch.float32)


def swiglu_workspace_bytes(shape: tuple[int, ...]) -> int:
    """Workspace bytes `swiglu(..., out=)` needs for an L1 output of `shape` [..., 2I]."""
    sizer = Sizer()
    _swiglu_buffers(sizer, tuple(shape))
    return sizer.off


def swiglu_quantize_workspace_bytes(shape: tuple[int, ...]) -> int:
    """Workspace bytes `swiglu_quantize` needs for an L1 output of `shape` [..., 2I]."""
    sizer = Sizer()
    _swiglu_buffers(sizer, tuple(shape))
    half = (*shape[:-1], shape[-1] // 2)
    sizer.empty(half, torch.float32)
    return sizer.off + quantize_workspace_bytes(half)


def _check_l1(name: str, l1_out: object, multiple: int = BLOCK) -> torch.Tensor:
    _checks.tensor(name, l1_out, _checks.FLOAT_INPUTS, min_ndim=1)
    if l1_out.shape[-1] % (2 * multiple):
        raise ValueError(
            f"{name} last dim must be 2*I with I a multiple of {multiple}, got "
            f"{name}.shape={tuple(l1_out.shape)}"
        )
    return l1_out


def _swiglu_into(
    l1_out: torch.Tensor, limit: float | None, out: torch.Tensor, l1: torch.Tensor
) -> None:
    """silu(min(gate, L)) * clamp(up, -L, L) of l1_out written into out (fp32) through l1, an
    fp32 buffer of l1_out's shape: clamps, then silu, then the product, in place."""
    gate, up = l1.copy_(l1_out).chunk(2, dim=-1)
    if limit is not None:
        gate.clamp_(max=limit)
        up.clamp_(-limit, limit)
    torch.mul(F.silu(gate, inplace=True), up, out=out)


@torch.library.custom_op(
    "dsv4::swiglu_quantize_nvfp4", mutates_args=("codes_out", "scales_out", "workspace")
)
def _swiglu_quantize_op(
    l1_out: torch.Tensor,
    global_scale: torch.Tensor,
    limit: float | None,
    codes_out: torch.Tensor,
    scales_out: torch.Tensor,
    workspace: torch.Tensor | None,
    row_weight: torch.Tensor | None = None,
    impl: str = "torch",
) -> None:
    gs = global_scale.reshape(())
    if impl == "cutedsl":
        _cutedsl_quantize(l1_out, gs, codes_out, scales_out, row_weight, swiglu=True, limit=limit)
        return
    ws = Workspace(workspace, l1_out.device)  # None: every temporary is a fresh tensor
    l1 = _swiglu_buffers(ws, tuple(l1_out.shape))  # reserved first, as the sizing counts it
    h = ws.empty((*l1_out.shape[:-1], l1_out.shape[-1] // 2), torch.float32)
    _swiglu_into(l1_out, limit, h, l1)
    if row_weight is not None:
        h.mul_(row_weight.unsqueeze(-1))  # fp32, after the SwiGLU (the reference's order)
    quantize_into(h, gs, codes_out, scales_out, ws.rest())


@_swiglu_quantize_op.register_fake
def _(
    l1_out, global_scale, limit, codes_out, scales_out, workspace, row_weight=None, impl="torch"
) -> None:
    return None


def swiglu_quantize(
    l1_out: torch.Tensor,
    global_scale: torch.Tensor,
    limit: float | None = DEFAULT_SWIGLU_LIMIT,
    codes_out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU (DeepSeek V4 clamp) of l1_out [..., 2I], requantized with the static gs.

    Returns (codes uint8 [..., I/2], scales e4m3 [..., I/16]), written into the outputs when
    given (then nothing is allocated for the results and nothing is read on the host). With a
    `workspace` (uint8 1-D, `swiglu_quantize_workspace_bytes(l1_out.shape)` bytes) the
    temporaries live there too: nothing at all is allocated. `row_weight` (fp32 [T] for a
    [T, 2I] l1_out) multiplies row t after the SwiGLU. `impl`: see `select_quant_impl`.
    """
    _check_l1("l1_out", l1_out)
    lim = _checks.positive_limit("limit", limit)
    gs = _checks.global_scale("global_scale", global_scale, l1_out.device)
    lead, i = tuple(l1_out.shape[:-1]), l1_out.shape[-1] // 2
    if (codes_out is None) != (scales_out is None):
        raise ValueError("codes_out and scales_out must be given together")
    if codes_out is None:
        codes_out = torch.empty((*lead, i // 2), dtype=torch.uint8, device=l1_out.device)
        scales_out = torch.empty(
            (*lead, i // BLOCK), dtype=torch.float8_e4m3fn, device=l1_out.device
        )
    else:
        _checks.tensor("codes_out", codes_out, (torch.uint8,))
        _checks.tensor("scales_out", scales_out, (torch.float8_e4m3fn,))
        _checks.shape("codes_out", codes_out, (*lead, i // 2))
        _checks.shape("scales_out", scales_out, (*lead, i // BLOCK))
        _checks.same_device(l1_out=l1_out, codes_out=codes_out, scales_out=scales_out)
    need = swiglu_quantize_workspace_bytes(tuple(l1_out.shape))
    _checks.workspace(workspace, l1_out.device, need)
    if row_weight is not None:
        _checks.tensor("row_weight", row_weight, (torch.float32,), ndim=1)
        _checks.shape("row_weight", row_weight, (math.prod(lead),))
        _checks.same_device(l1_out=l1_out, row_weight=row_weight)
    impl = select_quant_impl(l1_out.device, impl)
    _swiglu_quantize_op(l1_out, gs, lim, codes_out, scales_out, workspace, row_weight, impl)
    return codes_out, scales_out
