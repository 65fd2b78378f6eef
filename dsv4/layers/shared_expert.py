"""The shared expert: out = L2(swiglu(L1(x))) in NVFP4, a one-expert grouped GEMM twice.

Life cycle: set_weights(w13 [H, 2I] gate|up, w2 [I, H]) -> finalize() (weights quantized with
one global scale each, codes K-major, scales swizzled; every buffer run() touches allocated for
max_num_tokens) -> calibrate(sample) (static activation scales, §2: gs1 from the sample's amax,
L1 run with it, gs2 from the amax of the SwiGLU output) -> run(x, out=None).

run() validates metadata only, then writes into the preallocated buffers and `out`: quantize x
with gs1, swizzle its scales, L1 GEMM, fused SwiGLU (DeepSeek V4 clamp) + requantize with gs2,
swizzle, L2 GEMM into out. The expert offsets of T tokens are a view into a preallocated
arange, so no value crosses from host to device. With out=None the result is a view of
the runner's own buffer, overwritten by the next run. stages() names the intermediates of the
last run like reference.layers.shared_expert, as views of the buffers.

Allocation and sync: as every runner (dsv4/layers/__init__.py), none in run().
"""

from __future__ import annotations

import torch

from dsv4.layers import _common as c
from dsv4.layers import custom_ops
from dsv4.ops import (
    DEFAULT_SWIGLU_LIMIT,
    assemble_scales_3d_side,
    grouped_gemm_workspace_bytes,
    pad_and_swizzle,
    pad_and_swizzle_workspace_bytes,
    prepare_weight_codes,
    quantize_activation_nvfp4,
    quantize_weight_to_nvfp4,
    quantize_workspace_bytes,
    run_nvfp4_grouped_gemm,
    select_backend,
    swiglu,
    swiglu_quantize,
    swiglu_quantize_workspace_bytes,
    swizzled_numel,
)
from dsv4.ops.quantize import BLOCK


class SharedExpertRunner(c.Runner):
    """NVFP4 shared expert of `hidden` -> `intermediate` -> `hidden` for up to max_num_tokens."""

    kind = "SharedExpertRunner"

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        max_num_tokens: int,
        swiglu_limit: float | None = DEFAULT_SWIGLU_LIMIT,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
        quant_impl: str | None = None,
    ) -> None:
        self.hidden = c.positive_int("hidden", hidden, BLOCK)
        self.intermediate = c.positive_int("intermediate", intermediate, BLOCK)
        self.max_num_tokens = c.positive_int("max_num_tokens", max_num_tokens)
        self.swiglu_limit = c.limit_value("swiglu_limit", swiglu_limit)
        self._init_runner("shared_expert", device, backend, quant_impl)

    # ---- life cycle

    def set_weights(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """w13 [H, 2I]: L1 gate_up (gate = first I columns, up = last I); w2 [I, H]."""
        h, i = self.hidden, self.intermediate
        c.tensor("w13", w13, c.FLOAT_INPUTS, (h, 2 * i))
        c.tensor("w2", w2, c.FLOAT_INPUTS, (i, h), w13.device)
        dev = c.resolve_device(self._device, w13)
        self._w13, self._w2 = w13.to(dev), w2.to(dev)
        self._device = self._w13.device  # "cuda" resolved to "cuda:0": what run() compares
        self.state = c.State.WEIGHTS_SET

    def finalize(self) -> None:
        """Quantize and lay out the weights; allocate every buffer run() uses.

        Drops the high-precision weights (set them again to re-finalize).
        """
        c.require(self.kind, self.state, c.State.WEIGHTS_SET, "finalize()")
        dev, t, h, i = self._device, self.max_num_tokens, self.hidden, self.intermediate
        self._resolve_quant_impl(dev)  # fails here when an impl was named that cannot run
        # fails here, naming the need (a capability, or a shape the backend cannot tile)
        self._backend_name = select_backend(dev, self.backend, [(t, h, 2 * i, 1), (t, i, h, 1)])
        self._w13_q = self._weight(self._w13, self._backend_name)
        self._w2_q = self._weight(self._w2, self._backend_name)
        del self._w13, self._w2

        def zeros(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=dev)

        self._offsets = torch.arange(t + 1, dtype=torch.int32, device=dev)  # row t: [t]
        self._gs1 = torch.ones(1, dtype=torch.float32, device=dev)
        self._gs2 = torch.ones(1, dtype=torch.float32, device=dev)
        self._x_codes = zeros((t, h // 2), torch.uint8)
        self._x_scales = zeros((t, h // BLOCK), torch.float8_e4m3fn)
        self._x_sf = zeros(swizzled_numel(t, h // BLOCK), torch.float8_e4m3fn)
        self._l1 = zeros((t, 2 * i), torch.bfloat16)
        self._act_codes = zeros((t, i // 2), torch.uint8)
        self._act_scales = zeros((t, i // BLOCK), torch.float8_e4m3fn)
        self._act_sf = zeros(swizzled_numel(t, i // BLOCK), torch.float8_e4m3fn)
        self._out = zeros((t, h), torch.bfloat16)
        gemm_ws = grouped_gemm_workspace_bytes(self._backend_name, t, h, 2 * i, 1)
        gemm_ws = max(gemm_ws, grouped_gemm_workspace_bytes(self._backend_name, t, i, h, 1))
        self._ws = zeros(
            max(
                quantize_workspace_bytes((t, h)),
                pad_and_swizzle_workspace_bytes(t, h // BLOCK),
                pad_and_swizzle_workspace_bytes(t, i // BLOCK),
                swiglu_quantize_workspace_bytes((t, 2 * i)),
                gemm_ws,
            ),
            torch.uint8,
        )  # every op's temporaries, one op at a time
        self._gemm_ws = self._ws if gemm_ws else None
        self.state = c.State.FINALIZED

    @staticmethod
    def _weight(w: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[K, N] -> (codes of one expert in `backend`'s layout, swizzled scales [1, ...], gs
        fp32 [1])."""
        codes, scales, gs = quantize_weight_to_nvfp4(w)
        codes = prepare_weight_codes(codes[None], backend)
        return codes, assemble_scales_3d_side([scales]), gs.reshape(1)

    def calibrate(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static activation scales from a warm-up sample [T_s, H] (any T_s); returns (gs1, gs2).

        gs1 = amax(sample) / (6*448); the quantized L1 runs with gs1 (in chunks of
        max_num_tokens rows); gs2 = amax(swiglu(L1)) / (6*448), as the serving code calibrates.
        Reads values on the host (a warm-up step, not graph-safe).
        """
        c.require(self.kind, self.state, c.State.FINALIZED, "calibrate()")
        c.tensor("sample", sample, c.FLOAT_INPUTS, (None, self.hidden), self._device)
        self._gs1.copy_(c.calibrated_scale("gs1", c.amax(sample)).reshape(1))
        act_amax = torch.zeros((), dtype=torch.float32, device=self._device)
        for start in range(0, sample.shape[0], self.max_num_tokens):
            chunk = sample[start : start + self.max_num_tokens]
            l1 = self._l1_gemm(chunk)
            act_amax = torch.maximum(act_amax, c.amax(swiglu(l1, self.swiglu_limit)))
        self._gs2.copy_(c.calibrated_scale("gs2", act_amax).reshape(1))
        self.state = c.State.CALIBRATED
        return self._gs1.clone(), self._gs2.clone()

    def set_activation_scales(self, gs1: torch.Tensor, gs2: torch.Tensor) -> None:
        """Static scales known in advance (decode convention, fp32, one value each), instead of
        calibrate(): e.g. a checkpoint's input scales."""
        # one value each: the staged activations are quantized with one scale per tensor
        self._set_two_scales(gs1, gs2)

    # ---- run

    def run(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] (float, T <= max_num_tokens) -> out bf16 [T, H]. Graph-safe: allocates
        nothing, no host sync (see the module note on the torch backend's eager CUDA path),
        metadata-only checks (nothing is written when one fails)."""
        c.require(self.kind, self.state, c.State.CALIBRATED, "run()")
        c.tensor("x", x, c.FLOAT_INPUTS, (None, self.hidden), self._device)
        t = c.tokens("x", x.shape[0], self.max_num_tokens)
        if out is None:
            out = self._out[:t]
        else:
            c.out_tensor(out, (t, self.hidden), self._device, (x,))
        self._last_t, self._last_out = t, out
        if t == 0:
            return out
        self._l1_gemm(x)
        codes, scales = self._act_codes[:t], self._act_scales[:t]
        swiglu_quantize(
            self._l1[:t],
            self._gs2,
            self.swiglu_limit,
            codes,
            scales,
            self._ws,
            impl=self.quant_impl,
        )
        sf = self._act_sf[: swizzled_numel(t, scales.shape[1])]
        pad_and_swizzle(scales, out=sf, workspace=self._ws)
        self._gemm(codes, sf, self._w2_q, self._gs2, out)
        return out

    def run_op(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """run() through the `dsv4::shared_expert_run` custom op (opaque to torch.compile)."""
        custom_ops.shared_expert_run(self.handle, x, out)
        return out

    def _l1_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize x [t, H] with gs1 and run L1 into the l1 buffer; returns its [t, 2I] view."""
        t = x.shape[0]
        codes, scales = self._x_codes[:t], self._x_scales[:t]
        quantize_activation_nvfp4(x, self._gs1, codes, scales, self._ws, self.quant_impl)
        sf = self._x_sf[: swizzled_numel(t, scales.shape[1])]
        pad_and_swizzle(scales, out=sf, workspace=self._ws)
        return self._gemm(codes, sf, self._w13_q, self._gs1, self._l1[:t])

    def _gemm(self, codes, sf, weight, gs, out: torch.Tensor) -> torch.Tensor:
        """One expert of T rows (offsets [T]): activation codes and swizzled scales x weight."""
        w_codes, w_sf, w_gs = weight
        t = codes.shape[0]
        run_nvfp4_grouped_gemm(
            codes,
            w_codes,
            sf,
            w_sf,
            self._offsets[t : t + 1],
            gs,
            w_gs,
            out=out,
            backend=self._backend_name,
            workspace=self._gemm_ws,
        )
        return out

    # ---- introspection

    def stages(self) -> dict[str, object]:
        """Intermediates of the last run, named as reference.layers.shared_expert names them:
        "x_q", "l1_out", "act_q", "l2_out", "out" (views, valid until the next run)."""
        if self._last_t is None:
            raise RuntimeError(f"{self.kind}.stages() needs a run() first")
        t = self._last_t
        return {
            "x_q": (self._x_codes[:t], self._x_scales[:t], self._gs1),
            "l1_out": self._l1[:t],
            "act_q": (self._act_codes[:t], self._act_scales[:t], self._gs2),
            "l2_out": self._last_out,
            "out": self._last_out,
        }
