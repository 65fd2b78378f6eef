"""Routed experts of one expert-parallel rank: top-k routing, grouped NVFP4 GEMMs, combine.

Life cycle as the shared expert: set_weights(w13 [E, H, 2I], w2 [E, I, H]) -> finalize() ->
calibrate(sample, topk_ids, topk_weights) -> run(x, topk_ids, topk_weights, out=None).

run(), all on the device, nothing read on the host (T and k are shapes, host metadata):
1. Route. key = global id - first_expert, with every id outside [0, E) (other ranks' experts,
   -1) mapped to E; a stable counting sort of the T*k keys (one-hot, cumsum: no sort
   kernel, whose scratch would be allocated per call) gives the staged order: rows grouped by local
   expert, by token then slot inside an expert (flat index token*k + slot is already ascending),
   the dropped slots last. Expert END offsets = searchsorted(sorted keys, 0..E-1, right) (int32,
   no count reaches the host); the GEMMs read offsets on the device and ignore rows past
   offsets[-1], so every buffer is sized for max_num_tokens*top_k rows and the dropped rows are
   computed on but never used. With route_impl="triton" (CUDA, Triton; asked for: it has not
   run on a GPU yet) the same sort in three launches (dsv4/kernels/triton/moe_route.py:
   per-chunk counts, one scan, placement), which also write the combine's inverse index and the
   experts' scale starts; the same bits.
2. x is quantized once per token with gs1 (quantization is row-local and gs1 one value, so this
   equals quantizing the staged rows), then codes and scale bytes are gathered into staged order
   and the scales assembled per expert from the device offsets. With quant_impl "cutedsl" one
   kernel does all of it (`quantize_to_expert_layout`: each staged row gathered from its token,
   its scale bytes written straight at the expert's padded rows, `padded_group_starts` computed
   once per run for both GEMMs), and the SwiGLU-requant of step 3 writes the L2 GEMM's scale
   layout the same way, and step 4 is one kernel too: same bits, ~75 fewer launches.
3. L1 grouped GEMM; SwiGLU (DeepSeek V4 clamp) in fp32 times each row's routing weight, BEFORE
   the L2 quantization with gs2; L2 grouped GEMM. The weights are the gate's final ones, with
   routed_scaling_factor already applied (DeepSeek V4's gate multiplies the normalized top-k
   weights by it): the runner multiplies them as given and applies no factor.
4. Combine in fp32, in slot order: out[t] = ((0 + row(t,0)) + row(t,1)) + ... as the reference
   sums, each slot a gather through the inverse permutation (a slot with no local row reads a
   zero row), so the order is fixed and no atomics are involved; then cast to bf16. With a
   process group, the fp32 sum is all-reduced across ranks (each rank adds its experts' share;
   torch.distributed sums in its own order) before the cast.
Activation global scales: one value per activation tensor (calibrated as
reference.layers.calibrate_routed_moe: gs1 from the amax of the staged rows, gs2 from the amax
of the weighted SwiGLU output), stored expanded to [E] for the GEMM's per-expert alpha.

Allocation and sync: as every runner (dsv4/layers/__init__.py), none in run().
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

from dsv4.layers import _common as c
from dsv4.layers import custom_ops
from dsv4.ops import (
    DEFAULT_SWIGLU_LIMIT,
    assemble_2d_workspace_bytes,
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    grouped_gemm_workspace_bytes,
    max_padded_rows,
    padded_group_starts,
    padded_group_starts_workspace_bytes,
    prepare_weight_codes,
    quantize_activation_nvfp4,
    quantize_to_expert_layout,
    quantize_weight_to_nvfp4,
    quantize_workspace_bytes,
    run_nvfp4_grouped_gemm,
    select_backend,
    swiglu,
    swiglu_quantize,
    swiglu_quantize_workspace_bytes,
    unswizzle,
)
from dsv4.ops._workspace import cumsum_small, scalar
from dsv4.ops.quantize import BLOCK

# the routing's implementations: the torch ops, or dsv4/kernels/triton/moe_route.py
ROUTE_IMPLS = ("torch", "triton")


def _scale_cols(k: int) -> int:
    """round_up(K/16, 4): bytes per row of a swizzled scale matrix."""
    return (k // BLOCK + 3) // 4 * 4


class RoutedMoERunner(c.Runner):
    """NVFP4 routed experts first_expert .. first_expert + n_local_experts - 1 of one rank."""

    kind = "RoutedMoERunner"

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        n_local_experts: int,
        first_expert: int,
        top_k: int,
        max_num_tokens: int,
        swiglu_limit: float | None = DEFAULT_SWIGLU_LIMIT,
        process_group: dist.ProcessGroup | None = None,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
        quant_impl: str | None = None,
        route_impl: str | None = None,
    ) -> None:
        if route_impl not in (None, *ROUTE_IMPLS):
            raise ValueError(f"route_impl must be one of {ROUTE_IMPLS} or None, got {route_impl=}")
        self.route_impl_request = route_impl
        self.hidden = c.positive_int("hidden", hidden, BLOCK)
        self.intermediate = c.positive_int("intermediate", intermediate, BLOCK)
        self.n_local_experts = c.positive_int("n_local_experts", n_local_experts)
        self.first_expert = c.non_negative_int("first_expert", first_expert)
        self.top_k = c.positive_int("top_k", top_k)
        self.max_num_tokens = c.positive_int("max_num_tokens", max_num_tokens)
        self.swiglu_limit = c.limit_value("swiglu_limit", swiglu_limit)
        self.process_group = process_group
        self._init_runner("routed_moe", device, backend, quant_impl)

    @property
    def max_rows(self) -> int:
        """Staged rows the buffers hold: max_num_tokens * top_k."""
        return self.max_num_tokens * self.top_k

    # ---- life cycle

    def set_weights(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """w13 [E, H, 2I] (gate | up per expert), w2 [E, I, H], E = n_local_experts."""
        e, h, i = self.n_local_experts, self.hidden, self.intermediate
        c.tensor("w13", w13, c.FLOAT_INPUTS, (e, h, 2 * i))
        c.tensor("w2", w2, c.FLOAT_INPUTS, (e, i, h), w13.device)
        dev = c.resolve_device(self._device, w13)
        self._w13, self._w2 = w13.to(dev), w2.to(dev)
        self._device = self._w13.device  # "cuda" resolved to "cuda:0": what run() compares
        self.state = c.State.WEIGHTS_SET

    def finalize(self) -> None:
        """Quantize (one global scale per expert) and lay out the weights; allocate buffers."""
        c.require(self.kind, self.state, c.State.WEIGHTS_SET, "finalize()")
        dev, e, h, i = self._device, self.n_local_experts, self.hidden, self.intermediate
        t, rows = self.max_num_tokens, self.max_rows
        self._resolve_quant_impl(dev)  # fails here when an impl was named that cannot run
        self._backend_name = select_backend(
            dev, self.backend, [(rows, h, 2 * i, e), (rows, i, h, e)]
        )
        self._w13_q = self._weights(self._w13, self._backend_name)
        self._w2_q = self._weights(self._w2, self._backend_name)
        del self._w13, self._w2

        def zeros(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=dev)

        self._gs1 = torch.ones(e, dtype=torch.float32, device=dev)
        self._gs2 = torch.ones(e, dtype=torch.float32, device=dev)
        # routing
        self._experts = torch.arange(e, dtype=torch.int64, device=dev)
        self._row_ids = torch.arange(rows, dtype=torch.int64, device=dev)
        self._key = zeros(rows, torch.int64)
        self._sorted_key = zeros(rows, torch.int64)
        self._perm = zeros(rows, torch.int64)  # staged row -> flat slot token*k + slot
        # quant_impl "cutedsl": one kernel gathers, quantizes and lays out each GEMM's A, and
        # one sums each token's slots (dsv4/kernels/cutedsl/moe_combine.py)
        self._fused = self.quant_impl == "cutedsl"
        # staged row -> token (the gather index): int32 for the staging kernel, int64 for
        # index_select (the routing's division writes it straight in either way)
        self._token = zeros(rows, torch.int32 if self._fused else torch.int64)
        self._sf_starts = zeros(e, torch.int32)  # each expert's first scale row (both GEMMs)
        self._dropped = zeros(rows, torch.bool)
        self._src_row = zeros(rows, torch.int64)
        self._inv = zeros(rows, torch.int64)  # flat slot -> staged row, or the zero row
        self._offsets = zeros(e, torch.int32)
        self._weight_flat = zeros(rows, torch.float32)
        self._weight_row = zeros(rows, torch.float32)
        # L1
        self._xt_codes = zeros((t, h // 2), torch.uint8)  # per token
        self._xt_scales = zeros((t, h // BLOCK), torch.float8_e4m3fn)
        self._x_codes = zeros((rows, h // 2), torch.uint8)  # staged
        self._x_scales = zeros((rows, h // BLOCK), torch.float8_e4m3fn)
        self._x_sf = zeros(max_padded_rows(rows, e) * _scale_cols(h), torch.float8_e4m3fn)
        self._l1 = zeros((rows, 2 * i), torch.bfloat16)
        # L2
        self._act_codes = zeros((rows, i // 2), torch.uint8)
        self._act_scales = zeros((rows, i // BLOCK), torch.float8_e4m3fn)
        self._act_sf = zeros(max_padded_rows(rows, e) * _scale_cols(i), torch.float8_e4m3fn)
        self._l2 = zeros((rows + 1, h), torch.bfloat16)  # row `rows` stays 0: dropped slots
        # combine
        self._slot_rows = zeros((t, h), torch.bfloat16)
        self._acc = zeros((t, h), torch.float32)
        self._slot_idx = zeros(t, torch.int64)
        self._slot_rows32 = zeros((t, h), torch.float32)
        self._out = zeros((t, h), torch.bfloat16)
        # routing's stable counting sort: one-hot [E + 1, rows] (flat: a contiguous view per call)
        self._onehot = zeros((e + 1) * rows, torch.int64)
        self._onehot_b = zeros((e + 1) * rows, torch.bool)
        self._pos = zeros(rows, torch.int64)
        self._bin_start = zeros(e + 1, torch.int64)
        self._pair = zeros((2, e + 1, 2), torch.int64)
        self._bins = torch.arange(e + 1, dtype=torch.int64, device=dev)
        self._first = scalar(self.first_expert, torch.int64)  # 0-d CPU constants
        self._n_keys = scalar(e + 1, torch.int64)
        self._e_key = scalar(e, torch.int64)
        self._top_k = scalar(self.top_k, torch.int64)
        self._one = scalar(1, torch.int64)
        gemm_ws = max(
            grouped_gemm_workspace_bytes(self._backend_name, rows, h, 2 * i, e),
            grouped_gemm_workspace_bytes(self._backend_name, rows, i, h, e),
        )
        need = max(
            quantize_workspace_bytes((t, h)),
            swiglu_quantize_workspace_bytes((rows, 2 * i)),
            assemble_2d_workspace_bytes(rows, h // BLOCK, e, self._x_sf.numel()),
            assemble_2d_workspace_bytes(rows, i // BLOCK, e, self._act_sf.numel()),
            padded_group_starts_workspace_bytes(e),
            gemm_ws,
        )
        self._ws = zeros(need, torch.uint8)  # every op's temporaries, one op at a time
        self._gemm_ws = self._ws if gemm_ws else None
        # the routing: the torch form (~20 launches), or asked for, three Triton launches (the
        # same bits; None takes the torch form until the Triton one has run on a GPU)
        self.route_impl = "torch"
        if self.route_impl_request == "triton":
            has_triton = importlib.util.find_spec("triton") is not None
            if dev.type != "cuda" or not has_triton:
                raise ValueError(
                    f"route_impl 'triton' needs a CUDA device and triton (pip install "
                    f"'.[sm90]'), got device {dev} and triton "
                    f"{'installed' if has_triton else 'not installed'}"
                )
            self._init_route_kernels()
        self.state = c.State.FINALIZED

    def _init_route_kernels(self) -> None:
        """Take the Triton routing (dsv4/kernels/triton/moe_route.py): its scratch, once."""
        from dsv4.kernels.triton import moe_route

        n = moe_route.chunks(self.max_rows) * moe_route.e_pad(self.n_local_experts)
        self._route_hist = torch.zeros(n, dtype=torch.int32, device=self._device)
        self._route_base = torch.zeros(n, dtype=torch.int32, device=self._device)
        self.route_impl = "triton"

    @staticmethod
    def _weights(w: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[E, K, N] -> (codes in `backend`'s layout, swizzled scales [E, ...], gs fp32 [E])."""
        qs = [quantize_weight_to_nvfp4(w[e]) for e in range(w.shape[0])]
        codes = prepare_weight_codes(torch.stack([q[0] for q in qs]), backend)
        scales = assemble_scales_3d_side([q[1] for q in qs])
        return codes, scales, torch.stack([q[2].reshape(()) for q in qs])

    def calibrate(
        self, sample: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Static scales (gs1, gs2), fp32 [E] each, from a warm-up batch with its routing.

        gs1 from the amax of the sample tokens this rank's experts receive; L1 run with it (in
        chunks of max_num_tokens tokens); gs2 from the amax of the weighted SwiGLU output, the
        tensor L2 quantizes. Reads values on the host (a warm-up step, not graph-safe).
        """
        c.require(self.kind, self.state, c.State.FINALIZED, "calibrate()")
        self._check_inputs(sample, topk_ids, topk_weights, "sample", limit_tokens=False)
        local = topk_ids.long() - self.first_expert
        received = ((local >= 0) & (local < self.n_local_experts)).any(dim=1)
        self._gs1.copy_(c.calibrated_scale("gs1", c.amax(sample[received])))
        act_amax = torch.zeros((), dtype=torch.float32, device=self._device)
        for start in range(0, sample.shape[0], self.max_num_tokens):
            end = start + self.max_num_tokens
            ids, wts = topk_ids[start:end], topk_weights[start:end]
            rows = ids.numel()
            self._route(ids, wts)
            self._l1_gemm(sample[start:end], rows)
            r = int(self._offsets[-1])  # staged rows of this chunk (host read: calibration)
            act = swiglu(self._l1[:r], self.swiglu_limit) * self._weight_row[:r, None]
            act_amax = torch.maximum(act_amax, c.amax(act))
        self._gs2.copy_(c.calibrated_scale("gs2", act_amax))
        self.state = c.State.CALIBRATED
        return self._gs1.clone(), self._gs2.clone()

    def set_activation_scales(self, gs1: torch.Tensor, gs2: torch.Tensor) -> None:
        """Static scales known in advance (decode convention, fp32, one value each), instead of
        calibrate(): e.g. a checkpoint's input scales."""
        # one value each: the staged activations are quantized with one scale per tensor
        self._set_two_scales(gs1, gs2)

    # ---- run

    def _check_inputs(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        name: str = "x",
        limit_tokens: bool = True,
    ) -> int:
        c.tensor(name, x, c.FLOAT_INPUTS, (None, self.hidden), self._device)
        t = x.shape[0]
        if limit_tokens:
            c.tokens(name, t, self.max_num_tokens)
        c.tensor("topk_ids", topk_ids, c.ID_DTYPES, (t, self.top_k), self._device)
        c.tensor("topk_weights", topk_weights, c.FLOAT_INPUTS, (t, self.top_k), self._device)
        return t

    def run(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, H], topk_ids int [T, k] GLOBAL expert ids, topk_weights float [T, k] -> out
        bf16 [T, H]: this rank's share of the MoE output (all ranks' with a process group).

        Slots whose expert is not local (other ranks, -1, any out-of-range id) add nothing.
        Graph-safe: allocates nothing, no host sync (see the module note on the torch
        backend's eager CUDA path), metadata-only checks (nothing is
        written when one fails).
        """
        c.require(self.kind, self.state, c.State.CALIBRATED, "run()")
        t = self._check_inputs(x, topk_ids, topk_weights)
        if out is None:
            out = self._out[:t]
        else:
            c.out_tensor(out, (t, self.hidden), self._device, (x, topk_ids, topk_weights))
        self._last_t, self._last_out = t, out
        if t == 0:
            self._offsets.zero_()
            return out
        rows = t * self.top_k
        self._route(topk_ids, topk_weights)
        self._l1_gemm(x, rows)
        self._l2_gemm(rows)
        self._combine(t, out)
        return out

    def run_op(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """run() through the `dsv4::routed_moe_run` custom op (opaque to torch.compile)."""
        custom_ops.routed_moe_run(self.handle, x, topk_ids, topk_weights, out)
        return out

    def _route(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Staged order, expert offsets, token and routing weight of each staged row (and, by
        the Triton routing, the combine's inverse index and the experts' scale starts)."""
        rows, e = topk_ids.numel(), self.n_local_experts
        if self.route_impl == "triton":
            from dsv4.kernels.triton import moe_route

            moe_route.launch_route(
                topk_ids, topk_weights, self.first_expert, e, self.max_rows, self._token,
                self._weight_row, self._inv, self._offsets, self._sf_starts, self._route_hist,
                self._route_base,
            )  # fmt: skip
            return
        key, skey, perm = self._key[:rows], self._sorted_key[:rows], self._perm[:rows]
        key.copy_(topk_ids.reshape(-1)).sub_(self._first)
        key.clamp_(-1, e).remainder_(self._n_keys)  # -1 (any id below the rank) and >= E -> E
        # stable sort of the keys 0..E by counting (no sort kernel, which allocates scratch):
        # staged position = rows with a smaller key + earlier rows with the same key
        # (bins x rows, scanned along its contiguous dim: torch's outer-dim scan, one thread per
        # column walking all rows, took 162 us of a 2.23 ms MoE at 128 tokens on an H200; this
        # one 9 us)
        n = (e + 1) * rows
        onehot, pos = self._onehot[:n].view(e + 1, rows), self._pos[:rows]
        onehot_b = self._onehot_b[:n].view(e + 1, rows)
        torch.eq(key.unsqueeze(0), self._bins.unsqueeze(1), out=onehot_b)
        onehot.copy_(onehot_b)
        torch.cumsum(onehot, dim=1, out=onehot)
        total = onehot[:, -1]  # rows per bin
        cumsum_small(total, self._bin_start, self._pair).sub_(total)
        torch.gather(onehot, 0, key.unsqueeze(0), out=pos.unsqueeze(0))  # rank in bin, from 1
        torch.index_select(self._bin_start, 0, key, out=self._src_row[:rows])
        pos.add_(self._src_row[:rows]).sub_(self._one)
        perm.index_copy_(0, pos, self._row_ids[:rows])  # staged row -> flat slot
        torch.index_select(key, 0, perm, out=skey)
        torch.searchsorted(skey, self._experts, right=True, out_int32=True, out=self._offsets)
        torch.div(perm, self._top_k, rounding_mode="floor", out=self._token[:rows])
        self._weight_flat[:rows].copy_(topk_weights.reshape(-1))  # to fp32, as the reference
        torch.index_select(self._weight_flat[:rows], 0, perm, out=self._weight_row[:rows])
        if self._fused:
            padded_group_starts(self._offsets, out=self._sf_starts, workspace=self._ws)

    def _l1_gemm(self, x: torch.Tensor, rows: int) -> None:
        if self._fused:
            codes, sf = self._x_codes[:rows], self._staged_sf(self._x_sf, self.hidden, rows)
            quantize_to_expert_layout(
                x, self._gs1[:1], self._offsets, self._sf_starts, codes, sf,
                index=self._token[:rows],
            )  # fmt: skip
            self._gemm(codes, sf, self._w13_q, self._gs1, self._l1[:rows])
            return
        t = x.shape[0]
        xt_codes, xt_scales = self._xt_codes[:t], self._xt_scales[:t]
        quantize_activation_nvfp4(x, self._gs1[:1], xt_codes, xt_scales, self._ws, self.quant_impl)
        token = self._token[:rows]
        codes, scales = self._x_codes[:rows], self._x_scales[:rows]
        torch.index_select(xt_codes, 0, token, out=codes)
        scale_bytes = scales.view(torch.uint8)
        torch.index_select(xt_scales.view(torch.uint8), 0, token, out=scale_bytes)
        self._grouped_gemm(codes, scales, self._x_sf, self._w13_q, self._gs1, self._l1[:rows])

    def _l2_gemm(self, rows: int) -> None:
        codes, scales = self._act_codes[:rows], self._act_scales[:rows]
        if self._fused:
            sf = self._staged_sf(self._act_sf, self.intermediate, rows)
            quantize_to_expert_layout(
                self._l1[:rows], self._gs2[:1], self._offsets, self._sf_starts, codes, sf,
                swiglu=True, limit=self.swiglu_limit, row_weight=self._weight_row[:rows],
            )  # fmt: skip
            self._gemm(codes, sf, self._w2_q, self._gs2, self._l2[:rows])
            return
        # SwiGLU in fp32, times the routing weight, BEFORE the quantization with gs2: one op
        swiglu_quantize(
            self._l1[:rows],
            self._gs2[:1],
            self.swiglu_limit,
            codes,
            scales,
            self._ws,
            row_weight=self._weight_row[:rows],
            impl=self.quant_impl,
        )
        self._grouped_gemm(codes, scales, self._act_sf, self._w2_q, self._gs2, self._l2[:rows])

    def _staged_sf(self, sf_buf: torch.Tensor, k: int, rows: int) -> torch.Tensor:
        """The part of a 2-D-side scale buffer that `rows` staged rows of width k use."""
        return sf_buf[: max_padded_rows(rows, self.n_local_experts) * _scale_cols(k)]

    def _grouped_gemm(self, codes, scales, sf_buf, weights, gs, out) -> None:
        sf, _ = assemble_scales_2d_side_from_offsets(
            scales,
            self._offsets,
            out=self._staged_sf(sf_buf, scales.shape[1] * BLOCK, scales.shape[0]),
            workspace=self._ws,
        )
        self._gemm(codes, sf, weights, gs, out)

    def _gemm(self, codes, sf, weights, gs, out) -> None:
        w_codes, w_sf, w_gs = weights
        run_nvfp4_grouped_gemm(
            codes,
            w_codes,
            sf,
            w_sf,
            self._offsets,
            gs,
            w_gs,
            out=out,
            backend=self._backend_name,
            workspace=self._gemm_ws,
        )

    def _combine(self, t: int, out: torch.Tensor) -> None:
        rows, k = t * self.top_k, self.top_k
        inv = self._inv[:rows]
        if self.route_impl == "torch":  # (the Triton routing wrote it)
            dropped, src = self._dropped[:rows], self._src_row[:rows]
            torch.eq(self._sorted_key[:rows], self._e_key, out=dropped)
            src.copy_(self._row_ids[:rows]).masked_fill_(dropped, self.max_rows)  # the zero row
            inv.index_copy_(0, self._perm[:rows], src)  # flat slot token*k + s -> staged row
        if self._fused:
            self._combine_kernel(t, inv, out)
            return
        slots = inv.view(t, k)
        acc, tmp = self._acc[:t], self._slot_rows[:t]
        acc.zero_()  # 0 + row(t, 0) first, as the reference sums (turns -0 into +0 alike)
        idx, tmp32 = self._slot_idx[:t], self._slot_rows32[:t]
        for s in range(k):  # in slot order: the fp32 sum's order is fixed
            idx.copy_(slots[:, s])  # a contiguous index (index_select copies a strided one)
            torch.index_select(self._l2, 0, idx, out=tmp)
            acc.add_(tmp32.copy_(tmp))  # bf16 -> fp32 here, not in a temporary of add_
        if self.process_group is not None:
            dist.all_reduce(acc, group=self.process_group)
        out.copy_(acc)

    def _combine_kernel(self, t: int, inv: torch.Tensor, out: torch.Tensor) -> None:
        """The same slot-order fp32 sum in one CuTeDSL launch: bf16 straight into `out` (or the
        runner's own buffer when `out` is not contiguous and 16-byte aligned), or, with a
        process group, the fp32 sum for the all-reduce."""
        from dsv4.kernels.cutedsl import moe_combine as mc

        pg = self.process_group is not None
        cfg = mc.CombineConfig(self.hidden, self.top_k, fp32_out=pg)
        direct = not pg and out.is_contiguous() and out.data_ptr() % 16 == 0
        dst = self._acc[:t] if pg else (out if direct else self._out[:t])
        mc.run_combine(cfg, self._l2, inv, dst)
        if pg:
            dist.all_reduce(dst, group=self.process_group)
        if not direct:
            out.copy_(dst)

    # ---- introspection

    def stages(self) -> dict[str, object]:
        """Intermediates of the last run, named and ordered as reference.layers.routed_moe:
        "expert_offsets", "gather_index", "x_q", "l1_out", "act_q", "l2_out", "out".

        Views of the buffers, valid until the next run (with quant_impl "cutedsl" the x_q and
        act_q scales are fresh tensors read back from the GEMMs' scale layout). Reads the staged
        row count on the host (a sync): for inspection, not for the graph-safe path.
        """
        if self._last_t is None:
            raise RuntimeError(f"{self.kind}.stages() needs a run() first")
        r = int(self._offsets[-1]) if self._last_t else 0
        x_scales, act_scales = self._x_scales[:r], self._act_scales[:r]
        if self._fused:  # the linear scales were never made: read them off the layout
            rows = self._last_t * self.top_k
            x_scales = self._linear_scales(self._x_sf, self.hidden, rows, r)
            act_scales = self._linear_scales(self._act_sf, self.intermediate, rows, r)
        return {
            "expert_offsets": self._offsets,
            "gather_index": self._token[:r].long(),
            "x_q": (self._x_codes[:r], x_scales, self._gs1),
            "l1_out": self._l1[:r],
            "act_q": (self._act_codes[:r], act_scales, self._gs2),
            "l2_out": self._l2[:r],
            "out": self._last_out,
        }

    def _linear_scales(self, sf_buf: torch.Tensor, k: int, rows: int, r: int) -> torch.Tensor:
        """[r, k/16] scales of the first r staged rows, read back from the experts' 2-D-side
        layout (host reads, allocations: for stages() only)."""
        cp = _scale_cols(k)
        sf = self._staged_sf(sf_buf, k, rows)
        full = unswizzle(sf.view(torch.uint8), sf.numel() // cp, cp)[:, : k // BLOCK]
        ends = self._offsets.tolist()
        starts = self._sf_starts.tolist()
        firsts = [0, *ends[:-1]]
        idx = [s + d for s, f, e in zip(starts, firsts, ends, strict=True) for d in range(e - f)]
        return full[torch.tensor(idx[:r], dtype=torch.long, device=full.device)].view(
            torch.float8_e4m3fn
        )
