"""SwiGLU with a limit, in every variant the field uses, so a kernel's choice can be named.

DeepSeek V4 (docs/design.md §3) computes in fp32 on the L1 output [..., 2I]: gate = min(gate, L);
up = clamp(up, -L, L); h = silu(gate) * up. Gate is the first half, up the second, unless the
weights were stacked the other way (`gate_first=False`). Other kernels clamp after the product,
clamp only from above after the product, clamp silu(gate) instead of gate (SwigluStep), skip the
clamp, or apply the clamp to the raw GEMM accumulator before the alpha = gsa * gsb multiply
(`pre_alpha`). Each is expressible here, and
`clamp_active_mask` says where a clamp changes a value: only there can two variants disagree.
Everything is computed in fp32 whatever the input dtype; silu(x) = x * sigmoid(x) as torch does it.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F


class SwigluVariant(enum.Enum):
    """Where the limit L is applied."""

    DSV4 = "dsv4"  # gate = min(gate, L); up = clamp(up, -L, L); h = silu(gate) * up (the default)
    CLAMP_AFTER_PRODUCT = "clamp_after_product"  # h = clamp(silu(gate) * up, -L, L)
    CLAMP_AFTER_PRODUCT_UPPER = "clamp_after_product_upper"  # h = min(silu(gate) * up, L)
    SWIGLU_STEP = "swiglu_step"  # h = min(silu(gate), L) * clamp(up, -L, L)
    NO_CLAMP = "no_clamp"  # h = silu(gate) * up, limit ignored


# Variants whose every clamp acts on gate or up themselves, so it can be done on the raw GEMM
# accumulator. CLAMP_AFTER_PRODUCT and SWIGLU_STEP clamp after the nonlinearity: no raw-unit form.
_RAW_CLAMPABLE = (SwigluVariant.DSV4, SwigluVariant.NO_CLAMP)


def _check(
    l1_out: torch.Tensor, limit: float | None, variant: SwigluVariant, pre_alpha: object
) -> None:
    if not isinstance(l1_out, torch.Tensor) or not l1_out.dtype.is_floating_point:
        got = l1_out.dtype if isinstance(l1_out, torch.Tensor) else type(l1_out).__name__
        raise ValueError(f"l1_out must be a floating-point tensor, got {got}")
    if l1_out.dim() == 0 or l1_out.shape[-1] % 2:
        raise ValueError(
            "l1_out last dim must be even (2*I: gate and up), "
            f"got l1_out.shape={tuple(l1_out.shape)}"
        )
    if not isinstance(variant, SwigluVariant):
        raise ValueError(f"variant must be a SwigluVariant, got {variant!r}")
    if limit is not None and not limit > 0:  # `not >` also rejects NaN
        raise ValueError(f"limit must be > 0 or None, got {limit=}")
    if pre_alpha is not None and limit is not None and variant not in _RAW_CLAMPABLE:
        raise ValueError(
            f"pre_alpha (clamp in raw GEMM units) needs a variant that clamps gate/up only "
            f"({', '.join(v.name for v in _RAW_CLAMPABLE)}), got {variant=}"
        )


def _split(l1_out: torch.Tensor, gate_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = l1_out.float().chunk(2, dim=-1)
    return (a, b) if gate_first else (b, a)


def _alpha(pre_alpha: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(pre_alpha, dtype=torch.float32, device=like.device)


def swiglu(
    l1_out: torch.Tensor,
    limit: float | None = 10.0,
    variant: SwigluVariant = SwigluVariant.DSV4,
    gate_first: bool = True,
    pre_alpha: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """[..., 2I] L1 output -> fp32 [..., I]: h = silu(gate) * up with the variant's clamps.

    `limit=None` (or NO_CLAMP) clamps nothing. `pre_alpha=None`: l1_out is the finished GEMM
    output (alpha already applied) and L is in those units.
    `pre_alpha=alpha` (scalar, or a tensor broadcastable to [..., I], e.g. [T, 1] per row): l1_out
    is the raw fp32 accumulator sum(code_a*scale_a * code_b*scale_b), and the kernel clamps THAT:
        gate = min(gate_raw, L) * alpha;  up = clamp(up_raw, -L, L) * alpha;  h = silu(gate) * up
    i.e. an effective limit of L * alpha in true units. With no clamp active this is bit for bit
    swiglu(l1_out * alpha). Only DSV4 and NO_CLAMP have a raw-unit form (ValueError otherwise).
    """
    _check(l1_out, limit, variant, pre_alpha)
    gate, up = _split(l1_out, gate_first)
    lim = None if variant is SwigluVariant.NO_CLAMP else limit
    if lim is not None and variant in (SwigluVariant.DSV4, SwigluVariant.SWIGLU_STEP):
        up = up.clamp(-lim, lim)
    if lim is not None and variant is SwigluVariant.DSV4:
        gate = gate.clamp(max=lim)
    if pre_alpha is not None:
        alpha = _alpha(pre_alpha, l1_out)
        gate, up = gate * alpha, up * alpha
    act = F.silu(gate)
    if lim is not None and variant is SwigluVariant.SWIGLU_STEP:
        act = act.clamp(max=lim)
    h = act * up
    if lim is not None and variant is SwigluVariant.CLAMP_AFTER_PRODUCT:
        h = h.clamp(-lim, lim)
    if lim is not None and variant is SwigluVariant.CLAMP_AFTER_PRODUCT_UPPER:
        h = h.clamp(max=lim)
    return h


def variant_label(variant: SwigluVariant, gate_first: bool = True) -> str:
    """How a (variant, gate/up order) pair is named in results: "dsv4", "no_clamp+up_first"."""
    return variant.value + ("" if gate_first else "+up_first")


def clamp_active_mask(
    l1_out: torch.Tensor,
    limit: float | None = 10.0,
    variant: SwigluVariant = SwigluVariant.DSV4,
    gate_first: bool = True,
    pre_alpha: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """bool [..., I]: True where one of the variant's clamps changes a value (NaN never counts).

    Outside this mask the variant equals NO_CLAMP bit for bit, so two variants can differ only
    where the union of their masks is True.
    """
    _check(l1_out, limit, variant, pre_alpha)
    gate, up = _split(l1_out, gate_first)
    none = torch.zeros(gate.shape, dtype=torch.bool, device=gate.device)
    if limit is None or variant is SwigluVariant.NO_CLAMP:
        return none
    if variant is SwigluVariant.DSV4:  # raw or not, the clamp compares the same numbers to L
        return (gate > limit) | (up.abs() > limit)
    # the remaining variants have no pre_alpha form (_check refused it)
    if variant is SwigluVariant.SWIGLU_STEP:
        return (F.silu(gate) > limit) | (up.abs() > limit)
    if variant is SwigluVariant.CLAMP_AFTER_PRODUCT_UPPER:
        return F.silu(gate) * up > limit
    assert variant is SwigluVariant.CLAMP_AFTER_PRODUCT
    return (F.silu(gate) * up).abs() > limit
