"""What the three runners share: the life cycle, argument checks and calibration helpers.

Checks read tensor metadata only (dtype, shape, device), never values, so run() can call them
with no host sync, inside CUDA-graph capture and under torch.compile. Each raises ValueError
naming the argument and what was wrong with it. Calibration helpers may read values on the host:
calibration is a warm-up step, outside the graph-safe path.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from dsv4.layers import custom_ops
from dsv4.ops import global_scale_from_amax, nvfp4_amax, select_quant_impl

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)


class State(enum.IntEnum):
    """Where a runner is in its life cycle (each step needs the one before)."""

    NEW = 0  # constructed: no weights
    WEIGHTS_SET = 1  # set_weights() held the high-precision weights
    FINALIZED = 2  # weights quantized and laid out, every run() buffer allocated
    CALIBRATED = 3  # activation global scales known: run() may be called


_NEXT_STEP = {
    State.NEW: "set_weights()",
    State.WEIGHTS_SET: "finalize()",
    State.FINALIZED: "calibrate()",
}


def require(kind: str, state: State, needed: State, what: str) -> None:
    """RuntimeError naming the missing life-cycle step when `state` is short of `needed`."""
    if state < needed:
        raise RuntimeError(
            f"{kind}.{what} needs a {needed.name.lower()} runner, but it is "
            f"{state.name.lower()}: call {_NEXT_STEP[state]} first "
            f"(set_weights -> finalize -> calibrate -> run)"
        )


# --------------------------------------------------------------------------------------------
# argument checks (metadata only)


def positive_int(name: str, v: object, multiple: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple:
        need = "a positive int" if multiple == 1 else f"a positive multiple of {multiple}"
        raise ValueError(f"{name} must be {need}, got {name}={v!r}")
    return v


def non_negative_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {name}={v!r}")
    return v


def limit_value(name: str, v: object) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:  # `not >` too: NaN
        raise ValueError(f"{name} must be a number > 0 or None, got {name}={v!r}")
    return float(v)


def tensor(
    name: str,
    x: object,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None],
    device: torch.device | None = None,
) -> torch.Tensor:
    """x must be a tensor of one of `dtypes` with `shape` (None: any size) on `device`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {names}, got {name}.dtype={x.dtype}")
    want = tuple("*" if s is None else s for s in shape)
    if x.dim() != len(shape) or any(
        s is not None and s != n for s, n in zip(shape, x.shape, strict=True)
    ):
        raise ValueError(f"{name} must have shape {want}, got {name}.shape={tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device}, got {name}.device={x.device}")
    return x


def tokens(name: str, t: int, max_num_tokens: int) -> int:
    if t > max_num_tokens:
        raise ValueError(
            f"{name} has {t} tokens, more than max_num_tokens={max_num_tokens} the runner's "
            f"buffers were sized for"
        )
    return t


def out_tensor(
    out: object, shape: Sequence[int], device: torch.device, inputs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """A caller-owned bf16 output of exactly `shape` that does not overlap an input."""
    tensor("out", out, (torch.bfloat16,), shape, device)
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got out.stride()={out.stride()}")
    if out.numel() and any(_overlaps(out, x) for x in inputs):
        raise ValueError("out must not overlap an input tensor")
    return out


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges spanned by a and b intersect (views of one buffer may not)."""
    if not b.numel() or a.device != b.device:
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def _span(x: torch.Tensor) -> tuple[int, int]:
    last = sum((n - 1) * st for n, st in zip(x.shape, x.stride(), strict=True) if n > 0)
    start = x.data_ptr()
    return start, start + (last + 1) * x.element_size()


def scale_values(name: str, gs: object, n: int, device: torch.device) -> torch.Tensor:
    """fp32 global scale(s) given in advance: one value or n, -> fp32 [n] on `device`."""
    if not isinstance(gs, torch.Tensor) or gs.dtype != torch.float32:
        got = gs.dtype if isinstance(gs, torch.Tensor) else type(gs).__name__
        raise ValueError(f"{name} must be a float32 tensor, got {got}")
    if gs.numel() not in (1, n):
        raise ValueError(f"{name} must hold 1 or {n} values, got {name}.shape={tuple(gs.shape)}")
    if not bool(torch.isfinite(gs).all() and (gs > 0).all()):
        raise ValueError(f"{name} must be finite and > 0, got {name}={gs.tolist()}")
    return gs.reshape(-1).to(device).expand(n)


def resolve_device(device: torch.device | str | None, weights: torch.Tensor) -> torch.device:
    return weights.device if device is None else torch.device(device)


# --------------------------------------------------------------------------------------------
# calibration (host reads allowed)


def calibrated_scale(name: str, amax: torch.Tensor) -> torch.Tensor:
    """Decode-convention gs = amax / (6 * 448) (1.0 for amax 0) as fp32; must be finite.

    amax ignores NaN (as kernels' fmax reductions do); an Inf in the warm-up sample gives an
    Inf scale, which would quantize every later input to zero: refused, naming the stage.
    """
    gs = global_scale_from_amax(amax.float())
    if not bool(torch.isfinite(gs).all()):
        raise ValueError(
            f"calibration of {name}: the warm-up sample's amax is {amax.tolist()} (not finite); "
            f"an Inf in the sample would give an unusable global scale"
        )
    return gs


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x|, NaN ignored, fp32 0-d (0 for an empty tensor)."""
    return nvfp4_amax(x)


class Runner:
    """What every runner shares: device, GEMM backend, life-cycle state, custom-op handle and
    the last run's size and output (for stages())."""

    kind = "Runner"

    def _init_runner(
        self,
        op_name: str,
        device: torch.device | str | None,
        backend: str | None,
        quant_impl: str | None = None,
    ) -> None:
        self.backend = backend  # grouped-GEMM backend name; None: chosen by device at finalize
        # quantize / SwiGLU-requantize implementation asked for ("torch", "cutedsl", None: by
        # device); `quant_impl` is the one chosen at finalize, which every run() uses
        self.quant_impl_request = quant_impl
        self.quant_impl: str | None = None
        self._device = None if device is None else torch.device(device)
        self.state = State.NEW
        self.handle = custom_ops.register_runner(self, op_name)
        self._last_t: int | None = None
        self._last_out: torch.Tensor | None = None

    @property
    def device(self) -> torch.device | None:
        return self._device

    def _resolve_quant_impl(self, device: torch.device) -> None:
        self.quant_impl = select_quant_impl(device, self.quant_impl_request)

    def _set_two_scales(self, gs1: object, gs2: object) -> None:
        """Static (gs1, gs2), one value each, for the two-GEMM runners (decode convention)."""
        require(self.kind, self.state, State.FINALIZED, "set_activation_scales()")
        gs1 = scale_values("gs1", gs1, 1, self._device)
        gs2 = scale_values("gs2", gs2, 1, self._device)
        self._gs1.copy_(gs1)
        self._gs2.copy_(gs2)
        self.state = State.CALIBRATED
