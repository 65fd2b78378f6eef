"""dsv4's backends as harness adapters: the bridge from the harness to the production path.

`Dsv4Adapter(backend)` implements the harness's stage methods (docs/cases.md "Adapters") with
dsv4.ops, the grouped GEMM pinned to one backend of the registry; `can_implement` asks that
backend's capability probe for the case's device, so `dsv4-sm100` on an H100 is "unsupported:
needs sm_100, got sm_90", never a silent fallback. The quantize-family stages (quantize,
swiglu_requant, and inside the layers) run on the adapter's `quant_impl` ("torch" or "cutedsl",
dsv4.ops.select_quant_impl), refused by can_implement where it cannot run ("needs a CUDA device
of sm_90 or newer").
The layer methods come from `LayerAdapterMixin`, which any adapter class may mix in: each builds
a dsv4.layers runner sized for the case (max_num_tokens = T), sets the weights, finalizes,
calibrates on the case's warm-up sample, runs once and returns the runner's named stages incl.
"out" (views of the runner's buffers); `routed_moe_rank` is one expert-parallel rank's routed
MoE (a runner of its local experts, harness.stages.ep); `prepare_<layer>` (same arguments)
does all but the run and returns the steady-state call, which the harness times
(docs/timing.md). The GEMM backend is the adapter's `backend` attribute when it has one, else
chosen by device; the quantize implementation likewise its `quant_impl` attribute.
Names (harness.backends.BUILTIN): `dsv4-torch` (the portable backend, torch quantize),
`dsv4-cutedsl` (the CuTeDSL quantize / SwiGLU-requantize kernels, and in the routed MoE the fused
staging and combine; the GEMM on the device's best backend; an adapter whose `route_impl` is
"triton" routes by dsv4/kernels/triton/moe_route.py), `dsv4-sm90` (the Triton grouped GEMM
for sm_90, verified on an H200) and `dsv4-sm100` (the CuTeDSL tcgen05 grouped GEMM for sm_100a:
compiled in CI, numerics and speed unverified on hardware; unsupported elsewhere with the reason,
and for shapes it cannot tile).
Conventions are ours (decode-convention global scales, DeepSeek V4 SwiGLU, gate first). Uses
only dsv4's public modules (dsv4.ops, dsv4.layers); dsv4 imports nothing of the harness.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from dsv4.layers import GroupedLinear, RoutedMoERunner, SharedExpertRunner
from dsv4.ops import (
    BackendUnavailableError,
    QuantImplUnavailableError,
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    global_scale_from_amax,
    max_padded_rows,
    nvfp4_amax,
    prepare_weight_codes,
    quantize_activation_nvfp4,
    run_nvfp4_grouped_gemm,
    select_backend,
    select_quant_impl,
    swiglu_quantize,
)
from harness.adapters import AdapterBase, Conventions, GemmOperands, default_can_implement


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
            route_impl=getattr(self, "route_impl", None),
        )
        runner.set_weights(w13, w2)
        runner.finalize()
        sample = x if calib_sample is None else calib_sample
        runner.calibrate(sample, topk_ids, topk_weights)  # the warm-up batch has x's routing
        return functools.partial(runner.run, x, topk_ids, topk_weights)

    def prepare_routed_moe_rank(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        *,
        rank: int,
        world: int,
        first_expert: int,
        n_local: int,
        **kw: Any,
    ) -> functools.partial:
        """Rank `rank` of `world`: a RoutedMoERunner for global experts first_expert ..
        first_expert + n_local - 1, built from those experts of the global weights; it receives
        the global top-k ids and subtracts first_expert itself (the combine is the caller's)."""
        local = slice(first_expert, first_expert + n_local)
        args = (x, topk_ids, topk_weights, w13[local], w2[local])
        return self.prepare_routed_moe(*args, first_expert=first_expert, **kw)

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

    def routed_moe_rank(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return _stages(self.prepare_routed_moe_rank(*args, **kwargs))


def _stages(run: functools.partial) -> dict[str, Any]:
    """Run a prepared call once; the named stages of the runner whose run() it binds."""
    run()
    return run.func.__self__.stages()


class Dsv4Adapter(LayerAdapterMixin, AdapterBase):
    """dsv4.ops stages with the grouped GEMM on one named backend."""

    conventions = Conventions()
    devices = ("cpu", "cuda")

    def __init__(self, backend: str | None, quant_impl: str = "torch", name: str = "") -> None:
        self.backend = backend  # None: the device's best grouped-GEMM backend
        self.quant_impl = quant_impl
        self.name = name or f"dsv4-{backend}"

    def can_implement(self, case: Any) -> tuple[bool, str]:
        ok, why = default_can_implement(self, case)
        if not ok:
            return ok, why
        dev = torch.device(case.device)
        try:  # ValueError: not registered or a shape it cannot tile; *Error: capability missing
            select_backend(dev, self.backend, case.gemm_shapes())
            select_quant_impl(dev, self.quant_impl)
        except (ValueError, BackendUnavailableError, QuantImplUnavailableError) as e:
            return False, str(e)
        return True, ""

    def gemm_backend(self, device: torch.device) -> str:
        """The grouped-GEMM backend this adapter runs on `device` (recorded in every row)."""
        return select_backend(device, self.backend)

    # ---- stages (outputs are caller-owned; every method writes them in place)

    def quantize(self, x, global_scale, codes_out, scales_out):
        gs = global_scale_from_amax(nvfp4_amax(x)) if global_scale is None else global_scale
        quantize_activation_nvfp4(x, gs.float(), codes_out, scales_out, impl=self.quant_impl)
        return gs

    def assemble_scales(self, a_scales, expert_offsets, b_scales, out_2d, out_3d):
        # The library fills a buffer sized for any routing (graph-safe, no sync); the harness
        # gives the exact size, which is a prefix of it: the tail past the last group is zero.
        t, c = a_scales.shape
        cp = (c + 3) // 4 * 4
        rows = max(max_padded_rows(t, expert_offsets.numel()), out_2d.numel() // cp)
        full = torch.empty(rows * cp, dtype=out_2d.dtype, device=out_2d.device)
        assemble_scales_2d_side_from_offsets(a_scales, expert_offsets, out=full)
        out_2d.copy_(full[: out_2d.numel()])
        assemble_scales_3d_side(b_scales, out=out_3d)

    def grouped_gemm(self, ops: GemmOperands, out):
        run_nvfp4_grouped_gemm(
            ops.a_codes,
            prepare_weight_codes(ops.b_codes, self.backend),  # the backend's layout
            ops.a_scales_swizzled,
            ops.b_scales_swizzled,
            ops.expert_offsets,
            ops.global_scale_a,
            ops.global_scale_b,
            out=out,
            backend=self.backend,
        )

    def swiglu_requant(self, l1_out, limit, global_scale, codes_out, scales_out):
        swiglu_quantize(
            l1_out, global_scale.float(), limit, codes_out, scales_out, impl=self.quant_impl
        )


dsv4_torch = functools.partial(Dsv4Adapter, "torch")
dsv4_cutedsl = functools.partial(Dsv4Adapter, None, "cutedsl", "dsv4-cutedsl")
dsv4_sm90 = functools.partial(Dsv4Adapter, "sm90")
dsv4_sm100 = functools.partial(Dsv4Adapter, "sm100")  # compiled in CI, unverified on hardware

__all__ = [
    "Dsv4Adapter",
    "LayerAdapterMixin",
    "dsv4_cutedsl",
    "dsv4_sm90",
    "dsv4_sm100",
    "dsv4_torch",
]
