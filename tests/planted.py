"""Planted defects: adapters with one realistic bug each, which the harness must catch and place.

Each defect adapter is the reference adapter with ONE stage method replaced by a version carrying
a bug seen in (or easy to make in) real NVFP4 kernels, so the smoke sweep has to fail that stage,
name it, and pass every other stage. The runner adapters at the end misbehave as processes
instead (raise, hang, die) to check that every (case, backend) pair still ends as a row.
The harness finds them by import path, e.g. `-b tests.planted:RoundHalfAway`.
Nothing here is imported by the harness or the reference: these are test fixtures only.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch

import reference as ref
from harness.adapters import Conventions, GemmOperands, QuantPolicy
from harness.backends.reference import ReferenceAdapter
from reference import layers as ref_layers
from reference.activation import SwigluVariant, swiglu
from reference.gemm import grouped_gemm_nvfp4
from reference.layouts import (
    assemble_scales_2d_side_from_offsets,
    swizzle_scales,
    unswizzle_scales,
)
from reference.nvfp4 import BLOCK, E2M1_MIDPOINTS, tensor_amax

ATOM_BYTES = 512  # one 128x4 scale atom


# --------------------------------------------------------------------------------------------
# numeric and layout defects (each overrides one stage method)


class StageDefect(ReferenceAdapter):
    """Base of the defects: stage cases only. Their layer methods are the reference's own, so a
    layer case would compare the reference with itself at full cost (routed_moe dominates)."""

    def can_implement(self, case):
        if case.stage.is_layer:
            return False, f"{self.name} plants a stage defect; its layers are the reference's"
        return super().can_implement(case)


class RoundHalfAway(StageDefect):
    """E2M1 ties rounded away from zero (C `roundf`) instead of cvt.rn's ties-to-even."""

    name = "planted-round-half-away"

    @staticmethod
    def step(a, mid, value):  # the bug: every tie goes up, even ones included
        return a >= mid

    def quantize(self, x, global_scale, codes_out, scales_out):
        _, scales, gs = ref.quantize_nvfp4(x, global_scale)  # block scales are right
        xn = x.float() / gs
        blocks = xn.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
        s = scales.float().unsqueeze(-1)
        q = torch.where(s == 0, torch.zeros_like(blocks), blocks / s).reshape(x.shape)
        a = q.abs()
        code = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
        for mid, value in zip(E2M1_MIDPOINTS, ref.E2M1_VALUES[1:], strict=True):
            code += self.step(a, mid, value).to(torch.uint8)
        code |= torch.signbit(q).to(torch.uint8) << 3
        code = torch.where(torch.isnan(q), torch.full_like(code, 0x7), code)  # as the reference
        codes_out.copy_(ref.pack_e2m1(code))
        scales_out.copy_(scales)
        return gs


class RoundTiesDown(RoundHalfAway):
    """E2M1 ties always rounded to the smaller magnitude."""

    name = "planted-round-ties-down"

    @staticmethod
    def step(a, mid, value):
        return a > mid


class RoundTruncate(RoundHalfAway):
    """E2M1 by truncation: the largest magnitude not above |q| (a floor, not a rounding)."""

    name = "planted-round-truncate"

    @staticmethod
    def step(a, mid, value):
        return a >= value


def _swap_bits_2_and_4(n_bytes: int, device: torch.device) -> torch.Tensor:
    """Index permutation of a buffer of whole atoms: bits 2 and 4 of the in-atom offset swapped.

    In-atom offset = (r % 32) * 16 + ((r // 32) % 4) * 4 + c % 4, so bit 2 is the low bit of the
    32-row sub-block and bit 4 the low bit of the row within it: rows 32 and 1 trade places.
    """
    i = torch.arange(n_bytes, device=device)
    b2, b4 = (i >> 2) & 1, (i >> 4) & 1
    return i & ~((1 << 2) | (1 << 4)) | (b2 << 4) | (b4 << 2)


class SwappedSwizzleBits(StageDefect):
    """128x4 swizzle with two index bits of the in-atom byte offset swapped (rows 1 <-> 32)."""

    name = "planted-swapped-swizzle-bits"

    def assemble_scales(self, a_scales, expert_offsets, b_scales, out_2d, out_3d):
        super().assemble_scales(a_scales, expert_offsets, b_scales, out_2d, out_3d)
        for out in (out_2d, out_3d):
            flat = out.view(torch.uint8).reshape(-1, ATOM_BYTES)  # 2D and 3D: whole atoms
            perm = _swap_bits_2_and_4(ATOM_BYTES, flat.device)
            flat.copy_(flat[:, perm].clone())


class SkipLastKBlock(StageDefect):
    """K loop that stops one 16-element block early (off-by-one in the K-tile count)."""

    name = "planted-skip-last-k-block"

    def grouped_gemm(self, ops: GemmOperands, out):
        a_codes = ops.a_codes.clone()
        a_codes[:, -BLOCK // 2 :] = 0  # two codes per byte: the last 8 bytes are the last block
        a = dataclasses.replace(ops.a, codes=a_codes)
        super().grouped_gemm(dataclasses.replace(ops, a=a), out)


class InvertedAlpha(StageDefect):
    """GEMM epilogue multiplying by 1/(gsa*gsb): encode-convention scales taken for decode ones."""

    name = "planted-inverted-alpha"

    @staticmethod
    def scales(gsa, gsb):
        return 1.0 / gsa, 1.0 / gsb

    def grouped_gemm(self, ops: GemmOperands, out):
        gsa, gsb = self.scales(ops.global_scale_a, ops.global_scale_b)
        super().grouped_gemm(ops.with_global_scales(gsa, gsb), out)


class MissingAlpha(InvertedAlpha):
    """GEMM epilogue that never multiplies by alpha (the raw block-scaled accumulator)."""

    name = "planted-missing-alpha"

    @staticmethod
    def scales(gsa, gsb):
        return torch.ones_like(gsa), torch.ones_like(gsb)


class AlphaTwice(InvertedAlpha):
    """alpha applied in the epilogue and again by the caller."""

    name = "planted-alpha-twice"

    @staticmethod
    def scales(gsa, gsb):
        return gsa * gsa, gsb * gsb


class ClampAfterProduct(StageDefect):
    """SwiGLU clamping silu(gate) * up to [-L, L] instead of gate and up (another model's)."""

    name = "planted-clamp-after-product"
    variant = SwigluVariant.CLAMP_AFTER_PRODUCT

    def swiglu_requant(self, l1_out, limit, global_scale, codes_out, scales_out):
        act = swiglu(l1_out, limit, variant=self.variant)
        codes, scales, _ = ref.quantize_nvfp4(act, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)


class PaddingUnwritten(StageDefect):
    """2D-side scale assembly writing data bytes only: padding left unzeroed (torch.empty)."""

    name = "planted-padding-unwritten"

    def assemble_scales(self, a_scales, expert_offsets, b_scales, out_2d, out_3d):
        full = torch.empty_like(out_2d)
        super().assemble_scales(a_scales, expert_offsets, b_scales, full, out_3d)
        # Where the data bytes land: assemble a matrix of ones, padding comes out 0x00.
        ones = torch.ones(a_scales.shape, dtype=torch.uint8, device=a_scales.device)
        data = assemble_scales_2d_side_from_offsets(ones, expert_offsets)[0] != 0
        out_2d.view(torch.uint8)[data] = full.view(torch.uint8)[data]


class SwigluExpOverflow(StageDefect):
    """SwiGLU whose silu(g) = g * e^g / (1 + e^g) stages e^g in fp16 for the numerator only: e^g
    overflows to Inf above ln(65504) = 11.09, so with a limit above that (or none) a large gate
    makes h = +-Inf, which the requantize saturates to scale 448 (byte 0x7E)."""

    name = "planted-swiglu-exp-overflow"
    FP16_MAX = 65504.0

    def swiglu_requant(self, l1_out, limit, global_scale, codes_out, scales_out):
        gate, up = l1_out.float().chunk(2, dim=-1)
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        e = torch.exp(gate)
        e16 = torch.where(e > self.FP16_MAX, torch.full_like(e, float("inf")), e)  # the bug
        # where e^g fits in fp16 the result is the reference's own silu, bit for bit
        act = torch.where(
            e16.isinf(), gate * up * e16 / (1 + e), torch.nn.functional.silu(gate) * up
        )
        codes, scales, _ = ref.quantize_nvfp4(act, global_scale)
        codes_out.copy_(codes)
        scales_out.copy_(scales)


class GemmNanTailRow(StageDefect):
    """Grouped GEMM whose tail tile of a single row (a group of T_g rows, T_g % 128 == 1) is
    stored from an unwritten accumulator: NaN in that group's last row."""

    name = "planted-gemm-nan-tail-row"

    def grouped_gemm(self, ops: GemmOperands, out):
        super().grouped_gemm(ops, out)
        start = 0
        for end in ops.expert_offsets.tolist():
            if (end - start) % 128 == 1:
                out[end - 1] = float("nan")
            start = end


def _padding_rows(sw_group: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The scale rows rows..round_up(rows, 128) of one group's swizzled block, [pad, cols]."""
    full = (rows + 127) // 128 * 128
    return unswizzle_scales(sw_group, full, cols)[rows:]


class GemmPaddingLeak(StageDefect):
    """Grouped GEMM whose row store wraps instead of masking: the padding rows of a group's last
    128-row tile (scales read from the swizzled buffer's padding, codes of row p % T_g) are
    accumulated into real row p % T_g. Zeroed padding adds exactly 0, so clean buffers pass."""

    name = "planted-gemm-padding-leak"

    def grouped_gemm(self, ops: GemmOperands, out):
        super().grouped_gemm(ops, out)
        k16 = ops.a_scales.shape[1]
        ends = ops.expert_offsets.tolist()
        flat = ops.a_scales_swizzled.view(torch.uint8).reshape(-1)
        cp = (k16 + 3) // 4 * 4
        for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
            t = end - start
            if t == 0 or t % 128 == 0:
                continue
            row0 = int(ops.a_scale_row_offsets[e])
            block = flat[row0 * cp : (row0 + (t + 127) // 128 * 128) * cp]
            pad = _padding_rows(block.view(torch.float8_e4m3fn), t, k16)
            if not bool((pad.view(torch.uint8) != 0).any()):
                continue  # zero scales: the wrapped rows add exactly nothing
            rows = torch.arange(t, t + pad.shape[0], device=out.device) % t + start
            leak = grouped_gemm_nvfp4(
                ops.a_codes[rows],
                pad,
                ops.b_codes[e : e + 1],
                ops.b_scales[e : e + 1],
                torch.tensor([pad.shape[0]], dtype=torch.int32, device=out.device),
                ops.global_scale_a[e : e + 1],
                ops.global_scale_b[e : e + 1],
                out_dtype=torch.float32,
            )
            acc = out.float().index_add_(0, rows, leak)
            out.copy_(acc.to(out.dtype))


class GemmExpertScaleCrosstalk(StageDefect):
    """Grouped GEMM loading one saturation bound for every expert's weight block scales from
    expert 0 (its largest scale, 448 for any weight quantized from its own amax): harmless while
    expert 0 holds a 448 block, wrong for every other expert once expert 0's scales change."""

    name = "planted-gemm-expert-scale-crosstalk"

    def grouped_gemm(self, ops: GemmOperands, out):
        bound = ops.b_scales[0].float().max()
        clamped = torch.minimum(ops.b_scales.float(), bound).to(ops.b_scales.dtype)
        b = dataclasses.replace(ops.b, scales=clamped)
        super().grouped_gemm(dataclasses.replace(ops, b=b), out)


DEFECTS = (RoundHalfAway, SwappedSwizzleBits, SkipLastKBlock, ClampAfterProduct, PaddingUnwritten)


# --------------------------------------------------------------------------------------------
# layer defects: the reference layer with one stage born wrong, the rest computed from it


class LayerDefect(ReferenceAdapter):
    """Base of the layer defects: only the layer named by `layer` (one Stage value)."""

    layer = ""

    def can_implement(self, case):
        if case.stage.value != self.layer:
            return False, f"{self.name} plants a defect in {self.layer} only"
        return super().can_implement(case)


def _gemm_skip_last_k_block(a_q, b_q, offsets):
    """The grouped GEMM of SkipLastKBlock on quantized (codes, scales, gs) operands."""
    a_codes = a_q[0].clone()
    a_codes[:, -BLOCK // 2 :] = 0
    out = grouped_gemm_nvfp4(a_codes, a_q[1], b_q[0], b_q[1], offsets, a_q[2], b_q[2])
    return out.to(torch.bfloat16)


class GroupedLinearSkipLastKBlock(LayerDefect):
    """wo_a whose grouped GEMM stops one K block early (the only GEMM of that layer)."""

    name = "planted-grouped-linear-skip-last-k-block"
    layer = "grouped_linear"

    def grouped_linear(self, o, w, *, n_groups, o_lora_rank, calib_sample):
        st = super().grouped_linear(
            o, w, n_groups=n_groups, o_lora_rank=o_lora_rank, calib_sample=calib_sample
        )
        z = _gemm_skip_last_k_block(st["x_q"], st["w_q"], st["expert_offsets"])
        st["gemm_out"] = z
        st["out"] = z.reshape(n_groups, o.shape[0], o_lora_rank).transpose(0, 1).contiguous()
        return st


# --------------------------------------------------------------------------------------------
# process-level misbehaviour (quantize only), for the runner's isolation, timeout and resume


class Raises(ReferenceAdapter):
    """A kernel launch that raises (bad argument, CUDA error surfaced as an exception)."""

    name = "planted-raises"

    def quantize(self, x, global_scale, codes_out, scales_out):
        raise RuntimeError(f"planted failure in quantize for x.shape={tuple(x.shape)}")


class Hangs(ReferenceAdapter):
    """A kernel that never returns (deadlocked barrier, spin on a flag nobody sets)."""

    name = "planted-hangs"

    def quantize(self, x, global_scale, codes_out, scales_out):
        time.sleep(600)


class Dies(ReferenceAdapter):
    """A kernel that takes its process down (segfault, illegal address): SIGKILL to itself."""

    name = "planted-dies"

    def quantize(self, x, global_scale, codes_out, scales_out):
        os.kill(os.getpid(), signal.SIGKILL)


# Read here, in a test fixture only: the resume test sets it for one subprocess.
EXIT_AT_ENV = "DSV4_PLANTED_EXIT_AT"
_calls = 0


class ExitsAtNth(ReferenceAdapter):
    """The reference, except that the Nth quantize call of a process (N from $DSV4_PLANTED_EXIT_AT)
    kills the whole process: a sweep killed midway, as by OOM killer or a preempted node."""

    name = "planted-exits-at-nth"

    def quantize(self, x, global_scale, codes_out, scales_out):
        global _calls
        _calls += 1
        if os.environ.get(EXIT_AT_ENV) == str(_calls):
            os._exit(3)
        return super().quantize(x, global_scale, codes_out, scales_out)


# The same backend name at two "commits", for `compare`: $DSV4_PLANTED_BUILD names a defect class
# of this module (unset: the reference). A factory, so the variable is read at each adapter load.
BUILD_ENV = "DSV4_PLANTED_BUILD"


def kernel_build():
    """One backend whose build is chosen by $DSV4_PLANTED_BUILD (a regression between runs)."""
    name = os.environ.get(BUILD_ENV)
    return (globals()[name] if name else ReferenceAdapter)()


class Gs2FromL1(LayerDefect):
    """Shared expert calibrating gs2 on the L1 output's amax instead of the SwiGLU output's (the
    tensor L2 actually quantizes): born in calibration, first seen in act_q's codes."""

    name = "planted-gs2-from-l1"
    layer = "shared_expert"

    def shared_expert(self, x, w13, w2, *, limit, calib_sample):
        gs1, _ = ref_layers.calibrate_shared_expert(calib_sample, w13, w2, limit=limit)
        l1 = ref_layers.shared_expert(calib_sample, w13, w2, limit=limit, gs1=gs1)["l1_out"]
        gs2 = ref.global_scale_from_amax(tensor_amax(l1))
        return ref_layers.shared_expert(x, w13, w2, limit=limit, gs1=gs1, gs2=gs2)


class ClampAfterProductUpper(ClampAfterProduct):
    """SwiGLU clamping the product from above only, min(silu(gate) * up, L): agrees with
    clamp_after_product wherever the product is > -L, so it must be told apart at both signs."""

    name = "planted-clamp-after-product-upper"
    variant = SwigluVariant.CLAMP_AFTER_PRODUCT_UPPER


def honest(variant: SwigluVariant, weight_after_w2: bool = False) -> ReferenceAdapter:
    """A correct kernel of another convention that says so: it must pass, flagged not-DSV4."""
    conv = Conventions(swiglu_variant=variant, weight_after_w2=weight_after_w2)
    adapter = ReferenceAdapter(conventions=conv)
    adapter.name = f"planted-honest-{variant.value}"
    return adapter


def honest_clamp_after_product():
    return honest(SwigluVariant.CLAMP_AFTER_PRODUCT)


class DishonestLayers(ReferenceAdapter):
    """Declares DSV4's conventions (the default) but its layers run `actual`'s."""

    name = "planted-dishonest-layers"
    actual = Conventions()

    def __init__(self):
        super().__init__()
        self._inner = ReferenceAdapter(conventions=self.actual)

    def shared_expert(self, *args, **kw):
        return self._inner.shared_expert(*args, **kw)

    def routed_moe(self, *args, **kw):
        return self._inner.routed_moe(*args, **kw)


class LayerClampAfterProduct(DishonestLayers):
    """Shared expert / routed MoE whose SwiGLU clamps after the product."""

    name = "planted-layer-clamp-after-product"
    actual = Conventions(swiglu_variant=SwigluVariant.CLAMP_AFTER_PRODUCT)


class RoutingWeightAfterW2(DishonestLayers):
    """Routed MoE multiplying the routing weight into the L2 rows (transformers) while declaring
    DSV4's before-w2 (DeepSeek's reference, DeepGEMM)."""

    name = "planted-routing-weight-after-w2"
    actual = Conventions(weight_after_w2=True)


class RoutingScaleTwice(ReferenceAdapter):
    """Routed MoE with V4-Pro's routed_scaling_factor (2.5) baked in, multiplied into weights
    that (as it declares by default) already include the case's factor: applied twice on a
    V4-Pro case, the wrong one on any other."""

    name = "planted-routing-scale-twice"
    factor = 2.5

    def routed_moe(self, x, topk_ids, topk_weights, w13, w2, **kw):
        return super().routed_moe(x, topk_ids, topk_weights * self.factor, w13, w2, **kw)


class RoutingScaleHardcoded(ReferenceAdapter):
    """Declares that it applies routed_scaling_factor itself (normalized weights in), then
    applies a hard-coded 2.5 whatever the case's model gives (V4-Flash: 1.5)."""

    name = "planted-routing-scale-hardcoded"
    conventions = Conventions(routing_weights_scaled=False)

    def routed_moe(self, *args, routed_scaling_factor, **kw):
        return super().routed_moe(*args, routed_scaling_factor=2.5, **kw)


class RoutingScaleIgnored(RoutingScaleHardcoded):
    """Declares that it applies routed_scaling_factor itself, and never does."""

    name = "planted-routing-scale-ignored"

    def routed_moe(self, *args, routed_scaling_factor, **kw):
        return ReferenceAdapter.routed_moe(self, *args, routed_scaling_factor=1.0, **kw)


class ClampBeforeAlpha(LayerDefect):
    """Shared expert fusing the SwiGLU into the L1 epilogue and clamping the raw fp32
    accumulator (before alpha = gsa * gsb), so its limit is L / alpha in true units."""

    name = "planted-clamp-before-alpha"
    layer = "shared_expert"

    def _run(self, x, w13, w2, limit, gs1, gs2):
        st = ref_layers.shared_expert(x, w13, w2, limit=limit, gs1=gs1, gs2=gs1)
        xq, wq = st["x_q"], st["w13_q"]
        one = torch.ones(1, dtype=torch.float32, device=x.device)
        offsets = torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device)
        raw = grouped_gemm_nvfp4(
            xq[0], xq[1], wq[0], wq[1], offsets, one, one, out_dtype=torch.float32
        )
        alpha = xq[2] * wq[2]
        act = swiglu(raw, limit, pre_alpha=alpha)
        if gs2 is None:  # calibration: the amax of this very act
            return act
        act_q = ref_layers.quantize_groups(act, offsets, gs2.reshape(1))
        l2 = grouped_gemm_nvfp4(*act_q[:2], *st["w2_q"][:2], offsets, act_q[2], st["w2_q"][2])
        st.update(act=act, act_q=act_q, l2_out=l2.to(torch.bfloat16), out=l2.to(torch.bfloat16))
        return st

    def shared_expert(self, x, w13, w2, *, limit, calib_sample):
        gs1, _ = ref_layers.calibrate_shared_expert(calib_sample, w13, w2, limit=limit)
        act = self._run(calib_sample, w13, w2, limit, gs1, None)
        gs2 = ref.global_scale_from_amax(tensor_amax(act)).to(x.device)
        return self._run(x, w13, w2, limit, gs1, gs2)


class UnpaddedGroupAssembly(ReferenceAdapter):
    """2D-side scale assembly that swizzles all groups as ONE matrix: group g's scale rows start
    at its data row sum(T_j) instead of sum(round_up(T_j, 128)). Its grouped_linear reads its own
    assembly (through the correct layout), so groups after the first get another group's scales."""

    name = "planted-unpadded-group-assembly"

    def can_implement(self, case):
        if case.stage.value not in ("scale_assembly", "grouped_linear"):
            return False, f"{self.name} plants a defect in scale_assembly and grouped_linear"
        return super().can_implement(case)

    def assemble_scales(self, a_scales, expert_offsets, b_scales, out_2d, out_3d):
        super().assemble_scales(a_scales, expert_offsets, b_scales, out_2d, out_3d)
        whole = swizzle_scales(a_scales).view(torch.uint8)  # the bug: one swizzle for all groups
        flat = out_2d.view(torch.uint8).reshape(-1)
        flat.zero_()
        flat[: whole.numel()] = whole[: flat.numel()]

    def grouped_linear(self, o, w, *, n_groups, o_lora_rank, calib_sample):
        st = super().grouped_linear(
            o, w, n_groups=n_groups, o_lora_rank=o_lora_rank, calib_sample=calib_sample
        )
        (codes, scales, gs), wq, offsets = st["x_q"], st["w_q"], st["expert_offsets"]
        buf = assemble_scales_2d_side_from_offsets(scales, offsets)[0]  # sized as it must be
        b3d = ref.layouts.assemble_scales_3d_side(list(wq[1]))
        self.assemble_scales(scales, offsets, wq[1], buf, b3d)
        # the GEMM reads group g's scales where the layout says they are
        t, cols = o.shape[0], scales.shape[1]
        cp, span = (cols + 3) // 4 * 4, (t + 127) // 128 * 128
        read = [
            unswizzle_scales(buf[g * span * cp : (g + 1) * span * cp], t, cols)
            for g in range(n_groups)
        ]
        z = grouped_gemm_nvfp4(codes, torch.cat(read), wq[0], wq[1], offsets, gs, wq[2])
        st["gemm_out"] = z.to(torch.bfloat16)
        st["out"] = st["gemm_out"].reshape(n_groups, t, o_lora_rank).transpose(0, 1).contiguous()
        return st


# --------------------------------------------------------------------------------------------
# quantizer policies of real peers (legitimate where declared, named where not)


class ScaleFloorQuantizer(StageDefect):
    """A quantizer clamping block scales up to 2^-6 (normalized units): all-zero blocks get a
    nonzero scale byte, their codes (and values) stay 0."""

    name = "planted-scale-floor"
    FLOOR = 2.0**-6

    def quantize(self, x, global_scale, codes_out, scales_out):
        gs = ref.global_scale_from_amax(tensor_amax(x)) if global_scale is None else global_scale
        xn = x.float() / gs
        blocks = xn.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
        s = (blocks.abs().amax(-1, keepdim=True) / 6.0).clamp(min=self.FLOOR)
        scales = ref.encode_block_scales(s)
        q = blocks / scales.float()
        codes_out.copy_(ref.pack_e2m1(ref.encode_e2m1(q.reshape(x.shape))))
        scales_out.copy_(scales.squeeze(-1))
        return gs


class NanScaleByteFF(StageDefect):
    """A quantizer writing 0xFF (negative NaN) for a NaN block's scale byte instead of 0x7F."""

    name = "planted-nan-scale-byte-ff"

    def quantize(self, x, global_scale, codes_out, scales_out):
        gs = super().quantize(x, global_scale, codes_out, scales_out)
        b = scales_out.view(torch.uint8)
        b.copy_(torch.where(b == 0x7F, torch.full_like(b, 0xFF), b))
        return gs


class NanAmaxQuantizer(StageDefect):
    """A dynamic quantizer whose amax propagates NaN (torch.amax): one NaN input makes the
    global scale NaN and every block NaN."""

    name = "planted-nan-amax"

    def quantize(self, x, global_scale, codes_out, scales_out):
        if global_scale is None:
            global_scale = x.float().abs().amax() / (6.0 * 448.0)  # NaN in, NaN out
        return super().quantize(x, global_scale, codes_out, scales_out)


def declaring(cls: type, *policies: QuantPolicy):
    """The same quantizer, honest about its policies."""
    adapter = cls()
    adapter.conventions = Conventions(policies=frozenset(policies))
    return adapter


class UnclampedScaleCast(StageDefect):
    """Block scales cast to e4m3 without the clamp to 448 (torch 2.11 turns > 464 and +Inf into
    NaN, docs/design.md §3): seen only on the static-scale path, where a block can exceed 448."""

    name = "planted-unclamped-scale-cast"

    def quantize(self, x, global_scale, codes_out, scales_out):
        gs = super().quantize(x, global_scale, codes_out, scales_out)
        xn = x.float() / torch.as_tensor(gs, dtype=torch.float32)
        blocks = xn.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
        over = blocks.abs().amax(-1) / 6.0 > 464.0  # what the unclamped cast makes NaN
        b = scales_out.view(torch.uint8)
        b.copy_(torch.where(over, torch.full_like(b, 0x7F), b))
        return gs


class GroupedLinearScaled(LayerDefect):
    """wo_a whose output is uniformly `factor` too large (a stray scale in the epilogue)."""

    name = "planted-grouped-linear-scaled"
    layer = "grouped_linear"
    factor = 1.01

    def grouped_linear(self, o, w, *, n_groups, o_lora_rank, calib_sample):
        st = super().grouped_linear(
            o, w, n_groups=n_groups, o_lora_rank=o_lora_rank, calib_sample=calib_sample
        )
        (codes, scales, gs), wq = st["x_q"], st["w_q"]
        z = grouped_gemm_nvfp4(
            codes, scales, *wq[:2], st["expert_offsets"], gs, wq[2], out_dtype=torch.float32
        )
        st["gemm_out"] = (z * self.factor).to(torch.bfloat16)  # scaled in the fp32 epilogue
        t = o.shape[0]
        st["out"] = st["gemm_out"].reshape(n_groups, t, o_lora_rank).transpose(0, 1).contiguous()
        return st


class GroupedLinearScaledSlightly(GroupedLinearScaled):
    """0.4% too large (0.5% after the bf16 rounding): calc_diff ~1e-5, under the calc_diff
    budget; only the gain shows it."""

    name = "planted-grouped-linear-scaled-slightly"
    factor = 1.004


# --------------------------------------------------------------------------------------------
# expert-parallel defects (stage routed_moe_ep, harness.stages.ep): one rank's share is wrong


class EpDefect(ReferenceAdapter):
    """Base of the expert-parallel defects: routed_moe_ep cases only."""

    def can_implement(self, case):
        if case.stage.value != "routed_moe_ep":
            return False, f"{self.name} plants an expert-parallel defect"
        return super().can_implement(case)


class ForgetsFirstExpert(EpDefect):
    """Builds its runner from the right experts but uses the global ids as local ones (the
    rank's first expert id never subtracted): rank r > 0 serves the slots of experts 0..n-1."""

    name = "planted-forgets-first-expert"

    def routed_moe_rank(
        self, x, topk_ids, topk_weights, w13, w2, *, rank, world, first_expert, n_local, **kw
    ):
        local = slice(first_expert, first_expert + n_local)
        return self.routed_moe(
            x, topk_ids, topk_weights, w13[local], w2[local], first_expert=0, **kw
        )


class DropsLastRank(EpDefect):
    """Loses the tokens routed to the last rank (an off-by-one in the dispatch's rank range):
    rank W-1 receives none of its slots and contributes nothing."""

    name = "planted-drops-last-rank"

    def routed_moe_rank(self, x, topk_ids, topk_weights, *args, rank, world, **kw):
        if rank == world - 1:
            topk_ids = torch.full_like(topk_ids, -1)
        return super().routed_moe_rank(
            x, topk_ids, topk_weights, *args, rank=rank, world=world, **kw
        )


class RankDies(EpDefect):
    """Rank 1's process dies mid-case (segfault, illegal address): SIGKILL to itself."""

    name = "planted-rank-dies"

    def routed_moe_rank(self, *args, rank, **kw):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().routed_moe_rank(*args, rank=rank, **kw)


class RankHangs(EpDefect):
    """Rank 1 never returns, so every other rank waits in the combine's collective."""

    name = "planted-rank-hangs"

    def routed_moe_rank(self, *args, rank, **kw):
        if rank == 1:
            time.sleep(600)
        return super().routed_moe_rank(*args, rank=rank, **kw)


class RankRaises(EpDefect):
    """Rank 1 raises (a bad argument on one rank only)."""

    name = "planted-rank-raises"

    def routed_moe_rank(self, *args, rank, **kw):
        if rank == 1:
            raise RuntimeError("planted failure on rank 1")
        return super().routed_moe_rank(*args, rank=rank, **kw)
