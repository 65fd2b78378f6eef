"""The routed MoE's Triton routing (dsv4/kernels/triton/moe_route.py).

CPU: the three kernels under the Triton interpreter (a child process) against the routing's
definition, a stable sort of the slots by local expert (torch.sort(stable=True)), bit for bit:
tokens, fp32 weights, the combine's inverse index, END offsets and padded scale starts, over
ragged, empty and dropped experts, several chunks and more chunks than one scan step reads;
compiled for sm_90 and sm_100 (triton.compile, no GPU: the B200 runners take it too); bad
buffers named. GPU: the layer test (tests/test_dsv4_layers.py) runs the routed MoE with it
against the torch routing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.triton_interp import needs_interpreter, run_interpreted

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (pip install '.[sm90]')"
)


def expected(ids: torch.Tensor, w: torch.Tensor, first: int, e: int) -> dict[str, torch.Tensor]:
    """The routing by its definition: a stable sort of the slots by key (E: not local)."""
    rows = ids.numel()
    key = ids.reshape(-1).long() - first
    key = torch.where((key < 0) | (key >= e), e, key)
    perm = torch.sort(key, stable=True).indices  # staged row -> slot
    counts = torch.bincount(key, minlength=e + 1)
    inv = torch.empty(rows, dtype=torch.int64)
    inv[perm] = torch.arange(rows)
    inv[key == e] = rows
    padded = (counts[:e] + 127) // 128 * 128
    return {
        "token": perm // ids.shape[1],
        "weight": w.reshape(-1)[perm].float(),
        "inv": inv,
        "offsets": torch.cumsum(counts[:e], 0).int(),
        "starts": (torch.cumsum(padded, 0) - padded).int(),
    }


def _cases():
    g = torch.Generator().manual_seed(0)
    out = []
    for t, k, e, first, lo, hi in (
        (1, 6, 48, 0, 0, 48),  # one token
        (128, 6, 48, 48, -1, 384),  # the second rank of 8: most slots dropped, -1 ids
        (300, 6, 32, 0, 0, 32),  # 1800 slots: 8 chunks, every expert local
        (3000, 6, 48, 0, 0, 60),  # 18000 slots: 71 chunks, more than one scan step
        (5, 2, 4, 0, 7, 9),  # every slot dropped
        (40, 1, 3, 1, 1, 2),  # one expert takes every slot, the others empty
    ):
        ids = torch.randint(lo, hi, (t, k), generator=g)
        w = torch.rand(t, k, generator=g).to(torch.bfloat16)
        out.append((f"t{t}_k{k}_e{e}_first{first}", ids, w, first, e))
    ids, w = out[2][1], out[2][2]
    out.append(("int32_strided", ids.int().t().contiguous().t(), w.float(), 0, 32))
    return out


def _interpret_main() -> None:
    """Run in the child (TRITON_INTERPRET=1): every check raises naming its case."""
    from dsv4.kernels.triton import moe_route as mr

    for name, ids, w, first, e in _cases():
        want = expected(ids, w, first, e)
        for token_dtype in (torch.int64, torch.int32):
            got = mr.route(ids, w, first, e, token_dtype)
            for field, v in want.items():
                g = got[field]
                assert torch.equal(g.long() if field == "token" else g, v), (
                    f"{name} {token_dtype} {field}: first difference at "
                    f"{(g.long() != v.long()).nonzero()[:1].tolist()}"
                )
            assert got["token"].dtype == token_dtype, name
    _runner_main()
    print("route cases passed")


def _runner_main() -> None:
    """The routed MoE runner (CPU, torch GEMMs) with its routing switched to the kernels: the
    same output, stages and combine index as with the torch routing, slots of other ranks and
    -1 ids included."""
    from dsv4 import ops
    from tests import test_dsv4_layers as tl

    r = tl._routed()
    for t in (1, 7, tl.T_MAX):
        x, ids, w = tl._inputs("routed", t, 40 + t)
        ids[::3, 0] = 0  # another rank's expert
        ids[1 % t, -1] = -1
        r.route_impl = "torch"
        want = r.run(x, ids, w).clone()
        want_st = {k: v for k, v in r.stages().items() if isinstance(v, torch.Tensor)}
        want_st["inv"], want_st["weight_row"] = r._inv[: ids.numel()].clone(), r._weight_row
        want_st = {k: v.clone() for k, v in want_st.items()}
        r._init_route_kernels()
        got = r.run(x, ids, w)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"t={t}: outputs"
        got_st = {k: v for k, v in r.stages().items() if isinstance(v, torch.Tensor)}
        got_st["inv"], got_st["weight_row"] = r._inv[: ids.numel()], r._weight_row
        assert torch.equal(r._sf_starts, ops.padded_group_starts(r._offsets)), f"t={t}: starts"
        for k, v in want_st.items():
            rows = ids.numel() if k == "weight_row" else None
            assert torch.equal(got_st[k][:rows], v[:rows]), f"t={t}: {k}"


@needs_interpreter
def test_route_under_the_interpreter_is_the_stable_sort_by_expert():
    run_interpreted("tests.test_moe_route", "_interpret_main", "route cases passed")


@pytest.mark.parametrize("arch", [90, 100])
def test_route_kernels_compile_for_sm90_and_sm100(arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv4.kernels.triton import moe_route as mr

    e = 48
    consts = dict(K=6, E=e, E_PAD=mr.e_pad(e), BLOCK=mr.BLOCK)
    ids = dict(ids_ptr="*i64", stride_t="i32", stride_s="i32")
    kernels = {
        "hist": (mr._hist_kernel, dict(**ids, hist_ptr="*i32", rows="i32", first="i32"), consts),
        "scan": (
            mr._scan_kernel,
            dict(
                hist_ptr="*i32",
                base_ptr="*i32",
                offsets_ptr="*i32",
                starts_ptr="*i32",
                n_chunks="i32",
            ),
            dict(E=e, E_PAD=mr.e_pad(e), CB=mr.SCAN_CHUNKS, ATOM=mr.ATOM_ROWS),
        ),  # fmt: skip
        "place": (
            mr._place_kernel,
            dict(
                **ids,
                w_ptr="*bf16",
                stride_wt="i32",
                stride_ws="i32",
                base_ptr="*i32",
                token_ptr="*i32",
                weight_ptr="*fp32",
                inv_ptr="*i64",
                rows="i32",
                first="i32",
                zero_row="i32",
            ),
            consts,
        ),  # fmt: skip
    }
    for name, (fn, types, cs) in kernels.items():
        sig = {**types, **{c: "constexpr" for c in cs}}
        sig = {a: sig[a] for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, cs), target=GPUTarget("cuda", arch, 32))
        ptx = k.asm["ptx"]
        assert ".local" not in ptx, f"{name}: local memory"
        if name == "place":  # the scatter of the staged rows: tokens, weights, inverse index
            assert ptx.count("st.global") >= 3, name


def test_launch_route_names_bad_buffers():
    from dsv4.kernels.triton import moe_route as mr

    ids = torch.zeros(4, 2, dtype=torch.int64)
    w = torch.ones(4, 2)
    bufs = dict(
        token=torch.empty(8, dtype=torch.int64),
        weight=torch.empty(8),
        inv=torch.empty(8, dtype=torch.int64),
        offsets=torch.empty(3, dtype=torch.int32),
        starts=torch.empty(3, dtype=torch.int32),
        hist=torch.empty(4, dtype=torch.int32),
        base=torch.empty(4, dtype=torch.int32),
    )
    for field, bad, match in (
        ("token", torch.empty(7, dtype=torch.int64), r"token must be contiguous 1-D .* >= 8"),
        ("weight", torch.empty(8, dtype=torch.float16), "weight must be"),
        ("inv", torch.empty(8, dtype=torch.int32), "inv must be"),
        ("offsets", torch.empty(2, dtype=torch.int32), r"offsets must be .* >= 3"),
        ("hist", torch.empty(3, dtype=torch.int32), r"hist must be .*chunks\(R=8\)"),
    ):
        with pytest.raises(ValueError, match=match):
            mr.launch_route(ids, w, 0, 3, 8, **{**bufs, field: bad})
    with pytest.raises(ValueError, match="topk_ids must be int32 / int64"):
        mr.launch_route(ids.float(), w, 0, 3, 8, **bufs)
    with pytest.raises(ValueError, match=r"topk_weights must be float \[4, 2\]"):
        mr.launch_route(ids, w[:3], 0, 3, 8, **bufs)
