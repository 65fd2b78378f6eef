"""harness.refcache: the reference side of a case is computed once for all backends of a sweep.

The second backend of a case finds the reference stages, noise floor and SQNR (layers) or the
oracle and bound (grouped GEMM) in the cache: the reference functions are not called again
(counted), and its comparisons are exactly those of an uncached run. Other conventions, or
other inputs, are other keys; the LRU keeps within its byte bound.
"""

from __future__ import annotations

import json

import pytest
import torch

import reference.layers as ref_layers
from harness import adapters, refcache
from harness.backends.reference import ReferenceAdapter
from harness.cases import PRESETS, Case, Stage
from harness.stages import run as stage_run
from harness.stages import run_case
from harness.stages.inputs import layer_inputs
from tests import planted


def _count(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    real = getattr(module, name)

    def counting(*args, **kw):
        calls[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counting)
    return calls


def _as_json(comps) -> str:
    return json.dumps(
        [(c.name, c.outcome.value, c.message, c.metrics) for c in comps],
        sort_keys=True,
        default=str,
    )


def _dsv4():
    pytest.importorskip("dsv4.ops")
    return adapters.load("dsv4-torch")


CASE = Case(Stage.ROUTED_MOE, PRESETS["tiny"], 33, scale_ratio=1.0)


def test_second_backend_does_not_recompute_the_layer_reference(monkeypatch):
    calls = _count(monkeypatch, ref_layers, "routed_moe")
    kernel = _dsv4()  # calls no reference function itself
    first = run_case(CASE, kernel)
    n_first = calls[0]
    assert n_first >= 3  # the reference run (and its calibration), the float64 rerun, the twin
    second = run_case(CASE, _dsv4())
    assert calls[0] == n_first  # nothing recomputed for the second backend
    assert refcache.CACHE.hits == 1 and refcache.CACHE.misses == 1
    refcache.CACHE.clear()
    uncached = run_case(CASE, _dsv4())
    assert calls[0] == 2 * n_first
    assert _as_json(first) == _as_json(second) == _as_json(uncached)


def test_other_conventions_or_inputs_are_other_keys(monkeypatch):
    calls = _count(monkeypatch, stage_run, "reference_layer")
    run_case(CASE, ReferenceAdapter())
    run_case(CASE, planted.honest(planted.SwigluVariant.CLAMP_AFTER_PRODUCT))  # other SwiGLU
    run_case(Case(Stage.ROUTED_MOE, PRESETS["tiny"], 33, scale_ratio=1.0, seed=1), _dsv4())
    assert calls[0] == 3
    run_case(Case(Stage.ROUTED_MOE, PRESETS["tiny"], 33, scale_ratio=1.0, seed=1), _dsv4())
    assert calls[0] == 3
    # a replayed bundle's inputs are not the seed's: never served from (or put in) the cache
    d = layer_inputs(CASE, torch.device("cpu"))
    run_case(CASE, _dsv4(), {k: v.clone() for k, v in d.tensors().items()})
    assert calls[0] == 4


def test_grouped_gemm_oracle_and_bound_are_computed_once(monkeypatch):
    case = Case(Stage.GROUPED_GEMM, PRESETS["tiny"], 33)
    oracle = _count(monkeypatch, stage_run, "grouped_gemm_nvfp4")
    bound = _count(monkeypatch, stage_run, "grouped_gemm_error_bound")
    first = run_case(case, _dsv4())
    second = run_case(case, _dsv4())
    assert (oracle[0], bound[0]) == (1, 1)
    assert _as_json(first) == _as_json(second)


def test_lru_is_bounded_in_bytes():
    cache = refcache.RefCache(max_bytes=3 * 64)
    t = [torch.zeros(16) for _ in range(5)]  # 64 bytes each
    for i in range(4):
        assert cache.get(i, lambda i=i: t[i]) is t[i]
    assert len(cache) == 3 and cache.bytes == 3 * 64  # key 0 went first
    assert cache.get(1, lambda: None) is t[1]  # hit: 1 becomes the most recent
    cache.get(4, lambda: t[4])
    assert cache.get(2, lambda: "recomputed") == "recomputed"  # 2 was the least recent
    big = torch.zeros(64)  # 256 bytes: returned, never kept
    assert cache.get("big", lambda: big) is big and "big" not in cache._entries
    view_pair = (t[0], t[0][:8])  # one storage counted once
    assert refcache.nbytes({"a": view_pair, "b": [t[0]]}) == 64
    assert cache.get(({"unhashable": 1},), lambda: 5) == 5  # no caching, no error
    with pytest.raises(ValueError, match="max_bytes"):
        refcache.RefCache(-1)
