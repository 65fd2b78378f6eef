"""Inputs of a case, the same for the reference and the kernel: built from the case's seed.

Stage cases are teacher forced: `quantize_inputs`, `scale_assembly_inputs`, `gemm_operands`
(the reference's own quantization, plain and in its assembled layouts, in both scale
conventions) and `swiglu_inputs` give a stage exactly the reference's inputs. `layer_inputs`
draws a layer's activations, weights, routing and calibration sample; `run_layer` hands them to
an adapter's layer method. The verdict (harness.stages.run) and the timing (harness.timing) both
build their inputs here, so what is timed is what was judged. Draws come from harness.inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

import reference as ref
from harness import inputs
from harness.adapters import GemmOperands, QuantizedOperand, to_adapter_scale
from harness.cases import Case, Stage
from reference.activation import swiglu
from reference.layouts import (
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    compute_expert_offsets,
)
from reference.nvfp4 import ScaleConvention, global_scale_from_amax, tensor_amax


def quantize_inputs(case: Case, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A quantize case's x [T, K] and its decode-convention global scale (None: dynamic)."""
    g = inputs.generator(case, "x")
    x = inputs.activation((case.tokens, case.shape.hidden), case.distribution, g).to(dev)
    if case.distribution.exact:
        gs = torch.tensor(inputs.EXACT_GLOBAL_SCALE, device=dev)
    elif case.scale_ratio is None:
        gs = None
    else:
        # calibrated on the clean warm-up sample (the planted NaN / Inf only in the live x)
        gs = global_scale_from_amax(tensor_amax(inputs.finite(x)) / case.scale_ratio).to(dev)
    return x, gs


def routed_counts(case: Case) -> torch.Tensor:
    ids, _ = inputs.routing(case, inputs.generator(case, "routing"))
    return inputs.tokens_per_expert(ids, inputs.first_expert(case), case.shape.n_experts)


def scale_assembly_inputs(
    case: Case, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scale-assembly case's (activation scales [T, K/16], END offsets [E], weight scales
    [E, K/16, N])."""
    s = case.shape
    counts = routed_counts(case)
    offsets = compute_expert_offsets(counts).to(dev)
    g = inputs.generator(case, "scales")
    c, n = s.hidden // 16, 2 * s.intermediate
    # Random finite bytes 0x01..0x7E: a zero padding byte can never be mistaken for data.
    u8 = {"generator": g, "dtype": torch.uint8, "device": g.device}
    a = torch.randint(1, 0x7F, (int(counts.sum()), c), **u8)
    b = torch.randint(1, 0x7F, (s.n_experts, c, n), **u8)
    return a.view(torch.float8_e4m3fn).to(dev), offsets, b.view(torch.float8_e4m3fn).to(dev)


def gemm_operands(
    case: Case, dev: torch.device, conv: ScaleConvention
) -> tuple[GemmOperands, GemmOperands]:
    """(reference-convention operands, adapter-convention operands) for a grouped GEMM case."""
    s = case.shape
    counts = routed_counts(case)
    offsets = compute_expert_offsets(counts).to(dev)
    k, n, e = s.hidden, 2 * s.intermediate, s.n_experts
    x = inputs.activation((int(counts.sum()), k), case.distribution, inputs.generator(case, "a"))
    w = inputs.weight((e, k, n), inputs.generator(case, "b"))
    a = QuantizedOperand(*ref.quantize_nvfp4(x.to(dev)))
    a = a.with_global_scale(a.global_scale.reshape(1).expand(e).contiguous())  # one per expert
    b = QuantizedOperand.stack(
        [QuantizedOperand(*ref.quantize_weight_nvfp4(w[i].to(dev))) for i in range(e)]
    )
    a_sw, a_rows = assemble_scales_2d_side_from_offsets(a.scales, offsets)
    b_sw = assemble_scales_3d_side(list(b.scales))
    ops = GemmOperands(a, b, offsets, a_sw, a_rows, b_sw)
    conv_ops = ops.with_global_scales(
        to_adapter_scale(a.global_scale, conv), to_adapter_scale(b.global_scale, conv)
    )
    return ops, conv_ops


def _swiglu_input(case: Case, dev: torch.device) -> torch.Tensor:
    g = inputs.generator(case, "l1")
    l1 = inputs.activation((case.tokens, 2 * case.shape.intermediate), case.distribution, g)
    # x6: |value| > 10 for ~10% of normal draws, so the default limit's clamps are exercised.
    return (l1.float() * 6.0).to(torch.bfloat16).to(dev)


def swiglu_inputs(
    case: Case, dev: torch.device, conv: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A SwiGLU-requant case's (L1 output, reference activation in the convention `conv`
    declares, decode-convention global scale calibrated on that very activation)."""
    l1 = _swiglu_input(case, dev)
    act = swiglu(l1, case.limit, conv.swiglu_variant, conv.gate_first)  # as the adapter declares
    return l1, act, global_scale_from_amax(tensor_amax(act)).to(dev)


class LayerInputsError(ValueError):
    """Layer input tensors (e.g. a repro bundle's) that do not fit the case's layer."""


@dataclass(frozen=True)
class LayerInputs:
    """A layer case's inputs, shared by reference and kernel: its tensors (saved by name in a
    repro bundle, harness/repro.py) and the case's scalars. `call(adapter)` runs the adapter's
    layer method on them (docs/cases.md "Adapters"): the one place its arguments are spelled."""

    TENSORS: ClassVar[tuple[str, ...]]  # the tensor fields, by the names a bundle stores
    METHOD: ClassVar[str]  # the adapter's layer method

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSORS}

    def to(self, dev: torch.device) -> LayerInputs:
        return dataclasses.replace(self, **{k: v.to(dev) for k, v in self.tensors().items()})

    def call(self, adapter: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def scalars(case: Case) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class SharedExpertInputs(LayerInputs):
    x: torch.Tensor  # bf16 [T, H]
    w13: torch.Tensor  # bf16 [H, 2I], gate | up
    w2: torch.Tensor  # bf16 [I, H]
    calib_sample: torch.Tensor  # bf16 [T, H], the warm-up sample of the static scales
    limit: float | None  # SwiGLU clamp

    TENSORS = ("x", "w13", "w2", "calib_sample")
    METHOD = "shared_expert"

    @staticmethod
    def scalars(case: Case) -> dict[str, Any]:
        return {"limit": case.limit}

    def call(self, adapter: Any) -> Any:
        return adapter.shared_expert(
            self.x, self.w13, self.w2, limit=self.limit, calib_sample=self.calib_sample
        )


@dataclass(frozen=True)
class RoutedMoeInputs(LayerInputs):
    x: torch.Tensor  # bf16 [T, H]
    topk_ids: torch.Tensor  # int64 [T, k], GLOBAL expert ids
    topk_weights: torch.Tensor  # fp32 [T, k], normalized (routed_scaling_factor not applied)
    w13: torch.Tensor  # bf16 [E, H, 2I]
    w2: torch.Tensor  # bf16 [E, I, H]
    calib_sample: torch.Tensor  # bf16 [T, H]
    first_expert: int  # global id of the rank's first local expert
    limit: float | None
    routed_scaling_factor: float  # the case's shape's

    TENSORS = ("x", "topk_ids", "topk_weights", "w13", "w2", "calib_sample")
    METHOD = "routed_moe"

    @staticmethod
    def scalars(case: Case) -> dict[str, Any]:
        return {
            "first_expert": inputs.first_expert(case),
            "limit": case.limit,
            "routed_scaling_factor": case.shape.routed_scaling_factor,
        }

    def _weights(self, adapter: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        # the weights are normalized; the factor goes where the adapter declares
        rsf = self.routed_scaling_factor
        if getattr(getattr(adapter, "conventions", None), "routing_weights_scaled", True):
            return inputs.gate_weights(self.topk_weights, rsf), {}
        return self.topk_weights, {"routed_scaling_factor": rsf}

    def call(self, adapter: Any) -> Any:
        wts, kw = self._weights(adapter)
        return adapter.routed_moe(
            self.x,
            self.topk_ids,
            wts,
            self.w13,
            self.w2,
            first_expert=self.first_expert,
            limit=self.limit,
            calib_sample=self.calib_sample,
            **kw,
        )

    def call_rank(self, adapter: Any, rank: int, world: int) -> Any:
        """The adapter's `routed_moe_rank` (docs/cases.md "Expert parallel"): rank `rank` of
        `world`, its experts the n_local = E / world global ids from rank * n_local on, given
        the global weights (every expert) and these tokens with their global top-k ids."""
        n_local = self.w13.shape[0] // world
        wts, kw = self._weights(adapter)
        return adapter.routed_moe_rank(
            self.x,
            self.topk_ids,
            wts,
            self.w13,
            self.w2,
            rank=rank,
            world=world,
            first_expert=self.first_expert + rank * n_local,
            n_local=n_local,
            limit=self.limit,
            calib_sample=self.calib_sample,
            **kw,
        )


@dataclass(frozen=True)
class GroupedLinearInputs(LayerInputs):
    o: torch.Tensor  # bf16 [T, n_heads, head_dim]
    w: torch.Tensor  # bf16 [G, D, R]
    calib_sample: torch.Tensor  # bf16 [T, n_heads, head_dim]
    n_groups: int
    o_lora_rank: int

    TENSORS = ("o", "w", "calib_sample")
    METHOD = "grouped_linear"

    @staticmethod
    def scalars(case: Case) -> dict[str, Any]:
        return {"n_groups": case.shape.n_groups, "o_lora_rank": case.shape.o_lora_rank}

    def call(self, adapter: Any) -> Any:
        return adapter.grouped_linear(
            self.o,
            self.w,
            n_groups=self.n_groups,
            o_lora_rank=self.o_lora_rank,
            calib_sample=self.calib_sample,
        )


LAYER_INPUTS: dict[Stage, type[LayerInputs]] = {
    Stage.SHARED_EXPERT: SharedExpertInputs,
    Stage.ROUTED_MOE: RoutedMoeInputs,
    Stage.GROUPED_LINEAR: GroupedLinearInputs,
    Stage.ROUTED_MOE_EP: RoutedMoeInputs,  # every rank's experts (harness.stages.ep)
}


def layer_inputs(case: Case, dev: torch.device) -> LayerInputs:
    """Inputs of a layer case drawn from its seed, shared by reference and kernel."""
    s, t = case.shape, case.tokens
    gx = inputs.generator(case, "x")
    ratio = 1.0 if case.scale_ratio is None else case.scale_ratio
    if case.stage is Stage.GROUPED_LINEAR:
        heads = s.n_groups * s.group_dim // s.head_dim
        o = inputs.activation((t, heads, s.head_dim), case.distribution, gx)
        w = inputs.weight((s.n_groups, s.group_dim, s.o_lora_rank), inputs.generator(case, "w"))
        d = {"o": o, "w": w, "calib_sample": inputs.calibration_sample(o, ratio)}
    elif case.stage is Stage.SHARED_EXPERT:
        x = inputs.activation((t, s.hidden), case.distribution, gx)
        d = {
            "x": x,
            "w13": inputs.weight((s.hidden, 2 * s.intermediate), inputs.generator(case, "w13")),
            "w2": inputs.weight((s.intermediate, s.hidden), inputs.generator(case, "w2")),
            "calib_sample": inputs.calibration_sample(x, ratio),
        }
    else:
        x = inputs.activation((t, s.hidden), case.distribution, gx)
        ids, wts = inputs.routing(case, inputs.generator(case, "routing"))
        e = inputs.routed_experts(case)
        w13 = inputs.weight((e, s.hidden, 2 * s.intermediate), inputs.generator(case, "w13"))
        d = {
            "x": x,
            "topk_ids": ids,
            "topk_weights": wts,
            "w13": w13,
            "w2": inputs.weight((e, s.intermediate, s.hidden), inputs.generator(case, "w2")),
            "calib_sample": inputs.calibration_sample(x, ratio),
        }
    return layer_inputs_from_tensors(case, d).to(dev)


def layer_inputs_from_tensors(
    case: Case, tensors: Mapping[str, torch.Tensor], source: str = "inputs"
) -> LayerInputs:
    """A layer case's inputs from named tensors (a repro bundle's), the scalars from the case;
    `source` names where the tensors came from in errors."""
    kind = LAYER_INPUTS.get(case.stage)
    if kind is None:
        raise LayerInputsError(
            f"{source}: input tensors replay layer cases only, not {case.stage.value}"
        )
    missing = [n for n in kind.TENSORS if n not in tensors]
    extra = sorted(set(tensors) - set(kind.TENSORS))
    if missing or extra:
        raise LayerInputsError(
            f"{source}: a {case.stage.value} case takes the tensors {', '.join(kind.TENSORS)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
        )
    bad = [n for n in kind.TENSORS if not isinstance(tensors[n], torch.Tensor)]
    if bad:
        raise LayerInputsError(f"{source}: {', '.join(bad)} must be tensors")
    return kind(**{n: tensors[n] for n in kind.TENSORS}, **kind.scalars(case))


def run_layer(case: Case, adapter: Any, d: LayerInputs) -> Any:
    """The adapter's layer method on `d` (the case names the layer; `d` must be its inputs)."""
    if not isinstance(d, LAYER_INPUTS[case.stage]):
        raise TypeError(f"{case.stage.value} case given {type(d).__name__}")
    return d.call(adapter)


__all__ = [
    "LAYER_INPUTS",
    "GroupedLinearInputs",
    "LayerInputs",
    "LayerInputsError",
    "RoutedMoeInputs",
    "SharedExpertInputs",
    "gemm_operands",
    "layer_inputs",
    "layer_inputs_from_tensors",
    "quantize_inputs",
    "routed_counts",
    "run_layer",
    "scale_assembly_inputs",
    "swiglu_inputs",
]
