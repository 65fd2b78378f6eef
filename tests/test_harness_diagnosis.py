"""Diagnosis fidelity (issue 15): every planted defect is named at the stage where it is born.

Each test runs one small case straight through `harness.stages.run.run_case` (no sweep, no files) on
the reference or on a defect adapter of tests/planted.py, and checks the verdict, the stage the
harness names and the diagnosis in its message. Shapes are the tiny preset: the whole file runs
in seconds on one core.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness import adapters, metrics
from harness.adapters import QuantPolicy
from harness.backends.reference import ReferenceAdapter
from harness.cases import Case, Distribution, Shape, Stage
from harness.records import Outcome
from harness.stages import run_case
from reference.nvfp4 import unpack_e2m1
from tests import planted


def run(adapter, stage: Stage, **kw) -> dict:
    """name -> Comparison of one tiny case."""
    case = Case(stage, Shape(), **kw)
    return {c.name: c for c in run_case(case, adapter)}


LAYERS = (Stage.SHARED_EXPERT, Stage.ROUTED_MOE, Stage.GROUPED_LINEAR)


# --------------------------------------------------------------------------------------------
# 1. NaN-equal intermediates


@pytest.mark.parametrize("stage", LAYERS, ids=lambda s: s.value)
@pytest.mark.parametrize(
    "dist", [Distribution.NAN_ONE, Distribution.INF_ONE], ids=lambda d: d.value
)
def test_reference_against_itself_is_equal_at_every_stage_with_nan_and_inf(stage, dist):
    rows = run(ReferenceAdapter(), stage, tokens=5, distribution=dist, scale_ratio=2.0)
    out = rows.pop("out")
    assert out.outcome is Outcome.PASS, out.message
    assert out.metrics["first_divergent_stage"] is None
    assert rows and all(c.metrics["equal"] for c in rows.values()), {
        k: c.metrics for k, c in rows.items() if not c.metrics["equal"]
    }


def test_equal_nan_needs_nan_at_the_same_place():
    a = torch.tensor([1.0, float("nan"), float("inf"), -0.0])
    assert metrics.equal_nan(a, a.clone()) and not torch.equal(a, a.clone())
    assert metrics.equal_nan(a, torch.tensor([1.0, float("nan"), float("inf"), 0.0]))
    assert not metrics.equal_nan(a, torch.tensor([float("nan"), 1.0, float("inf"), 0.0]))
    assert not metrics.equal_nan(a, a.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# 9. counts of codes, not bytes


def test_code_mismatches_are_counted_per_code():
    rows = run(
        planted.RoundHalfAway(), Stage.QUANTIZE, tokens=5, distribution=Distribution.MIDPOINTS
    )
    c = rows["quantize.codes"]
    assert c.outcome is Outcome.FAIL
    n = c.metrics["n_mismatch"]
    assert n > c.metrics["n_mismatch_bytes"] > 0  # two codes per byte: the byte count is lower
    assert c.metrics["numel"] == 5 * 256
    assert c.message.startswith(f"{n} of 1280 codes mismatch")
    assert len(c.metrics["first_mismatch"]) == 2 and c.metrics["first_mismatch"][1] < 256


def test_codes_equal_unpacks_both_nibbles():
    a = torch.tensor([[0x21, 0x43]], dtype=torch.uint8)
    b = torch.tensor([[0x12, 0x43]], dtype=torch.uint8)  # one byte, both of its codes differ
    eq = metrics.codes_equal(a, b)
    assert eq["n_mismatch"] == 2 and eq["n_mismatch_bytes"] == 1 and eq["numel"] == 4
    assert eq["first_mismatch"] == [0, 0]
    assert torch.equal(unpack_e2m1(a)[0, 2:], unpack_e2m1(b)[0, 2:])


# --------------------------------------------------------------------------------------------
# 2. every layer names a stage


def test_grouped_linear_gemm_defect_is_named_at_its_gemm():
    rows = run(planted.GroupedLinearSkipLastKBlock(), Stage.GROUPED_LINEAR, tokens=5)
    out = rows["out"]
    assert out.outcome is Outcome.FAIL
    assert out.metrics["first_divergent_stage"] == "gemm_out"
    assert "first divergent stage: gemm_out" in out.message
    assert rows["x_q"].metrics["equal"] and not rows["gemm_out"].metrics["equal"]


@pytest.mark.parametrize("stage", LAYERS, ids=lambda s: s.value)
def test_every_layer_exposes_quantized_input_and_gemm_output(stage):
    rows = run(ReferenceAdapter(), stage, tokens=5)
    assert "x_q" in rows and ({"l1_out", "l2_out"} <= set(rows) or "gemm_out" in rows)
    assert rows["out"].metrics["not_exposed"] == []


# --------------------------------------------------------------------------------------------
# 3. calibrated global scales are compared, and calibration is a stage


def test_wrong_gs2_calibration_is_named_calibration():
    rows = run(planted.Gs2FromL1(), Stage.SHARED_EXPERT, tokens=5, scale_ratio=1.0)
    assert rows["calibration.gs1"].outcome is Outcome.PASS
    cal = rows["calibration.gs2"]
    assert cal.outcome is Outcome.FAIL and cal.message.startswith("calibration (gs2)")
    assert cal.metrics["rel_err"] > 0.01
    assert rows["l1_out"].metrics["equal"]  # everything before it is right
    out = rows["out"]
    assert out.metrics["first_divergent_stage"] == "calibration"
    assert "first divergent stage: calibration" in out.message


def test_calibrated_scales_are_compared_per_group():
    rows = run(ReferenceAdapter(), Stage.ROUTED_MOE, tokens=5, scale_ratio=2.0)
    for gs in ("gs1", "gs2"):
        c = rows[f"calibration.{gs}"]
        assert c.outcome is Outcome.PASS and c.metrics["equal"]
        assert len(c.metrics["ref"]) == 4  # one per local expert


# --------------------------------------------------------------------------------------------
# 4. the GEMM's alpha convention is diagnosed


@pytest.mark.parametrize(
    "defect, found",
    [
        (planted.InvertedAlpha, "1/(gsa*gsb)"),
        (planted.MissingAlpha, "1 (missing)"),
        (planted.AlphaTwice, "(gsa*gsb)^2"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_gemm_alpha_mistakes_are_named(defect, found):
    c = run(defect(), Stage.GROUPED_GEMM, tokens=5)["grouped_gemm.out"]
    assert c.outcome is Outcome.FAIL
    assert c.metrics["matches_alpha"] == found
    assert f"output matches alpha = {found}" in c.message


def test_other_gemm_defects_match_no_alpha():
    c = run(planted.SkipLastKBlock(), Stage.GROUPED_GEMM, tokens=5)["grouped_gemm.out"]
    assert c.outcome is Outcome.FAIL and c.metrics["matches_alpha"] is None
    assert "matches alpha" not in c.message


# --------------------------------------------------------------------------------------------
# 5. declared SwiGLU conventions are honoured and flagged; 6. more variants, told apart


def test_honest_other_convention_passes_flagged_not_dsv4():
    for stage, kw in (
        (Stage.SWIGLU_REQUANT, {"limit": 1.0}),
        (Stage.SHARED_EXPERT, {"limit": 1.0, "scale_ratio": 1.0}),
    ):
        rows = run(planted.honest_clamp_after_product(), stage, tokens=5, **kw)
        for c in rows.values():
            assert c.outcome is Outcome.PASS, (c.name, c.message)
        last = rows.get("out") or list(rows.values())[-1]
        assert last.metrics["not_dsv4"] == ["SwiGLU clamp_after_product"]
        assert "not DeepSeek V4's convention" in last.message


@pytest.mark.parametrize(
    "defect, found",
    [
        (planted.ClampAfterProduct, "clamp_after_product"),
        (planted.ClampAfterProductUpper, "clamp_after_product_upper"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
@pytest.mark.parametrize("limit", [10.0, 1.0])
def test_swiglu_stage_variant_is_named_uniquely(defect, found, limit):
    rows = run(defect(), Stage.SWIGLU_REQUANT, tokens=5, limit=limit)
    failing = [c for c in rows.values() if c.outcome is Outcome.FAIL]
    assert failing
    for c in failing:
        assert c.metrics["matches_variant"] == found  # one variant, not "a or b"
        assert f"matches SwiGLU variant {found}, not the declared dsv4" in c.message


def test_variant_probe_tells_every_variant_apart():
    from harness.diagnose import PROBE_LIMIT, variant_probe
    from reference.activation import SwigluVariant, swiglu

    l1 = variant_probe(PROBE_LIMIT, 32, torch.device("cpu"))
    outs = [
        swiglu(l1, PROBE_LIMIT, v, gf).to(torch.bfloat16)
        for gf in (True, False)
        for v in SwigluVariant
    ]
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1 :])


@pytest.mark.parametrize(
    "defect, stage, kw, found",
    [
        (
            planted.LayerClampAfterProduct,
            Stage.SHARED_EXPERT,
            {"limit": 1.0},
            "clamp_after_product",
        ),
        (
            planted.LayerClampAfterProduct,
            Stage.ROUTED_MOE,
            {"limit": 1.0, "tokens": 33},
            "clamp_after_product",
        ),
        (planted.RoutingWeightAfterW2, Stage.ROUTED_MOE, {}, "dsv4 (routing weight after w2)"),
        (
            planted.ClampBeforeAlpha,
            Stage.SHARED_EXPERT,
            {},
            "dsv4 (clamp in raw GEMM units, before alpha)",
        ),
    ],
    ids=["shared-cap", "routed-cap", "weight-after-w2", "clamp-before-alpha"],
)
def test_layer_swiglu_convention_is_named_at_act(defect, stage, kw, found):
    kw = {"tokens": 5, "scale_ratio": 1.0, **kw}
    out = run(defect(), stage, **kw)["out"]
    assert out.outcome is Outcome.FAIL
    assert out.metrics["first_divergent_stage"] == "act"  # not calibration, not act_q
    assert out.metrics["matches_variant"] == found
    assert f"matches SwiGLU variant {found}, not the declared dsv4" in out.message


# --------------------------------------------------------------------------------------------
# routed_scaling_factor: a convention the adapter declares, a mismatch named


PRO_RSF, FLASH_RSF = Shape(routed_scaling_factor=2.5), Shape(routed_scaling_factor=1.5)


def _routed(adapter, shape: Shape, **kw) -> dict:
    case = Case(Stage.ROUTED_MOE, shape, 33, scale_ratio=1.0, **kw)
    return {c.name: c for c in run_case(case, adapter)}


@pytest.mark.parametrize("scaled", [True, False], ids=["weights-scaled", "adapter-scales"])
def test_honest_routing_scale_conventions_pass_with_the_same_bits(scaled):
    conv = adapters.Conventions(routing_weights_scaled=scaled)
    rows = _routed(ReferenceAdapter(conventions=conv), PRO_RSF)
    assert rows["out"].outcome is Outcome.PASS, rows["out"].message
    assert all(c.metrics.get("equal", True) for c in rows.values())
    assert "not DeepSeek V4" not in rows["out"].message  # an API convention, like encode scales


def test_dsv4_runner_takes_weights_with_the_factor_applied():
    rows = _routed(adapters.load("dsv4-torch"), PRO_RSF)
    assert rows["out"].outcome is Outcome.PASS, rows["out"].message
    # gs2 is calibrated on the weighted SwiGLU output: equal only with the same 2.5x weights
    assert rows["calibration.gs2"].metrics["equal"] and rows["act_q"].metrics["equal"]


@pytest.mark.parametrize(
    "defect, shape, found, c",
    [
        (
            planted.RoutingScaleTwice,
            PRO_RSF,
            "routed_scaling_factor applied twice (2.5 x 2.5)",
            2.5,
        ),
        (
            planted.RoutingScaleTwice,
            FLASH_RSF,
            "routed_scaling_factor 2.5 applied to weights that include 1.5",
            2.5,
        ),
        (
            planted.RoutingScaleHardcoded,
            FLASH_RSF,
            "routed_scaling_factor 2.5 instead of 1.5",
            2.5 / 1.5,
        ),
        (
            planted.RoutingScaleIgnored,
            PRO_RSF,
            "routed_scaling_factor not applied (normalized weights used as they are)",
            0.4,
        ),
    ],
    ids=["twice", "on-top-of-flash", "hardcoded-on-flash", "ignored"],
)
def test_routing_scale_mistakes_are_named(defect, shape, found, c):
    rows = _routed(defect(), shape)
    out = rows["out"]
    assert out.outcome is Outcome.FAIL
    assert out.metrics["matches_routing_scale"] == found
    assert f"output is {c:.4g} x the reference: {found}" in out.message
    assert out.metrics["first_divergent_stage"] == "row_weight"  # the weights themselves


def test_a_correct_factor_is_not_named_and_no_factor_explains_another_defect():
    ok = _routed(planted.RoutingScaleHardcoded(), PRO_RSF)["out"]  # 2.5 is V4-Pro's own
    assert ok.outcome is Outcome.PASS, ok.message
    other = _routed(planted.LayerClampAfterProduct(), PRO_RSF, limit=1.0)["out"]
    assert other.outcome is Outcome.FAIL and other.metrics["matches_routing_scale"] is None
    assert other.metrics["matches_variant"] == "clamp_after_product"


# --------------------------------------------------------------------------------------------
# 10. the adapter's own scale assembly in layer cases, misplaced groups named


def test_unpadded_group_assembly_is_named_in_the_layer_and_the_stage():
    rows = run(planted.UnpaddedGroupAssembly(), Stage.GROUPED_LINEAR, tokens=5)
    asm = rows["x_q.assembly"]
    assert asm.outcome is Outcome.FAIL and asm.metrics["groups_misplaced"] == [1]
    assert "group 1 at scale rows 5..9 (its data-row offset), expected from 128" in asm.message
    assert rows["x_q"].metrics["equal"]  # the quantized scales themselves are right
    assert rows["out"].metrics["first_divergent_stage"] == "x_q.assembly"
    stage = run(planted.UnpaddedGroupAssembly(), Stage.SCALE_ASSEMBLY, tokens=5)["scales_2d"]
    assert stage.outcome is Outcome.FAIL and stage.metrics["groups_misplaced"]
    assert "its data-row offset" in stage.message


def test_layer_assembly_rows_pass_for_the_reference():
    rows = run(ReferenceAdapter(), Stage.ROUTED_MOE, tokens=33)
    for name in ("x_q.assembly", "w13_q.assembly", "act_q.assembly", "w2_q.assembly"):
        assert rows[name].outcome is Outcome.PASS, rows[name].message


# --------------------------------------------------------------------------------------------
# 7. quantizer policies are classes: declared they pass, undeclared they are named, never real

POLICY_CASES = [
    (planted.ScaleFloorQuantizer, QuantPolicy.SCALE_FLOOR, Distribution.ZERO_BLOCKS),
    (planted.NanScaleByteFF, QuantPolicy.NAN_SCALE_BYTE, Distribution.NAN_ONE),
    (planted.NanAmaxQuantizer, QuantPolicy.NAN_AMAX, Distribution.NAN_ONE),
]


@pytest.mark.parametrize("cls, policy, dist", POLICY_CASES, ids=lambda v: getattr(v, "value", None))
def test_undeclared_policy_fails_under_its_own_name(cls, policy, dist):
    rows = run(cls(), Stage.QUANTIZE, tokens=33, distribution=dist)
    failing = [c for c in rows.values() if c.outcome is Outcome.FAIL]
    assert failing
    for c in failing:
        assert f"policy {policy.value}" in c.message and "does not declare" in c.message
        assert "are real mismatches" not in c.message
        assert c.metrics.get("classes", {}).get("real", 0) == 0


@pytest.mark.parametrize("cls, policy, dist", POLICY_CASES, ids=lambda v: getattr(v, "value", None))
def test_declared_policy_passes(cls, policy, dist):
    rows = run(planted.declaring(cls, policy), Stage.QUANTIZE, tokens=33, distribution=dist)
    assert all(c.outcome is Outcome.PASS for c in rows.values()), {
        c.name: c.message for c in rows.values()
    }
    assert any(policy.value in c.message and "declared" in c.message for c in rows.values())


def test_a_policy_does_not_hide_a_real_error():
    # the scale floor declared, but on top of it a rounding defect: still real mismatches
    adapter = planted.declaring(planted.RoundHalfAway, QuantPolicy.SCALE_FLOOR)
    c = run(adapter, Stage.QUANTIZE, tokens=5, distribution=Distribution.MIDPOINTS)[
        "quantize.codes"
    ]
    assert c.outcome is Outcome.FAIL and "every intermediate is exact" in c.message


# --------------------------------------------------------------------------------------------
# 8. the static-scale path meets the Inf (clean warm-up sample)


def test_inf_with_a_static_scale_exercises_the_saturating_path():
    c = run(
        planted.UnclampedScaleCast(),
        Stage.QUANTIZE,
        tokens=33,
        distribution=Distribution.INF_ONE,
        scale_ratio=1.0,
    )
    assert c["quantize.global_scale"].metrics["ref"] < float("inf")  # calibrated finite
    assert c["quantize.scales"].outcome is Outcome.FAIL
    assert c["quantize.scales"].metrics["classes"]["real"] == 1  # the Inf's block, only it


def test_shipped_case_files_cover_the_holes():
    from pathlib import Path

    from harness.cases import load_cases

    root = Path(__file__).resolve().parents[1] / "cases"
    _, adv = load_cases(root / "adversarial.yaml")
    assert any(c.stage is Stage.SCALE_ASSEMBLY and c.tokens == 129 for c in adv)
    assert any(
        c.stage is Stage.SHARED_EXPERT
        and c.distribution is Distribution.INF_ONE
        and c.scale_ratio is not None
        for c in adv
    )
    for name in ("dsv4_pro.yaml", "dsv4_flash.yaml"):
        _, cases = load_cases(root / name)
        dists = {c.distribution for c in cases if c.stage is Stage.QUANTIZE}
        assert {Distribution.MIDPOINTS, Distribution.FP4_GRID} <= dists, name


# --------------------------------------------------------------------------------------------
# 11. layer verdicts see a uniform scale error; a derived budget; the rounding direction


@pytest.mark.parametrize("t", [5, 129])
def test_one_percent_too_large_fails_with_its_gain(t):
    out = run(planted.GroupedLinearScaled(), Stage.GROUPED_LINEAR, tokens=t, scale_ratio=1.0)["out"]
    assert out.outcome is Outcome.FAIL
    assert abs(out.metrics["gain"] - 1.01) < 1e-3
    assert "1% too large" in out.message or "0.99% too large" in out.message


def test_a_scale_error_under_the_calc_diff_budget_fails_by_gain_alone():
    out = run(
        planted.GroupedLinearScaledSlightly(), Stage.GROUPED_LINEAR, tokens=129, scale_ratio=1.0
    )["out"]
    assert out.metrics["calc_diff"] < out.metrics["budget_calc_diff"]  # calc_diff alone: pass
    assert out.outcome is Outcome.FAIL and out.message.startswith("gain 1.004")


@pytest.mark.parametrize("stage", LAYERS, ids=lambda s: s.value)
def test_budget_is_derived_from_the_measured_noise_floor(stage):
    from harness.stages.verdicts import CALC_DIFF_MIN, NOISE_MULT

    out = run(ReferenceAdapter(), stage, tokens=33, scale_ratio=1.0)["out"]
    m = out.metrics
    assert out.outcome is Outcome.PASS and m["budget_derived"]
    assert m["budget_calc_diff"] == max(NOISE_MULT * m["noise_floor_calc_diff"], CALC_DIFF_MIN)
    assert m["gain"] == 1.0 and m["bias"] == 0.0


def test_an_explicit_budget_overrides_the_derived_one():
    from harness.cases import Budget

    case = Case(Stage.GROUPED_LINEAR, Shape(), 5, scale_ratio=1.0, budget=Budget(calc_diff=1e-3))
    out = {c.name: c for c in run_case(case, planted.GroupedLinearScaled())}["out"]
    assert out.metrics["budget_calc_diff"] == 1e-3 and not out.metrics["budget_derived"]
    assert "calc_diff" not in out.message and "gain" in out.message  # the gain still sees it


@pytest.mark.parametrize(
    "defect, dist, direction",
    [
        (planted.RoundHalfAway, Distribution.MIDPOINTS, "ties away from zero"),
        (planted.RoundTiesDown, Distribution.MIDPOINTS, "ties toward zero"),
        (planted.RoundTruncate, Distribution.NORMAL, "truncation"),
    ],
    ids=["half-away", "ties-down", "truncate"],
)
def test_rounding_direction_is_named(defect, dist, direction):
    c = run(defect(), Stage.QUANTIZE, tokens=5, distribution=dist)["quantize.codes"]
    assert c.outcome is Outcome.FAIL
    assert c.metrics["rounding"]["direction"] == direction
    assert f"rounding: {direction}" in c.message


# --------------------------------------------------------------------------------------------
# the report shows what was named


def test_report_lists_the_diagnoses(tmp_path, monkeypatch):
    from harness.report import render
    from harness.runner import SweepOptions, run_sweep

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # tests.planted:* from the repo root
    cases = [
        Case(Stage.GROUPED_GEMM, Shape(), 5),
        Case(Stage.QUANTIZE, Shape(), 5, distribution=Distribution.MIDPOINTS),
    ]
    backends = ("tests.planted:InvertedAlpha", "tests.planted:RoundTiesDown")
    run_sweep(cases, tmp_path, SweepOptions(backends=backends, progress=False))
    text = render(tmp_path, tmp_path / "index.html").read_text()
    assert ">Diagnoses</h2>" in text
    assert "alpha matches 1/(gsa*gsb)" in text and "rounding ties toward zero" in text
