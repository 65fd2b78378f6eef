"""NVFP4 quantization: dynamic (amax), static (calibrated global scale) and weights.

Format and order of operations (docs/design.md §3), in fp32: x_n = x / gs; s = amax_block(|x_n|)
/ 6; clamp to [0, 448]; round to e4m3 (nearest even); q = x_n / s (0 where s == 0); round q to
E2M1 (nearest, ties to the even code, saturate to +-6, sign kept when rounding to zero).

How the bits are made here (the oracle in reference/ does it by comparison ladders; this file by
rounding arithmetic, so the two are independent statements of the same format):
- E2M1: the grid has quantum 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]; scaling |q| by 2, 1 or
  1/2 is exact, torch.round rounds halves to even, and an even grid point is an even code, so
  round(2|q|), round(|q|) + 2 and round(|q|/2) + 4 are the magnitude codes (then min 7).
- e4m3: the block scale is clamped to [0, 448] first, then torch's cast rounds it (nearest even,
  subnormals included; checked exhaustively in tests). Out-of-range values never reach the cast:
  torch 2.11 turns them into NaN, 2.13 on CPU saturates.
- NaN policy (explicit): a NaN block amax gives scale byte 0x7F; a NaN element (or every element
  of a NaN-scaled block) gives code 0x7 (+6), as CUDA's software cvt path does.
The static path reads no tensor value on the host and writes into caller-owned outputs.

Implementations (`QUANT_IMPLS`): "torch" (this file, any device) and "cutedsl" (the fused kernel
of dsv4/kernels/cutedsl, CUDA sm_90+, same bits). `select_quant_impl(device, impl)` says which one
a call runs: impl=None takes cutedsl where it can run, else torch; naming one that cannot run
raises BackendUnavailableError saying what is missing. Callers record the name (the runners as
`quant_impl`, the harness adapter in its name): explicit, never a silent fallback.
"""

from __future__ import annotations

import functools

import torch

from dsv4.ops import _checks
from dsv4.ops._workspace import Sizer, Workspace, as_workspace, scalar

BLOCK = 16  # elements per block scale, along the last (contraction) dim
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_SCALE_DENOM = E2M1_MAX * E4M3_MAX  # decode convention: gs = amax / (6 * 448)
E4M3_NAN_BYTE = 0x7F  # scale byte of a block whose amax is NaN
E2M1_NAN_CODE = 0x7  # NaN policy: +6


# --------------------------------------------------------------------------------------------
# element formats


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """fp32 values in block-scale units -> uint8 E2M1 codes 0..15 (one per element, unpacked)."""
    q = q.float()
    full, dev = tuple(q.shape), q.device
    codes = torch.empty(full, dtype=torch.uint8, device=dev)
    f32 = [torch.empty(full, dtype=torch.float32, device=dev) for _ in range(3)]
    masks = [torch.empty(full, dtype=torch.bool, device=dev) for _ in range(2)]
    _e2m1_codes_into(q, codes, *f32, *masks)
    return codes


def _e2m1_codes_into(
    q: torch.Tensor,
    codes: torch.Tensor,
    a: torch.Tensor,
    f1: torch.Tensor,
    f2: torch.Tensor,
    m1: torch.Tensor,
    m2: torch.Tensor,
) -> None:
    """e2m1_codes(q) written into codes (uint8, q's shape) with caller-given fp32 / bool
    temporaries of q's shape (nothing allocated). The grid has quantum 0.5 on [0, 2), 1 on
    [2, 4) and 2 on [4, 6]: lo = round(2|q|) on [0, 2) (1.75 -> round(3.5) = 4, even); mid =
    round(|q|) + 2 on [2, 4) (2, 3, 4 are codes 4, 5, 6); hi = min(round(|q|/2) + 4, 7) on
    [4, inf] (4 -> 6, 6 -> 7, Inf -> 7). NaN fails both tests and lands in hi, then becomes
    E2M1_NAN_CODE; the sign bit 0x8 is kept for -0.0 and negatives rounding to 0, not NaN."""
    f32 = torch.float32
    torch.abs(q, out=a)
    torch.mul(a, scalar(0.5, f32), out=f1).round_().add_(scalar(4.0, f32)).clamp_(max=7.0)
    torch.round(a, out=f2).add_(scalar(2.0, f32))  # mid
    torch.lt(a, scalar(4.0, f32), out=m1)
    torch.where(m1, f2, f1, out=f1)
    torch.mul(a, scalar(2.0, f32), out=f2).round_()  # lo
    torch.lt(a, scalar(2.0, f32), out=m1)
    torch.where(m1, f2, f1, out=f1)  # magnitude code
    torch.ne(q, q, out=m1)  # isnan
    f1.nan_to_num_(nan=float(E2M1_NAN_CODE))
    torch.signbit(q, out=m2)
    m2.logical_and_(m1.logical_not_())
    codes.copy_(f1)
    codes.add_(m2.view(torch.uint8), alpha=8)  # | 0x8 (the magnitude is <= 7)


def e4m3_scale_bytes(s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 block scales -> UE4M3 bytes (uint8): clamp to [0, 448], round nearest even; NaN 0x7F.

    abs() maps a -0.0 scale to +0.0 (byte 0x00, not e4m3fn's -0 byte 0x80); the scale is unsigned.
    """
    s = s.float()
    if out is None:
        out = torch.empty(s.shape, dtype=torch.uint8, device=s.device)
    tmp = torch.empty(s.shape, dtype=torch.float32, device=s.device)
    mask = torch.empty(s.shape, dtype=torch.bool, device=s.device)
    _e4m3_scale_bytes_into(s, out, tmp, mask)
    return out


def _e4m3_scale_bytes_into(
    s: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor, mask: torch.Tensor
) -> None:
    """e4m3_scale_bytes(s) into out (uint8 or e4m3 bytes of s's shape), fp32 / bool temps."""
    torch.clamp(s, 0.0, E4M3_MAX, out=tmp).abs_()  # clamp BEFORE the cast: torch may not saturate
    out.view(torch.float8_e4m3fn).copy_(tmp)  # the cast .to() makes, written in place
    torch.ne(s, s, out=mask)  # isnan
    out.view(torch.uint8).masked_fill_(mask, E4M3_NAN_BYTE)  # a scalar fill: no host copy


def e2m1_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 16 E2M1 values by code (8 is -0.0), built on the device from arange: no host copy,
    so it may be built inside CUDA-graph capture."""
    code = torch.arange(16, device=device)
    exp, mant = (code >> 1) & 3, (code & 1).float()
    mag = torch.where(exp == 0, mant * 0.5, torch.exp2(exp.float() - 1.0) * (1.0 + mant * 0.5))
    return torch.where(code >= 8, -mag, mag).to(dtype)


def decode_e2m1(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed codes [..., K/2] (element 2i in the low nibble) -> values [..., K] in `dtype`."""
    table = e2m1_table(dtype, packed.device)
    pairs = torch.stack((packed & 0xF, packed >> 4), dim=-1).long()
    return table[pairs].flatten(-2)


# --------------------------------------------------------------------------------------------
# global scale


def nvfp4_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as fp32 0-d tensor, NaN ignored (as fmax-based kernel reductions), +Inf kept."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return torch.nan_to_num(x.float().abs(), nan=0.0, posinf=float("inf")).amax()


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Decode-convention global scale amax / (6 * 448) in fp32; 1.0 where amax is 0."""
    amax = amax.float()
    denom = torch.full_like(amax, GLOBAL_SCALE_DENOM)  # true division (see quantize_into)
    return torch.where(amax > 0, amax / denom, torch.ones_like(amax))


# --------------------------------------------------------------------------------------------
# implementations

QUANT_IMPLS = ("torch", "cutedsl")


class QuantImplUnavailableError(RuntimeError):
    """A quantize implementation was asked for where it cannot run (the message says why)."""


@functools.cache
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def cutedsl_supports(device: torch.device | str) -> tuple[bool, str]:
    """Whether the CuTeDSL quantize kernels run on `device`: (ok, why not)."""
    from dsv4.kernels.cutedsl import available

    device = torch.device(device)
    if device.type != "cuda":
        return False, f"needs a CUDA device of sm_90 or newer, got {device.type}"
    major = _cuda_major(device.index if device.index is not None else torch.cuda.current_device())
    if major < 9:
        return False, f"needs sm_90 or newer, got sm_{major}x"
    return available()


def select_quant_impl(device: torch.device | str, impl: str | None = None) -> str:
    """The quantize implementation for `device`: `impl` if given (it must run there), else
    "cutedsl" where it runs and "torch" elsewhere."""
    if impl is not None and impl not in QUANT_IMPLS:
        raise ValueError(f"impl must be one of {QUANT_IMPLS} or None, got {impl=}")
    if impl == "torch":
        return impl
    ok, why = cutedsl_supports(device)
    if impl == "cutedsl" and not ok:
        raise QuantImplUnavailableError(f"quantize impl 'cutedsl' {why}")
    return "cutedsl" if ok else "torch"


def _cutedsl_quantize(
    x, gs, codes_out, scales_out, row_weight=None, swiglu: bool = False, limit=None
) -> None:
    """The CuTeDSL kernel with linear scales into the given outputs (x [..., K] as [T, K]);
    swiglu=True: x is the L1 output [..., 2I], quantized after the SwiGLU with `limit`."""
    from dsv4.kernels.cutedsl import nvfp4_quant as nq

    x2 = x.reshape(-1, x.shape[-1])
    dtype = str(x.dtype).removeprefix("torch.")
    if swiglu:
        cfg = nq.QuantConfig(
            x2.shape[1] // 2,
            dtype,
            nq.ScaleLayout.LINEAR,
            prologue=nq.Prologue.SWIGLU,
            swiglu_limit=limit,
            row_weight=row_weight is not None,
        )
    else:
        cfg = nq.QuantConfig(x2.shape[1], dtype, nq.ScaleLayout.LINEAR)
    codes, scales = codes_out.view(-1, codes_out.shape[-1]), scales_out.view(-1, cfg.cols)
    cfg = nq.tuned(cfg, codes=codes, scales=scales)
    nq.run_quant(cfg, x2, gs.reshape(1), codes, scales, row_weight)


# --------------------------------------------------------------------------------------------
# the one quantizer every public function goes through


def _check_x(name: str, x: object) -> torch.Tensor:
    _checks.tensor(name, x, _checks.FLOAT_INPUTS, min_ndim=1)
    if x.shape[-1] % BLOCK:
        raise ValueError(
            f"{name} last dim must be a multiple of {BLOCK}, got {name}.shape={tuple(x.shape)}"
        )
    return x


def _check_outputs(x: torch.Tensor, codes_out: torch.Tensor, scales_out: torch.Tensor) -> None:
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    _checks.tensor("codes_out", codes_out, (torch.uint8,))
    _checks.tensor("scales_out", scales_out, (torch.float8_e4m3fn,))
    _checks.shape("codes_out", codes_out, (*lead, k // 2))
    _checks.shape("scales_out", scales_out, (*lead, k // BLOCK))
    _checks.same_device(x=x, codes_out=codes_out, scales_out=scales_out)


def _quantize_buffers(ws: Workspace | Sizer, shape: tuple[int, ...]) -> tuple:
    full, blk = shape, (*shape[:-1], shape[-1] // BLOCK)
    f32 = torch.float32
    return (
        *(ws.empty(full, f32) for _ in range(4)),
        ws.empty(blk, f32),
        ws.empty(blk, f32),
        ws.empty(blk, torch.bool),
        ws.empty(full, torch.bool),
        ws.empty(full, torch.bool),
        ws.empty(full, torch.uint8),
    )


def quantize_workspace_bytes(shape: tuple[int, ...]) -> int:
    """Workspace bytes the static quantizer needs for an input of `shape` [..., K]."""
    sizer = Sizer()
    _quantize_buffers(sizer, tuple(shape))
    return sizer.off


def quantize_into(
    x: torch.Tensor,
    gs: torch.Tensor,
    codes_out: torch.Tensor,
    scales_out: torch.Tensor,
    workspace: Workspace | torch.Tensor | None = None,
) -> None:
    """Quantize x [..., K] with the 0-d fp32 global scale gs into codes_out / scales_out.

    No validation (callers validate) and no host sync. Temporaries come from `workspace` (a
    uint8 arena of at least `quantize_workspace_bytes(x.shape)` bytes: then nothing at all is
    allocated), else from the caching allocator; the results go to the outputs.
    """
    ws = as_workspace(workspace, x.device)
    xn, t1, t2, t3, s, s32, mb, m1, m2, codes = _quantize_buffers(ws, tuple(x.shape))
    # order of operations matters for bits: divide, not multiply by 1/gs
    if x.dtype == torch.float32:
        torch.div(x, gs, out=xn)
    else:
        xn.copy_(x).div_(gs)  # x.float() / gs
    blocks = xn.unflatten(-1, (-1, BLOCK))
    torch.abs(blocks, out=t1.unflatten(-1, (-1, BLOCK)))
    torch.amax(t1.unflatten(-1, (-1, BLOCK)), dim=-1, out=s)  # NaN-propagating: stays visible
    # a true division, as the reference: divided by a device tensor (PyTorch's CUDA division
    # by a CPU scalar multiplies by its reciprocal, which is not RN(amax / 6))
    s.div_(s32.fill_(E2M1_MAX))
    _e4m3_scale_bytes_into(s, scales_out, s32, mb)
    # the rounded scale as written (0x7F reads as NaN); through the byte view, so a uint8
    # scales_out works too
    s32.copy_(scales_out.view(torch.uint8).view(torch.float8_e4m3fn))
    torch.logical_not(s32, out=mb)  # s == 0 (NaN is not 0)
    q = t2.unflatten(-1, (-1, BLOCK))
    torch.div(blocks, s32.unsqueeze(-1), out=q)
    q.masked_fill_(mb.unsqueeze(-1), 0.0)  # where(s == 0, 0, x / s)
    _e2m1_codes_into(t2, codes, t1, xn, t3, m1, m2)
    # pack, element 2i in the low nibble: lo | hi << 4 == lo + 16 * hi for nibbles
    torch.add(codes[..., 0::2], codes[..., 1::2], alpha=16, out=codes_out)


# --------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile: same bits compiled or not)


@torch.library.custom_op(
    "dsv4::quantize_nvfp4_static", mutates_args=("codes_out", "scales_out", "workspace")
)
def _quantize_static_op(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    codes_out: torch.Tensor,
    scales_out: torch.Tensor,
    workspace: torch.Tensor | None,
    impl: str = "torch",
) -> None:
    if impl == "cutedsl":
        _cutedsl_quantize(x, global_scale, codes_out, scales_out)
    else:
        quantize_into(x, global_scale.reshape(()), codes_out, scales_out, workspace)


@_quantize_static_op.register_fake
def _(x, global_scale, codes_out, scales_out, workspace, impl="torch") -> None:
    return None


@torch.library.custom_op("dsv4::quantize_nvfp4_dynamic", mutates_args=())
def _quantize_dynamic_op(
    x: torch.Tensor, impl: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gs = global_scale_from_amax(nvfp4_amax(x))  # the amax reduction on the device, then static
    codes = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty(
        (*x.shape[:-1], x.shape[-1] // BLOCK), dtype=torch.float8_e4m3fn, device=x.device
    )
    if impl == "cutedsl":
        _cutedsl_quantize(x, gs, codes, scales)
    else:
        quantize_into(x, gs, codes, scales)
    return codes, scales, gs


@_quantize_dynamic_op.register_fake
def _(x, impl="torch"):
    lead = tuple(x.shape[:-1])
    return (
        x.new_empty((*lead, x.shape[-1] // 2), dtype=torch.uint8),
        x.new_empty((*lead, x.shape[-1] // BLOCK), dtype=torch.float8_e4m3fn),
        x.new_empty((), dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------------
# public API (names of the serving code, docs/design.md §2)


def quantize_to_nvfp4(
    x: torch.Tensor, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic: x [..., K] -> (codes uint8 [..., K/2], scales e4m3 [..., K/16], gs fp32 0-d).

    gs = amax(|x|) / (6 * 448) (NaN ignored, 1.0 for an all-zero x), computed on the device (a
    torch reduction), then the static quantizer of `impl` (see `select_quant_impl`).
    """
    _check_x("x", x)
    return _quantize_dynamic_op(x, select_quant_impl(x.device, impl))


def quantize_activation_nvfp4(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    codes_out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static: quantize x [..., K] with a calibrated gs (fp32, one element, on x's device).

    Returns (codes_out, scales_out). With both outputs given nothing is allocated for the
    results and no tensor value is read on the host: the call is CUDA-graph capturable. With a
    `workspace` too (uint8 1-D, at least `quantize_workspace_bytes(x.shape)` bytes, on x's
    device) the temporaries live there and the call allocates nothing at all. Values beyond the
    calibrated amax saturate in the block scale (448), never NaN. `impl`: see
    `select_quant_impl` (None: cutedsl on CUDA where it runs, else torch); same bits either way.
    """
    _check_x("x", x)
    gs = _checks.global_scale("global_scale", global_scale, x.device)
    if (codes_out is None) != (scales_out is None):
        raise ValueError(
            "codes_out and scales_out must be given together, got "
            f"codes_out={'None' if codes_out is None else 'tensor'} "
            f"scales_out={'None' if scales_out is None else 'tensor'}"
        )
    if codes_out is None:
        lead, k = tuple(x.shape[:-1]), x.shape[-1]
        codes_out = torch.empty((*lead, k // 2), dtype=torch.uint8, device=x.device)
        scales_out = torch.empty((*lead, k // BLOCK), dtype=torch.float8_e4m3fn, device=x.device)
    else:
        _check_outputs(x, codes_out, scales_out)
    _checks.workspace(workspace, x.device, quantize_workspace_bytes(tuple(x.shape)))
    _quantize_static_op(x, gs, codes_out, scales_out, workspace, select_quant_impl(x.device, impl))
    return codes_out, scales_out


def quantize_activation_nvfp4_grouped(
    x: torch.Tensor,
    global_scales: torch.Tensor,
    codes_out: torch.Tensor,
    scales_out: torch.Tensor,
    workspace: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static, one scale per group: x [T, G, K] (group g = x[:, g]) with gs fp32 [G] ->
    codes_out uint8 [G*T, K/2] and scales_out e4m3 [G*T, K/16], group g in rows g*T..(g+1)*T.

    cutedsl: one launch for all groups; torch: one quantize per group (workspace as
    `quantize_workspace_bytes((T, K))`). Graph-capturable, nothing read on the host.
    """
    _checks.tensor("x", x, _checks.FLOAT_INPUTS, ndim=3)
    _check_x("x", x)
    t, g, k = x.shape
    _checks.tensor("global_scales", global_scales, (torch.float32,), ndim=1)
    _checks.shape("global_scales", global_scales, (g,))
    _checks.tensor("codes_out", codes_out, (torch.uint8,))
    _checks.tensor("scales_out", scales_out, (torch.float8_e4m3fn,))
    _checks.shape("codes_out", codes_out, (g * t, k // 2))
    _checks.shape("scales_out", scales_out, (g * t, k // BLOCK))
    _checks.same_device(x=x, gs=global_scales, codes_out=codes_out, scales_out=scales_out)
    impl = select_quant_impl(x.device, impl)
    if impl == "cutedsl":
        from dsv4.kernels.cutedsl import nvfp4_quant as nq

        cfg = nq.QuantConfig(k, str(x.dtype).removeprefix("torch."), nq.ScaleLayout.LINEAR, g)
        cfg = nq.tuned(cfg, codes=codes_out, scales=scales_out)
        nq.run_quant(cfg, x, global_scales, codes_out, scales_out)
        return codes_out, scales_out
    for i in range(g):  # the torch quantizer takes one scale per call
        rows = slice(i * t, (i + 1) * t)
        quantize_activation_nvfp4(
            x[:, i], global_scales[i : i + 1], codes_out[rows], scales_out[rows], workspace, impl
        )
    return codes_out, scales_out


def quantize_weight_to_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight w [K, N], blocks of 16 along K (the contraction dim).

    Returns (codes uint8 [K/2, N], scales e4m3 [K/16, N], gs fp32 0-d), N-major like the
    serving code; `make_b_k_major` turns stacked codes K-major. gs from w's amax unless given.
    """
    _checks.tensor("w", w, _checks.FLOAT_INPUTS, ndim=2)
    if w.shape[0] % BLOCK:
        raise ValueError(
            f"w must be [K, N] with K a multiple of {BLOCK}, got w.shape={tuple(w.shape)}"
        )
    # impl="torch": wt is a transposed view (the kernels take a contiguous last dim), and
    # weights are quantized once, at finalize
    wt = w.t()
    if global_scale is None:
        codes, scales, gs = quantize_to_nvfp4(wt, impl="torch")
    else:
        gs = _checks.global_scale("global_scale", global_scale, w.device)
        codes, scales = quantize_activation_nvfp4(wt, gs, impl="torch")
    return codes.t().contiguous(), scales.t().contiguous(), gs


def dequantize_nvfp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes [..., K/2], scales [..., K/16] (blocks along the last dim) -> values [..., K].

    code * scale is exact in bf16 and fp32 (<= 6 significant bits, docs/design.md §3); with a
    global scale the product is taken in fp32 and rounded once to `dtype`.
    """
    _checks.tensor("codes", codes, (torch.uint8,), min_ndim=1)
    _checks.tensor("scales", scales, _checks.SCALE_DTYPES, min_ndim=1)
    k = 2 * codes.shape[-1]
    if tuple(scales.shape) != (*codes.shape[:-1], k // BLOCK) or k % BLOCK:
        raise ValueError(
            f"scales must be [..., K/16] for codes [..., K/2], got codes.shape="
            f"{tuple(codes.shape)} scales.shape={tuple(scales.shape)}"
        )
    s = scales.view(torch.float8_e4m3fn).float().repeat_interleave(BLOCK, dim=-1)
    vals = decode_e2m1(codes) * s
    if global_scale is not None:
        vals = vals * _checks.global_scale("global_scale", global_scale, codes.device)
    return vals.to(dtype)
