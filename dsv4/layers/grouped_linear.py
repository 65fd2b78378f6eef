"""The grouped o-projection (wo_a, "bhr,hdr->bhd"): o [T, n_heads, head_dim] -> z [T, G, R].

o is viewed as [T, G, D], D = heads_per_group * head_dim, and group g computes o[:, g] @ w[g]
for EVERY token (no routing): one NVFP4 grouped GEMM of G groups of T rows each, group-major
(group g's rows are g*T .. (g+1)*T - 1, the reference's order), END offsets (g+1)*T.
Layout choice: data rows are NOT padded per group; the activation SCALES are, each group's block
starting at scale row g * round_up(T, 128) (the grouped GEMM's 2-D-side contract), so the design's
"offsets are g*padded_T" holds for the scale rows, while the data offsets stay (g+1)*T and the
staged codes match reference.layers.grouped_linear row for row.

Life cycle: set_weight(w) ([G, D, R] bmm form, or [G*R, D] dense form: split per group and
transposed so D is the contraction dim K) -> finalize() -> calibrate(sample) (one activation
scale per group, each group's amax / (6*448), as reference.layers.calibrate_grouped_linear) ->
run(o, out=None). run() quantizes each group with its own scale (G launches on views: the
quantizer takes one scale per call), assembles the scales from an offsets row of a table made
at finalize (no value crosses from host to device), runs the GEMM into a group-major buffer and
writes out [T, G, R] with one strided copy.

Allocation and sync: as every runner (dsv4/layers/__init__.py), none in run().
"""

from __future__ import annotations

import torch

from dsv4.layers import _common as c
from dsv4.layers import custom_ops
from dsv4.ops import (
    assemble_2d_workspace_bytes,
    assemble_scales_2d_side_from_offsets,
    assemble_scales_3d_side,
    grouped_gemm_workspace_bytes,
    max_padded_rows,
    prepare_weight_codes,
    quantize_activation_nvfp4_grouped,
    quantize_weight_to_nvfp4,
    quantize_workspace_bytes,
    run_nvfp4_grouped_gemm,
    select_backend,
)
from dsv4.ops.quantize import BLOCK


class GroupedLinear(c.Runner):
    """NVFP4 wo_a: n_groups groups of heads_per_group heads of head_dim -> o_lora_rank each."""

    kind = "GroupedLinear"

    def __init__(
        self,
        n_groups: int,
        heads_per_group: int,
        head_dim: int,
        o_lora_rank: int,
        max_num_tokens: int,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
        quant_impl: str | None = None,
    ) -> None:
        self.n_groups = c.positive_int("n_groups", n_groups)
        self.heads_per_group = c.positive_int("heads_per_group", heads_per_group)
        self.head_dim = c.positive_int("head_dim", head_dim)
        self.o_lora_rank = c.positive_int("o_lora_rank", o_lora_rank)
        self.max_num_tokens = c.positive_int("max_num_tokens", max_num_tokens)
        self.group_dim = heads_per_group * head_dim  # D, the contraction dim
        if self.group_dim % BLOCK:
            raise ValueError(
                f"heads_per_group * head_dim (the contraction dim) must be a multiple of {BLOCK},"
                f" got {heads_per_group=} * {head_dim=} = {self.group_dim}"
            )
        self._init_runner("grouped_linear", device, backend, quant_impl)

    @property
    def n_heads(self) -> int:
        return self.n_groups * self.heads_per_group

    # ---- life cycle

    def set_weight(self, w: torch.Tensor) -> None:
        """w [G, D, R] (bmm form) or [G*R, D] (dense form, a Linear's weight: out x in)."""
        g, d, r = self.n_groups, self.group_dim, self.o_lora_rank
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            c.tensor("w", w, c.FLOAT_INPUTS, (g * r, d))
            w = w.reshape(g, r, d).transpose(1, 2)  # group g's rows, transposed: D becomes K
        else:
            try:
                c.tensor("w", w, c.FLOAT_INPUTS, (g, d, r))
            except ValueError as e:
                raise ValueError(f"{e} (or the dense form [G*R, D]={(g * r, d)})") from None
        dev = c.resolve_device(self._device, w)
        self._w = w.to(dev)
        self._device = self._w.device  # "cuda" resolved to "cuda:0": what run() compares
        self.state = c.State.WEIGHTS_SET

    def finalize(self) -> None:
        """Quantize (one global scale per group) and lay out the weight; allocate buffers."""
        c.require(self.kind, self.state, c.State.WEIGHTS_SET, "finalize()")
        dev, g, d, r = self._device, self.n_groups, self.group_dim, self.o_lora_rank
        t = self.max_num_tokens
        self._resolve_quant_impl(dev)  # fails here when an impl was named that cannot run
        self._backend_name = select_backend(dev, self.backend, [(g * t, d, r, g)])
        qs = [quantize_weight_to_nvfp4(self._w[i]) for i in range(g)]
        self._w_codes = prepare_weight_codes(torch.stack([q[0] for q in qs]), self._backend_name)
        self._w_sf = assemble_scales_3d_side([q[1] for q in qs])
        self._w_gs = torch.stack([q[2].reshape(()) for q in qs])
        del self._w

        def zeros(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=dev)

        # offsets of T tokens: row T of the table, (g+1)*T for g < G
        steps = torch.arange(1, g + 1, dtype=torch.int32, device=dev)
        self._offsets = torch.arange(t + 1, dtype=torch.int32, device=dev)[:, None] * steps
        self._gs = torch.ones(g, dtype=torch.float32, device=dev)
        self._x_codes = zeros((g * t, d // 2), torch.uint8)
        self._x_scales = zeros((g * t, d // BLOCK), torch.float8_e4m3fn)
        cp = (d // BLOCK + 3) // 4 * 4
        self._x_sf = zeros(max_padded_rows(g * t, g) * cp, torch.float8_e4m3fn)
        self._z = zeros((g * t, r), torch.bfloat16)
        self._out = zeros((t, g, r), torch.bfloat16)
        gemm_ws = grouped_gemm_workspace_bytes(self._backend_name, g * t, d, r, g)
        need = max(
            quantize_workspace_bytes((t, d)),
            assemble_2d_workspace_bytes(g * t, d // BLOCK, g, self._x_sf.numel()),
            gemm_ws,
        )
        self._ws = zeros(need, torch.uint8)  # every op's temporaries, one op at a time
        self._gemm_ws = self._ws if gemm_ws else None
        self.state = c.State.FINALIZED

    def calibrate(self, sample: torch.Tensor) -> torch.Tensor:
        """Per-group activation scales fp32 [G] from a warm-up o [T_s, n_heads, head_dim]:
        each group's amax (NaN ignored) / (6*448). Reads values on the host (warm-up step)."""
        c.require(self.kind, self.state, c.State.FINALIZED, "calibrate()")
        shape = (None, self.n_heads, self.head_dim)
        c.tensor("sample", sample, c.FLOAT_INPUTS, shape, self._device)
        groups = sample.reshape(sample.shape[0], self.n_groups, self.group_dim)
        amax = torch.stack([c.amax(groups[:, i]) for i in range(self.n_groups)])
        self._gs.copy_(c.calibrated_scale("gs", amax))
        self.state = c.State.CALIBRATED
        return self._gs.clone()

    def set_activation_scales(self, gs: torch.Tensor) -> None:
        """Static per-group scales known in advance (decode convention, fp32 [G] or one)."""
        c.require(self.kind, self.state, c.State.FINALIZED, "set_activation_scales()")
        self._gs.copy_(c.scale_values("gs", gs, self.n_groups, self._device))
        self.state = c.State.CALIBRATED

    # ---- run

    def run(self, o: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """o [T, n_heads, head_dim] float -> out bf16 [T, G, R]. Graph-safe: allocates nothing,
        no host sync (but see the module note on the torch backend's eager CUDA path),
        metadata-only checks (nothing is written when one fails)."""
        c.require(self.kind, self.state, c.State.CALIBRATED, "run()")
        c.tensor("o", o, c.FLOAT_INPUTS, (None, self.n_heads, self.head_dim), self._device)
        t = c.tokens("o", o.shape[0], self.max_num_tokens)
        g, r = self.n_groups, self.o_lora_rank
        if out is None:
            out = self._out[:t]
        else:
            c.out_tensor(out, (t, g, r), self._device, (o,))
        self._last_t, self._last_out = t, out
        if t == 0:
            return out
        x = o.reshape(t, g, self.group_dim)
        codes, scales = self._x_codes[: g * t], self._x_scales[: g * t]
        # one scale per group: one launch (cutedsl) or one quantize per group (torch)
        quantize_activation_nvfp4_grouped(x, self._gs, codes, scales, self._ws, self.quant_impl)
        offsets = self._offsets[t]
        need = max_padded_rows(g * t, g) * ((scales.shape[1] + 3) // 4 * 4)
        sf, _ = assemble_scales_2d_side_from_offsets(
            scales, offsets, out=self._x_sf[:need], workspace=self._ws
        )
        z = self._z[: g * t]
        run_nvfp4_grouped_gemm(
            codes,
            self._w_codes,
            sf,
            self._w_sf,
            offsets,
            self._gs,
            self._w_gs,
            out=z,
            backend=self._backend_name,
            workspace=self._gemm_ws,
        )
        out.copy_(z.view(g, t, r).transpose(0, 1))
        return out

    def run_op(self, o: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """run() through the `dsv4::grouped_linear_run` custom op (opaque to torch.compile)."""
        custom_ops.grouped_linear_run(self.handle, o, out)
        return out

    # ---- introspection

    def stages(self) -> dict[str, object]:
        """Intermediates of the last run, named as reference.layers.grouped_linear: "x_q"
        (group-major rows [G*T, D/2], gs [G]), "expert_offsets" int32 [G], "gemm_out"
        (group-major bf16 [G*T, R], dsv4 only), "out" (views, valid until the next run)."""
        if self._last_t is None:
            raise RuntimeError(f"{self.kind}.stages() needs a run() first")
        t, g = self._last_t, self.n_groups
        return {
            "x_q": (self._x_codes[: g * t], self._x_scales[: g * t], self._gs),
            "expert_offsets": self._offsets[t],
            "gemm_out": self._z[: g * t],
            "out": self._last_out,
        }
