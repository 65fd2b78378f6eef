"""Adapters: the one small protocol through which the harness reaches a kernel under test.

An adapter is an object with a `name`, its `conventions` (global-scale direction, SwiGLU variant,
gate/up order), the `devices` it runs on, and any of the stage methods below. Stage methods write
into caller-owned outputs that the runner has poisoned (NaN, 0xFF bytes) so unwritten elements
show; layer methods build, calibrate and run a layer and return its named intermediates.
`can_implement(case) -> (ok, why)` says what it cannot do; a missing method is "unsupported".

Adapters are found by registered name (`reference`, `dsv4-torch`, ...) or by an import path
`package.module:attr` naming a class, a factory or an instance, so users test their own runners
without touching this repo. The reference adapter is built in: it runs the oracle against itself,
which checks the harness end to end on any machine.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

import reference as ref
from harness.cases import Case, Stage
from reference import layers as ref_layers
from reference.activation import SwigluVariant, swiglu, variant_label
from reference.gemm import grouped_gemm_nvfp4
from reference.layouts import assemble_scales_2d_side_from_offsets, assemble_scales_3d_side


class QuantPolicy(enum.Enum):
    """A quantizer's documented deviation from ours (docs/design.md §3): declared, it is accepted;
    undeclared, its mismatches are still classified under its own name, never as real errors."""

    SCALE_FLOOR = "scale_floor"  # block scales clamped up to a floor (e.g. 2^-6): all-zero
    # blocks get a nonzero scale byte, their values stay 0
    NAN_SCALE_BYTE = "nan_scale_byte"  # a NaN block's scale byte is 0xFF (negative NaN), not 0x7F
    NAN_AMAX = "nan_amax"  # the dynamic amax propagates NaN: one NaN makes the global scale NaN


@dataclass(frozen=True)
class Conventions:
    """What an adapter's numbers mean; the runner converts to and from ours."""

    global_scale: ref.ScaleConvention = ref.ScaleConvention.DECODE
    swiglu_variant: SwigluVariant = SwigluVariant.DSV4
    gate_first: bool = True
    weight_after_w2: bool = False  # routed MoE: routing weight on the L2 rows, not before L2
    policies: frozenset[QuantPolicy] = frozenset()  # quantizer policies it follows

    @property
    def swiglu_label(self) -> str:
        return variant_label(self.swiglu_variant, self.gate_first)

    def not_dsv4(self) -> list[str]:
        """The declared conventions that are not DeepSeek V4's (judged as declared, flagged)."""
        out = []
        if self.swiglu_label != variant_label(SwigluVariant.DSV4):
            out.append(f"SwiGLU {self.swiglu_label}")
        if self.weight_after_w2:
            out.append("routing weight after w2")
        return out

    def row(self) -> dict[str, Any]:
        return {
            "conv_global_scale": self.global_scale.value,
            "conv_swiglu": self.swiglu_variant.value,
            "conv_gate_first": self.gate_first,
            "conv_weight_after_w2": self.weight_after_w2,
            "conv_policies": sorted(p.value for p in self.policies),
        }


@dataclass(frozen=True)
class GemmOperands:
    """Teacher-forced GEMM inputs, plain and in the reference's assembled layouts."""

    a_codes: torch.Tensor  # uint8 [T, K/2]
    a_scales: torch.Tensor  # e4m3 [T, K/16]
    b_codes: torch.Tensor  # uint8 [E, K/2, N]
    b_scales: torch.Tensor  # e4m3 [E, K/16, N]
    expert_offsets: torch.Tensor  # int32 [E] cumulative END offsets
    global_scale_a: torch.Tensor  # fp32 [E], the adapter's convention
    global_scale_b: torch.Tensor  # fp32 [E], the adapter's convention
    a_scales_swizzled: torch.Tensor  # reference 2D-side assembly (1-D bytes)
    a_scale_row_offsets: torch.Tensor  # int32 [E] START rows of each group's swizzled scales
    b_scales_swizzled: torch.Tensor  # reference 3D-side assembly [E, ...]

    def plain(self) -> tuple[torch.Tensor, ...]:
        """The positional arguments of `reference.gemm.grouped_gemm_nvfp4` (plain layouts)."""
        return (
            self.a_codes,
            self.a_scales,
            self.b_codes,
            self.b_scales,
            self.expert_offsets,
            self.global_scale_a,
            self.global_scale_b,
        )


# --------------------------------------------------------------------------------------------
# the runner's side of the protocol: poisoned outputs, scales in the adapter's convention

POISON_BYTE = 0xFF  # e4m3 NaN (negative), and a pair of -6 codes: unwritten bytes show


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer whose unwritten elements show: NaN for floats, 0xFF bytes otherwise."""
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, POISON_BYTE, dtype=torch.uint8, device=device).view(dtype)


def to_adapter_scale(
    gs: torch.Tensor | None, convention: ref.ScaleConvention
) -> torch.Tensor | None:
    if gs is None or convention is ref.ScaleConvention.DECODE:
        return gs
    return ref.to_encode_scale(gs)


def from_adapter_scale(gs: Any, convention: ref.ScaleConvention) -> torch.Tensor | None:
    if gs is None:
        return None
    gs = torch.as_tensor(gs, dtype=torch.float32)
    return gs if convention is ref.ScaleConvention.DECODE else ref.from_encode_scale(gs)


STAGE_METHODS: dict[Stage, str] = {
    Stage.QUANTIZE: "quantize",
    Stage.SCALE_ASSEMBLY: "assemble_scales",
    Stage.GROUPED_GEMM: "grouped_gemm",
    Stage.SWIGLU_REQUANT: "swiglu_requant",
    Stage.SHARED_EXPERT: "shared_expert",
    Stage.ROUTED_MOE: "routed_moe",
    Stage.GROUPED_LINEAR: "grouped_linear",
}


@runtime_checkable
class Adapter(Protocol):
    """What the runner needs of a kernel under test (stage methods are optional)."""

    name: str
    conventions: Conventions
    devices: tuple[str, ...]

    def can_implement(self, case: Case) -> tuple[bool, str]: ...


class AdapterBase:
    """Defaults: docs/design.md's conventions, CPU and CUDA, the stages it has methods for."""

    name = "unnamed"
    conventions = Conventions()
    devices: tuple[str, ...] = ("cpu", "cuda")

    def can_implement(self, case: Case) -> tuple[bool, str]:
        return default_can_implement(self, case)


def default_can_implement(adapter: Any, case: Case) -> tuple[bool, str]:
    method = STAGE_METHODS[case.stage]
    if not callable(getattr(adapter, method, None)):
        return False, f"{adapter.name} has no {method}() for stage {case.stage.value}"
    kind = case.device.split(":")[0]
    if kind not in adapter.devices:
        return False, f"{adapter.name} runs on {adapter.devices}, case needs {kind}"
    return True, ""


def check(adapter: Any, case: Case) -> tuple[bool, str]:
    """can_implement of any adapter, falling back to the default for protocol-light objects."""
    fn = getattr(adapter, "can_implement", None)
    return fn(case) if callable(fn) else default_can_implement(adapter, case)


# --------------------------------------------------------------------------------------------
# the reference as an adapter


class ReferenceAdapter(AdapterBase):
    """The oracle itself: every stage, any device. Passing proves the harness, not a kernel.

    With other `conventions` it is an honest kernel of that convention (SwiGLU variant, gate/up
    order, routing-weight position): the harness judges every adapter against the reference run
    with the adapter's declared conventions.
    """

    name = "reference"

    def __init__(
        self, quantized: bool = True, conventions: Conventions | None = None, oracle: bool = False
    ):
        self.quantized = quantized  # False: the unquantized fp32 twin of each layer
        self.oracle = oracle  # True: layer GEMMs in float64 (another summation order)
        if conventions is not None:
            self.conventions = conventions

    def _swiglu_args(self) -> dict[str, Any]:
        c = self.conventions
        return {"variant": c.swiglu_variant, "gate_first": c.gate_first}

    def quantize(self, x, global_scale, codes_out, scales_out):
        codes, scales, gs = ref.quantize_nvfp4(x, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)
        return gs

    def assemble_scales(self, a_scales, expert_offsets, b_scales, out_2d, out_3d):
        out_2d.copy_(assemble_scales_2d_side_from_offsets(a_scales, expert_offsets)[0])
        out_3d.copy_(assemble_scales_3d_side(list(b_scales)))

    def grouped_gemm(self, ops: GemmOperands, out):
        out.copy_(grouped_gemm_nvfp4(*ops.plain(), out_dtype=out.dtype))

    def swiglu_requant(self, l1_out, limit, global_scale, codes_out, scales_out):
        act = swiglu(l1_out, limit, **self._swiglu_args())
        codes, scales, _ = ref.quantize_nvfp4(act, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)

    def shared_expert(self, x, w13, w2, *, limit, calib_sample):
        kw = {"limit": limit, "oracle": self.oracle, **self._swiglu_args()}
        if not self.quantized:
            return ref_layers.shared_expert(x, w13, w2, quantized=False, **kw)
        gs1, gs2 = ref_layers.calibrate_shared_expert(calib_sample, w13, w2, **kw)
        return ref_layers.shared_expert(x, w13, w2, gs1=gs1, gs2=gs2, **kw)

    def routed_moe(self, x, topk_ids, topk_weights, w13, w2, *, first_expert, limit, calib_sample):
        args = (x, topk_ids, topk_weights, w13, w2)
        kw = {
            "first_expert": first_expert,
            "limit": limit,
            "weight_after_w2": self.conventions.weight_after_w2,
            "oracle": self.oracle,
            **self._swiglu_args(),
        }
        if not self.quantized:
            return ref_layers.routed_moe(*args, quantized=False, **kw)
        gs1, gs2 = ref_layers.calibrate_routed_moe(calib_sample, *args[1:], **kw)
        return ref_layers.routed_moe(*args, gs1=gs1, gs2=gs2, **kw)

    def grouped_linear(self, o, w, *, n_groups, o_lora_rank, calib_sample):
        if not self.quantized:
            return ref_layers.grouped_linear(
                o, w, n_groups=n_groups, o_lora_rank=o_lora_rank, quantized=False
            )
        gs = ref_layers.calibrate_grouped_linear(calib_sample, n_groups=n_groups)
        return ref_layers.grouped_linear(
            o, w, n_groups=n_groups, o_lora_rank=o_lora_rank, gs=gs, oracle=self.oracle
        )


# --------------------------------------------------------------------------------------------
# registry and lookup

_REGISTRY: dict[str, Callable[[], Any]] = {"reference": ReferenceAdapter}


def register(name: str, factory: Callable[[], Any]) -> None:
    """Make an adapter available by name (dsv4 registers its backends this way)."""
    _REGISTRY[name] = factory


def _builtin_names() -> list[str]:
    importlib.import_module("harness.baselines")  # registers the timing baselines (bf16)
    try:  # dsv4 is optional for the harness; when present it registers its adapters
        importlib.import_module("dsv4.adapters")
    except ModuleNotFoundError as e:
        if e.name not in ("dsv4", "dsv4.adapters"):
            raise
    return sorted(_REGISTRY)


def available() -> list[str]:
    return _builtin_names()


class AdapterError(ValueError):
    """An adapter name or import path that does not resolve."""


def load(spec: str) -> Any:
    """An adapter from a registered name or a `module:attr` import path."""
    if ":" not in spec:
        names = _builtin_names()
        if spec not in _REGISTRY:
            raise AdapterError(
                f"unknown adapter {spec!r} (registered: {', '.join(names)}; "
                f"or give an import path module:attr)"
            )
        return _instantiate(spec, _REGISTRY[spec])
    module_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path:  # like pytest and uvicorn: user modules from the cwd
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise AdapterError(f"adapter {spec!r}: no module named {e.name!r}") from None
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AdapterError(f"adapter {spec!r}: module {module_name} has no attribute {part!r}")
        obj = getattr(obj, part)
    return _instantiate(spec, obj)


def _instantiate(spec: str, obj: Any) -> Any:
    adapter = (
        obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "name")) else obj
    )
    if not hasattr(adapter, "name"):
        raise AdapterError(f"adapter {spec!r} has no 'name' attribute")
    if not hasattr(adapter, "conventions"):
        adapter.conventions = Conventions()
    if not hasattr(adapter, "devices"):
        adapter.devices = ("cpu", "cuda")
    return adapter


def gemm_backend(adapter: Any, case: Any) -> str:
    """The grouped-GEMM backend `adapter` runs `case` on, where it says (optional method
    `gemm_backend(device) -> str`, docs/cases.md); "" where it does not."""
    fn = getattr(adapter, "gemm_backend", None)
    if not callable(fn):
        return ""
    import torch

    return str(fn(torch.device(case.device)))


def describe(adapter: Any) -> dict[str, Any]:
    """Row fields that say which adapter and conventions produced a result."""
    conv = getattr(adapter, "conventions", Conventions())
    return {"backend": adapter.name, **conv.row()}


__all__ = [
    "Adapter",
    "AdapterBase",
    "AdapterError",
    "Conventions",
    "GemmOperands",
    "POISON_BYTE",
    "QuantPolicy",
    "ReferenceAdapter",
    "available",
    "check",
    "describe",
    "from_adapter_scale",
    "gemm_backend",
    "load",
    "poisoned",
    "register",
    "to_adapter_scale",
    "dataclasses",
]
