"""How dsv4.ops, the runners and the harness adapter choose the quantize implementation.

The choice is explicit and visible: `select_quant_impl` names it, a runner keeps it as
`quant_impl`, the `dsv4-cutedsl` adapter refuses a device it cannot run on with the reason, and
asking for `cutedsl` where it cannot run raises (never a silent fallback to torch).
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.layers.shared_expert import SharedExpertRunner
from dsv4.ops.quantize import QuantImplUnavailableError


def test_cpu_selects_torch_and_refuses_cutedsl_naming_why():
    assert ops.select_quant_impl("cpu") == "torch"
    assert ops.select_quant_impl("cpu", "torch") == "torch"
    with pytest.raises(QuantImplUnavailableError, match="needs a CUDA device of sm_90"):
        ops.select_quant_impl("cpu", "cutedsl")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.select_quant_impl("cpu", "triton")
    ok, why = ops.cutedsl_supports("cpu")
    assert not ok and "cpu" in why


def test_ops_refuse_cutedsl_on_cpu():
    x = torch.randn(4, 32)
    gs = torch.tensor([0.01])
    with pytest.raises(QuantImplUnavailableError, match="cutedsl"):
        ops.quantize_activation_nvfp4(x, gs, impl="cutedsl")
    with pytest.raises(QuantImplUnavailableError, match="cutedsl"):
        ops.swiglu_quantize(torch.randn(4, 64), gs, 10.0, impl="cutedsl")
    with pytest.raises(QuantImplUnavailableError, match="cutedsl"):
        ops.quantize_to_nvfp4(x, impl="cutedsl")
    # auto on CPU: torch, the same bits as before the implementations were named
    c1, s1, g1 = ops.quantize_to_nvfp4(x)
    c2, s2, g2 = ops.quantize_to_nvfp4(x, impl="torch")
    assert torch.equal(c1, c2) and torch.equal(s1.view(torch.uint8), s2.view(torch.uint8))


def test_runner_records_its_quant_impl_and_refuses_at_finalize():
    r = SharedExpertRunner(32, 32, 4)
    r.set_weights(torch.randn(32, 64), torch.randn(32, 32))
    r.finalize()
    assert r.quant_impl == "torch"
    bad = SharedExpertRunner(32, 32, 4, quant_impl="cutedsl")
    bad.set_weights(torch.randn(32, 64), torch.randn(32, 32))
    with pytest.raises(QuantImplUnavailableError, match="needs a CUDA device"):
        bad.finalize()


def test_adapter_dsv4_cutedsl_is_unsupported_on_cpu_with_the_reason():
    from harness import adapters
    from harness.cases import PRESETS, Case, Stage

    a = adapters.load("dsv4-cutedsl")
    assert a.name == "dsv4-cutedsl" and a.quant_impl == "cutedsl"
    case = Case(Stage.QUANTIZE, PRESETS["tiny"], 5, device="cpu")
    ok, why = a.can_implement(case)
    assert not ok and "needs a CUDA device of sm_90" in why


def test_swiglu_quantize_row_weight_multiplies_after_the_swiglu():
    from reference.activation import swiglu
    from reference.nvfp4 import quantize_nvfp4

    g = torch.Generator().manual_seed(3)
    l1 = torch.randn(9, 64, generator=g) * 5
    w = torch.rand(9, generator=g)
    gs = torch.tensor([0.004])
    codes, scales = ops.swiglu_quantize(l1, gs, 10.0, row_weight=w)
    rc, rs, _ = quantize_nvfp4(swiglu(l1, 10.0) * w[:, None], gs)
    assert torch.equal(codes, rc) and torch.equal(scales.view(torch.uint8), rs.view(torch.uint8))
    ws = torch.empty(ops.swiglu_quantize_workspace_bytes((9, 64)), dtype=torch.uint8)
    c2, s2 = ops.swiglu_quantize(
        l1, gs, 10.0, torch.empty_like(codes), torch.empty_like(scales), ws, row_weight=w
    )
    assert torch.equal(c2, codes) and torch.equal(s2.view(torch.uint8), scales.view(torch.uint8))
    with pytest.raises(ValueError, match="row_weight"):
        ops.swiglu_quantize(l1, gs, 10.0, row_weight=w[:3])


def test_grouped_quantize_equals_per_group_quantize():
    from reference.nvfp4 import quantize_nvfp4

    t, gn, d = 7, 3, 32
    x = torch.randn(t, gn * d).view(t, gn, d)
    gs = torch.tensor([0.01, 0.02, 0.5])
    codes = torch.empty(gn * t, d // 2, dtype=torch.uint8)
    scales = torch.empty(gn * t, d // 16, dtype=torch.float8_e4m3fn)
    ops.quantize_activation_nvfp4_grouped(x, gs, codes, scales)
    for g in range(gn):
        rc, rs, _ = quantize_nvfp4(x[:, g], gs[g])
        assert torch.equal(codes[g * t : (g + 1) * t], rc)
        assert torch.equal(scales[g * t : (g + 1) * t].view(torch.uint8), rs.view(torch.uint8))
