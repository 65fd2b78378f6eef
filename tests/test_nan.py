"""NaN regressions, issue 12: birth trace, isolation probes, input minimisation, parameter
bisection and the flight recorder, each shown on a planted kernel of tests/planted.py."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import yaml

from harness import adapters, cli, minimize, probes, recorder, repro, trace
from harness.cases import Case, CaseError, Distribution, Probe, Shape, Stage, load_cases
from harness.records import Outcome
from harness.stages import inputs as stage_inputs
from harness.stages.run import run_case
from tests import planted

SMALL_GEMM = Shape(hidden=64, intermediate=32, n_experts=1, top_k=1)  # one group: rows = tokens
PADDED = Shape(hidden=288)  # K/16 = 18: two padding columns per scale row
LN_FP16_MAX = math.log(65504.0)  # where the planted SwiGLU's fp16 e^g overflows
NAN_RATIO = 464.0 / 448.0  # block scale 448 * ratio above 464: the unclamped cast's NaN


def _load(cls):
    return adapters._instantiate(cls.__name__, cls)


# --------------------------------------------------------------------------------------------
# A. trace


def test_trace_names_the_quantizer_whose_scale_turns_nan_and_where():
    case = Case(Stage.QUANTIZE, tokens=16, scale_ratio=2.0)
    tr = trace.trace_case(case, _load(planted.UnclampedScaleCast))
    assert tr.culprit["stage"] == "quantize" and tr.culprit["position"]["kind"] == "nan"
    x, gs = stage_inputs.quantize_inputs(case, torch.device("cpu"))
    block_scale = x.float().reshape(16, -1, 16).abs().amax(-1) / gs / 6  # [T, K/16]
    first = trace._first(block_scale > 464.0)  # what the unclamped cast turns into NaN
    p = tr.culprit["position"]
    assert (p["token"], p["block"]) == first and torch.isfinite(x).all()
    assert tr.first_divergent["stage"] == "quantize"
    kernel = next(r for r in tr.rows if r.side == "kernel")
    assert kernel.stats["nan_bytes"] == int((block_scale > 464.0).sum()) > 0


def test_trace_names_the_swiglu_that_overflows_for_large_gates():
    case = Case(Stage.SWIGLU_REQUANT, tokens=16, limit=20.0)
    adapter = _load(planted.SwigluExpOverflow)
    tr = trace.trace_case(case, adapter)
    p = tr.culprit["position"]
    assert tr.culprit["stage"] == "swiglu_requant" and p["kind"] == "saturated"
    l1, _, _ = stage_inputs.swiglu_inputs(case, torch.device("cpu"), adapter.conventions)
    gate = l1.float()[:, : case.shape.intermediate].clamp(max=case.limit)
    big = (gate > LN_FP16_MAX).reshape(16, -1, 16).any(-1)  # blocks whose e^gate overflows
    assert trace._first(big) == (p["token"], p["block"])
    # with the DSV4 limit of 10 every gate stays below ln(65504): nothing is born
    assert trace.trace_case(Case(Stage.SWIGLU_REQUANT, tokens=16), adapter).culprit is None


def test_trace_names_the_gemm_writing_nan_into_a_single_row_tail_tile():
    adapter = _load(planted.GemmNanTailRow)
    tr = trace.trace_case(Case(Stage.GROUPED_GEMM, SMALL_GEMM, 129), adapter)
    assert tr.culprit == {
        "stage": "grouped_gemm",
        "part": "forced",
        "position": {"kind": "nan", "row": 128, "token": 128, "expert": 0, "block": 0},
    }
    assert trace.trace_case(Case(Stage.GROUPED_GEMM, SMALL_GEMM, 130), adapter).culprit is None
    # in a layer, the kernel's GEMM fed the reference layer's x_q is where it is born
    layer = trace.trace_case(Case(Stage.SHARED_EXPERT, tokens=129, scale_ratio=1.0), adapter)
    assert layer.culprit["stage"] == "l1_out" and layer.culprit["position"]["token"] == 128
    assert layer.first_divergent["stage"] == "l1_out"


def test_trace_of_a_nan_input_blames_the_input_and_lists_the_propagators():
    case = Case(Stage.ROUTED_MOE, tokens=16, scale_ratio=1.0, distribution=Distribution.NAN_ONE)
    tr = trace.trace_case(case, adapters.load("dsv4-torch"))
    x = stage_inputs.layer_inputs(case, torch.device("cpu")).x
    token, col = (int(v) for v in torch.nonzero(torch.isnan(x))[0])
    assert tr.culprit["stage"] == "input"
    assert tr.culprit["position"] == {"kind": "nan", "token": token, "block": col // 16}
    assert tr.propagators[:2] == ["x_q", "l1_out"] and tr.propagators[-1] == "out"
    assert tr.first_divergent is None  # the kernel matches the reference at every stage
    text = trace.format_table(tr)
    assert "culprit input (layer)" in text and "0x7F" in text and "0x7E" in text


def test_trace_cli_prints_the_table_and_exits_1_where_a_stage_is_born_bad(tmp_path, capsys):
    f = tmp_path / "q.yaml"
    f.write_text("sweeps:\n  - stage: quantize\n    tokens: [16]\n    scale_ratios: [2]\n")
    assert cli.main(["trace", str(f), "-b", "tests.planted:UnclampedScaleCast"]) == 1
    out = capsys.readouterr().out
    assert "culprit quantize (forced) at kind=nan" in out and "first bad" in out
    assert cli.main(["trace", str(f), "-b", "dsv4-torch"]) == 0
    assert "no NaN, Inf or new saturation" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# B. probes


@pytest.mark.parametrize("probe", list(Probe))
def test_dsv4_torch_passes_every_probe(probe):
    case = Case(Stage.GROUPED_GEMM, PADDED, 33, probe=probe)
    rows = run_case(case, adapters.load("dsv4-torch"))
    assert [(r.name, r.outcome.value) for r in rows] == [
        ("grouped_gemm.out", "pass"),
        (f"probe.{probe.value}", "pass"),
    ]
    assert rows[1].metrics["numel_guarded"] > 0


def test_probes_perturb_only_padding_or_one_expert_byte():
    ops, _ = stage_inputs.gemm_operands(
        Case(Stage.GROUPED_GEMM, PADDED, 33), torch.device("cpu"), None
    )
    a_map, b_map = probes.padding_maps(ops)
    for probe in Probe:
        new, may_change = probes.perturb(probe, ops)
        a_diff = new.a_scales_swizzled.view(torch.uint8) != ops.a_scales_swizzled.view(torch.uint8)
        b_diff = new.b_scales_swizzled.view(torch.uint8) != ops.b_scales_swizzled.view(torch.uint8)
        if probe is Probe.EXPERT_SCALE_BYTE:
            assert may_change == 0 and int(b_diff.sum()) == 1 and int(b_diff[0].sum()) == 1
            assert not a_diff.any()
            continue
        assert may_change is None and a_diff.any()  # N = 256: the weights have no row padding
        assert b_diff.any() == (probe is not Probe.PADDING_NAN)
        assert not (a_diff & (a_map == probes.DATA)).any()  # data bytes untouched
        assert not (b_diff & (b_map == probes.DATA)).any()


def test_a_padding_leak_is_caught_by_the_padding_probes_only():
    adapter = _load(planted.GemmPaddingLeak)
    verdict = {}
    for probe in Probe:
        rows = run_case(Case(Stage.GROUPED_GEMM, PADDED, 33, probe=probe), adapter)
        assert rows[0].outcome.value == "pass"  # clean (zeroed) padding: a correct result
        verdict[probe] = rows[1]
    assert verdict[Probe.PADDING_NAN].outcome.value == "fail"
    assert verdict[Probe.PADDING_GARBAGE].outcome.value == "fail"
    assert verdict[Probe.EXPERT_SCALE_BYTE].outcome.value == "pass"
    first = verdict[Probe.PADDING_NAN].metrics["first_changed"]
    assert "must be bitwise unchanged" in verdict[Probe.PADDING_NAN].message
    assert first["row"] == 0 and first["expert"] == 0  # the first row of the first group


def test_expert_cross_talk_is_caught_by_the_expert_probe():
    adapter = _load(planted.GemmExpertScaleCrosstalk)
    case = Case(Stage.GROUPED_GEMM, PADDED, 33, probe=Probe.EXPERT_SCALE_BYTE)
    out, probe = run_case(case, adapter)
    assert out.outcome.value == "pass" and probe.outcome.value == "fail"
    assert 0 not in probe.metrics["experts_changed"] and probe.metrics["experts_changed"]
    for p in (Probe.PADDING_NAN, Probe.PADDING_GARBAGE, Probe.SCALE_PADDING_7F):
        rows = run_case(Case(Stage.GROUPED_GEMM, PADDED, 33, probe=p), adapter)
        assert rows[1].outcome.value == "pass"


def test_probes_are_a_case_axis_checked_at_load(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(
        "sweeps:\n  - stage: grouped_gemm\n    shape: {hidden: 288}\n    tokens: [33]\n"
        "    probes: [null, padding_nan, scale_padding_7f]\n"
    )
    cases = load_cases(f)[1]
    assert [c.probe for c in cases] == [None, Probe.PADDING_NAN, Probe.SCALE_PADDING_7F]
    assert cases[1].id.endswith("_ppadding_nan_s0") and cases[0].digest != cases[1].digest
    doc = tmp_path / "one.yaml"  # a bundle's case file keeps the probe
    doc.write_text(yaml.safe_dump(repro.case_document(cases[2])))
    assert load_cases(doc)[1][0].id == cases[2].id
    bad = {
        "    tokens: [3]\n    probes: [scale_padding_7f]\n": "hidden/16 = 16 is a multiple of 4",
        "    shape: {n_experts: 1, top_k: 1}\n    probes: [expert_scale_byte]\n": "2 or more",
        "    probes: [padding_zero]\n": "unknown value 'padding_zero'",
    }
    for body, msg in bad.items():
        f.write_text("sweeps:\n  - stage: grouped_gemm\n" + body)
        with pytest.raises(CaseError, match=msg):
            load_cases(f)
    f.write_text("sweeps:\n  - stage: quantize\n    probes: [padding_nan]\n")
    with pytest.raises(CaseError, match="probes: not an axis of stage quantize"):
        load_cases(f)


# --------------------------------------------------------------------------------------------
# C. input minimisation and parameter bisection


def test_ddmin_finds_a_one_minimal_failing_subset():
    calls = []

    def fails(s):
        calls.append(s)
        return {3, 7, 12} <= set(s)

    assert sorted(minimize.ddmin(list(range(20)), fails)) == [3, 7, 12]


def _one_minimal(m: minimize.Minimized, case: Case, adapter) -> None:
    """The minimal input still fails with the same comparison; dropping any token, expert or
    kept block makes that failure vanish."""
    assert len(m.tokens) == 1  # one token is enough for each planted defect below
    (step,) = trace.case_steps(case, adapter, torch.device("cpu"))
    exps = m.experts if m.experts is not None else [0]
    keep = minimize._step_shrink(step, m.tokens, exps, m.k_blocks)
    assert m.failing in minimize._failures_of_step(keep, adapter, case)
    for b in m.k_blocks:
        fewer = [x for x in m.k_blocks if x != b]
        shrunk = minimize._step_shrink(step, m.tokens, exps, fewer)
        assert m.failing not in minimize._failures_of_step(shrunk, adapter, case)


@pytest.mark.parametrize(
    "cls, case",
    [
        (planted.UnclampedScaleCast, Case(Stage.QUANTIZE, tokens=16, scale_ratio=2.0)),
        (planted.SwigluExpOverflow, Case(Stage.SWIGLU_REQUANT, tokens=16, limit=20.0)),
        (planted.GemmNanTailRow, Case(Stage.GROUPED_GEMM, SMALL_GEMM, 129)),
        (planted.GemmPaddingLeak, Case(Stage.GROUPED_GEMM, PADDED, 33, probe=Probe.PADDING_NAN)),
        (
            planted.GemmExpertScaleCrosstalk,
            Case(Stage.GROUPED_GEMM, PADDED, 33, probe=Probe.EXPERT_SCALE_BYTE),
        ),
    ],
    ids=lambda v: getattr(v, "name", None) or getattr(v, "id", None),
)
def test_minimize_returns_a_minimal_failing_token_set(cls, case):
    adapter = _load(cls)
    m = minimize.minimize(case, adapter)
    _one_minimal(m, case, adapter)
    if cls is planted.GemmExpertScaleCrosstalk:
        assert m.experts and 0 not in m.experts  # the expert that must not have changed
    if cls is planted.GemmNanTailRow:
        assert m.k_blocks == []  # the NaN needs no data at all: 1 row is 1 mod 128


def test_minimize_a_layer_names_the_skipped_k_block_and_bundles_it(tmp_path, capsys):
    f = tmp_path / "gl.yaml"
    f.write_text("sweeps:\n  - stage: grouped_linear\n    tokens: [6]\n    scale_ratios: [1]\n")
    case = load_cases(f)[1][0]
    adapter = _load(planted.GroupedLinearSkipLastKBlock)
    m = minimize.minimize(case, adapter)
    assert len(m.tokens) == 1 and m.k_blocks == [m.n_k_blocks - 1]  # the block it skips
    out = tmp_path / "bundle"
    spec = "tests.planted:GroupedLinearSkipLastKBlock"
    assert cli.main(["minimize", str(f), "--case", case.id, "-b", spec, "-o", str(out)]) == 0
    assert "K blocks [7] of 8" in capsys.readouterr().out
    assert cli.main(["repro", str(out)]) == 1  # the minimal input replays to the failure
    assert "[" + spec + "] case: fail" in capsys.readouterr().out


def test_minimize_a_routed_moe_drops_tokens_and_experts():
    case = Case(Stage.ROUTED_MOE, tokens=4, scale_ratio=1.0)
    adapter = adapters.load("tests.planted:RoutingWeightAfterW2")
    m = minimize.minimize(case, adapter)
    assert m.failing == "out" and len(m.tokens) == 1
    ids = stage_inputs.layer_inputs(case, torch.device("cpu")).topk_ids[m.tokens[0]]
    local = set((ids - case.shape.n_experts).tolist())
    assert m.experts and set(m.experts) <= local  # only experts the kept token is routed to
    shrunk = minimize._layer_shrink(case, m.inputs, [0], m.experts, m.k_blocks)
    assert "out" in minimize._failures_of_layer(case, adapter, shrunk)


def test_bisect_param_finds_the_ratio_where_the_unclamped_cast_turns_nan():
    adapter = _load(planted.UnclampedScaleCast)
    case = Case(Stage.QUANTIZE, tokens=16, scale_ratio=1.0)
    for criterion in ("fail", "nan"):
        r = minimize.bisect_param(case, adapter, "scale_ratio", 0.5, 100.0, criterion=criterion)
        assert r.passes < NAN_RATIO <= r.fails and r.fails / r.passes - 1 <= 0.01
    clean = minimize.bisect_param
    with pytest.raises(ValueError, match="passes at both"):
        clean(case, adapters.load("dsv4-torch"), "scale_ratio", 0.5, 100.0)
    with pytest.raises(ValueError, match="limit is not a parameter of stage quantize"):
        clean(case, adapter, "limit", 1.0, 20.0)


def test_bisect_param_finds_the_limit_where_the_swiglu_overflows(capsys):
    adapter = _load(planted.SwigluExpOverflow)
    r = minimize.bisect_param(Case(Stage.SWIGLU_REQUANT, tokens=16), adapter, "limit", 1.0, 100.0)
    assert r.passes < LN_FP16_MAX <= r.fails and r.fails / r.passes - 1 <= 0.01


def test_bisect_param_cli(tmp_path, capsys):
    f = tmp_path / "q.yaml"
    f.write_text(textwrap.dedent("sweeps:\n  - stage: quantize\n    scale_ratios: [1]\n"))
    cid = load_cases(f)[1][0].id
    argv = ["bisect-param", str(f), "--case", cid, "-b", "tests.planted:UnclampedScaleCast"]
    assert cli.main([*argv, "--param", "scale_ratio", "--lo", "1", "--hi", "4"]) == 0
    assert "scale_ratio passes at 1.0" in capsys.readouterr().out
    assert cli.main([*argv, "--param", "limit", "--lo", "1", "--hi", "4"]) == 2


# --------------------------------------------------------------------------------------------
# D. flight recorder

H, INTER, T_MAX = 256, 128, 8


def _shared_runner(seed: int = 0):
    from dsv4.layers import SharedExpertRunner

    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(H, 2 * INTER, generator=g) / 16).to(torch.bfloat16)
    w2 = (torch.randn(INTER, H, generator=g) / 11).to(torch.bfloat16)
    sample = torch.randn(T_MAX, H, generator=g).to(torch.bfloat16)
    r = SharedExpertRunner(H, INTER, T_MAX)
    r.set_weights(w13, w2)
    r.finalize()
    r.calibrate(sample)
    return r, {"w13": w13, "w2": w2}, sample


def _x(t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_the_recorder_keeps_the_last_n_calls_and_allocates_nothing_in_the_call(tmp_path):
    from tests.test_dsv4_layers import _allocations

    runner, w, sample = _shared_runner()
    xs = [_x(t, 10 + t) for t in (3, 8, 1, 5, 2)]
    rec = recorder.FlightRecorder(
        runner, last=3, weights=w, calib_sample=sample, nan_check=True, out=tmp_path / "fr"
    )
    with rec:
        runner.run(xs[0])  # warm-up: lazily cached constants
        assert _allocations(lambda: runner.run(xs[1])) == []  # ring copy and NaN check included
        for x in xs[2:]:
            runner.run(x)
    kept = rec.calls()
    assert [c["x"].shape[0] for c in kept] == [1, 5, 2]
    assert all(torch.equal(c["x"], x) for c, x in zip(kept, xs[2:], strict=True))
    assert not rec.fired and rec.dumped == []  # no NaN: nothing written
    assert "run" not in vars(runner)  # the runner is itself again


def test_a_recorded_serving_call_replays_to_the_same_verdict(tmp_path):
    runner, w, sample = _shared_runner(1)
    bad = _x(4, 3)
    bad[2, 37] = float("nan")  # one poisoned activation in a serving batch
    outs = []
    rec = recorder.FlightRecorder(
        runner, last=2, weights=w, calib_sample=sample, nan_check=True, out=tmp_path / "fr"
    )
    with rec:
        for x in (_x(6, 1), _x(5, 2), bad):
            outs.append(runner.run_op(x, torch.empty(x.shape[0], H, dtype=torch.bfloat16)))
    assert [p.name for p in rec.dumped] == ["call000001", "call000002"]  # the last two calls
    case, meta, tensors = repro.load(rec.dumped[-1])
    assert (
        case.stage is Stage.SHARED_EXPERT and case.tokens == 4 and meta["backend"] == "dsv4-torch"
    )
    assert torch.equal(tensors["x"].view(torch.int16), bad.view(torch.int16))
    # the replay's kernel output is the serving call's, bit for bit, and so is the verdict
    replayed = stage_inputs.run_layer(
        case, adapters.load("dsv4-torch"), stage_inputs.layer_inputs_from_tensors(case, tensors)
    )["out"]
    assert torch.equal(replayed.view(torch.int16), outs[-1].view(torch.int16))
    rows = repro.replay(rec.dumped[-1])
    out_row = next(r for r in rows if r.compare == "out")
    assert out_row.outcome is Outcome.PASS and out_row.metrics["nan_out"] == int(
        outs[-1].isnan().sum()
    )
    tr = trace.trace_case(case, adapters.load("dsv4-torch"), tensors)
    assert tr.culprit["stage"] == "input" and tr.culprit["position"]["token"] == 2
    clean = repro.replay(rec.dumped[0])
    assert clean[-1].outcome is Outcome.PASS


def test_the_recorder_maps_a_ranks_expert_ids_and_refuses_bad_arguments(tmp_path):
    from dsv4.layers import RoutedMoERunner

    e, k = 4, 2
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, H, 2 * INTER, generator=g) / 16).to(torch.bfloat16)
    w2 = (torch.randn(e, INTER, H, generator=g) / 11).to(torch.bfloat16)
    r = RoutedMoERunner(H, INTER, e, 8, k, T_MAX)  # this rank holds global experts 8..11
    r.set_weights(w13, w2)
    r.finalize()
    ids = torch.tensor([[8, 11], [3, 9], [-1, 10]])
    wts = torch.full((3, k), 0.5)
    r.calibrate(_x(3, 0), ids, wts)
    rec = recorder.FlightRecorder(r, last=4, weights={"w13": w13, "w2": w2}, calib_sample=_x(3, 0))
    with rec:
        r.run(_x(3, 5), ids, wts)
        r.run(_x(2, 6), ids[:2], wts[:2])
    first, second = rec.dump(tmp_path / "fr")
    case, _, tensors = repro.load(first)
    # the harness's local rank starts at global id n_experts: local ids kept, others dropped
    assert tensors["topk_ids"].tolist() == [[4, 7], [-1, 5], [-1, 6]]
    assert case.stage is Stage.ROUTED_MOE and case.shape.n_experts == e
    assert torch.equal(tensors["calib_sample"], _x(3, 0))
    _, _, t2 = repro.load(second)  # 2 tokens, a 3-token sample: calibrated on the call itself
    assert torch.equal(t2["calib_sample"], t2["x"])
    assert repro.replay(second)[-1].outcome is Outcome.PASS
    with pytest.raises(ValueError, match="weights needs w13, w2"):
        recorder.FlightRecorder(r, last=2, weights={}, calib_sample=_x(3, 0))
    with pytest.raises(ValueError, match="last must be a positive int"):
        recorder.FlightRecorder(r, last=0, weights={"w13": w13, "w2": w2}, calib_sample=_x(3, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_recorder_is_captured_in_a_cuda_graph_with_its_runner(tmp_path):
    from dsv4.layers import SharedExpertRunner

    dev = torch.device("cuda")
    runner, w, sample = _shared_runner(2)
    r = SharedExpertRunner(H, INTER, T_MAX, device=dev)
    r.set_weights(w["w13"].to(dev), w["w2"].to(dev))
    r.finalize()
    r.calibrate(sample.to(dev))
    static_x = _x(5, 40).to(dev)
    out = torch.empty(5, H, dtype=torch.bfloat16, device=dev)
    rec = recorder.FlightRecorder(
        r, last=4, weights=w, calib_sample=sample, nan_check=True, out=tmp_path / "fr"
    )
    with rec:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream
            r.run(static_x, out=out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            r.run(static_x, out=out)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        fed = []
        for seed in (41, 42, 43):
            x = _x(5, seed)  # drawn on the host: no device tensor outlives the copy
            if seed == 43:
                x[1, 3] = float("nan")
            static_x.copy_(x)
            graph.replay()  # the ring's slot is advanced on the device, inside the graph
            fed.append(x)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
        assert rec.fired
    kept = rec.calls()[-3:]
    assert all(
        torch.equal(c["x"].view(torch.int16), x.view(torch.int16))
        for c, x in zip(kept, fed, strict=True)
    )
    assert len(rec.dumped) == 4  # the NaN fired: the whole ring was written
