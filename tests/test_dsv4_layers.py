"""dsv4.layers end to end through the harness, and the runners' contracts one by one.

The harness half writes case files to tmp_path and runs them with `harness.runner.run_one`
against the adapter below (LayerAdapterMixin on the harness's AdapterBase, found by import path
like any user adapter): every layer within its budget for the layout-breaking token counts at
V4-Flash proportions (v4_flash_reduced), clamp limits none / 10 / 1, a static scale calibrated
on a sample half the live amax (saturates, no NaN, recorded), and a NaN input traced to the
stage where it appears. The runner half checks what the harness cannot see: the life cycle,
ValueErrors that leave `out` untouched, stable buffers across runs (no allocation of results),
the custom ops, the dense weight form, a single-process gloo group, and CUDA-graph capture
(skipped without CUDA; written to run on a GPU runner).
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from dsv4.layers import GroupedLinear, RoutedMoERunner, SharedExpertRunner
from harness.adapters import AdapterBase
from harness.backends.dsv4 import LayerAdapterMixin
from harness.cases import load_cases
from harness.runner import run_one

ADAPTER = "dsv4-torch"  # harness.backends.dsv4.Dsv4Adapter mixes LayerAdapterMixin in
TOKENS = [1, 5, 127, 128, 129, 300]


class UserAdapter(LayerAdapterMixin, AdapterBase):
    """The mixin on a user's own adapter class, found by import path; GEMM backend by device."""

    name = "dsv4-layers-user"


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # On a shared 2-core runner OpenMP's spinning threads made these tests 4x slower (100 s
    # instead of 22 s); every comparison is between runs in this process, so numerics agree.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# through the harness


def _run_yaml(tmp_path, sweeps: list[dict], backend: str = ADAPTER) -> dict[str, list[dict]]:
    """case id -> result rows of one run_one each (the last row is the case verdict)."""
    doc = {"name": "dsv4_layers", "defaults": {"backends": [backend]}, "sweeps": sweeps}
    path = tmp_path / "dsv4_layers.yaml"
    path.write_text(yaml.safe_dump(doc))
    _, cases = load_cases(path)
    return {case.id: run_one(case, backend) for case in cases}


def _out_row(rows: list[dict]) -> dict:
    return next(r for r in rows if r.compare == "out")


def _assert_all_pass(results: dict[str, list[dict]]) -> None:
    bad = {
        cid: f"{rows[-1]['outcome']}: {rows[-1]['message']}"
        for cid, rows in results.items()
        if rows[-1].outcome != "pass"
    }
    assert not bad, bad


# Every layout-breaking token count at V4-Flash proportions (top-6 of 8 local experts, 8 groups)
LAYER_SWEEPS = [
    ("shared_expert", "v4_flash_reduced", TOKENS),
    ("routed_moe", "v4_flash_reduced", TOKENS),
    ("grouped_linear", "v4_flash_reduced", TOKENS),
]


@pytest.mark.parametrize("stage, shape, tokens", LAYER_SWEEPS)
def test_layer_end_to_end_within_budget(tmp_path, stage, shape, tokens):
    sweep = {"stage": stage, "shape": shape, "tokens": tokens, "scale_ratios": [1]}
    results = _run_yaml(tmp_path, [sweep])
    assert len(results) == len(tokens)
    _assert_all_pass(results)
    for rows in results.values():
        # integer stages (offsets, gather index) and the quantized operands match the oracle
        # exactly: they follow the same order of operations
        for r in rows:
            if r.compare in ("expert_offsets", "gather_index", "x_q", "act_q"):
                assert r.metrics["equal"], (r.case_id, r.compare, r.metrics)


@pytest.mark.parametrize("stage", ["shared_expert", "routed_moe"])
def test_layer_clamp_limits(tmp_path, stage):
    # limit 10 (the default) runs in the token sweep above; none and a limit of 1 (most of the
    # gate and up values clamped) here, where the clamp decides the output
    sweep = {"stage": stage, "tokens": [5, 129], "limits": [None, 1], "scale_ratios": [1]}
    if stage == "routed_moe":
        sweep["routing"] = ["uniform", "invalid_ids"]
    _assert_all_pass(_run_yaml(tmp_path, [sweep]))


def test_routed_moe_routings(tmp_path):
    sweep = {
        "stage": "routed_moe",
        "tokens": [33],
        "routing": ["one_expert", "empty_experts", "invalid_ids"],
        "scale_ratios": [1],
    }
    _assert_all_pass(_run_yaml(tmp_path, [sweep]))


@pytest.mark.parametrize("stage", ["shared_expert", "routed_moe", "grouped_linear"])
def test_static_scale_exceeded_saturates_and_is_recorded(tmp_path, stage):
    # calibrated on a sample whose amax is half the live one: block scales pass 448 and must
    # saturate (never NaN); the harness records the outcome with its error metrics
    results = _run_yaml(tmp_path, [{"stage": stage, "tokens": [129], "scale_ratios": [2]}])
    (rows,) = results.values()
    assert rows[-1].outcome in ("pass", "fail"), rows[-1].message
    out = _out_row(rows).metrics
    assert out["nan_out"] == 0 and out["inf_out"] == 0
    assert math.isfinite(out["calc_diff"]) and "sqnr_db" in out
    assert out["nan_first_stage"] is None


@pytest.mark.parametrize("stage", ["shared_expert", "routed_moe", "grouped_linear"])
def test_nan_input_is_traced_to_its_stage(tmp_path, stage):
    sweep = {"stage": stage, "tokens": [33], "distributions": ["nan_one"], "scale_ratios": [1]}
    (rows,) = _run_yaml(tmp_path, [sweep]).values()
    assert rows[-1].outcome in ("pass", "fail"), rows[-1].message
    # the NaN block's scale byte is 0x7F: the first stage that shows it is the quantized input
    assert _out_row(rows).metrics["nan_first_stage"] == "x_q"


def test_mixin_on_a_user_adapter_by_import_path(tmp_path):
    sweeps = [
        {"stage": s, "tokens": [5], "scale_ratios": [1]}
        for s in ("shared_expert", "routed_moe", "grouped_linear")
    ]
    results = _run_yaml(tmp_path, sweeps, backend="tests.test_dsv4_layers:UserAdapter")
    assert len(results) == 3
    _assert_all_pass(results)


# --------------------------------------------------------------------------------------------
# runners directly

H, INTER, E, K, FIRST, T_MAX = 64, 32, 4, 2, 4, 16
G, HPG, HD, R = 2, 2, 32, 48


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _w(shape, seed):
    return (torch.randn(shape, generator=_gen(seed)) / shape[-2] ** 0.5).to(torch.bfloat16)


def _x(shape, seed, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(torch.bfloat16)


def _routing(t, seed, e=E, first=FIRST):
    ids = torch.stack([torch.randperm(e, generator=_gen(seed + i))[:K] for i in range(t)]) + first
    wts = torch.softmax(torch.randn(t, K, generator=_gen(seed)), dim=-1)
    return ids, wts


def _shared(t_max=T_MAX, limit=10.0, device="cpu"):
    r = SharedExpertRunner(H, INTER, t_max, limit, device=device)
    r.set_weights(_w((H, 2 * INTER), 1).to(device), _w((INTER, H), 2).to(device))
    r.finalize()
    r.calibrate(_x((t_max, H), 3).to(device))
    return r


def _routed(t_max=T_MAX, process_group=None, device="cpu", quant_impl=None, route_impl=None):
    r = RoutedMoERunner(
        H, INTER, E, FIRST, K, t_max, 10.0, process_group, device=device, quant_impl=quant_impl,
        route_impl=route_impl,
    )  # fmt: skip
    r.set_weights(_w((E, H, 2 * INTER), 4).to(device), _w((E, INTER, H), 5).to(device))
    r.finalize()
    ids, wts = _routing(t_max, 6)
    r.calibrate(_x((t_max, H), 7).to(device), ids.to(device), wts.to(device))
    return r


def _grouped(t_max=T_MAX, device="cpu"):
    r = GroupedLinear(G, HPG, HD, R, t_max, device=device)
    r.set_weight(_w((G, HPG * HD, R), 8).to(device))
    r.finalize()
    r.calibrate(_x((t_max, G * HPG, HD), 9).to(device))
    return r


def _inputs(kind: str, t: int, seed: int, device="cpu") -> tuple:
    if kind == "shared":
        return (_x((t, H), seed).to(device),)
    if kind == "routed":
        ids, wts = _routing(t, seed)
        return _x((t, H), seed).to(device), ids.to(device), wts.to(device)
    return (_x((t, G * HPG, HD), seed).to(device),)


def _out_shape(kind: str, t: int) -> tuple[int, ...]:
    return (t, G, R) if kind == "grouped" else (t, H)


BUILD = {"shared": _shared, "routed": _routed, "grouped": _grouped}


def _poisoned(shape) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.bfloat16)


def test_life_cycle_order_is_enforced():
    r = SharedExpertRunner(H, INTER, 4)
    with pytest.raises(RuntimeError, match="set_weights"):
        r.finalize()
    r.set_weights(_w((H, 2 * INTER), 1), _w((INTER, H), 2))
    with pytest.raises(RuntimeError, match="finalize"):
        r.calibrate(_x((4, H), 3))
    r.finalize()
    with pytest.raises(RuntimeError, match="calibrate"):
        r.run(_x((4, H), 3))
    g = GroupedLinear(G, HPG, HD, R, 4)
    with pytest.raises(RuntimeError, match="set_weights|set_weight|finalize"):
        g.run(_x((4, G * HPG, HD), 3))
    m = RoutedMoERunner(H, INTER, E, FIRST, K, 4)
    with pytest.raises(RuntimeError, match="run"):
        m.run(_x((4, H), 3), *_routing(4, 0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden": 40}, "hidden"),
        ({"intermediate": 0}, "intermediate"),
        ({"max_num_tokens": True}, "max_num_tokens"),
        ({"swiglu_limit": -1.0}, "swiglu_limit"),
        ({"swiglu_limit": float("nan")}, "swiglu_limit"),
    ],
)
def test_constructor_rejects_bad_config(kwargs, match):
    args = {"hidden": H, "intermediate": INTER, "max_num_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        SharedExpertRunner(**args)


def test_set_weights_rejects_shapes():
    r = SharedExpertRunner(H, INTER, 4)
    with pytest.raises(ValueError, match="w13"):
        r.set_weights(_w((H, INTER), 1), _w((INTER, H), 2))
    with pytest.raises(ValueError, match="w2"):
        r.set_weights(_w((H, 2 * INTER), 1), _w((H, INTER), 2))
    m = RoutedMoERunner(H, INTER, E, FIRST, K, 4)
    with pytest.raises(ValueError, match="w13"):
        m.set_weights(_w((E + 1, H, 2 * INTER), 1), _w((E, INTER, H), 2))
    g = GroupedLinear(G, HPG, HD, R, 4)
    with pytest.raises(ValueError, match="dense form"):
        g.set_weight(_w((G, HPG * HD, R + 1), 1))


def _bad_calls():
    """(kind, mutate(args, out) -> (args, out), message): each must raise ValueError."""
    t = 5

    def swap(i, v):
        return lambda a, o: ((*a[:i], v, *a[i + 1 :]), o)

    x, ids, wts = _inputs("routed", t, 11)
    return [
        ("shared", swap(0, x.to(torch.int32)), "x must be"),
        ("shared", swap(0, _x((t, H + 16), 1)), "x must have shape"),
        ("shared", swap(0, _x((t, 1, H), 1)), "x must have shape"),
        ("shared", swap(0, _x((T_MAX + 1, H), 1)), "max_num_tokens"),
        ("shared", swap(0, x.float().numpy()), "torch.Tensor"),
        ("shared", lambda a, o: (a, o.float()), "out must be"),
        ("shared", lambda a, o: (a, _poisoned((t + 1, H))), "out must have shape"),
        ("shared", lambda a, o: (a, o.t().contiguous().t()), "contiguous"),
        ("routed", swap(1, ids.float()), "topk_ids must be"),
        ("routed", swap(1, ids[:, :1]), "topk_ids must have shape"),
        ("routed", swap(1, ids[:-1]), "topk_ids must have shape"),
        ("routed", swap(2, wts.to(torch.int64)), "topk_weights must be"),
        ("routed", swap(2, wts[:, :1]), "topk_weights must have shape"),
        ("routed", swap(0, _x((t, H // 2), 1)), "x must have shape"),
        ("routed", lambda a, o: (a, _poisoned((t, H + 1))), "out must have shape"),
        ("grouped", swap(0, _x((t, G * HPG + 1, HD), 1)), "o must have shape"),
        ("grouped", swap(0, _x((t, G * HPG * HD), 1)), "o must have shape"),
        ("grouped", swap(0, _x((T_MAX + 1, G * HPG, HD), 1)), "max_num_tokens"),
        ("grouped", lambda a, o: (a, _poisoned((t, G * R))), "out must have shape"),
    ]


@pytest.mark.parametrize("kind, mutate, match", _bad_calls())
def test_bad_inputs_raise_and_write_nothing(kind, mutate, match):
    runner = BUILD[kind]()
    t = 5
    args = _inputs(kind, t, 11)
    out = _poisoned(_out_shape(kind, t))
    args, out = mutate(args, out)
    before = out.clone()
    with pytest.raises(ValueError, match=match):
        runner.run(*args, out=out)
    assert torch.equal(out.view(torch.int16), before.view(torch.int16))  # NaN bits untouched


def test_out_must_not_alias_the_input():
    r = _shared()
    x = _x((5, H), 1)
    with pytest.raises(ValueError, match="overlap"):
        r.run(x, out=x)


@pytest.mark.parametrize("kind", ["shared", "routed", "grouped"])
def test_run_allocates_no_result_buffers(kind):
    """Every tensor run() returns or exposes lives in a buffer made at finalize, and the same
    token count gives the same addresses run after run (what a CUDA graph replays into)."""
    runner = BUILD[kind]()
    owned = [v for v in vars(runner).values() if isinstance(v, torch.Tensor)]
    spans = [(b.data_ptr(), b.data_ptr() + b.untyped_storage().nbytes()) for b in owned]

    def ptrs(stages) -> dict[str, list[int]]:
        flat = {}
        for name, v in stages.items():
            flat[name] = [p.data_ptr() for p in (v if isinstance(v, tuple) else (v,))]
        return flat

    seen = {}
    for seed, t in [(1, 7), (2, 3), (3, 7), (4, T_MAX), (5, 7)]:
        out = runner.run(*_inputs(kind, t, seed))
        st = runner.stages()
        assert st["out"] is out
        for name, v in st.items():
            for p in v if isinstance(v, tuple) else (v,):
                if p.numel():
                    assert any(a <= p.data_ptr() < b for a, b in spans), name
        if t in seen:
            assert ptrs(st) == seen[t]
        seen[t] = ptrs(st)


def _allocations(fn) -> list[tuple[str, int]]:
    """(innermost op, bytes) of every allocation `fn` makes, seen by the CPU profiler.

    Allocation events sit in the profiler's event tree (torch 2.13: tag Allocation with
    extra_fields.alloc_size > 0 for an allocation, < 0 for a free); the flat prof.events() list
    shows only those made outside any op as "[memory]", so the tree is walked.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    found = []

    def walk(ev, op):
        if ev.tag == _EventType.Allocation and ev.extra_fields.alloc_size > 0:
            found.append((op, ev.extra_fields.alloc_size))
        for child in ev.children:
            walk(child, ev.name if ev.tag == _EventType.TorchOp else op)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, "<python>")
    return found


def test_allocation_counter_sees_allocations():
    """Positive controls: the counter below is not blind. A runner's op called standalone
    (no workspace) allocates its temporaries; a Python number where an op takes a tensor is
    wrapped into a fresh 0-d tensor (why the ops use cached 0-d constants)."""
    from dsv4.ops import quantize_activation_nvfp4

    x, gs = _x((5, H), 1), torch.ones(1)
    codes = torch.empty(5, H // 2, dtype=torch.uint8)
    scales = torch.empty(5, H // 16, dtype=torch.float8_e4m3fn)
    assert len(_allocations(lambda: quantize_activation_nvfp4(x, gs, codes, scales))) > 5
    y = torch.zeros(4)
    assert len(_allocations(lambda: y.add_(1.0))) >= 1
    assert _allocations(lambda: y.add_(y)) == []


@pytest.mark.parametrize("kind", ["shared", "routed", "grouped"])
def test_run_allocates_nothing_after_warm_up(kind):
    """docs/design.md §2 "run() allocates nothing" on the torch backend: after a warm-up call (which
    may fill lazily cached 0-d constants), run() makes no allocation at all, not even a
    temporary: every op writes into the runner's buffers and its workspace."""
    runner = BUILD[kind](t_max=129)
    for t in (5, 129):
        args = _inputs(kind, t, 31 + t)
        runner.run(*args)  # warm-up
        assert _allocations(lambda args=args: runner.run(*args)) == [], (kind, t)
        out = torch.empty(_out_shape(kind, t), dtype=torch.bfloat16)
        assert _allocations(lambda args=args, out=out: runner.run(*args, out=out)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["shared", "routed", "grouped"])
def test_run_allocates_nothing_on_cuda(kind):
    """The CUDA caching allocator's allocation count is unchanged by a warm run()."""
    dev = torch.device("cuda")
    runner = BUILD[kind](t_max=129, device=dev)
    for t in (5, 129):
        args = _inputs(kind, t, 41 + t, dev)
        runner.run(*args)
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        runner.run(*args)
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, (kind, t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["shared", "routed", "grouped"])
def test_eager_run_never_syncs_on_cuda(kind):
    """Eager run() (not only a captured one) makes no host sync: CUDA's sync debug mode turns
    any synchronizing call (a .item(), a .tolist(), a blocking copy) into an error."""
    dev = torch.device("cuda")
    runner = BUILD[kind](t_max=129, device=dev)
    for t in (5, 129):
        args = _inputs(kind, t, 43 + t, dev)
        runner.run(*args)  # warm-up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runner.run(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _needs_cutedsl_gpu() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs CUDA"
    from dsv4.ops import cutedsl_supports

    return cutedsl_supports(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not _needs_cutedsl_gpu()[0], reason=_needs_cutedsl_gpu()[1] or "cutedsl")
@pytest.mark.parametrize("t", [1, 5, T_MAX])
def test_routed_fused_staging_is_bit_identical_to_the_torch_staging(t):
    """quant_impl "cutedsl" stages each GEMM's A in one kernel (quantize_to_expert_layout: the
    gather, the SwiGLU, the scales straight into the experts' padded layout) and combines in one
    (moe_combine); "torch" quantizes, gathers, assembles and sums in separate ops. Same GEMM
    backend: every stage and the output are the same bits, the linear scales stages() reads
    back from the layout included; also into a caller's `out` off a 16-byte boundary."""
    dev = torch.device("cuda")
    fused = _routed(device=dev, quant_impl="cutedsl")
    plain = _routed(device=dev, quant_impl="torch")
    assert fused._fused and not plain._fused
    args = _inputs("routed", t, 51 + t, dev)
    a, b = fused.run(*args).clone(), plain.run(*args).clone()
    assert torch.equal(a, b)
    buf = torch.full((t * H + 1,), float("nan"), dtype=torch.bfloat16, device=dev)
    odd = buf[1:].view(t, H)  # contiguous, 2 bytes off a 16-byte boundary
    fused.run(*args, out=odd)
    assert torch.equal(odd, b)
    sa, sb = fused.stages(), plain.stages()
    for name in ("x_q", "act_q"):
        for got, want in zip(sa[name][:2], sb[name][:2], strict=True):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    assert torch.equal(sa["l2_out"], sb["l2_out"])


def test_routed_route_impl_is_asked_for_and_checked():
    with pytest.raises(ValueError, match=r"route_impl must be one of \('torch', 'triton'\)"):
        RoutedMoERunner(H, INTER, E, FIRST, K, 4, route_impl="cuda")
    r = RoutedMoERunner(H, INTER, E, FIRST, K, 4, device="cpu", route_impl="triton")
    r.set_weights(_w((E, H, 2 * INTER), 4), _w((E, INTER, H), 5))
    with pytest.raises(ValueError, match="route_impl 'triton' needs a CUDA device"):
        r.finalize()
    assert _routed().route_impl == "torch"  # the default until the Triton routing ran on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_impl", ["torch", "cutedsl"])
@pytest.mark.parametrize("t", [1, 5, T_MAX])
def test_routed_triton_routing_is_bit_identical_to_the_torch_routing(t, quant_impl):
    """route_impl "triton" (dsv4/kernels/triton/moe_route.py: three launches) against the torch
    routing on the same runner configuration: the output and every stage the same bits, with
    slots of other ranks and -1 ids."""
    if quant_impl == "cutedsl" and not _needs_cutedsl_gpu()[0]:
        pytest.skip(_needs_cutedsl_gpu()[1])
    dev = torch.device("cuda")
    kern = _routed(device=dev, quant_impl=quant_impl, route_impl="triton")
    plain = _routed(device=dev, quant_impl=quant_impl, route_impl="torch")
    assert (kern.route_impl, plain.route_impl) == ("triton", "torch")
    x, ids, w = _inputs("routed", t, 61 + t, dev)
    ids[::3, 0] = 0  # another rank's expert
    ids[1 % t, -1] = -1
    assert torch.equal(kern.run(x, ids, w), plain.run(x, ids, w))
    sa, sb = kern.stages(), plain.stages()
    for name in ("expert_offsets", "gather_index", "l1_out", "l2_out"):
        assert torch.equal(sa[name], sb[name]), name
    for name in ("x_q", "act_q"):
        for got, want in zip(sa[name][:2], sb[name][:2], strict=True):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


@pytest.mark.parametrize("kind", ["shared", "routed", "grouped"])
def test_run_into_out_equals_run_into_own_buffer(kind):
    runner = BUILD[kind]()
    args = _inputs(kind, 9, 21)
    own = runner.run(*args).clone()
    out = _poisoned(_out_shape(kind, 9))
    assert runner.run(*args, out=out) is out
    assert torch.equal(out, own)
    assert not torch.isnan(own).any()


def test_routed_ids_not_on_this_rank_contribute_nothing():
    import reference.layers as ref_layers

    r = _routed()
    x = _x((6, H), 31)
    ids, wts = _routing(6, 32)
    base = r.run(x, ids, wts).clone()
    # other ranks' experts, -1 and ids far outside the int32 range add exactly zero
    elsewhere = torch.tensor([[-1, FIRST - 1], [FIRST + E, 2**40]] * 3)
    assert not r.run(x, elsewhere, wts).any()
    mixed = torch.where(torch.tensor([[True, False]] * 6), ids, elsewhere)
    got = r.run(x, mixed, wts)
    st = r.stages()
    assert int(st["expert_offsets"][-1]) == 6  # one local slot per token
    w13, w2 = _w((E, H, 2 * INTER), 4), _w((E, INTER, H), 5)
    gs1, gs2 = st["x_q"][2], st["act_q"][2]
    want = ref_layers.routed_moe(x, mixed, wts, w13, w2, first_expert=FIRST, gs1=gs1, gs2=gs2)
    assert torch.equal(got, want["out"])
    # int32 ids route identically; bf16 routing weights are accepted
    assert torch.equal(r.run(x, ids.to(torch.int32), wts), base)
    assert torch.isfinite(r.run(x, ids, wts.to(torch.bfloat16))).all()


def test_grouped_linear_dense_form_equals_bmm_form():
    w = _w((G, HPG * HD, R), 8)
    o = _x((7, G * HPG, HD), 41)
    outs = []
    for form in (w, w.transpose(1, 2).reshape(G * R, HPG * HD)):
        g = GroupedLinear(G, HPG, HD, R, 8)
        g.set_weight(form)
        g.finalize()
        g.calibrate(o)
        outs.append(g.run(o).clone())
    assert torch.equal(outs[0], outs[1])


def test_calibration_matches_reference_semantics():
    import reference.layers as ref_layers

    x = _x((9, H), 51)
    w13, w2 = _w((H, 2 * INTER), 1), _w((INTER, H), 2)
    r = SharedExpertRunner(H, INTER, 4, 10.0)  # a sample larger than the buffers: chunked
    r.set_weights(w13, w2)
    r.finalize()
    gs1, gs2 = r.calibrate(x)
    ref1, ref2 = ref_layers.calibrate_shared_expert(x, w13, w2, limit=10.0)
    assert torch.equal(gs1.reshape(()), ref1.reshape(())) and torch.equal(gs2[0], ref2)

    ids, wts = _routing(9, 52)
    ids[0] = -1  # a token that no local expert receives leaves gs1 alone
    m = RoutedMoERunner(H, INTER, E, FIRST, K, 9)
    w13e, w2e = _w((E, H, 2 * INTER), 4), _w((E, INTER, H), 5)
    m.set_weights(w13e, w2e)
    m.finalize()
    got = m.calibrate(x, ids, wts)
    want = ref_layers.calibrate_routed_moe(x, ids, wts, w13e, w2e, first_expert=FIRST)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_calibration_refuses_an_infinite_sample():
    r = SharedExpertRunner(H, INTER, 4)
    r.set_weights(_w((H, 2 * INTER), 1), _w((INTER, H), 2))
    r.finalize()
    x = _x((4, H), 1)
    x[1, 3] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        r.calibrate(x)


def test_scale_beyond_calibration_saturates_at_448():
    r = _shared()
    r.run(_x((T_MAX, H), 61, scale=8.0))
    codes, scales, _ = r.stages()["x_q"]
    assert (scales.view(torch.uint8) == 0x7E).any()  # 448: saturated, not NaN (0x7F)
    assert not (scales.view(torch.uint8) == 0x7F).any()
    assert torch.isfinite(r.stages()["out"]).all()


@pytest.mark.parametrize("kind", ["shared", "routed", "grouped"])
def test_custom_op_equals_run_and_compiles_opaque(kind):
    runner = BUILD[kind]()
    args = _inputs(kind, 6, 71)
    want = runner.run(*args).clone()
    out = _poisoned(_out_shape(kind, 6))
    assert torch.equal(runner.run_op(*args, out), want)

    def fn(*a):
        o = torch.empty(_out_shape(kind, 6), dtype=torch.bfloat16)
        return runner.run_op(*a, o)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), want)


def test_routed_moe_all_reduce_single_process_gloo(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        args = _inputs("routed", 8, 81)
        alone = _routed().run(*args).clone()
        reduced = _routed(process_group=dist.group.WORLD).run(*args)
        assert torch.equal(reduced, alone)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not _needs_cutedsl_gpu()[0], reason=_needs_cutedsl_gpu()[1] or "cutedsl")
def test_routed_fused_combine_all_reduce_single_process_nccl(tmp_path):
    """The fused combine's fp32 sum goes through the all-reduce before the cast (a process
    group): with one NCCL rank the output is the same bits as without a group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("torch.distributed with NCCL is not available")
    dev = torch.device("cuda")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        args = _inputs("routed", 8, 83, dev)
        alone = _routed(device=dev, quant_impl="cutedsl").run(*args).clone()
        grouped = _routed(process_group=dist.group.WORLD, device=dev, quant_impl="cutedsl")
        assert grouped._fused
        assert torch.equal(grouped.run(*args), alone)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# CUDA graphs (run on a GPU runner; skipped here)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["shared", "routed", "grouped", "routed_triton_routing"])
def test_run_is_captured_by_a_cuda_graph(kind):
    dev = torch.device("cuda")
    if kind == "routed_triton_routing":  # the routing's three Triton launches captured too
        kind, runner = "routed", _routed(device=dev, route_impl="triton")
    else:
        runner = BUILD[kind](device=dev)
    t = 11
    static_in = [a.clone() for a in _inputs(kind, t, 91, dev)]
    out = torch.empty(_out_shape(kind, t), dtype=torch.bfloat16, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch recommends
        for _ in range(2):
            runner.run(*static_in, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner.run(*static_in, out=out)

    results = [torch.empty_like(out) for _ in range(3)]
    eager = [torch.empty_like(out) for _ in range(2)]
    new_in = _inputs(kind, t, 92, dev)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(2):
        out.fill_(float("nan"))
        graph.replay()
        results[i].copy_(out)
    for a, b in zip(static_in, new_in, strict=True):  # new values into the captured inputs
        a.copy_(b)
    out.fill_(float("nan"))
    graph.replay()
    results[2].copy_(out)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # replay allocates nothing
    assert torch.equal(results[0], results[1])  # replay is deterministic
    assert not torch.isnan(results[2]).any()
    # eager (the torch backend may slice experts on the host there: same math, other order)
    runner.run(*_inputs(kind, t, 91, dev), out=eager[0])
    runner.run(*new_in, out=eager[1])
    for got, want in zip((results[0], results[2]), eager, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
