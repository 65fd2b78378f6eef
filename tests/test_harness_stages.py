"""The typed inputs of harness.stages: per-layer frozen input sets and quantized operands.

A layer case's inputs are one frozen dataclass per layer (its tensors by the names a repro bundle
stores, the case's scalars beside them), and the adapter call is spelled once, by that type;
named tensors that do not fit the case's layer are refused naming what is missing or extra. The
grouped GEMM's A and B sides are `QuantizedOperand`s; the documented flat names read them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import repro
from harness.adapters import GemmOperands, QuantizedOperand
from harness.backends.reference import ReferenceAdapter
from harness.cases import PRESETS, Case, Stage
from harness.stages import inputs as si
from harness.stages.run import run_case
from reference.nvfp4 import ScaleConvention, to_encode_scale

CPU = torch.device("cpu")


def _case(stage: Stage, tokens: int = 3) -> Case:
    return Case(stage, PRESETS["tiny"], tokens, scale_ratio=1.0, limit=10.0, device="cpu")


@pytest.mark.parametrize("stage", [Stage.SHARED_EXPERT, Stage.ROUTED_MOE, Stage.GROUPED_LINEAR])
def test_each_layer_has_its_own_frozen_inputs(stage):
    case = _case(stage)
    d = si.layer_inputs(case, CPU)
    assert type(d) is si.LAYER_INPUTS[stage] and d.METHOD == stage.value
    assert set(d.tensors()) == set(d.TENSORS) and d.tensors()["calib_sample"] is d.calib_sample
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.calib_sample = None
    # the scalars come from the case, the tensors from its seed (the same on every draw)
    again = si.layer_inputs(case, CPU)
    assert all(torch.equal(v, again.tensors()[k]) for k, v in d.tensors().items())
    scalars = {f.name for f in dataclasses.fields(d)} - set(d.TENSORS)
    assert {k: getattr(d, k) for k in scalars} == type(d).scalars(case)
    rebuilt = si.layer_inputs_from_tensors(case, d.tensors())
    assert rebuilt == dataclasses.replace(d)  # same tensor objects, same scalars


def test_a_layer_runs_the_same_from_its_inputs_or_their_tensors():
    case = _case(Stage.ROUTED_MOE, tokens=5)
    d = si.layer_inputs(case, CPU)
    assert d.first_expert == case.shape.n_experts  # rank 1 of EP: local != global ids
    typed = run_case(case, ReferenceAdapter(), d)
    named = run_case(case, ReferenceAdapter(), d.tensors())
    assert [(c.name, c.outcome, c.message) for c in typed] == [
        (c.name, c.outcome, c.message) for c in named
    ]
    assert typed[0].name == "out" and typed[0].outcome.value == "pass"


def test_tensors_that_do_not_fit_the_layer_are_refused_by_name():
    case = _case(Stage.SHARED_EXPERT)
    t = si.layer_inputs(case, CPU).tensors()
    with pytest.raises(si.LayerInputsError) as e:
        si.layer_inputs_from_tensors(case, {**t, "topk_ids": t["x"]}, "b/tensors.pt")
    assert str(e.value) == (
        "b/tensors.pt: a shared_expert case takes the tensors x, w13, w2, calib_sample; "
        "unexpected topk_ids"
    )
    del t["w2"]
    with pytest.raises(si.LayerInputsError, match="; missing w2$"):
        si.layer_inputs_from_tensors(case, t)
    with pytest.raises(ValueError, match="replay layer cases only, not quantize"):
        run_case(_case(Stage.QUANTIZE), ReferenceAdapter(), t)
    with pytest.raises(TypeError, match="routed_moe case given SharedExpertInputs"):
        si.run_layer(_case(Stage.ROUTED_MOE), ReferenceAdapter(), si.layer_inputs(case, CPU))


def test_a_bundle_whose_tensors_do_not_fit_its_case_is_refused(tmp_path):
    case = _case(Stage.SHARED_EXPERT)
    d = si.layer_inputs(case, CPU)
    out = repro.save(tmp_path / "b", case, "reference", d)  # typed inputs: saved by name
    _, _, tensors = repro.load(out)
    assert set(tensors) == set(d.TENSORS) and torch.equal(tensors["w13"], d.w13)
    torch.save({k: v for k, v in tensors.items() if k != "calib_sample"}, out / "tensors.pt")
    with pytest.raises(repro.BundleError, match=r"tensors\.pt: a shared_expert .*missing calib"):
        repro.load(out)


def test_gemm_operands_carry_quantized_sides_in_both_conventions():
    case = Case(Stage.GROUPED_GEMM, PRESETS["tiny"], 33, device="cpu")
    ops, enc = si.gemm_operands(case, CPU, ScaleConvention.ENCODE)
    e = case.shape.n_experts
    assert isinstance(ops.a, QuantizedOperand) and isinstance(ops.b, QuantizedOperand)
    assert ops.a.global_scale.shape == ops.b.global_scale.shape == (e,)
    assert ops.b.codes.shape[0] == ops.b.scales.shape[0] == e
    # the flat names of the documented protocol read the sides
    assert ops.a_codes is ops.a.codes and ops.b_scales is ops.b.scales
    assert ops.global_scale_a is ops.a.global_scale and ops.global_scale_b is ops.b.global_scale
    assert ops.plain()[:4] == (ops.a.codes, ops.a.scales, ops.b.codes, ops.b.scales)
    # the adapter's convention changes the global scales only
    assert enc.a.codes is ops.a.codes and enc.b_scales_swizzled is ops.b_scales_swizzled
    assert torch.equal(enc.global_scale_a, to_encode_scale(ops.global_scale_a))
    assert torch.equal(enc.global_scale_b, to_encode_scale(ops.global_scale_b))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ops.a.codes = ops.b.codes
    assert isinstance(ops, GemmOperands)
