"""The routed MoE's combine in one CuTeDSL launch (any arch from sm_90).

out[t] = (((0 + l2[inv[t, 0]]) + l2[inv[t, 1]]) + ...) + l2[inv[t, k - 1]], summed in fp32 in
slot order (the reference's order: reference.layers.routed_moe), then rounded to bf16 to
nearest even (or, `fp32_out`, the fp32 sum itself, for a cross-rank all-reduce before the cast).
inv [T * k] (int64) maps each (token, slot) to its staged L2 row, or to a zero row for a slot
whose expert is not local. The torch form of the same sum is k gathers, casts and adds (about
25 launches); this is one: each thread sums 8 columns of one token, its loads 16 bytes wide.

Layers (STYLE.md rule 1): `CombineKernel` (config, `@cute.jit` launch, `@cute.kernel` body),
`compile_combine` (cached by config and arch, no GPU needed), `run_combine` (validates metadata,
writes the caller's `out` on the current stream: reads no value on the host, CUDA-graph
capturable, nothing allocated), `combine` (allocates `out`). Exactness: tests/test_dsv4_layers.py
compares the routed MoE with it against the torch combine bit for bit on the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, Int64, Uint32
from cutlass.cutlass_dsl import dsl_user_op

from dsv4.kernels.cutedsl.nvfp4_quant import (
    ARCHS,
    _cu_stream,
    _meta,
    _need,
    _ptx,
    _st_global_b32xn,
    arch_of,
)

VEC = 8  # columns a thread sums: one 16-byte bf16 load per slot


@dataclass(frozen=True)
class CombineConfig:
    """Everything that changes generated code (the compile key, with the arch)."""

    hidden: int  # H, a multiple of 8
    top_k: int  # k slots per token
    fp32_out: bool = False  # write the fp32 sums (for an all-reduce) instead of bf16
    threads: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or self.hidden <= 0 or self.hidden % VEC:
            raise ValueError(
                f"CombineConfig.hidden must be a positive multiple of {VEC}, got {self.hidden=}"
            )
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ValueError(f"CombineConfig.top_k must be an int >= 1, got {self.top_k=}")
        if self.threads not in (64, 128, 256, 512):
            raise ValueError(
                f"CombineConfig.threads must be 64, 128, 256 or 512, got {self.threads=}"
            )


@dsl_user_op
def _bf16x2(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Uint32:
    """Two fp32 -> one word of two bf16 (lo in the low half), each rounded to nearest even."""
    return _ptx("cvt.rn.bf16x2.f32 $0, $2, $1;", Uint32, Float32(lo), Float32(hi), loc=loc, ip=ip)


@dsl_user_op
def _bits(v: Float32, *, loc=None, ip=None) -> Uint32:
    return _ptx("mov.b32 $0, $1;", Uint32, Float32(v), loc=loc, ip=ip)


class CombineKernel:
    """l2 [R, H] bf16, inv int64 [T * k] -> out [T, H] (bf16, or fp32 with fp32_out)."""

    def __init__(self, cfg: CombineConfig, arch: str) -> None:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch=}")
        self.cfg = cfg
        self.arch = arch

    @cute.jit
    def __call__(
        self,
        l2_ptr: cute.Pointer,
        inv_ptr: cute.Pointer,
        out_ptr: cute.Pointer,
        tokens: Int32,
        l2_rows: Int32,
        stream,
    ):
        cfg = self.cfg
        h = cfg.hidden
        l2 = cute.make_tensor(l2_ptr, cute.make_layout((l2_rows, h), stride=(h, 1)))
        inv = cute.make_tensor(inv_ptr, cute.make_layout(tokens * cfg.top_k))
        out = cute.make_tensor(out_ptr, cute.make_layout((tokens, h), stride=(h, 1)))
        n_threads = tokens * (h // VEC)
        self.kernel(l2, inv, out, tokens).launch(
            grid=[(n_threads + (cfg.threads - 1)) // cfg.threads, 1, 1],
            block=[cfg.threads, 1, 1],
            stream=stream,
        )

    @cute.kernel
    def kernel(self, l2: cute.Tensor, inv: cute.Tensor, out: cute.Tensor, tokens: Int32):
        cfg = self.cfg
        per_row = cfg.hidden // VEC
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        i = Uint32(bidx * cfg.threads + tidx)
        t = Int32(i // per_row)
        v = Int32(i % per_row)
        if t < tokens:
            acc = [Float32(0.0) for _ in range(VEC)]  # 0 + row(t, 0) first, as the reference
            for s in cutlass.range_constexpr(cfg.top_k):
                r = Int32(inv[t * cfg.top_k + s])
                vals = cute.zipped_divide(l2[r, None], (VEC,))[(None, v)].load().to(Float32)
                acc = [acc[j] + vals[j] for j in range(VEC)]
            dst = cute.zipped_divide(out[t, None], (VEC,))[(None, v)]
            if cutlass.const_expr(cfg.fp32_out):
                bits = [_bits(a) for a in acc]
                _st_global_b32xn(dst.iterator, bits[0:4])
                _st_global_b32xn(dst.iterator + 4, bits[4:8])
            else:
                words = [_bf16x2(acc[j], acc[j + 1]) for j in range(0, VEC, 2)]
                _st_global_b32xn(dst.iterator, words)


def _fake_args(cfg: CombineConfig):
    from cutlass.cute.runtime import make_ptr
    from cutlass.runtime import make_fake_stream

    out_ty = Float32 if cfg.fp32_out else BFloat16
    ptrs = [
        make_ptr(ty, 0, cute.AddressSpace.gmem, assumed_align=16)
        for ty in (BFloat16, Int64, out_ty)
    ]
    return (*ptrs, Int32(1), Int32(1), make_fake_stream())


@functools.cache
def compile_combine(cfg: CombineConfig, arch: str, extra_options: str = ""):
    """Compile for `arch` ("sm_90a" / "sm_100a"); cached by (cfg, arch, options). No GPU needed;
    a failed compile raises naming the configuration and the arch."""
    from dsv4.kernels.cutedsl.ptx_check import compile_named

    return compile_named(
        CombineKernel(cfg, arch), _fake_args(cfg), arch, extra_options,
        f"CuTeDSL combine kernel ({cfg})",
    )  # fmt: skip


def run_combine(cfg: CombineConfig, l2, inv, out) -> None:
    """out[t] = the slot-order fp32 sum of l2[inv[t * k + s]] (bf16 RNE, or fp32 with
    cfg.fp32_out). l2 bf16 [R, H] contiguous, 16-byte aligned; inv int64 [T * k] contiguous, its
    values in [0, R) (not checked: that would read them); out [T, H] contiguous, 16-byte
    aligned; all on one CUDA device."""
    import torch
    from cutlass.cute.runtime import make_ptr

    h, k = cfg.hidden, cfg.top_k
    out_dtype = torch.float32 if cfg.fp32_out else torch.bfloat16
    _need(
        l2.dtype == torch.bfloat16
        and l2.dim() == 2
        and l2.shape[1] == h
        and l2.is_contiguous()
        and l2.data_ptr() % 16 == 0,
        lambda: f"l2 must be contiguous 16-byte aligned bf16 [R, {h}], got {_meta(l2)}",
    )
    _need(
        out.dtype == out_dtype
        and out.dim() == 2
        and out.shape[1] == h
        and out.is_contiguous()
        and out.data_ptr() % 16 == 0,
        lambda: f"out must be contiguous 16-byte aligned {out_dtype} [T, {h}], got {_meta(out)}",
    )
    t = out.shape[0]
    _need(
        inv.dtype == torch.int64 and tuple(inv.shape) == (t * k,) and inv.is_contiguous(),
        lambda: f"inv must be contiguous int64 [{t * k}] (T={t} x top_k={k}), got {_meta(inv)}",
    )
    devs = {"l2": l2.device, "inv": inv.device, "out": out.device}
    _need(
        len(set(devs.values())) == 1 and l2.device.type == "cuda",
        lambda: f"all tensors must be on one CUDA device, got {devs}",
    )
    _need(
        l2.numel() < 2**31 and out.numel() < 2**31,
        lambda: f"tensors must hold fewer than 2^31 elements, got {_meta(l2)}, {_meta(out)}",
    )
    if t == 0:
        return
    kernel = compile_combine(cfg, arch_of(l2.device))
    out_ty = Float32 if cfg.fp32_out else BFloat16
    ptrs = [
        make_ptr(ty, x.data_ptr(), cute.AddressSpace.gmem, assumed_align=16)
        for ty, x in ((BFloat16, l2), (Int64, inv), (out_ty, out))
    ]
    stream = _cu_stream(torch.cuda.current_stream(l2.device).cuda_stream)
    kernel(*ptrs, Int32(t), Int32(l2.shape[0]), stream)


def combine(l2, inv, top_k: int, *, fp32_out: bool = False):
    """The allocating form of `run_combine`: out [T, H] (T = inv.numel() / top_k) = the
    slot-order fp32 sum of each token's top_k staged rows l2[inv[t * top_k + s]], bf16 (or the
    fp32 sum with fp32_out). Same operands and checks as run_combine."""
    import torch

    n = inv.numel()
    _need(
        isinstance(top_k, int) and top_k >= 1 and n % top_k == 0,
        lambda: f"inv must hold T x top_k entries, got inv.numel()={n} top_k={top_k!r}",
    )
    _need(l2.dim() == 2, lambda: f"l2 must be [R, H], got {_meta(l2)}")
    out_dtype = torch.float32 if fp32_out else torch.bfloat16
    out = torch.empty(n // top_k, l2.shape[1], dtype=out_dtype, device=l2.device)
    run_combine(CombineConfig(l2.shape[1], top_k, fp32_out), l2, inv, out)
    return out
