"""NVFP4 grouped GEMM (2D x 3D) entry point and its backend registry.

`run_nvfp4_grouped_gemm` validates the operands (metadata only), picks a backend and calls the
`dsv4::nvfp4_grouped_gemm` custom op, which writes into `out` (opaque to torch.compile).
Backends register a function and a `supports(device) -> (ok, why)` probe; selection takes the
highest-priority backend that supports the device (sm100 > sm90 > torch), and an override that
names a backend whose capability is missing fails naming what it needs and what it got.
The backends are siblings, one module each, registered when dsv4.ops is imported:
`gemm_torch` (portable, any device), `gemm_sm90` (Triton, sm_90) and `gemm_sm100` (CuTeDSL,
sm_100a). A backend declares its scratch size (`workspace_bytes`), whether it reads B only
K-major, its own weight layout if it has one (`prepare_b`, made once at finalize by
`prepare_weight_codes`; `b_tiled`: it reads make_b_tiled's 4-D layout), and the shapes it can
tile (`shape_supports`, checked at the call: a refused shape fails naming why, never falls
back).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dsv4.ops import _checks
from dsv4.ops.layouts import ATOM_COLS, ATOM_ROWS, b_dims, make_b_k_major, round_up
from dsv4.ops.quantize import BLOCK

GemmFn = Callable[..., None]  # (mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out) -> None
Supports = Callable[[torch.device], tuple[bool, str]]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for on a device it cannot run on (the message names the need)."""


@dataclass(frozen=True)
class Backend:
    """A registered grouped-GEMM implementation."""

    name: str
    fn: GemmFn
    supports: Supports
    priority: int  # higher wins when several support the device
    # (T, K, N, E) -> bytes of scratch the backend takes as `workspace=`; None: takes none
    workspace_bytes: Callable[[int, int, int, int], int] | None = None
    # reads mat_b only K-major (make_b_k_major's layout, made once at finalize), else any strides
    b_k_major: bool = False
    # (T, K, N, E) -> (ok, why): the shapes the backend implements; None: every valid shape
    shape_supports: Callable[[int, int, int, int], tuple[bool, str]] | None = None
    # codes [E, K/2, N] -> the backend's own weight layout (made once at finalize); None: as
    # b_k_major says
    prepare_b: Callable[[torch.Tensor], torch.Tensor] | None = None
    # also reads make_b_tiled's 4-D layout [E, N/16, K/128, 1024]
    b_tiled: bool = False


_BACKENDS: dict[str, Backend] = {}

# Default priorities by name, so that sm100 > sm90 > torch holds whoever registers them.
DEFAULT_PRIORITY = {"sm100": 100, "sm90": 90, "torch": 0}

# Backends the design names but that are not written yet: an override naming one says so.
PLANNED_BACKENDS: dict[str, str] = {}


# --------------------------------------------------------------------------------------------
# capability probes (called where needed, cached; importing this module touches no GPU)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device | str) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


def describe_device(device: torch.device | str) -> str:
    """'sm_90', 'sm_100' for CUDA devices, the device type otherwise ('cpu')."""
    cap = device_capability(device)
    return torch.device(device).type if cap is None else f"sm_{cap[0]}{cap[1]}"


def requires_capability(major: int, minor: int = 0) -> Supports:
    """A supports probe: CUDA devices of compute capability major.x with x >= minor."""

    def supports(device: torch.device) -> tuple[bool, str]:
        cap = device_capability(device)
        if cap is not None and cap[0] == major and cap[1] >= minor:
            return True, ""
        return False, f"needs sm_{major}{minor}, got {describe_device(device)}"

    return supports


def any_device(device: torch.device) -> tuple[bool, str]:
    return True, ""


# --------------------------------------------------------------------------------------------
# registry


def register_backend(
    name: str,
    fn: GemmFn,
    supports: Supports,
    *,
    priority: int | None = None,
    workspace_bytes: Callable[[int, int, int, int], int] | None = None,
    b_k_major: bool = False,
    shape_supports: Callable[[int, int, int, int], tuple[bool, str]] | None = None,
    prepare_b: Callable[[torch.Tensor], torch.Tensor] | None = None,
    b_tiled: bool = False,
) -> None:
    """Add (or replace) a backend. `fn(mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out)`
    gets validated operands and writes `out`; `supports(device) -> (ok, why)` says where it runs
    (`requires_capability(10, 0)` for sm100). `priority` defaults to DEFAULT_PRIORITY[name].
    `b_k_major`: the backend reads mat_b only in make_b_k_major's layout (checked at the call).
    `shape_supports(T, K, N, E) -> (ok, why)`: the shapes it implements (checked at the call).
    `prepare_b(codes [E, K/2, N]) -> mat_b`: the backend's own weight layout, which
    `prepare_weight_codes` makes once at finalize; `b_tiled`: it reads make_b_tiled's layout."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name=}")
    if not callable(fn) or not callable(supports):
        raise ValueError(f"fn and supports must be callable, got {fn=} {supports=}")
    prio = DEFAULT_PRIORITY.get(name, 0) if priority is None else priority
    _BACKENDS[name] = Backend(
        name, fn, supports, prio, workspace_bytes, b_k_major, shape_supports, prepare_b, b_tiled
    )


def prepare_weight_codes(b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Weight codes [E, K/2, N] -> the layout `backend` reads (None: the backend
    select_backend picks for b's device; a named one needs no device of its kind, so weights
    can be laid out ahead), made once at finalize: its declared `prepare_b`, else
    make_b_k_major's where it reads only K-major, else b itself."""
    _checks.tensor("b", b, (torch.uint8,), ndim=3)
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not registered; registered: {', '.join(available_backends())}"
        )
    spec = _BACKENDS[backend or select_backend(b.device)]
    if spec.prepare_b is not None:
        return spec.prepare_b(b)
    return make_b_k_major(b) if spec.b_k_major else b


def backend_supports_shape(backend: str, t: int, k: int, n: int, e: int) -> tuple[bool, str]:
    """(ok, why) for A [T, K/2] x B [E, K/2, N] on `backend` (every shape when it declares no
    shape_supports); `why` names the backend."""
    fn = _BACKENDS[backend].shape_supports
    if fn is None:
        return True, ""
    ok, why = fn(t, k, n, e)
    return ok, ("" if ok else f"backend {backend!r}: {why}")


def grouped_gemm_workspace_bytes(backend: str, t: int, k: int, n: int, e: int) -> int:
    """Scratch bytes `backend` needs (as `workspace=`) for A [T, K/2] x B [E, K/2, N]; 0 for a
    backend that takes no workspace (then pass workspace=None)."""
    fn = _BACKENDS[backend].workspace_bytes
    return 0 if fn is None else fn(t, k, n, e)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Registered backend names, best first; with a device, only those that support it."""
    ranked = sorted(_BACKENDS.values(), key=lambda b: -b.priority)
    if device is None:
        return [b.name for b in ranked]
    dev = torch.device(device)
    return [b.name for b in ranked if b.supports(dev)[0]]


def select_backend(
    device: torch.device | str,
    override: str | None = None,
    shapes: Sequence[tuple[int, int, int, int]] = (),
) -> str:
    """The backend to run on `device`: `override` if given (it must support the device and
    every (T, K, N, E) in `shapes`), else the highest-priority registered backend that does."""
    dev = torch.device(device)
    if override is not None:
        if override not in _BACKENDS:
            planned = PLANNED_BACKENDS.get(override)
            what = f"not implemented yet ({planned})" if planned else "not registered"
            raise ValueError(
                f"backend={override!r} is {what}; registered: {', '.join(available_backends())}"
            )
        ok, why = _BACKENDS[override].supports(dev)
        if not ok:
            raise BackendUnavailableError(f"backend {override!r} {why}")
        for shape in shapes:
            ok, why = backend_supports_shape(override, *shape)
            if not ok:
                raise ValueError(why)
        return override
    reasons = []
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        ok, why = b.supports(dev)
        if ok:
            checks = [b.shape_supports(*s) for s in shapes] if b.shape_supports else []
            refused = [why for ok, why in checks if not ok]
            if not refused:
                return b.name
            why = f"cannot tile: {refused[0]}"
        reasons.append(f"{b.name!r} {why}")
    raise BackendUnavailableError(
        f"no grouped-GEMM backend supports {describe_device(dev)}: {'; '.join(reasons)}"
    )


# --------------------------------------------------------------------------------------------
# validation


def _validate(mat_a, mat_b, scale_a, scale_b, expert_offsets, gsa, gsb, out) -> None:
    _checks.tensor("mat_a", mat_a, (torch.uint8,), ndim=2)
    _checks.tensor("mat_b", mat_b, (torch.uint8,))
    if mat_b.dim() not in (3, 4) or (mat_b.dim() == 4 and mat_b.shape[3] != 1024):
        raise ValueError(
            "mat_b must be [E, K/2, N] (or make_b_tiled's [E, N/16, K/128, 1024]), got "
            f"mat_b.shape={tuple(mat_b.shape)}"
        )
    _checks.tensor("scale_a", scale_a, _checks.SCALE_DTYPES, ndim=1)
    _checks.tensor("scale_b", scale_b, _checks.SCALE_DTYPES, ndim=2)
    _checks.tensor("expert_offsets", expert_offsets, (torch.int32,), ndim=1)
    _checks.tensor("global_scale_a", gsa, (torch.float32,), ndim=1)
    _checks.tensor("global_scale_b", gsb, (torch.float32,), ndim=1)
    t, kh = mat_a.shape
    e, kbh, n = b_dims(mat_b)
    k = 2 * kh
    if k % BLOCK:
        raise ValueError(f"K must be a multiple of {BLOCK}, got mat_a.shape={tuple(mat_a.shape)}")
    if kbh != kh:
        raise ValueError(
            f"K mismatch: mat_a.shape={tuple(mat_a.shape)} (K={k}) but "
            f"mat_b.shape={tuple(mat_b.shape)} (K={2 * kbh})"
        )
    if e == 0:
        raise ValueError(
            f"mat_b must hold at least one expert, got mat_b.shape={tuple(mat_b.shape)}"
        )
    cp = round_up(k // BLOCK, ATOM_COLS)
    if scale_a.numel() % (ATOM_ROWS * cp):
        raise ValueError(
            f"scale_a must be the swizzled 2-D side (whole 128-row atoms of round_up(K/16, 4)="
            f"{cp} columns: a multiple of {ATOM_ROWS * cp} bytes), got scale_a.numel()="
            f"{scale_a.numel()}"
        )
    per_expert = round_up(n, ATOM_ROWS) * cp
    if tuple(scale_b.shape) != (e, per_expert):
        raise ValueError(
            f"scale_b must be [E, round_up(N, 128) * round_up(K/16, 4)]={(e, per_expert)} for "
            f"mat_b.shape={tuple(mat_b.shape)}, got scale_b.shape={tuple(scale_b.shape)}"
        )
    if expert_offsets.shape[0] != e:
        raise ValueError(
            f"expert_offsets must hold E={e} entries, got expert_offsets.shape="
            f"{tuple(expert_offsets.shape)}"
        )
    for name, gs in (("global_scale_a", gsa), ("global_scale_b", gsb)):
        if gs.shape[0] not in (1, e):
            raise ValueError(
                f"{name} must hold E={e} (or 1) entries, got {name}.shape={tuple(gs.shape)}"
            )
    if out is not None:
        _checks.tensor("out", out, (torch.bfloat16,), ndim=2)
        _checks.shape("out", out, (t, n))
    _checks.same_device(
        mat_a=mat_a,
        mat_b=mat_b,
        scale_a=scale_a,
        scale_b=scale_b,
        expert_offsets=expert_offsets,
        global_scale_a=gsa,
        global_scale_b=gsb,
        out=out,
    )


# --------------------------------------------------------------------------------------------
# custom op and public entry


@torch.library.custom_op("dsv4::nvfp4_grouped_gemm", mutates_args=("out", "workspace"))
def _grouped_gemm_op(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    expert_offsets: torch.Tensor,
    global_scale_a: torch.Tensor,
    global_scale_b: torch.Tensor,
    out: torch.Tensor,
    backend: str,
    workspace: torch.Tensor | None,
) -> None:
    args = (mat_a, mat_b, scale_a, scale_b, expert_offsets, global_scale_a, global_scale_b, out)
    if workspace is None:
        _BACKENDS[backend].fn(*args)
    else:
        _BACKENDS[backend].fn(*args, workspace=workspace)


@_grouped_gemm_op.register_fake
def _(mat_a, mat_b, scale_a, scale_b, offsets, gsa, gsb, out, backend, workspace):
    return None


def run_nvfp4_grouped_gemm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    expert_offsets: torch.Tensor,
    global_scale_a: torch.Tensor,
    global_scale_b: torch.Tensor,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[rows of e] = bf16(alpha_e * (A[rows of e] @ B[e])), alpha_e = gsa[e] * gsb[e] in fp32.

    mat_a uint8 [T, K/2]; mat_b uint8 [E, K/2, N] (any strides: a `make_b_k_major` view is the
    production layout); scale_a the swizzled 2-D side (`assemble_scales_2d_side*`, per-group
    128-padded rows, 1-D bytes); scale_b [E, round_up(N,128) * round_up(K/16,4)] swizzled 3-D
    side; expert_offsets int32 [E] cumulative END offsets; global scales fp32 [E] (or [1]),
    decode convention. Returns `out` (bf16 [T, N]); rows past expert_offsets[-1] are left as
    they were (zeros when out=None). `backend`: a registered name, or None to select by device.
    `workspace`: scratch for a backend that takes one (uint8 1-D, at least
    `grouped_gemm_workspace_bytes(backend, T, K, N, E)` bytes): the torch backend then
    allocates nothing; must be None for a backend that takes none.
    """
    _validate(mat_a, mat_b, scale_a, scale_b, expert_offsets, global_scale_a, global_scale_b, out)
    name = select_backend(mat_a.device, backend)
    e, _, n = b_dims(mat_b)
    ok, why = backend_supports_shape(name, mat_a.shape[0], 2 * mat_a.shape[1], n, e)
    if not ok:
        raise ValueError(why)
    if mat_b.dim() == 4 and not _BACKENDS[name].b_tiled:
        raise ValueError(
            f"mat_b is make_b_tiled's layout (shape {tuple(mat_b.shape)}), which backend "
            f"{name!r} does not read: give it prepare_weight_codes(codes, {name!r})"
        )
    if mat_b.dim() == 3 and _BACKENDS[name].b_k_major and mat_b.stride(1) != 1:
        raise ValueError(
            f"backend {name!r} reads mat_b K-major (make_b_k_major, once at finalize), got "
            f"mat_b.stride()={mat_b.stride()}"
        )
    if workspace is not None:
        t = mat_a.shape[0]
        need = grouped_gemm_workspace_bytes(name, t, 2 * mat_a.shape[1], n, e)
        if _BACKENDS[name].workspace_bytes is None:
            raise ValueError(f"backend {name!r} takes no workspace, got one")
        _checks.workspace(workspace, mat_a.device, need)
    if out is None:
        out = torch.zeros((mat_a.shape[0], n), dtype=torch.bfloat16, device=mat_a.device)
    _grouped_gemm_op(
        mat_a,
        mat_b,
        scale_a,
        scale_b,
        expert_offsets,
        global_scale_a,
        global_scale_b,
        out,
        name,
        workspace,
    )
    return out
