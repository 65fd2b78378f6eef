"""Peer NVFP4 grouped GEMMs: other people's kernels, judged by the same cases as ours.

On a B200 one sweep then compares dsv4's `sm100` kernel (`dsv4-sm100`), these peers and the
reference (docs/blackwell.md). Each implements only the grouped-GEMM stage, per expert, with
the harness's operands (the reference's swizzled scale layouts, which are the layouts both
peers document: 128x4 atoms, each group's rows padded to 128):

- `torch-scaled-mm`: `torch._scaled_mm` per expert (FP4 operands as float4_e2m1fn_x2, swizzled
  e4m3 block scales, fp32 output), alpha = gsa[e] * gsb[e] on the fp32 result, then bf16.
  torch's NVFP4 scaled matmul runs on sm_100 only.
- `flashinfer`: `flashinfer.mm_fp4` per expert (NVFP4, block 16, 128x4 scales, alpha as a
  one-element tensor, bf16 output), where flashinfer is installed.

Both read the expert offsets on the host (one sync per call: a peer, not a production path).
`can_implement` says why a peer cannot run (no sm_100 device, a package missing) and the case
is `unsupported` with that reason; never a pass. Status: NOT run on hardware here (no B200);
the calls follow the packages' documented signatures; torch-scaled-mm's arguments are checked
on CPU against torch's meta kernel and an emulation of the NVFP4 semantics
(tests/test_sm100_wiring.py).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

from harness.adapters import AdapterBase, Conventions, GemmOperands, default_can_implement
from harness.cases import Stage


def _sm100_reason(device: str) -> str:
    """'' when `device` is a CUDA device of compute capability 10.x, else why not."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"needs an sm_100 CUDA device, got {dev.type}"
    major, minor = _capability(dev.index if dev.index is not None else 0)
    return "" if major == 10 else f"needs an sm_100 CUDA device, got sm_{major}{minor}"


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _groups(ops: GemmOperands):
    """Per non-empty expert: (e, first row, end row, A scales [Mp, Cp], B scales [Np, Cp])."""
    kh = ops.a_codes.shape[1]
    cp = (2 * kh // 16 + 3) // 4 * 4
    n = ops.b_codes.shape[2]
    np_ = (n + 127) // 128 * 128
    ends = ops.expert_offsets.tolist()
    starts = ops.a_scale_row_offsets.tolist()
    a_sf = ops.a_scales_swizzled.view(torch.float8_e4m3fn)
    b_sf = ops.b_scales_swizzled.view(torch.float8_e4m3fn)
    prev = 0
    for e, end in enumerate(ends):
        rows = end - prev
        if rows > 0:
            mp = (rows + 127) // 128 * 128
            sa = a_sf[starts[e] * cp : (starts[e] + mp) * cp].view(mp, cp)
            yield e, prev, end, sa, b_sf[e].view(np_, cp)
        prev = end


def _b_col_major(ops: GemmOperands, e: int) -> torch.Tensor:
    """B[e] as [K/2, N] uint8 with K contiguous (column-major), what both peers take."""
    return ops.b_codes[e].t().contiguous().t()


def _alpha(ops: GemmOperands, e: int) -> torch.Tensor:
    gsa, gsb = ops.global_scale_a, ops.global_scale_b
    return gsa[e if gsa.numel() > 1 else 0] * gsb[e if gsb.numel() > 1 else 0]


class _PeerBase(AdapterBase):
    conventions = Conventions()  # decode-convention global scales, applied as alpha here
    devices = ("cuda",)

    def _missing(self) -> str:
        return ""

    def can_implement(self, case: Any) -> tuple[bool, str]:
        if case.stage is not Stage.GROUPED_GEMM:
            return False, f"{self.name} implements the grouped_gemm stage only"
        why = _sm100_reason(case.device) or self._missing()
        if why:
            return False, why
        return default_can_implement(self, case)


class TorchScaledMm(_PeerBase):
    """torch._scaled_mm NVFP4 per expert (fp32 out, alpha, bf16)."""

    name = "torch-scaled-mm"

    def _missing(self) -> str:
        if not hasattr(torch, "float4_e2m1fn_x2"):
            return f"needs torch with float4_e2m1fn_x2, got torch {torch.__version__}"
        return ""

    def grouped_gemm(self, ops: GemmOperands, out: torch.Tensor) -> None:
        fp4 = torch.float4_e2m1fn_x2
        for e, s, t, sa, sb in _groups(ops):
            y = torch._scaled_mm(
                ops.a_codes[s:t].view(fp4),
                _b_col_major(ops, e).view(fp4),
                sa.reshape(-1),
                sb.reshape(-1),
                out_dtype=torch.float32,
            )
            out[s:t] = (y * _alpha(ops, e)).to(torch.bfloat16)


class FlashinferFp4(_PeerBase):
    """flashinfer.mm_fp4 per expert (NVFP4, 128x4 scales, alpha tensor, bf16 out)."""

    name = "flashinfer"

    def _missing(self) -> str:
        if importlib.util.find_spec("flashinfer") is None:
            return "needs flashinfer (pip install flashinfer-python), not installed"
        return ""

    def grouped_gemm(self, ops: GemmOperands, out: torch.Tensor) -> None:
        import flashinfer

        for e, s, t, sa, sb in _groups(ops):
            flashinfer.mm_fp4(
                ops.a_codes[s:t],
                _b_col_major(ops, e),
                sa,
                sb.t(),  # B's scales as flashinfer documents them for a column-major B
                _alpha(ops, e).reshape(1),
                torch.bfloat16,
                out=out[s:t],
                block_size=16,
            )


__all__ = ["FlashinferFp4", "TorchScaledMm"]
