"""Reference NVFP4 grouped GEMM (2D x 3D) and the error bound a kernel's result must meet.

A [T, K] holds the tokens of all experts back to back (expert e owns rows offsets[e-1]:offsets[e],
offsets are int32 cumulative END offsets); B [E, K, N] holds one weight per expert, blocks of 16
along K. Both operands are dequantized WITHOUT their global scales: code * block scale has at most
6 significant bits, exact in bf16 and fp32 (docs/design.md §3), so the fp32 matmul below equals a
bf16 block-scaled MMA with fp32 accumulation up to the order of summation. The fp32 accumulator is
then multiplied by alpha = gsa[e] * gsb[e] (fp32, decode convention) and cast to the output dtype,
as the serving kernels' epilogue does. `oracle=True` runs the same formula in float64.

Summation order is the one thing a correct kernel may do differently, so kernels are judged with
`grouped_gemm_error_bound`: a bound derived from K and the operands (docstring has the derivation),
never a hand-picked tolerance. Rows not covered by any expert are 0 in the result and in the bound.

Memory is bounded by one expert: B is dequantized expert by expert inside the loop, never all E
at once (48 V4-Pro experts of 7168 x 6144 in float64 were 15.75 GiB in one allocation; one is
0.33 GiB). Each expert's dequantized B has the layout the whole-tensor dequantization gave its
slice, so the matmuls, and the results, are bit-identical to dequantizing everything first.
"""

from __future__ import annotations

import torch

from reference.nvfp4 import BLOCK, dequantize_nvfp4, dequantize_weight_nvfp4

U32 = 2.0**-24  # unit roundoff of fp32 (round to nearest)
U64 = 2.0**-53  # unit roundoff of float64
# Unit roundoff of the final cast (half an ulp, relative). fp32 -> fp32 is a no-op; its 2^-24 is a
# spare rounding for epilogues that round once more than ours.
OUT_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: U32}
# Absolute error of rounding into the subnormal range: half the smallest subnormal.
_UNDERFLOW = {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25, torch.float32: 2.0**-150}
_U64_UNDERFLOW = 2.0**-1074  # the smallest float64 subnormal (its half is not representable)
_EVAL_SLACK = 2.0**-40  # covers float64 rounding while evaluating the bound's dozen operations


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n*u / (1 - n*u): relative error bound of n roundings (needs n*u < 1)."""
    if n * u >= 1.0:
        raise ValueError(f"gamma needs n*u < 1, got {n=} {u=}")
    return n * u / (1.0 - n * u)


# --------------------------------------------------------------------------------------------
# validation


def _check_tensor(name: str, x: object, dtype: torch.dtype, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {name}.dtype={x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got {name}.shape={tuple(x.shape)}")
    return x


def _validate(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    b_codes: torch.Tensor,
    b_scales: torch.Tensor,
    expert_offsets: torch.Tensor,
    global_scale_a: torch.Tensor,
    global_scale_b: torch.Tensor,
    out_dtype: torch.dtype,
) -> list[int]:
    """Check every argument against the contract; return the offsets as Python ints."""
    _check_tensor("a_codes", a_codes, torch.uint8, 2)
    _check_tensor("a_scales", a_scales, torch.float8_e4m3fn, 2)
    _check_tensor("b_codes", b_codes, torch.uint8, 3)
    _check_tensor("b_scales", b_scales, torch.float8_e4m3fn, 3)
    _check_tensor("expert_offsets", expert_offsets, torch.int32, 1)
    _check_tensor("global_scale_a", global_scale_a, torch.float32, 1)
    _check_tensor("global_scale_b", global_scale_b, torch.float32, 1)
    if out_dtype not in OUT_UNIT_ROUNDOFF:
        raise ValueError(f"out_dtype must be one of {list(OUT_UNIT_ROUNDOFF)}, got {out_dtype=}")

    t, k_half = a_codes.shape
    e, kb_half, n = b_codes.shape
    k = 2 * k_half
    if k % BLOCK:
        raise ValueError(
            f"K must be a multiple of {BLOCK}, got a_codes.shape={tuple(a_codes.shape)}"
        )
    if kb_half != k_half:
        raise ValueError(
            f"K mismatch: a_codes.shape={tuple(a_codes.shape)} (K={k}) but "
            f"b_codes.shape={tuple(b_codes.shape)} (K={2 * kb_half})"
        )
    if tuple(a_scales.shape) != (t, k // BLOCK):
        raise ValueError(
            f"a_scales must be [T, K/16]={(t, k // BLOCK)} for "
            f"a_codes.shape={tuple(a_codes.shape)}, got a_scales.shape={tuple(a_scales.shape)}"
        )
    if tuple(b_scales.shape) != (e, k // BLOCK, n):
        raise ValueError(
            f"b_scales must be [E, K/16, N]={(e, k // BLOCK, n)} for "
            f"b_codes.shape={tuple(b_codes.shape)}, got b_scales.shape={tuple(b_scales.shape)}"
        )
    for name, x in (
        ("expert_offsets", expert_offsets),
        ("global_scale_a", global_scale_a),
        ("global_scale_b", global_scale_b),
    ):
        if x.shape[0] != e:
            raise ValueError(f"{name} must hold E={e} entries (b_codes.shape[0]), got {x.shape[0]}")
    devices = {x.device for x in (a_codes, a_scales, b_codes, b_scales, expert_offsets)}
    devices |= {global_scale_a.device, global_scale_b.device}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")

    offsets = [int(o) for o in expert_offsets.tolist()]  # host copy: the reference may sync
    prev = 0
    for i, o in enumerate(offsets):
        if o < prev:
            raise ValueError(
                f"expert_offsets must be non-decreasing and >= 0, got expert_offsets[{i}]={o} "
                f"after {prev}: {offsets}"
            )
        prev = o
    if offsets and offsets[-1] > t:
        raise ValueError(f"expert_offsets[-1]={offsets[-1]} exceeds T={t} (a_codes.shape[0])")
    return offsets


# --------------------------------------------------------------------------------------------
# dequantize (no global scale)


def dequantize_codes_scales(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [..., K/2], scales [..., K/16] (blocks along the last dim) -> code * scale in fp32.

    No global scale: each value is an E2M1 value times a UE4M3 scale, exact in fp32 (and bf16).
    """
    return dequantize_nvfp4(codes, scales, 1.0)  # * 1.0 is exact


def _expert_weight(
    b_codes: torch.Tensor, b_scales: torch.Tensor, e: int, dtype: torch.dtype
) -> torch.Tensor:
    """Exact B[e] [K, N] in `dtype`, without its global scale: one expert at a time (the float64
    working set is one expert's weight, not E of them). Strides (1, K), as a slice of the whole
    dequantized tensor has: the same BLAS call, the same bits."""
    return dequantize_weight_nvfp4(b_codes[e], b_scales[e], 1.0).to(dtype)


def _expert_rows(offsets: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each non-empty expert."""
    starts = [0, *offsets[:-1]]
    return [(e, s, end) for e, (s, end) in enumerate(zip(starts, offsets, strict=True)) if end > s]


# --------------------------------------------------------------------------------------------
# GEMM


def grouped_gemm_nvfp4(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    b_codes: torch.Tensor,
    b_scales: torch.Tensor,
    expert_offsets: torch.Tensor,
    global_scale_a: torch.Tensor,
    global_scale_b: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    oracle: bool = False,
) -> torch.Tensor:
    """out[rows of e] = cast(alpha_e * (A[rows of e] @ B[e])), alpha_e = gsa[e] * gsb[e]; [T, N].

    a_codes uint8 [T, K/2], a_scales e4m3 [T, K/16] (plain, not swizzled), b_codes uint8
    [E, K/2, N], b_scales e4m3 [E, K/16, N], expert_offsets int32 [E] cumulative END offsets
    (empty experts allowed, offsets[-1] <= T), global scales fp32 [E] in the decode convention.

    Order of operations (the bits depend on it): A and B dequantized without global scales
    (exact); matmul in fp32 (products exact, sums rounded in BLAS order); alpha = gsa * gsb in
    fp32; acc * alpha in fp32; cast to `out_dtype`. `oracle=True`: all of it in float64 and the
    float64 result is returned (`out_dtype` is ignored, no output rounding).
    Rows not covered by any expert (offsets[-1]:T) are 0.
    """
    args = (a_codes, a_scales, b_codes, b_scales, expert_offsets, global_scale_a, global_scale_b)
    offsets = _validate(*args, out_dtype)
    acc_dtype = torch.float64 if oracle else torch.float32
    # exact: values have <= 6 significant bits, so even a TF32 matmul on GPU sees them unrounded
    a = dequantize_codes_scales(a_codes, a_scales).to(acc_dtype)
    # fp32: gsa * gsb rounds once, as a kernel computing alpha on the host or in the epilogue.
    # float64: the product of two fp32 values is exact.
    alpha = global_scale_a.to(acc_dtype) * global_scale_b.to(acc_dtype)
    out = torch.zeros(a.shape[0], b_codes.shape[2], dtype=acc_dtype, device=a.device)
    for e, start, end in _expert_rows(offsets):
        out[start:end] = (a[start:end] @ _expert_weight(b_codes, b_scales, e, acc_dtype)) * alpha[e]
    return out if oracle else out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# error bound


def grouped_gemm_error_bound(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    b_codes: torch.Tensor,
    b_scales: torch.Tensor,
    expert_offsets: torch.Tensor,
    global_scale_a: torch.Tensor,
    global_scale_b: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    accumulator_unit_roundoff: float = U32,
) -> torch.Tensor:
    """float64 [T, N] bound on |y - oracle| (and on |y - exact|) for any correct kernel output y.

    A correct kernel: exact products, fp32 sums in ANY order, alpha in fp32, one cast to out_dtype.
    Per output element of expert e: S = sum_k a_k b_k, P = sum_k |a_k b_k| (= |A| @ |B|),
    alpha = gsa*gsb (real), R = alpha*S the exact result, u = 2^-24 (accumulator_unit_roundoff).

    1. Sum. Products are exact in fp32 (<= 6 x 6 significant bits) and multiples of 2^-20, so no
       partial sum underflows. Any order of fp32 additions (serial, pairwise, split-K, FMA chains)
       gives s with |s - S| <= gamma_K * P, gamma_K = K*u / (1 - K*u) (Higham, Accuracy and
       Stability of Numerical Algorithms, §4.2; K-1 additions need only gamma_{K-1}: one spare).
    2. Alpha. a32 = fl32(gsa*gsb): |a32 - alpha| <= u|alpha| + eta32 =: E_a, where eta32 = 2^-150
       (half the smallest fp32 subnormal) covers an alpha that underflows.
    3. Scale. c = fl32(s * a32). With |s| <= M := |S| + gamma_K P:
       |c - R| <= |s||a32 - alpha| + |alpha||s - S| + u|s||a32| + eta32
               <= M E_a + |alpha| gamma_K P + u M (|alpha| + E_a) + eta32 =: E_c.
    4. Cast. y = fl_out(c): |y - c| <= u_out |c| + eta_out <= u_out (|R| + E_c) + eta_out =: E_y,
       u_out = half an ulp relative: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32 (a spare rounding: the
       fp32 cast is a no-op); eta_out = half the smallest subnormal (2^-25 for fp16).
    5. Oracle. The float64 oracle has alpha exact (product of two fp32), so
       |oracle - R| <= |alpha| (g64 P + u64 (|S| + g64 P)) + 2^-1074 =: E_o, g64 = gamma_K(2^-53).
    Bound = (E_c + E_y + E_o) * (1 + 2^-40), the last factor for float64 rounding in evaluating
    it. S and P come from float64 matmuls: P <= P64 (1 + 2 g64) and |S| <= |S64| + g64 P.

    With random data the terms that matter are |alpha| gamma_K P (K=1024: 6.1e-5 |alpha| P) and
    u_out |R|. Compare y with the UNROUNDED oracle: where R lies near a bf16 midpoint, a correct
    kernel's y can be one ulp away from bf16(oracle); |y - oracle| is then about half an ulp, inside
    u_out |c|. Against bf16(oracle) another u_out |R| would be needed.
    Assumes each fp32 addition rounds to nearest (or is more precise). Tensor cores that align and
    truncate (Fasi et al. 2021, fp16/bf16 MMA on V100/A100) need a larger accumulator_unit_roundoff
    (2**-23 for round-toward-zero additions). fp32 / fp16 overflow to Inf is outside this bound.
    """
    args = (a_codes, a_scales, b_codes, b_scales, expert_offsets, global_scale_a, global_scale_b)
    offsets = _validate(*args, out_dtype)
    a = dequantize_codes_scales(a_codes, a_scales).double()
    k = a.shape[1]
    g_acc = gamma(k, accumulator_unit_roundoff)
    g64 = gamma(k, U64)
    u_out, eta_out = OUT_UNIT_ROUNDOFF[out_dtype], _UNDERFLOW[out_dtype]
    eta32 = _UNDERFLOW[torch.float32]
    alpha = (global_scale_a.double() * global_scale_b.double()).abs()  # exact in float64
    bound = torch.zeros(a.shape[0], b_codes.shape[2], dtype=torch.float64, device=a.device)
    for e, start, end in _expert_rows(offsets):
        al = alpha[e]
        b = _expert_weight(b_codes, b_scales, e, torch.float64)
        p = (a[start:end].abs() @ b.abs()) * (1.0 + 2.0 * g64)  # upper bound on P
        s_abs = (a[start:end] @ b).abs() + g64 * p  # upper bound on |S|
        e_a = U32 * al + eta32
        m = s_abs + g_acc * p
        e_c = m * e_a + al * g_acc * p + U32 * m * (al + e_a) + eta32
        e_y = u_out * (al * s_abs + e_c) + eta_out
        e_o = al * (g64 * p + U64 * (s_abs + g64 * p)) + _U64_UNDERFLOW
        bound[start:end] = (e_c + e_y + e_o) * (1.0 + _EVAL_SLACK)
    return bound
