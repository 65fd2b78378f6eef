"""harness.timing on CPU: statistics, the stopping rule, rooflines, work, verdicts, and what
`run --time` records where there is no CUDA. The CUDA measurement itself (events, graphs, NVML)
runs on the GPU host (bench/timing_check.py); here its logic is driven by synthetic samples."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from harness import adapters, results, timing
from harness.backends.reference import ReferenceAdapter
from harness.cases import Case, Routing, Shape, Stage
from harness.records import Outcome, Row
from harness.runner import SweepOptions, run_one, run_sweep, timing_row
from harness.timing import Protocol, StopReason, Work


class FakeClock:
    """A clock each sample advances by its own duration: budgets run out deterministically."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _source(values, clock: FakeClock, cost_s: float = 1e-3):
    it = itertools.cycle(values)

    def sample() -> float:
        clock.t += cost_s
        return next(it)

    return sample


# --------------------------------------------------------------------------------------------
# statistics and the stopping rule


def test_median_ci_brackets_the_median_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, big = rng.normal(100, 5, 50), rng.normal(100, 5, 5000)
    for x in (small, big):
        lo, hi = timing.median_ci(x)
        assert lo <= np.median(x) <= hi
    assert timing.ci_rel(big) < timing.ci_rel(small) / 5


def test_tight_samples_converge_at_the_minimum_count():
    clock = FakeClock()
    rng = np.random.default_rng(1)
    samples, why = timing.collect(
        _source(100 + rng.normal(0, 0.01, 1000), clock), Protocol(min_samples=20), clock
    )
    assert why is StopReason.CONVERGED and len(samples) == 20


def test_noisy_samples_stop_at_the_time_limit_and_say_so():
    clock = FakeClock()
    rng = np.random.default_rng(2)
    noisy = rng.lognormal(4, 1.0, 1000)  # far too wide for a 0.5% CI in 0.1 s of samples
    proto = Protocol(budget_s=0.1, warmup_s=0.01, target_ci=0.005)
    samples, why = timing.collect(_source(noisy, clock), proto, clock)
    assert why is StopReason.TIME_LIMIT
    assert 95 <= len(samples) <= 101  # 1 ms a sample: the 0.1 s budget, not the cap


def test_sample_cap_stops_first_when_it_is_lower():
    clock = FakeClock()
    proto = Protocol(budget_s=100, min_samples=5, max_samples=30, target_ci=0.0)
    samples, why = timing.collect(_source([1.0, 2.0, 3.0], clock), proto, clock)
    assert why is StopReason.MAX_SAMPLES and len(samples) == 30


def test_a_slow_call_still_gets_a_few_samples():
    clock = FakeClock()
    proto = Protocol(budget_s=0.5, warmup_s=0.0, min_samples=20)
    samples, why = timing.collect(_source([5.0, 6.0], clock, cost_s=2.0), proto, clock)
    assert why is StopReason.TIME_LIMIT and len(samples) == 3


def test_summary_keeps_every_sample_and_reports_spread():
    t = timing.Timing("graph", [10.0] * 8 + [12.0, 20.0], "converged", n_sets=4)
    m = t.summary()
    assert m["n_samples"] == 10 and len(m["samples_us"]) == 10
    assert m["latency_us"] == 10.0 and m["latency_p90_us"] == pytest.approx(12.8)
    assert m["rel_spread"] == pytest.approx(0.28)
    assert m["stop_reason"] == "converged" and m["n_sets"] == 4


@pytest.mark.parametrize(
    "field,value",
    [("budget_s", -1.0), ("target_ci", float("nan")), ("min_samples", 0), ("max_samples", 3)],
)
def test_bad_protocol_names_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        Protocol(**{field: value}, **({"min_samples": 5} if field == "max_samples" else {}))


# --------------------------------------------------------------------------------------------
# verdicts between runs


def test_same_distribution_twice_is_same():
    rng = np.random.default_rng(3)
    a, b = rng.normal(50, 0.5, 400), rng.normal(50, 0.5, 400)
    assert timing.compare_samples(a, b)["verdict"] == "same"


def test_ten_percent_shifts_are_slower_and_faster():
    rng = np.random.default_rng(4)
    a = rng.normal(50, 0.5, 300)
    slow, fast = rng.normal(55, 0.5, 300), rng.normal(45, 0.5, 300)
    s, f = timing.compare_samples(a, slow), timing.compare_samples(a, fast)
    assert s["verdict"] == "slower" and s["ratio"] == pytest.approx(1.1, abs=0.01)
    assert f["verdict"] == "faster" and f["ratio_hi"] < 0.97


def test_overlapping_noisy_samples_are_ambiguous():
    rng = np.random.default_rng(5)
    a, b = rng.lognormal(np.log(50), 0.3, 12), rng.lognormal(np.log(52), 0.3, 12)
    assert np.percentile(b, 10) < np.percentile(a, 90)  # the p10..p90 intervals overlap
    v = timing.compare_samples(a, b)
    assert v["verdict"] == "ambiguous" and v["ratio_lo"] < 0.97 < 1.03 < v["ratio_hi"]


def test_interval_fallback_for_rows_without_samples():
    assert timing.compare_intervals((10, 9, 11), (14, 13, 15))["verdict"] == "slower"
    assert timing.compare_intervals((10, 9, 11), (6, 5, 7))["verdict"] == "faster"
    assert timing.compare_intervals((10, 9, 11), (10.8, 10.5, 12))["verdict"] == "ambiguous"
    assert timing.compare_intervals((10, 9.9, 10.1), (10.1, 10.0, 10.2))["verdict"] == "same"


def _timed(case_id: str, samples) -> Row:
    s = sorted(samples)
    return Row(
        case_id=case_id,
        backend="k",
        compare=results.TIMING,
        outcome=Outcome.TIMED,
        metrics={
            "latency_us": float(np.median(s)),
            "latency_p10_us": float(np.percentile(s, 10)),
            "latency_p90_us": float(np.percentile(s, 90)),
            "samples_us": list(map(float, s)),
        },
    )


def test_compare_timings_sorts_cases_into_the_four_verdicts():
    rng = np.random.default_rng(6)
    base = [_timed(c, rng.normal(50, 0.4, 200)) for c in "abcd"]
    new = [
        _timed("a", rng.normal(50, 0.4, 200)),
        _timed("b", rng.normal(60, 0.4, 200)),
        _timed("c", rng.normal(40, 0.4, 200)),
        _timed("d", rng.lognormal(np.log(51), 0.4, 8)),
    ]
    d = results.compare_timings(base, new)
    got = {v: [k[0] for k, *_ in items] for v, items in d.items()}
    assert got == {"same": ["a"], "slower": ["b"], "faster": ["c"], "ambiguous": ["d"]}
    # a skipped timing row (no numbers) is never compared
    skipped = base[0].replace(outcome=Outcome.SKIPPED, metrics={"verdict": "pass"})
    assert not any(results.compare_timings([skipped], new[:1]).values())


# --------------------------------------------------------------------------------------------
# work and rooflines


def test_roofline_from_the_datasheet_and_overridden_by_measurement():
    r = timing.roofline("NVIDIA H200")
    assert (r.gbps, r.bf16_tflops, r.fp4_tflops) == (4800, 989, None)
    assert r.source["gbps"] == "datasheet H200" and "no FP4" in r.source["fp4_tflops"]
    m = timing.roofline("NVIDIA H200", copy_gbps=4274.0, bf16_tflops=693.0)
    assert (m.gbps, m.bf16_tflops) == (4274.0, 693.0) and m.source["gbps"] == "measured (copy)"
    assert timing.roofline("NVIDIA B200").fp4_tflops == 9000
    assert timing.roofline("Some GPU") is None
    assert timing.roofline("Some GPU", 1000.0, 100.0).source["fp4_tflops"].startswith("none")


def test_roofline_time_is_the_slower_of_memory_and_compute():
    h200, b200 = timing.roofline("H200"), timing.roofline("B200")
    mem = Work(0.0, 4.8e9)  # 4.8 GB at 4.8 TB/s: 1 ms
    assert h200.time_us(mem) == pytest.approx(1000.0)
    gemm = Work(2 * 8192 * 7168 * 6144, 1e6, "fp4")  # compute-bound
    assert h200.time_us(gemm) == pytest.approx(gemm.flops / 989e12 * 1e6)  # BF16 MMAs on Hopper
    assert b200.time_us(gemm) == pytest.approx(gemm.flops / 9000e12 * 1e6)
    d = timing.derived(gemm, 2 * h200.time_us(gemm), h200)
    assert d["roofline_pct"] == pytest.approx(50.0)
    assert d["tflops"] == pytest.approx(989 / 2)


def _case(stage: Stage, tokens: int = 64, **kw) -> Case:
    return Case(stage, Shape(hidden=256, intermediate=128, n_experts=4, top_k=2), tokens, **kw)


def test_work_counts_only_experts_that_received_tokens():
    full = timing.work(_case(Stage.GROUPED_GEMM))
    half = timing.work(_case(Stage.GROUPED_GEMM, routing=Routing.EMPTY_EXPERTS))
    w_bytes = 256 * 256 * (1 / 2 + 1 / 16)  # one expert's NVFP4 weights (K=256, N=2*128)
    assert full.flops == half.flops == 2 * 64 * 2 * 256 * 256  # every routed row, top-2
    assert full.bytes - half.bytes == pytest.approx(2 * w_bytes)  # two experts got nothing
    q = timing.work(_case(Stage.QUANTIZE))
    assert q == Work(0.0, 64 * 256 * 2 + 64 * 256 * (1 / 2 + 1 / 16))


def test_cold_l2_sets_exceed_twice_the_l2():
    l2 = 50 << 20
    for per_set in (1 << 20, 7 << 20, 30 << 20, 200 << 20):
        n = timing.cold_l2_sets(per_set, l2=l2)
        assert n >= 2 and (n * per_set > 2 * l2 or n == 256)
    assert timing.cold_l2_sets(1, l2=l2) == 256  # capped


# --------------------------------------------------------------------------------------------
# what a case times: the prepared hot path, and the rows on a machine without CUDA


@pytest.mark.parametrize("stage", list(Stage))
def test_prepare_runs_each_stage_hot_path_on_cpu(stage):
    case = _case(stage, tokens=8, device="cpu", scale_ratio=1.0)  # static scales
    fn = timing.prepare(case, adapters.load("dsv4-torch"), torch.device("cpu"))
    fn()
    fn()  # a prepared call can repeat: inputs and outputs stay allocated


def test_bf16_baseline_computes_the_same_layers_roughly():
    from harness.stages import inputs as stage_inputs

    base = adapters.load("bf16")
    for stage in (Stage.SHARED_EXPERT, Stage.ROUTED_MOE, Stage.GROUPED_LINEAR):
        case = _case(stage, tokens=16, limit=None)
        d = stage_inputs.layer_inputs(case, torch.device("cpu"))
        want = stage_inputs.run_layer(case, ReferenceAdapter(quantized=False), d)["out"]
        got = stage_inputs.run_layer(case, timing._Prepared(base), d)()
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), want.flatten(), dim=0)
        assert cos > 0.99, (stage, float(cos))


def test_bf16_baseline_is_not_a_correctness_backend():
    ok, why = adapters.check(adapters.load("bf16"), _case(Stage.QUANTIZE))
    assert not ok and "baselines:" in why


def test_reference_layers_cannot_be_timed_and_say_why():
    case = _case(Stage.SHARED_EXPERT, tokens=4)
    with pytest.raises(timing.TimingUnavailable, match="prepare_shared_expert"):
        timing.prepare(case, ReferenceAdapter(), torch.device("cpu"))


def test_time_on_cpu_records_a_skip_without_numbers(tmp_path):
    case = _case(Stage.QUANTIZE, tokens=8, source="x.yaml")
    rows = run_one(case, "dsv4-torch", time_it=True, baselines=("bf16",))
    assert [r.compare for r in rows][-2:] == [results.TIMING, "case"]
    t = rows[-2]
    assert t.outcome == "skipped" and "needs CUDA" in t.message
    assert t.metrics == {"verdict": "pass"}  # nothing that looks like a number
    assert not t.final and rows[-1].final


def test_a_failed_case_is_timed_but_marked_invalid():
    outcome, message, m = timing_row(_case(Stage.QUANTIZE), None, "error", ())
    assert outcome == "skipped" and "error" in message
    outcome, _, m = timing_row(_case(Stage.QUANTIZE, device="cpu"), None, "fail", ())
    assert outcome == "skipped" and m["verdict"] == "fail"


def test_a_timed_sweep_reruns_pairs_that_have_no_timing_row(tmp_path):
    cases = [dataclasses.replace(_case(Stage.QUANTIZE, tokens=4), backends=("reference",))]
    run_sweep(cases, tmp_path, SweepOptions(progress=False))
    assert results.timed_pairs(tmp_path) == set()
    assert run_sweep(cases, tmp_path, SweepOptions(progress=False))["resumed"] == 1
    timed = SweepOptions(progress=False, time=True)
    assert run_sweep(cases, tmp_path, timed)["resumed"] == 0  # finished, but never timed
    assert results.timed_pairs(tmp_path) == {(cases[0].id, "reference")}
    assert run_sweep(cases, tmp_path, timed)["resumed"] == 1


def test_cli_compare_prints_the_timing_verdicts(tmp_path, capsys):
    from harness import cli

    rng = np.random.default_rng(7)
    sets = {
        "old": [_timed("a", rng.normal(50, 0.4, 200)), _timed("b", rng.normal(50, 0.4, 200))],
        "new": [_timed("a", rng.normal(50, 0.4, 200)), _timed("b", rng.normal(70, 0.4, 200))],
    }
    for name, rows in sets.items():
        with results.ResultWriter(tmp_path / name) as w:
            w.write(rows)
    assert cli.main(["compare", str(tmp_path / "old"), str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "same: 1" in out and "slower: 1" in out and "x1.4" in out


def test_compiled_reference_is_bit_exact_on_quantize():
    from harness.stages.run import run_case

    adapter = adapters.load("reference-compiled")  # SwiGLU-requant: checked on the GPU host
    for stage in (Stage.QUANTIZE,):
        comps = run_case(_case(stage, tokens=4, scale_ratio=1.0), adapter)
        assert comps and all(c.outcome.value == "pass" for c in comps), comps
        assert all(c.metrics.get("equal", True) for c in comps)


def test_prepare_times_the_inputs_and_scale_the_verdict_used():
    from harness import inputs
    from harness.cases import Distribution
    from harness.stages import inputs as stage_inputs

    class Recorder(ReferenceAdapter):
        def quantize(self, x, global_scale, codes_out, scales_out):
            self.seen = (x, global_scale)
            return super().quantize(x, global_scale, codes_out, scales_out)

    rec = Recorder()
    for dist, ratio in ((Distribution.FP4_GRID, None), (Distribution.INF_ONE, 1.0)):
        case = _case(Stage.QUANTIZE, tokens=8, distribution=dist, scale_ratio=ratio)
        timing.prepare(case, rec, torch.device("cpu"))()
        x, gs = stage_inputs.quantize_inputs(case, torch.device("cpu"))
        assert torch.equal(rec.seen[0], x) and torch.equal(rec.seen[1], gs)
        assert torch.isfinite(gs)  # exact: the power-of-two scale; inf_one: calibrated clean
    assert float(rec.seen[1]) != inputs.EXACT_GLOBAL_SCALE
