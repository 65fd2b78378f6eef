"""The smoke sweep catches every planted defect of tests/planted.py, in the right stage.

One sweep of the default cases/smoke.yaml runs the reference and the five defect adapters
(module-scoped: it is the expensive part of the harness tests). For each defect: some case of
its stage fails, the failing rows name that stage and the compared output, no case of any other
stage fails (teacher forcing keeps a defect where it is), and the message carries the diagnosis
the harness promises (variant named, padding named, derived bound, exact-tie cases). The defects
run the stage cases only (their layer methods are the reference's, so layer cases report
unsupported); the reference adapter runs and passes every case, the harness checking itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import results
from harness.cases import load_cases
from harness.runner import SweepOptions, run_sweep
from tests import planted

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "cases" / "smoke.yaml"


def spec(cls: type) -> str:
    return f"tests.planted:{cls.__name__}"


# defect -> (its stage, the compared outputs allowed to fail)
EXPECTED = {
    planted.RoundHalfAway: ("quantize", {"quantize.codes"}),
    planted.SwappedSwizzleBits: ("scale_assembly", {"scales_2d", "scales_3d"}),
    planted.SkipLastKBlock: ("grouped_gemm", {"grouped_gemm.out"}),
    planted.ClampAfterProduct: (
        "swiglu_requant",
        {"swiglu_requant.codes", "swiglu_requant.scales"},
    ),
    planted.PaddingUnwritten: ("scale_assembly", {"scales_2d"}),
}
assert set(EXPECTED) == set(planted.DEFECTS)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(REPO)  # import paths tests.planted:* resolve from the repo root
    _, cases = load_cases(SMOKE)
    out = tmp_path_factory.mktemp("smoke")
    backends = ("reference", *(spec(d) for d in planted.DEFECTS))
    counts = run_sweep(cases, out, SweepOptions(backends=backends, progress=False))
    rows = results.latest(results.read_rows(out))
    return cases, counts, rows


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _finals(rows, backend):
    return {r.case_id: r for r in rows if r.backend == backend and r.final}


def _failing(rows, backend):
    return [r for r in rows if r.backend == backend and not r.final and r.outcome == "fail"]


def test_reference_passes_the_whole_smoke_sweep(smoke):
    cases, counts, rows = smoke
    finals = _finals(rows, "reference")
    assert set(finals) == {c.id for c in cases}
    bad = {k: (r.outcome, r.message[:200]) for k, r in finals.items() if r.outcome != "pass"}
    assert not bad
    assert counts["resumed"] == 0
    assert sum(v for k, v in counts.items() if k != "resumed") == 6 * len(cases)


@pytest.mark.parametrize("defect", planted.DEFECTS, ids=lambda d: d.__name__)
def test_defect_fails_its_stage_and_no_other(smoke, defect):
    cases, _, rows = smoke
    stage, outputs = EXPECTED[defect]
    finals = _finals(rows, spec(defect))
    assert set(finals) == {c.id for c in cases}  # every case recorded for it
    unsupported = {k for k, r in finals.items() if r.outcome == "unsupported"}
    assert unsupported == {c.id for c in cases if c.stage.is_layer}  # StageDefect.can_implement
    failed = {k: r for k, r in finals.items() if r.outcome not in ("pass", "unsupported")}
    assert failed, f"{defect.__name__} went unnoticed by the smoke sweep"
    # attributed to the right stage: nothing else fails, errors or crashes
    assert {r.stage for r in failed.values()} == {stage}
    assert {r.outcome for r in failed.values()} == {"fail"}
    comps = _failing(rows, spec(defect))
    assert comps and {r.compare for r in comps} <= outputs
    assert {r.case_id for r in comps} == set(failed)
    assert all(r.stage == stage and r.message for r in comps)


def test_round_half_away_fails_exactly_on_the_tie_cases(smoke):
    cases, _, rows = smoke
    failed = {
        k for k, r in _finals(rows, spec(planted.RoundHalfAway)).items() if r.outcome == "fail"
    }
    midpoints = {
        c.id for c in cases if c.stage.value == "quantize" and c.distribution.value == "midpoints"
    }
    assert midpoints and failed == midpoints  # elsewhere ties are classified, not failed
    for r in _failing(rows, spec(planted.RoundHalfAway)):
        assert "every intermediate is exact" in r.message
        assert r.metrics["n_mismatch"] > 0


def test_clamp_after_product_is_named(smoke):
    cases, _, rows = smoke
    comps = _failing(rows, spec(planted.ClampAfterProduct))
    for r in comps:
        assert "matches SwiGLU variant clamp_after_product" in r.message
        assert r.metrics["matches_variant"] == "clamp_after_product"
    finals = _finals(rows, spec(planted.ClampAfterProduct))
    for c in cases:  # with no limit the variants agree: only clamped cases may fail
        if c.stage.value == "swiglu_requant":
            assert (finals[c.id].outcome == "fail") == (c.limit is not None), c.id


def test_padding_unwritten_is_diagnosed_as_padding(smoke):
    _, _, rows = smoke
    comps = _failing(rows, spec(planted.PaddingUnwritten))
    assert comps
    for r in comps:
        assert r.compare == "scales_2d"
        assert "padding" in r.message
        assert r.metrics["mismatch_in_padding"] == r.metrics["n_mismatch"]


def test_skip_last_k_block_is_outside_the_bound(smoke):
    cases, _, rows = smoke
    comps = _failing(rows, spec(planted.SkipLastKBlock))
    gemm = {c.id for c in cases if c.stage.value == "grouped_gemm"}
    assert {r.case_id for r in comps} == gemm  # every token count and routing
    for r in comps:
        assert "outside the derived bound" in r.message
        assert r.metrics["n_outside"] > 0 and r.metrics["worst_ratio"] > 1


def test_swapped_swizzle_bits_fail_bytes_outside_padding(smoke):
    _, _, rows = smoke
    comps = _failing(rows, spec(planted.SwappedSwizzleBits))
    assert "scales_3d" in {r.compare for r in comps}
    for r in comps:
        assert "all of them in padding" not in r.message
