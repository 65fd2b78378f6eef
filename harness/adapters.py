"""Adapters: the one small protocol through which the harness reaches a kernel under test.

An adapter is an object with a `name`, its `conventions` (global-scale direction, SwiGLU variant,
gate/up order), the `devices` it runs on, and any of the stage methods below. Stage methods write
into caller-owned outputs that the runner has poisoned (NaN, 0xFF bytes) so unwritten elements
show; layer methods build, calibrate and run a layer and return its named intermediates.
`can_implement(case) -> (ok, why)` says what it cannot do; a missing method is "unsupported".

Adapters are found by name or by an import path `package.module:attr` naming a class, a factory
or an instance, so users test their own runners without touching this repo. Names come from the
static table of built-ins (`harness.backends.BUILTIN`: the reference, dsv4's backends, the timing
baselines, each imported only when asked for), from installed packages' entry points (group
`dsv4_nvfp4.adapters`) and from `register` at run time. This module holds the protocol and the
lookup only; it imports no adapter.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

import reference as ref
from harness.backends import BUILTIN, ENTRY_POINT_GROUP
from harness.cases import Case, Stage
from reference.activation import SwigluVariant, variant_label


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
    # Routed MoE: True, its topk_weights arrive with the case's routed_scaling_factor already
    # applied (the gate's output; dsv4's RoutedMoERunner multiplies them as given); False, they
    # arrive normalized and it applies the factor itself, given as `routed_scaling_factor=`.
    routing_weights_scaled: bool = True
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
            "conv_routing_weights_scaled": self.routing_weights_scaled,
            "conv_policies": sorted(p.value for p in self.policies),
        }


@dataclass(frozen=True)
class QuantizedOperand:
    """One NVFP4 operand in plain layouts: packed codes, block scales along K, global scale(s)."""

    codes: torch.Tensor  # uint8 [..., K/2], element 2i in the low nibble
    scales: torch.Tensor  # e4m3 [..., K/16], one per 16 elements along K
    global_scale: torch.Tensor  # fp32: one, or one per expert / group

    @classmethod
    def stack(cls, parts: list[QuantizedOperand]) -> QuantizedOperand:
        """Per-expert operands as one [E, ...] operand (global scales [E])."""
        return cls(
            torch.stack([q.codes for q in parts]),
            torch.stack([q.scales for q in parts]),
            torch.stack([q.global_scale.reshape(()) for q in parts]),
        )

    def with_global_scale(self, gs: torch.Tensor) -> QuantizedOperand:
        return dataclasses.replace(self, global_scale=gs)


@dataclass(frozen=True)
class GemmOperands:
    """Teacher-forced GEMM inputs: the A and B sides plain, and in the reference's assembled
    layouts. The flat names (`a_codes`, `global_scale_b`, ...) read the sides' fields."""

    a: QuantizedOperand  # codes [T, K/2], scales [T, K/16], global_scale [E]
    b: QuantizedOperand  # codes [E, K/2, N], scales [E, K/16, N], global_scale [E]
    expert_offsets: torch.Tensor  # int32 [E] cumulative END offsets
    a_scales_swizzled: torch.Tensor  # reference 2D-side assembly (1-D bytes)
    a_scale_row_offsets: torch.Tensor  # int32 [E] START rows of each group's swizzled scales
    b_scales_swizzled: torch.Tensor  # reference 3D-side assembly [E, ...]

    a_codes = property(lambda self: self.a.codes)
    a_scales = property(lambda self: self.a.scales)
    global_scale_a = property(lambda self: self.a.global_scale)
    b_codes = property(lambda self: self.b.codes)
    b_scales = property(lambda self: self.b.scales)
    global_scale_b = property(lambda self: self.b.global_scale)

    def with_global_scales(self, gsa: torch.Tensor, gsb: torch.Tensor) -> GemmOperands:
        """The same operands with other global scales (another convention, a diagnosis)."""
        a, b = self.a.with_global_scale(gsa), self.b.with_global_scale(gsb)
        return dataclasses.replace(self, a=a, b=b)

    def plain(self) -> tuple[torch.Tensor, ...]:
        """The positional arguments of `reference.gemm.grouped_gemm_nvfp4` (plain layouts)."""
        a, b = self.a, self.b
        return (
            a.codes,
            a.scales,
            b.codes,
            b.scales,
            self.expert_offsets,
            a.global_scale,
            b.global_scale,
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
    Stage.ROUTED_MOE_EP: "routed_moe_rank",  # one rank's partial output (harness.stages.ep)
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
# registry and lookup

_REGISTRY: dict[str, Callable[[], Any]] = {}  # names registered at run time


def register(name: str, factory: Callable[[], Any]) -> None:
    """Make an adapter available by name in this process (a test, a notebook). Built-in adapters
    are the table `harness.backends.BUILTIN`; an installed package declares its own in the
    entry-point group `harness.backends.ENTRY_POINT_GROUP`. A registered name wins over both."""
    _REGISTRY[name] = factory


def _entry_points() -> dict[str, str]:
    """name -> `module:attr` of the adapters installed packages declare (nothing imported)."""
    found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in found}


def _named() -> dict[str, str | Callable[[], Any]]:
    """Every adapter name: a `module:attr` path (imported on load) or a registered factory."""
    return {**_entry_points(), **BUILTIN, **_REGISTRY}


def available() -> list[str]:
    return sorted(_named())


class AdapterError(ValueError):
    """An adapter name or import path that does not resolve."""


def load(spec: str) -> Any:
    """An adapter from a name (built in, installed or registered) or a `module:attr` path."""
    if ":" in spec:
        return _instantiate(spec, _import(repr(spec), spec))
    named = _named()
    if spec not in named:
        raise AdapterError(
            f"unknown adapter {spec!r} (registered: {', '.join(sorted(named))}; "
            f"or give an import path module:attr)"
        )
    target = named[spec]
    if not isinstance(target, str):
        return _instantiate(spec, target)
    try:
        return _instantiate(spec, _import(f"{spec!r} ({target})", target))
    except ModuleNotFoundError as e:  # an optional package the named adapter needs
        raise AdapterError(
            f"adapter {spec!r} ({target}) does not load: no module named {e.name!r}"
        ) from None


def _import(what: str, path: str) -> Any:
    """The object `module:attr` names; `what` names it in errors."""
    module_name, _, attr = path.partition(":")
    if str(Path.cwd()) not in sys.path:  # like pytest and uvicorn: user modules from the cwd
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise AdapterError(f"adapter {what}: no module named {e.name!r}") from None
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AdapterError(f"adapter {what}: module {module_name} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


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
    "QuantizedOperand",
    "POISON_BYTE",
    "QuantPolicy",
    "available",
    "check",
    "describe",
    "from_adapter_scale",
    "gemm_backend",
    "load",
    "poisoned",
    "register",
    "to_adapter_scale",
]
