"""Seeded inputs for a case: activations by distribution, weights, routing, calibration samples.

Everything is drawn from one `torch.Generator` per (case seed, a tag) on the case's device type:
a CPU case draws on the CPU (the same numbers on every machine, as ever); a CUDA case draws on
its GPU (a V4-Pro routed MoE draws 3.2e9 weights: minutes on the CPU, milliseconds there). CUDA
draws are another stream than the CPU's, identical across runs and backends on one GPU model:
torch's CUDA generator spreads a draw over a grid sized by the device's SM count, so another
model may draw other numbers. Weights are drawn one expert / group at a time (on the CPU that is
the one-shot stream, bit for bit; on a GPU it bounds the fp32 temporaries to one expert). The
exact distributions (fp4_grid, midpoints) come with a power-of-two global scale: with them every
intermediate of the quantizer is exact and equality is demanded (docs/design.md §3).
"""

from __future__ import annotations

import zlib

import torch

from harness.cases import Case, Distribution, Routing, Stage

_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_MIDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
EXACT_GLOBAL_SCALE = 2.0**-3  # power of two: x / gs is exact


def generator(case: Case, tag: str) -> torch.Generator:
    """An independent, reproducible stream per (case seed, purpose, device type): on the case's
    CUDA device for a CUDA case, on the CPU otherwise. Draw with `device=g.device`."""
    dev = torch.device(case.device) if case.device.startswith("cuda") else torch.device("cpu")
    seed = case.seed * 1_000_003 + zlib.crc32(tag.encode())
    return torch.Generator(device=dev).manual_seed(seed)


def activation(shape: tuple[int, ...], dist: Distribution, g: torch.Generator) -> torch.Tensor:
    """bf16 activations [..., K] (K a multiple of 16) drawn from `dist`."""
    k, dev = shape[-1], g.device
    if dist is Distribution.NORMAL:
        x = torch.randn(shape, generator=g, device=dev)
    elif dist is Distribution.OUTLIERS:
        x = _student_t(shape, g)
        flat = x.view(-1)
        n_out = (max(1, flat.numel() // 500),)
        idx = torch.randint(0, flat.numel(), n_out, generator=g, device=dev)
        flat[idx] *= 100.0
    elif dist in (Distribution.FP4_GRID, Distribution.MIDPOINTS):
        # Each 16-block: amax exactly 6 * 2^j so its scale 2^j (times gs) is a power of two.
        table = (_GRID if dist is Distribution.FP4_GRID else _MIDS).to(dev)
        vals = table[torch.randint(0, len(table), shape, generator=g, device=dev)]
        sign = torch.where(torch.rand(shape, generator=g, device=dev) < 0.5, -1.0, 1.0)
        blocks = (vals * sign).view(*shape[:-1], k // 16, 16)
        first = torch.rand(blocks.shape[:-1], generator=g, device=dev)
        blocks[..., 0] = 6.0 * torch.where(first < 0.5, -1, 1)
        exp = torch.randint(-3, 4, (*blocks.shape[:-1], 1), generator=g, device=dev).float()
        x = (blocks * torch.exp2(exp) * EXACT_GLOBAL_SCALE).view(shape)
    elif dist is Distribution.SPARSE:
        x = torch.randn(shape, generator=g, device=dev)
        x = x * (torch.rand(shape, generator=g, device=dev) < 0.1)
    elif dist is Distribution.ZERO_BLOCKS:
        x = torch.randn(shape, generator=g, device=dev)
        keep = torch.rand((*shape[:-1], k // 16, 1), generator=g, device=dev) >= 0.25
        x = (x.view(*shape[:-1], k // 16, 16) * keep).view(shape)
    elif dist in (Distribution.NAN_ONE, Distribution.INF_ONE):
        x = torch.randn(shape, generator=g, device=dev)
        i = int(torch.randint(0, x.numel(), (1,), generator=g, device=dev))
        x.view(-1)[i] = float("nan") if dist is Distribution.NAN_ONE else float("inf")
    else:  # pragma: no cover - exhaustive over the enum
        raise ValueError(f"unknown distribution {dist}")
    return x.to(torch.bfloat16)


def _student_t(shape: tuple[int, ...], g: torch.Generator, df: int = 3) -> torch.Tensor:
    z = torch.randn(shape, generator=g, device=g.device)
    chi2 = torch.randn((*shape, df), generator=g, device=g.device).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / df)


def weight(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """bf16 weights [..., K, N], scaled like a trained layer (std 1/sqrt(K)).

    Drawn one [K, N] matrix at a time into the bf16 result, so the fp32 temporaries are one
    expert's. On the CPU that is the one-shot stream bit for bit: torch's CPU normal sampler
    fills a tensor of n >= 16 elements (n a multiple of 16) with n consecutive uniforms and
    transforms them 16 at a time, so consecutive draws continue where one large draw would.
    Otherwise (tiny or ragged matrices) the whole tensor is drawn at once, as before."""
    k, n = shape[-2], shape[-1]
    if k * n < 16 or (k * n) % 16:
        return (torch.randn(shape, generator=g, device=g.device) / k**0.5).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16, device=g.device)
    for m in out.view(-1, k, n):
        m.copy_(torch.randn((k, n), generator=g, device=g.device) / k**0.5)
    return out


def routing(case: Case, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int64 [T, k] LOCAL-rank-relative global ids, topk_weights fp32 [T, k]).

    Ids are global ids of the `routed_experts(case)` experts from `first_expert(case)` on (one
    rank's; every rank's for routed_moe_ep); invalid_ids puts -1 and ids past them (other
    ranks') in a quarter of the slots.
    """
    t, e, k = case.tokens, routed_experts(case), case.shape.top_k
    dev = g.device
    first = first_expert(case)
    pool = e
    if case.routing is Routing.EMPTY_EXPERTS:
        pool = max(k, (e + 1) // 2)
    ids = (
        torch.stack([torch.randperm(pool, generator=g, device=dev)[:k] for _ in range(t)])
        if t
        else (torch.zeros((0, k), dtype=torch.int64, device=dev))
    )
    if case.routing is Routing.EMPTY_EXPERTS:
        ids = ids * 2 % e if pool * 2 <= e else ids
    if case.routing is Routing.ONE_EXPERT:
        ids[:, 0] = 0
        ids[:, 1:] = torch.arange(1, k, device=dev).expand(t, k - 1) if k > 1 else ids[:, 1:]
    ids = ids + first
    if case.routing is Routing.INVALID_IDS:
        bad = torch.rand((t, k), generator=g, device=dev) < 0.25
        other = torch.where(torch.rand((t, k), generator=g, device=dev) < 0.5, -1, first + e + 3)
        ids = torch.where(bad, other, ids)
    w = torch.softmax(torch.randn((t, k), generator=g, device=dev), dim=-1)
    return ids, w


def gate_weights(topk_weights: torch.Tensor, routed_scaling_factor: float) -> torch.Tensor:
    """The routing weights DeepSeek V4's gate outputs: the normalized top-k weights (`routing`)
    times routed_scaling_factor, in fp32 (exact for the factor 1.0)."""
    return topk_weights.float() * routed_scaling_factor


def first_expert(case: Case) -> int:
    """Global id of the rank's first local expert: rank 1 of EP, so local != global ids; 0 for
    routed_moe_ep, whose inputs hold every rank's experts."""
    return 0 if case.stage is Stage.ROUTED_MOE_EP else case.shape.n_experts


def routed_experts(case: Case) -> int:
    """Experts the routing draws from and the weights hold: the rank's shape.n_experts, or
    ep_size ranks of them for routed_moe_ep (global ids 0 .. ep_size * n_experts - 1)."""
    return case.shape.n_experts * (case.ep_size if case.stage is Stage.ROUTED_MOE_EP else 1)


def tokens_per_expert(ids: torch.Tensor, first: int, n_experts: int) -> torch.Tensor:
    """int64 [E]: how many routed slots land on each local expert (others dropped)."""
    local = ids.flatten() - first
    local = local[(local >= 0) & (local < n_experts)]
    return torch.bincount(local, minlength=n_experts)


def calibration_sample(x: torch.Tensor, ratio: float | None) -> torch.Tensor | None:
    """A warm-up sample whose amax is amax(x) / ratio (None: dynamic scales, no sample).

    The sample is CLEAN: the planted NaN / Inf of a nan_one / inf_one case lives in the live batch
    only (zeroed here), as in serving, where scales come from a finite warm-up batch. Calibrating
    on the Inf itself gave gs = Inf and never exercised the static-scale path at all.
    """
    if ratio is None:
        return None
    return (finite(x).float() / ratio).to(x.dtype)


def finite(x: torch.Tensor) -> torch.Tensor:
    """x with its non-finite elements set to 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
