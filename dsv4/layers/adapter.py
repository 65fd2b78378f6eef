"""The layer methods of the harness adapter protocol, built on dsv4.layers' runners.

`LayerAdapterMixin` gives an adapter `shared_expert`, `routed_moe` and `grouped_linear`
(docs/cases.md "Adapters"): each builds a runner sized for the case (max_num_tokens = T), sets
the weights, finalizes, calibrates on the case's warm-up sample, runs once and returns the
runner's named stages incl. "out" (views of the runner's buffers). `prepare_<layer>` (same
arguments) does all but the run and returns the steady-state call, `run` on those inputs, which
the harness times (docs/timing.md). The grouped-GEMM backend is
the adapter's `backend` attribute when it has one (dsv4.adapters.Dsv4Adapter does), else chosen
by device; the quantize implementation likewise its `quant_impl` attribute (the runner's
`quant_impl` says which one ran). The mixin holds no state; the harness is not imported here
(its protocol is duck typed).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dsv4.layers.grouped_linear import GroupedLinear
from dsv4.layers.routed_moe import RoutedMoERunner
from dsv4.layers.shared_expert import SharedExpertRunner


class LayerAdapterMixin:
    """shared_expert / routed_moe / grouped_linear for an adapter class (mix in first)."""

    def _layer_backend(self) -> str | None:
        return getattr(self, "backend", None)

    def prepare_shared_expert(
        self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *, limit, calib_sample
    ) -> functools.partial:
        runner = SharedExpertRunner(
            w13.shape[0],
            w13.shape[1] // 2,
            max(1, x.shape[0]),
            limit,
            device=x.device,
            backend=self._layer_backend(),
            quant_impl=getattr(self, "quant_impl", None),
        )
        runner.set_weights(w13, w2)
        runner.finalize()
        runner.calibrate(x if calib_sample is None else calib_sample)
        return functools.partial(runner.run, x)

    def prepare_routed_moe(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        *,
        first_expert: int,
        limit,
        calib_sample,
    ) -> functools.partial:
        runner = RoutedMoERunner(
            w13.shape[1],
            w13.shape[2] // 2,
            w13.shape[0],
            first_expert,
            topk_ids.shape[1],
            max(1, x.shape[0]),
            limit,
            device=x.device,
            backend=self._layer_backend(),
            quant_impl=getattr(self, "quant_impl", None),
        )
        runner.set_weights(w13, w2)
        runner.finalize()
        sample = x if calib_sample is None else calib_sample
        runner.calibrate(sample, topk_ids, topk_weights)  # the warm-up batch has x's routing
        return functools.partial(runner.run, x, topk_ids, topk_weights)

    def prepare_grouped_linear(
        self, o: torch.Tensor, w: torch.Tensor, *, n_groups: int, o_lora_rank: int, calib_sample
    ) -> functools.partial:
        n_heads, head_dim = o.shape[1], o.shape[2]
        if n_heads % n_groups:
            raise ValueError(f"n_groups must divide n_heads, got {n_groups=} {n_heads=}")
        runner = GroupedLinear(
            n_groups,
            n_heads // n_groups,
            head_dim,
            o_lora_rank,
            max(1, o.shape[0]),
            device=o.device,
            backend=self._layer_backend(),
            quant_impl=getattr(self, "quant_impl", None),
        )
        runner.set_weight(w)
        runner.finalize()
        runner.calibrate(o if calib_sample is None else calib_sample)
        return functools.partial(runner.run, o)

    # The layer methods: prepare, run once, return the runner's named stages.

    def shared_expert(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return _stages(self.prepare_shared_expert(*args, **kwargs))

    def routed_moe(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return _stages(self.prepare_routed_moe(*args, **kwargs))

    def grouped_linear(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return _stages(self.prepare_grouped_linear(*args, **kwargs))


def _stages(run: functools.partial) -> dict[str, Any]:
    """Run a prepared call once; the named stages of the runner whose run() it binds."""
    run()
    return run.func.__self__.stages()


# The name dsv4.adapters' placeholder asks for.
LayerMethods = LayerAdapterMixin

__all__ = ["LayerAdapterMixin", "LayerMethods"]
