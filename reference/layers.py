"""Reference layers: shared expert, routed MoE, grouped linear (wo_a), stage by stage.

Each layer is a plain function that returns `Stages`, an ordered dict of NAMED intermediates, so
the harness can compare and NaN-trace a kernel by stage (docs/design.md §1, §5). Weights arrive
in high precision and are quantized here, one global scale per expert / group, blocks along K
(`quantize_weight_nvfp4`, the serving code's `quantize_weight_to_nvfp4`); their stages ("w13_q",
"w2_q", "w_q") are (codes, scales, gs[E]). Activations are quantized per expert / group with the
given static global scale, or dynamically (gs None: from the amax of the tensor being quantized).
Every GEMM is `grouped_gemm_nvfp4` (a single expert is E=1, offsets [T]); `oracle=True` runs it in
float64 and rounds once to bf16, which makes results independent of summation order (used to
compare against per-token loops bit for bit).

`quantized=False` gives the unquantized twin: fp32 operands, fp32 matmuls, the same SwiGLU, fp32
outputs, the same stage names minus the quantized-operand ones (docs/design.md §5 level 3).
"""

from __future__ import annotations

import torch

from reference.activation import SwigluVariant, swiglu
from reference.gemm import grouped_gemm_nvfp4
from reference.nvfp4 import (
    BLOCK,
    global_scale_from_amax,
    quantize_nvfp4,
    quantize_weight_nvfp4,
    tensor_amax,
)

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (codes, scales, gs)


class Stages(dict):
    """Named intermediates of one layer call, in the order they were computed.

    Values are tensors or (codes, scales, gs) tuples of quantized operands.
    """

    def summary(self) -> str:
        """One line per stage: shape, dtype, strides and contiguity of each tensor."""

        def describe(t: torch.Tensor) -> str:
            contig = "contiguous" if t.is_contiguous() else "non-contiguous"
            return f"{tuple(t.shape)} {t.dtype} stride={t.stride()} {contig}"

        lines = []
        for name, v in self.items():
            parts = v if isinstance(v, tuple) else (v,)
            lines.append(f"{name}: " + " | ".join(describe(t) for t in parts))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# validation


def _check_float(name: str, x: object, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {name}.dtype={x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got {name}.shape={tuple(x.shape)}")
    return x


def _check_k(name: str, k: int, shape: tuple[int, ...]) -> None:
    if k % BLOCK:
        raise ValueError(
            f"{name} (a contraction dim) must be a multiple of {BLOCK}, got {k} from shape {shape}"
        )


def _check_expert_weights(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int]:
    """x [T, H], w13 [..., H, 2I], w2 [..., I, H] -> (H, I)."""
    h = x.shape[1]
    if w13.shape[-2] != h:
        raise ValueError(
            f"H mismatch: x.shape={tuple(x.shape)} but w13.shape={tuple(w13.shape)} "
            f"(w13 must be [..., H, 2I])"
        )
    two_i = w13.shape[-1]
    if two_i % 2:
        raise ValueError(
            f"w13 last dim (2I: gate and up) must be even, got w13.shape={tuple(w13.shape)}"
        )
    i = two_i // 2
    if tuple(w2.shape[-2:]) != (i, h):
        raise ValueError(
            f"w2 must be [..., I, H]={(i, h)} for w13.shape={tuple(w13.shape)} and "
            f"x.shape={tuple(x.shape)}, got w2.shape={tuple(w2.shape)}"
        )
    if w13.shape[:-2] != w2.shape[:-2]:
        raise ValueError(
            f"expert count mismatch: w13.shape={tuple(w13.shape)}, w2.shape={tuple(w2.shape)}"
        )
    if w13.dim() == 3 and w13.shape[0] == 0:
        raise ValueError(f"need at least one local expert, got w13.shape={tuple(w13.shape)}")
    _check_k("H", h, tuple(x.shape))
    _check_k("I", i, tuple(w2.shape))
    return h, i


def _global_scales(name: str, gs: object, n: int, device: torch.device) -> torch.Tensor:
    """A scalar or [n] decode-convention global scale -> fp32 [n]; must be finite and > 0."""
    t = torch.as_tensor(gs, dtype=torch.float32, device=device)
    if t.numel() == 1:
        t = t.reshape(1).expand(n)
    elif tuple(t.shape) != (n,):
        raise ValueError(
            f"{name} must be a scalar or hold {n} values, got {name}.shape={tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all() and (t > 0).all()):
        raise ValueError(f"{name} must be finite and > 0, got {name}={t.tolist()}")
    return t.contiguous()


def _dynamic_scales(x: torch.Tensor, n: int) -> torch.Tensor:
    """One scale from the amax of the whole tensor, expanded to [n] (0 amax -> 1.0)."""
    return global_scale_from_amax(tensor_amax(x)).to(x.device).reshape(1).expand(n).contiguous()


# --------------------------------------------------------------------------------------------
# building blocks


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(o) for o in offsets.tolist()]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def quantize_groups(x: torch.Tensor, offsets: torch.Tensor, gs: torch.Tensor) -> Quantized:
    """Rows of group g (offsets: cumulative END) quantized with gs[g] (fp32 [G]);
    -> (codes, scales, gs[G])."""
    parts = [
        quantize_nvfp4(x[start:end], gs[g])[:2]
        for g, (start, end) in enumerate(_group_bounds(offsets))
    ]
    assert parts, "at least one group"  # callers check E >= 1
    codes = torch.cat([p[0] for p in parts])
    scales = torch.cat([p[1] for p in parts])
    return codes, scales, gs


def _quantize_weights(w: torch.Tensor) -> Quantized:
    """w [E, K, N] -> (codes [E, K/2, N], scales [E, K/16, N], gs fp32 [E]), one gs per expert."""
    qs = [quantize_weight_nvfp4(w[e]) for e in range(w.shape[0])]
    return (
        torch.stack([q[0] for q in qs]),
        torch.stack([q[1] for q in qs]),
        torch.stack([q[2].reshape(()) for q in qs]),
    )


def _gemm(a_q: Quantized, b_q: Quantized, offsets: torch.Tensor, oracle: bool) -> torch.Tensor:
    """Quantized grouped GEMM -> bf16. oracle: float64 accumulation, rounded once to bf16."""
    out = grouped_gemm_nvfp4(
        a_q[0],
        a_q[1],
        b_q[0],
        b_q[1],
        offsets,
        a_q[2],
        b_q[2],
        out_dtype=torch.bfloat16,
        oracle=oracle,
    )
    return out.to(torch.bfloat16)


def _matmul_fp32(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Unquantized twin of the grouped GEMM: rows of group g times w[g], fp32."""
    out = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float32, device=x.device)
    for g, (start, end) in enumerate(_group_bounds(offsets)):
        if end > start:
            out[start:end] = x[start:end].float() @ w[g].float()
    return out


# --------------------------------------------------------------------------------------------
# shared expert


def shared_expert(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    limit: float | None = 10.0,
    variant: SwigluVariant = SwigluVariant.DSV4,
    gate_first: bool = True,
    gs1: torch.Tensor | float | None = None,
    gs2: torch.Tensor | float | None = None,
    quantized: bool = True,
    oracle: bool = False,
) -> Stages:
    """x [T, H], w13 [H, 2I] (gate | up), w2 [I, H] -> stages; "out" is bf16 [T, H].

    Stages (quantized): "w13_q", "w2_q", "x_q" = quant(x, gs1), "l1_out" bf16 [T, 2I],
    "act" = swiglu(l1_out) fp32 [T, I], "act_q" = quant(act, gs2), "l2_out" bf16 [T, H], "out".
    gs1 / gs2 None: dynamic (from the amax of x / act). Unquantized twin: "l1_out", "act",
    "l2_out", "out", all fp32.
    """
    _check_float("x", x, 2)
    _check_float("w13", w13, 2)
    _check_float("w2", w2, 2)
    _check_expert_weights(x, w13, w2)
    offsets = torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device)
    st = Stages()
    if not quantized:
        st["l1_out"] = _matmul_fp32(x, w13[None], offsets)
        st["act"] = swiglu(st["l1_out"], limit, variant, gate_first)
        st["l2_out"] = _matmul_fp32(st["act"], w2[None], offsets)
        st["out"] = st["l2_out"]
        return st
    gs1 = _dynamic_scales(x, 1) if gs1 is None else _global_scales("gs1", gs1, 1, x.device)
    st["w13_q"] = _quantize_weights(w13[None])
    st["w2_q"] = _quantize_weights(w2[None])
    st["x_q"] = quantize_groups(x, offsets, gs1)
    st["l1_out"] = _gemm(st["x_q"], st["w13_q"], offsets, oracle)
    st["act"] = swiglu(st["l1_out"], limit, variant, gate_first)
    act = st["act"]
    gs2 = _dynamic_scales(act, 1) if gs2 is None else _global_scales("gs2", gs2, 1, x.device)
    st["act_q"] = quantize_groups(act, offsets, gs2)
    st["l2_out"] = _gemm(st["act_q"], st["w2_q"], offsets, oracle)
    st["out"] = st["l2_out"]
    return st


def calibrate_shared_expert(
    sample: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    limit: float | None = 10.0,
    variant: SwigluVariant = SwigluVariant.DSV4,
    gate_first: bool = True,
    *,
    oracle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static activation scales (gs1, gs2), fp32 0-d, as the serving code calibrates (§2).

    gs1 = amax(sample) / (6*448); run the quantized L1 with gs1; gs2 = amax(swiglu(L1)) / (6*448).
    Running `shared_expert(sample, ..., gs1=gs1, gs2=gs2)` then equals the dynamic run on sample.
    """
    _check_float("sample", sample, 2)
    gs1 = global_scale_from_amax(tensor_amax(sample)).to(sample.device)
    st = shared_expert(
        sample, w13, w2, limit=limit, variant=variant, gate_first=gate_first, gs1=gs1, oracle=oracle
    )
    return gs1, global_scale_from_amax(tensor_amax(st["act"])).to(sample.device)


# --------------------------------------------------------------------------------------------
# routed MoE


def _route(
    topk_ids: torch.Tensor, first_expert: int, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local (token, slot) pairs sorted by local expert, stable by token then slot.

    Returns (gather_index: token per staged row, slot per staged row, expert_offsets int32 [E]).
    """
    t, k = topk_ids.shape
    local = topk_ids.long().reshape(-1) - first_expert
    valid = (local >= 0) & (local < n_experts)  # other ranks' experts and -1 drop out here
    flat = torch.arange(t * k, device=topk_ids.device)[valid]
    expert = local[valid]
    order = torch.sort(expert, stable=True).indices  # flat = token*k + slot is already ascending
    flat, expert = flat[order], expert[order]
    counts = torch.bincount(expert, minlength=n_experts)
    return flat // k, flat % k, counts.cumsum(0).to(torch.int32)


def _combine(rows: torch.Tensor, token: torch.Tensor, slot: torch.Tensor, t: int, k: int):
    """out[t] = sum over slots s = 0..k-1 of the row of (t, s), in fp32, left to right.

    The order is fixed (slot order, not expert order) so a per-token loop gets the same bits.
    Slots with no local row add 0.
    """
    buf = torch.zeros(t, k, rows.shape[1], dtype=torch.float32, device=rows.device)
    buf[token, slot] = rows.float()
    out = torch.zeros(t, rows.shape[1], dtype=torch.float32, device=rows.device)
    for s in range(k):
        out = out + buf[:, s]
    return out


def _check_routing(
    x: torch.Tensor, topk_ids: object, topk_weights: object, first_expert: object
) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
        got = topk_ids.dtype if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
        raise ValueError(f"topk_ids must be int32 or int64 (global expert ids), got {got}")
    _check_float("topk_weights", topk_weights, 2)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids must be [T, k] with T={x.shape[0]} (x.shape={tuple(x.shape)}), "
            f"got topk_ids.shape={tuple(topk_ids.shape)}"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights.shape={tuple(topk_weights.shape)} must equal "
            f"topk_ids.shape={tuple(topk_ids.shape)}"
        )
    if not isinstance(first_expert, int) or isinstance(first_expert, bool) or first_expert < 0:
        raise ValueError(f"first_expert must be an int >= 0, got {first_expert=}")


def _check_scaling_factor(f: object) -> None:
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not (0 < f < float("inf")):
        raise ValueError(f"routed_scaling_factor must be a finite number > 0, got {f!r}")


def routed_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    first_expert: int = 0,
    limit: float | None = 10.0,
    variant: SwigluVariant = SwigluVariant.DSV4,
    gate_first: bool = True,
    weight_after_w2: bool = False,
    routed_scaling_factor: float = 1.0,
    gs1: torch.Tensor | float | None = None,
    gs2: torch.Tensor | float | None = None,
    quantized: bool = True,
    oracle: bool = False,
) -> Stages:
    """Local experts of one expert-parallel rank: x [T, H] -> "out" bf16 [T, H] (fp32 twin).

    topk_ids [T, k] are GLOBAL ids; local = id - first_expert, and ids outside [0, E_local)
    (other ranks' experts, -1) contribute nothing. w13 [E_local, H, 2I], w2 [E_local, I, H].
    Staged rows: the (token, slot) pairs with a local expert, grouped by expert, stable by token.
    The routing weight multiplies h = swiglu(L1) in fp32 BEFORE the L2 quantization (DeepSeek's
    reference, DeepGEMM); `weight_after_w2=True` multiplies the fp32 L2 rows instead
    (transformers), so "act" is unweighted. out[t] is the fp32 sum over t's slots, in slot order,
    of its (weighted) L2 rows, cast to bf16.
    The routing weight of a row is fp32(topk_weights) * routed_scaling_factor (fp32): DeepSeek V4's
    gate multiplies the normalized top-k weights by the factor; weights that already include it
    (the gate's output, as the harness passes them by default) come with the factor 1.0, which
    is exact, so both ways give the same bits.
    gs1 / gs2: scalar or fp32 [E_local]; None = dynamic, one scale from the amax of the whole
    staged tensor, expanded to [E_local].
    Stages: "w13_q", "w2_q", "expert_offsets" int32 [E_local] (cumulative END), "gather_index"
    int64 [R] (token of each staged row), "row_weight" fp32 [R, 1] (its routing weight),
    "x_q" (codes [R, H/2], scales, gs1 [E_local]), "l1_out"
    bf16 [R, 2I], "act" fp32 [R, I] (weighted), "act_q", "l2_out" bf16 [R, H], "out".
    Unquantized twin: "expert_offsets", "gather_index", "row_weight", "l1_out", "act", "l2_out",
    "out" (fp32).
    """
    _check_float("x", x, 2)
    _check_float("w13", w13, 3)
    _check_float("w2", w2, 3)
    _check_expert_weights(x, w13, w2)
    _check_routing(x, topk_ids, topk_weights, first_expert)
    _check_scaling_factor(routed_scaling_factor)
    t, k = topk_ids.shape
    n_experts = w13.shape[0]
    token, slot, offsets = _route(topk_ids, first_expert, n_experts)
    weight = (topk_weights.float()[token, slot] * routed_scaling_factor).unsqueeze(1)
    staged = x[token]

    st = Stages()
    if quantized:
        st["w13_q"] = _quantize_weights(w13)
        st["w2_q"] = _quantize_weights(w2)
    st["expert_offsets"] = offsets
    st["gather_index"] = token
    st["row_weight"] = weight
    w_act, w_l2 = (1.0, weight) if weight_after_w2 else (weight, 1.0)
    if not quantized:
        st["l1_out"] = _matmul_fp32(staged, w13, offsets)
        st["act"] = swiglu(st["l1_out"], limit, variant, gate_first) * w_act
        st["l2_out"] = _matmul_fp32(st["act"], w2, offsets)
        st["out"] = _combine(st["l2_out"] * w_l2, token, slot, t, k)
        return st
    if gs1 is None:
        gs1 = _dynamic_scales(staged, n_experts)
    gs1 = _global_scales("gs1", gs1, n_experts, x.device)
    st["x_q"] = quantize_groups(staged, offsets, gs1)
    st["l1_out"] = _gemm(st["x_q"], st["w13_q"], offsets, oracle)
    st["act"] = swiglu(st["l1_out"], limit, variant, gate_first) * w_act
    if gs2 is None:
        gs2 = _dynamic_scales(st["act"], n_experts)
    gs2 = _global_scales("gs2", gs2, n_experts, x.device)
    st["act_q"] = quantize_groups(st["act"], offsets, gs2)
    st["l2_out"] = _gemm(st["act_q"], st["w2_q"], offsets, oracle)
    st["out"] = _combine(st["l2_out"].float() * w_l2, token, slot, t, k).to(torch.bfloat16)
    return st


def calibrate_routed_moe(
    sample: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    first_expert: int = 0,
    limit: float | None = 10.0,
    variant: SwigluVariant = SwigluVariant.DSV4,
    gate_first: bool = True,
    weight_after_w2: bool = False,
    routed_scaling_factor: float = 1.0,
    oracle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static activation scales (gs1, gs2), fp32 [E_local] each, as the shared expert calibrates.

    gs1 from the amax of the staged rows (the sample's tokens this rank's experts receive); run
    L1 with it; gs2 from the amax of the weighted SwiGLU output (the tensor L2 quantizes). So
    `routed_moe(sample, ..., gs1=gs1, gs2=gs2)` equals the dynamic run on the same sample.
    """
    st = routed_moe(
        sample,
        topk_ids,
        topk_weights,
        w13,
        w2,
        first_expert=first_expert,
        limit=limit,
        variant=variant,
        gate_first=gate_first,
        weight_after_w2=weight_after_w2,
        routed_scaling_factor=routed_scaling_factor,
        oracle=oracle,
    )
    return st["x_q"][2], st["act_q"][2]


# --------------------------------------------------------------------------------------------
# grouped linear (wo_a)


def _group_weights(w: object, g: int, d: int, r: int) -> torch.Tensor:
    """w [G, D, R] (bmm form) or [G*R, D] (dense: split per group, transposed) -> [G, D, R]."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() == 3:
        _check_float("w", w, 3)
        if tuple(w.shape) != (g, d, r):
            raise ValueError(
                f"bmm-form w must be [n_groups, D, o_lora_rank]={(g, d, r)}, got "
                f"w.shape={tuple(w.shape)}"
            )
        return w
    _check_float("w", w, 2)
    if tuple(w.shape) != (g * r, d):
        raise ValueError(
            f"dense-form w must be [n_groups*o_lora_rank, D]={(g * r, d)}, got "
            f"w.shape={tuple(w.shape)}"
        )
    return w.reshape(g, r, d).transpose(1, 2)  # contraction dim D becomes K


def grouped_linear(
    o: torch.Tensor,
    w: torch.Tensor,
    *,
    n_groups: int,
    o_lora_rank: int,
    gs: torch.Tensor | float | None = None,
    quantized: bool = True,
    oracle: bool = False,
) -> Stages:
    """The "bhr,hdr->bhd" o-projection: o [T, n_heads, head_dim] -> "out" z [T, G, R] bf16.

    o is viewed as [T, G, D], D = heads_per_group * head_dim; group g computes o[:, g] @ w[g]
    for every token (no routing), as a grouped GEMM of G groups of T rows, offsets (g+1)*T.
    w: [G, D, R] (bmm form) or [G*R, D] (dense form). gs: scalar or fp32 [G]; None = dynamic
    per group (each group's own amax). Stages: "w_q" (one gs per group), "x_q" (group-major rows
    [G*T, D/2], gs [G]), "expert_offsets" int32 [G], "gemm_out" (group-major bf16 [G*T, R], the
    GEMM's own output, so a GEMM defect is named there), "out". Unquantized twin: "out" fp32.
    """
    _check_float("o", o, 3)
    t, n_heads, head_dim = o.shape
    if not isinstance(n_groups, int) or n_groups <= 0 or n_heads % n_groups:
        raise ValueError(
            f"n_groups must be a positive divisor of n_heads={n_heads} "
            f"(o.shape={tuple(o.shape)}), got {n_groups=}"
        )
    if not isinstance(o_lora_rank, int) or o_lora_rank <= 0:
        raise ValueError(f"o_lora_rank must be a positive int, got {o_lora_rank=}")
    g, r = n_groups, o_lora_rank
    d = n_heads // g * head_dim
    _check_k("D = heads_per_group*head_dim", d, tuple(o.shape))
    w = _group_weights(w, g, d, r)
    x = o.reshape(t, g, d).transpose(0, 1).reshape(g * t, d)  # group-major: group g's rows together
    offsets = torch.arange(1, g + 1, dtype=torch.int32, device=o.device) * t

    st = Stages()
    if not quantized:
        st["out"] = _matmul_fp32(x, w, offsets).reshape(g, t, r).transpose(0, 1).contiguous()
        return st
    if gs is None:
        gs = torch.stack(
            [global_scale_from_amax(tensor_amax(x[i * t : (i + 1) * t])) for i in range(g)]
        ).to(o.device)
    gs = _global_scales("gs", gs, g, o.device)
    st["w_q"] = _quantize_weights(w)
    st["x_q"] = quantize_groups(x, offsets, gs)
    st["expert_offsets"] = offsets
    st["gemm_out"] = _gemm(st["x_q"], st["w_q"], offsets, oracle)
    st["out"] = st["gemm_out"].reshape(g, t, r).transpose(0, 1).contiguous()
    return st


def calibrate_grouped_linear(sample: torch.Tensor, *, n_groups: int) -> torch.Tensor:
    """Activation global scales fp32 [G] from a warm-up sample o [T, n_heads, head_dim]:
    each group's own amax / (6 * 448), as `grouped_linear(gs=None)` computes them live."""
    _check_float("sample", sample, 3)
    t, n_heads, head_dim = sample.shape
    if not isinstance(n_groups, int) or n_groups <= 0 or n_heads % n_groups:
        raise ValueError(
            f"n_groups must be a positive divisor of n_heads={n_heads}, got {n_groups=}"
        )
    groups = sample.reshape(t, n_groups, -1).transpose(0, 1)
    return torch.stack([global_scale_from_amax(tensor_amax(gr)) for gr in groups]).to(sample.device)
