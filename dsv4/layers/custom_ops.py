"""run() of each runner as a torch.library custom op, so torch.compile treats a layer as opaque.

A runner owns weights and preallocated buffers, which a custom op's schema cannot carry, so each
runner registers itself under a string handle at construction (a weak reference: the registry
never keeps a runner alive) and the op takes the handle plus the per-call tensors:

    dsv4::shared_expert_run(str handle, Tensor x, Tensor(a!) out) -> ()
    dsv4::routed_moe_run(str handle, Tensor x, Tensor topk_ids, Tensor topk_weights,
                         Tensor(a!) out) -> ()
    dsv4::grouped_linear_run(str handle, Tensor o, Tensor(a!) out) -> ()

The ops mutate only `out` as far as the compiler knows; the runner's internal buffers are hidden
state (the same contract as a KV cache behind an attention op). Fake implementations return
nothing, so tracing never touches a runner. Runners call these via `run_op(...)`.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_RUNNERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_COUNTER = itertools.count()


def register_runner(runner: Any, kind: str) -> str:
    """A fresh handle naming `runner` for the custom ops (held weakly)."""
    handle = f"{kind}:{next(_COUNTER)}"
    _RUNNERS[handle] = runner
    return handle


def lookup_runner(handle: str) -> Any:
    runner = _RUNNERS.get(handle)
    if runner is None:
        raise ValueError(f"no live dsv4 layer runner has handle={handle!r}")
    return runner


@torch.library.custom_op("dsv4::shared_expert_run", mutates_args=("out",))
def shared_expert_run(handle: str, x: torch.Tensor, out: torch.Tensor) -> None:
    lookup_runner(handle).run(x, out=out)


@shared_expert_run.register_fake
def _(handle, x, out) -> None:
    return None


@torch.library.custom_op("dsv4::routed_moe_run", mutates_args=("out",))
def routed_moe_run(
    handle: str,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor,
) -> None:
    lookup_runner(handle).run(x, topk_ids, topk_weights, out=out)


@routed_moe_run.register_fake
def _(handle, x, topk_ids, topk_weights, out) -> None:
    return None


@torch.library.custom_op("dsv4::grouped_linear_run", mutates_args=("out",))
def grouped_linear_run(handle: str, o: torch.Tensor, out: torch.Tensor) -> None:
    lookup_runner(handle).run(o, out=out)


@grouped_linear_run.register_fake
def _(handle, o, out) -> None:
    return None
