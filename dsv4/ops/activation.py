"""DeepSeek V4 SwiGLU with a limit, fused with the static NVFP4 requantization of its output.

On the L1 output [..., 2I] (gate = first half, up = second half), in fp32 (DESIGN.md §3):
gate = min(gate, L); up = clamp(up, -L, L); h = silu(gate) * up; then h is quantized with the
calibrated global scale exactly as `quantize_activation_nvfp4` does. `limit=None` clamps nothing.
silu is torch's (x * sigmoid(x) as F.silu computes it on that device), so a fused kernel that
evaluates it differently may differ by an ulp before quantization: the harness classifies that.
This torch version composes the steps; it allocates only temporaries and reads no value on the
host, so with outputs given it is CUDA-graph capturable. It is a custom op, opaque to compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.ops import _checks
from dsv4.ops.quantize import BLOCK, quantize_into

DEFAULT_SWIGLU_LIMIT = 10.0


def swiglu(l1_out: torch.Tensor, limit: float | None = DEFAULT_SWIGLU_LIMIT) -> torch.Tensor:
    """[..., 2I] -> fp32 [..., I]: silu(min(gate, L)) * clamp(up, -L, L), gate first."""
    _check_l1("l1_out", l1_out, multiple=1)
    return _swiglu(l1_out, _checks.positive_limit("limit", limit))


def _check_l1(name: str, l1_out: object, multiple: int = BLOCK) -> torch.Tensor:
    _checks.tensor(name, l1_out, _checks.FLOAT_INPUTS, min_ndim=1)
    if l1_out.shape[-1] % (2 * multiple):
        raise ValueError(
            f"{name} last dim must be 2*I with I a multiple of {multiple}, got "
            f"{name}.shape={tuple(l1_out.shape)}"
        )
    return l1_out


def _swiglu(l1_out: torch.Tensor, limit: float | None) -> torch.Tensor:
    gate, up = l1_out.float().chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


@torch.library.custom_op("dsv4::swiglu_quantize_nvfp4", mutates_args=("codes_out", "scales_out"))
def _swiglu_quantize_op(
    l1_out: torch.Tensor,
    global_scale: torch.Tensor,
    limit: float | None,
    codes_out: torch.Tensor,
    scales_out: torch.Tensor,
) -> None:
    quantize_into(_swiglu(l1_out, limit), global_scale.reshape(()), codes_out, scales_out)


@_swiglu_quantize_op.register_fake
def _(l1_out, global_scale, limit, codes_out, scales_out) -> None:
    return None


def swiglu_quantize(
    l1_out: torch.Tensor,
    global_scale: torch.Tensor,
    limit: float | None = DEFAULT_SWIGLU_LIMIT,
    codes_out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU (DeepSeek V4 clamp) of l1_out [..., 2I], requantized with the static gs.

    Returns (codes uint8 [..., I/2], scales e4m3 [..., I/16]), written into the outputs when
    given (then nothing is allocated for the results and nothing is read on the host).
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
    _swiglu_quantize_op(l1_out, gs, lim, codes_out, scales_out)
    return codes_out, scales_out
