"""The routed MoE's CuTeDSL combine (dsv4/kernels/cutedsl/moe_combine.py).

CPU: compiled for sm_90a and sm_100a with fake arguments, the PTX checked (one 16-byte load per
slot, 16-byte stores, bf16 rounding to nearest even, k fp32 adds per column, the 0 + first one
kept, no flush-to-zero, no local memory); bad configurations and operands named. GPU: the sum
bit for bit against the slot-order fp32 sum in torch (zero rows, repeated rows, -0).
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.cutedsl_marks import HAS_DSL, WHY_NO_DSL, needs_dsl, needs_gpu


@needs_dsl
@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("fp32_out", [False, True])
@pytest.mark.parametrize("top_k", [1, 6])
def test_combine_compiles_with_expected_ptx(arch, fp32_out, top_k):
    from dsv4.kernels.cutedsl.moe_combine import CombineConfig, compile_combine
    from dsv4.kernels.cutedsl.ptx_check import compile_report

    cfg = CombineConfig(7168, top_k, fp32_out)
    rep = compile_report(lambda o: compile_combine(cfg, arch, o), arch)
    assert rep.count("ld.global.v4.b32") + rep.count("ld.global.nc.v4.b32") == top_k
    assert rep.count("st.global.v4.b32") == (2 if fp32_out else 1)
    assert rep.count("cvt.rn.bf16x2.f32") == (0 if fp32_out else 4)
    # 8 columns x k slots of fp32 adds, 0 + the first slot included (sm_100 fuses the bf16
    # widening into add.rn.f32.bf16: exact, the same sums)
    adds = len(re.findall(r"\badd(\.rn)?\.f32(\.bf16)?\s", rep.ptx))
    assert adds == 8 * top_k, adds
    assert ".ftz" not in rep.ptx
    assert not rep.uses_local_memory
    assert (rep.stack_bytes, rep.spill_store_bytes, rep.spill_load_bytes) == (0, 0, 0), rep


def test_combine_refuses_bad_configs_and_operands_naming_them():
    if not HAS_DSL:
        pytest.skip(WHY_NO_DSL)
    from dsv4.kernels.cutedsl.moe_combine import CombineConfig, run_combine

    with pytest.raises(ValueError, match="hidden must be a positive multiple of 8"):
        CombineConfig(60, 6)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        CombineConfig(64, 0)
    with pytest.raises(ValueError, match="threads must be"):
        CombineConfig(64, 2, threads=96)
    cfg = CombineConfig(64, 2)
    l2 = torch.zeros(9, 64, dtype=torch.bfloat16)
    inv = torch.zeros(8, dtype=torch.int64)
    out = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"l2 must be contiguous 16-byte aligned bf16 \[R, 64\]"):
        run_combine(cfg, l2.float(), inv, out)
    with pytest.raises(ValueError, match=r"inv must be contiguous int64 \[8\] \(T=4 x top_k=2\)"):
        run_combine(cfg, l2, inv[:6], out)
    with pytest.raises(ValueError, match="out must be contiguous 16-byte aligned torch.bfloat16"):
        run_combine(cfg, l2, inv, out.float())
    with pytest.raises(ValueError, match="one CUDA device"):
        run_combine(cfg, l2, inv, out)
    # the allocating form: the same checks, and its own on T x top_k
    from dsv4.kernels.cutedsl.moe_combine import combine

    with pytest.raises(ValueError, match=r"inv must hold T x top_k entries, got inv.numel\(\)=7"):
        combine(l2, inv[:7], 2)
    with pytest.raises(ValueError, match="top_k=0"):
        combine(l2, inv, 0)
    with pytest.raises(ValueError, match=r"l2 must be \[R, H\]"):
        combine(l2[0], inv, 2)
    with pytest.raises(ValueError, match="one CUDA device"):
        combine(l2, inv, 2)


@needs_gpu
@pytest.mark.parametrize("fp32_out", [False, True])
@pytest.mark.parametrize("t,k,h", [(1, 6, 7168), (37, 6, 512), (300, 2, 64), (5, 1, 8)])
def test_gpu_combine_is_the_slot_order_fp32_sum(t, k, h, fp32_out):
    from dsv4.kernels.cutedsl.moe_combine import CombineConfig, combine, run_combine

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(t * k + h)
    rows = t * k
    l2 = (torch.randn(rows + 1, h, device=dev, generator=g) * 3).to(torch.bfloat16)
    l2[rows] = 0.0  # the zero row of the slots with no local expert
    l2[0] = -0.0  # -0 + ... gives +0 in the reference's 0 + row(t, 0)
    inv = torch.randint(0, rows + 1, (rows,), device=dev, generator=g)
    inv[::3] = rows
    want = torch.zeros(t, h, dtype=torch.float32, device=dev)
    for s in range(k):  # the torch form: in slot order, fp32
        want += l2[inv.view(t, k)[:, s]].float()
    out = torch.full((t, h), float("nan"), device=dev, dtype=torch.float32)
    if not fp32_out:
        out = out.to(torch.bfloat16)
        want = want.to(torch.bfloat16)
    run_combine(CombineConfig(h, k, fp32_out), l2, inv, out)
    assert torch.equal(out.view(torch.int16 if not fp32_out else torch.int32),
                       want.view(torch.int16 if not fp32_out else torch.int32))  # fmt: skip
    got = combine(l2, inv, k, fp32_out=fp32_out)  # the allocating form: the same bits
    assert got.dtype == out.dtype and torch.equal(got, out)
