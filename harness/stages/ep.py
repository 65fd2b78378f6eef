"""Expert parallel: one routed MoE served by ep_size rank processes (stage routed_moe_ep).

The inputs hold every rank's experts (E = ep_size * shape.n_experts, global ids 0 .. E-1);
rank r owns global experts r*n .. r*n + n - 1 and runs the adapter's `routed_moe_rank` (a
runner of its local experts, built from the same global weights, given GLOBAL top-k ids). The
harness owns the process group (harness.ranks) and the combine:
- `allreduce`: every rank runs every token; the ranks' partial outputs are summed in fp32 by
  all-reduce, then cast to bf16.
- `alltoall`: rank s owns a contiguous shard of the tokens; all-to-all sends each rank only the
  tokens with a slot on its experts (with their ids, weights and warm-up rows); the partial
  rows come back by all-to-all and each owner sums them in fp32 in rank order, then casts.
Verdicts: `out` (the combined output against the reference over every expert, quantized with
the scales each rank calibrated for its own experts, within the routed_moe layer budget),
`partials` (each rank's partial output against the reference restricted to its experts and its
tokens: bit-exact for the reference adapter, within the budget for a kernel), `counts` (every
routed (token, slot) processed by exactly one rank, the right one: from each rank's expert
offsets and gather index). A failing count names the defect: a rank that processed the slots
of global experts 0..n-1 did not subtract its first expert id; a rank that processed none of
its slots dropped them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from harness import metrics, ranks, refcache
from harness.backends.reference import ReferenceAdapter
from harness.cases import Case, EpMode
from harness.stages.inputs import RoutedMoeInputs, layer_inputs, layer_inputs_from_tensors
from harness.stages.verdicts import Comparison, Outcome, append_note, compare_out


def dispatch(ids: torch.Tensor, world: int, n_local: int) -> list[torch.Tensor]:
    """Per rank, the tokens (ascending) with at least one slot on its experts."""
    rank_of = torch.where((ids >= 0) & (ids < world * n_local), ids // n_local, -1)
    return [torch.nonzero((rank_of == r).any(dim=1)).flatten() for r in range(world)]


def owned(tokens: int, world: int) -> list[torch.Tensor]:
    """alltoall: the contiguous token shard each rank holds before dispatch."""
    return list(torch.arange(tokens).tensor_split(world))


def _subset(d: RoutedMoeInputs, idx: torch.Tensor) -> RoutedMoeInputs:
    idx = idx.to(d.x.device)
    cal = None if d.calib_sample is None else d.calib_sample[idx]
    return dataclasses.replace(
        d, x=d.x[idx], topk_ids=d.topk_ids[idx], topk_weights=d.topk_weights[idx], calib_sample=cal
    )


# --------------------------------------------------------------------------------------------
# the rank side (runs in harness.ranks' processes)


def _a2a(ctx: ranks.RankContext, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """all_to_all_single of rows of x (send[j] rows to rank j), on the collective device."""
    import torch.distributed as dist

    src = x.to(ctx.collective_device).contiguous()
    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=src.device)
    dist.all_to_all_single(out, src, recv, send)
    return out.to(x.device)


def rank_task(ctx: ranks.RankContext, payload: tuple[Case, Any, str]) -> str:
    """One rank of a case: dispatch, the adapter's partial, combine; saves and returns a path."""
    import torch.distributed as dist

    case, adapter, inputs_path = payload
    r, w, n = ctx.rank, ctx.world, case.shape.n_experts
    tensors = torch.load(inputs_path, mmap=True)
    d = layer_inputs_from_tensors(case, tensors, inputs_path).to(torch.device(ctx.device))
    t = d.x.shape[0]
    recv = torch.arange(t)
    with torch.no_grad():
        if case.ep_mode is EpMode.ALLTOALL:
            mine = owned(t, w)[r]
            dest = dispatch(d.topk_ids[mine.to(d.x.device)].cpu(), w, n)  # positions in mine
            send = [int(x.numel()) for x in dest]
            counts = _a2a(ctx, torch.tensor(send), [1] * w, [1] * w)
            recv_n = [int(c) for c in counts]
            order = torch.cat(dest)
            recv = _a2a(ctx, mine[order], send, recv_n)  # global token ids, ascending
            local = _subset(d, mine)
            parts = {
                k: _a2a(ctx, getattr(local, k)[order.to(d.x.device)], send, recv_n)
                for k in ("x", "topk_ids", "topk_weights")
                + (() if d.calib_sample is None else ("calib_sample",))
            }
            d = dataclasses.replace(d, **parts)
        stages = d.call_rank(adapter, r, w)
        out = stages.get("out") if isinstance(stages, dict) else None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(d.x.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"routed_moe_rank returned 'out' {got}, expected {tuple(d.x.shape)}")
        if case.ep_mode is EpMode.ALLREDUCE:
            acc = out.float().to(ctx.collective_device)
            dist.all_reduce(acc)
            combined, combined_tokens = acc.to(torch.bfloat16).cpu(), torch.arange(t)
        else:
            back = _a2a(ctx, out.float(), recv_n, send)  # rows of my tokens, by rank j
            acc = torch.zeros((mine.numel(), d.x.shape[1]), dtype=torch.float32)
            for pos, rows in zip(dest, back.cpu().split(send), strict=True):
                acc[pos] += rows  # rank 0's share first, then rank 1's, ...: a fixed order
            combined, combined_tokens = acc.to(torch.bfloat16), mine
    path = ctx.workdir / f"{Path(inputs_path).stem}.rank{r}.pt"
    keep = {k: stages[k] for k in ("expert_offsets", "gather_index") if k in stages}
    torch.save(
        {
            "out": out.cpu(),
            "tokens": recv.cpu(),  # the global token of each row of out
            **{k: v.cpu() for k, v in keep.items() if isinstance(v, torch.Tensor)},
            "combined": combined,
            "combined_tokens": combined_tokens.cpu(),
        },
        path,
    )
    return str(path)


# --------------------------------------------------------------------------------------------
# the parent side: the verdicts


def count_check(ids: torch.Tensor, world: int, n_local: int, got: list[dict]) -> Comparison:
    """Every routed (token, slot) processed exactly once, by the rank owning its expert.

    `got[r]`: rank r's "expert_offsets" (END offsets of its local experts), "gather_index"
    (the row of `tokens` each staged row came from) and "tokens" (global token of each row).
    Top-k ids of a token are distinct, so (token, global expert) names a slot."""
    e_all = world * n_local
    valid = (ids >= 0) & (ids < e_all)
    expected = torch.zeros((ids.shape[0], e_all), dtype=torch.int64)
    tok = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    expected.index_put_((tok[valid], ids[valid]), torch.ones(int(valid.sum()), dtype=torch.int64))
    seen = torch.zeros_like(expected)
    per_rank, notes = [], []
    for r, g in enumerate(got):
        lo, hi = r * n_local, (r + 1) * n_local
        want = int(expected[:, lo:hi].sum())
        if "expert_offsets" not in g or "gather_index" not in g:
            per_rank.append({"rank": r, "expected": want, "processed": None})
            notes.append(f"rank {r}: exposes no expert_offsets / gather_index (cannot count)")
            continue
        ends = g["expert_offsets"].long().tolist()
        sizes = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        experts = torch.repeat_interleave(torch.arange(lo, lo + len(sizes)), torch.tensor(sizes))
        tokens = g["tokens"][g["gather_index"].long()[: len(experts)]]
        mine = torch.zeros_like(expected)
        mine.index_put_((tokens, experts), torch.ones_like(tokens), accumulate=True)
        seen += mine
        per_rank.append({"rank": r, "expected": want, "processed": len(experts)})
        if torch.equal(mine, expected * _cols(e_all, lo, hi)):
            continue
        shifted = torch.zeros_like(expected)  # its tokens' slots on global experts 0..n-1
        rows = g["tokens"].long()
        shifted[rows, lo:hi] = expected[rows, :n_local]
        if len(experts) == 0 and want:  # before the offset: both are empty when its tokens
            last = " (the last rank)" if r == world - 1 else ""  # have no slot on 0..n-1
            notes.append(f"rank {r}{last}: tokens routed to rank {r} dropped (0 of {want} slots)")
        elif r and torch.equal(mine, shifted):
            notes.append(
                f"rank {r}: expert offset not subtracted (it processed the slots of global "
                f"experts 0..{n_local - 1} as its own: global ids used as local ids, "
                f"first_expert {lo} ignored)"
            )
        else:
            miss = int(((expected[:, lo:hi] - mine[:, lo:hi]).clamp_min(0)).sum())
            extra = int((mine - expected * _cols(e_all, lo, hi)).clamp_min(0).sum())
            notes.append(f"rank {r}: {miss} of its {want} slots missing, {extra} unexpected")
    lost = int(((expected == 1) & (seen == 0)).sum())
    doubled = int((seen > 1).sum())
    m = {
        "slots": int(expected.sum()),
        "processed": int(seen.sum()),
        "lost": lost,
        "doubled": doubled,
        "per_rank": per_rank,
        "equal": torch.equal(seen, expected) and not notes,
    }
    if m["equal"]:
        return Comparison("counts", Outcome.PASS, "", m)
    msg = f"{lost} of {m['slots']} routed (token, slot) pairs lost, {doubled} doubled"
    return Comparison("counts", Outcome.FAIL, "; ".join([msg, *notes]), {**m, "diagnoses": notes})


def _cols(e_all: int, lo: int, hi: int) -> torch.Tensor:
    c = torch.zeros(e_all, dtype=torch.int64)
    c[lo:hi] = 1
    return c


def _noise_floor(a: torch.Tensor, b: torch.Tensor) -> float:
    return metrics.error_panel(a.float(), b.float(), 0.0, 0.0)["calc_diff"]


def reference_ep(case: Case, declared: Any, d: RoutedMoeInputs) -> dict[str, Any]:
    """The reference side: per rank (its tokens, its restricted reference, its noise floor),
    then the reference over every expert with the ranks' calibrated scales, and its floor."""
    w, n = case.ep_size, case.shape.n_experts
    ids = d.topk_ids.cpu()
    toks = dispatch(ids, w, n) if case.ep_mode is EpMode.ALLTOALL else [torch.arange(len(ids))] * w
    per_rank, gs1, gs2 = [], [], []
    for r in range(w):
        d_r = _subset(d, toks[r])
        ref = d_r.call_rank(ReferenceAdapter(conventions=declared), r, w)
        second = d_r.call_rank(ReferenceAdapter(conventions=declared, oracle=True), r, w)
        per_rank.append((toks[r], ref["out"], _noise_floor(ref["out"], second["out"])))
        gs1.append(ref["x_q"][2].reshape(-1).expand(n))
        gs2.append(ref["act_q"][2].reshape(-1).expand(n))
    scales = (torch.cat(gs1), torch.cat(gs2))
    full = d.call(ReferenceAdapter(conventions=declared, scales=scales))["out"]
    second = d.call(ReferenceAdapter(conventions=declared, scales=scales, oracle=True))["out"]
    return {"ranks": per_rank, "out": full, "floor": _noise_floor(full, second)}


def run_ep(case: Case, adapter: Any, dev: torch.device) -> list[Comparison]:
    """A routed_moe_ep case: the ranks run it (harness.ranks), then the verdicts."""
    w, n = case.ep_size, case.shape.n_experts
    d = layer_inputs(case, dev)
    declared = adapter.conventions
    ref = refcache.cached("routed_moe_ep", case, lambda: reference_ep(case, declared, d), declared)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    g = ranks.group(w, kind)
    path = g.workdir / f"inputs-{case.digest}.pt"
    torch.save({k: v.cpu() for k, v in d.tensors().items() if v is not None}, path)
    try:
        paths = g.run(rank_task, (case, adapter, str(path)), case.timeout_s)
    except ranks.RankFailure as e:
        return [Comparison("case", e.outcome, str(e), {"rank": e.rank, "stderr_tail": e.tail})]
    finally:
        path.unlink(missing_ok=True)
    got = [torch.load(p) for p in paths]
    for p in paths:
        Path(p).unlink(missing_ok=True)
    counts = count_check(d.topk_ids.cpu(), w, n, got)
    partials = _partials(case, ref["ranks"], got)
    combined = torch.zeros_like(ref["out"].cpu())
    for gr in got:
        combined[gr["combined_tokens"]] = gr["combined"]
    out = compare_out(case, ref["out"].cpu(), combined, ref["floor"])
    out.metrics["ep_size"], out.metrics["ep_mode"] = w, case.ep_mode.value
    if out.outcome is Outcome.FAIL:  # the named defect first, then the numbers
        named = counts.metrics.get("diagnoses") or []
        out.message = "; ".join([*named, out.message])
        for c in (counts, partials):
            if c.outcome is Outcome.FAIL:
                append_note(out, f"{c.name}: {c.message}")
    return [out, counts, partials]


def _partials(case: Case, ref_ranks: list, got: list[dict]) -> Comparison:
    """Each rank's partial output against the reference restricted to its experts and tokens."""
    per_rank, bad, worst = [], [], None
    for r, ((toks, r_out, floor), g) in enumerate(zip(ref_ranks, got, strict=True)):
        if not torch.equal(g["tokens"], toks):
            per_rank.append({"rank": r, "tokens_match": False})
            bad.append(
                f"rank {r}: received tokens {g['tokens'].tolist()[:8]}, expected "
                f"{toks.tolist()[:8]} (dispatch)"
            )
            continue
        if toks.numel() == 0:  # no slot of this rank's experts among the tokens: nothing to run
            per_rank.append({"rank": r, "tokens": 0, "bit_exact": g["out"].numel() == 0})
            continue
        c = compare_out(case, r_out.cpu(), g["out"], floor)
        exact = metrics.equal_nan(r_out.cpu(), g["out"])
        per_rank.append(
            {
                "rank": r,
                "bit_exact": exact,
                **{k: c.metrics[k] for k in ("calc_diff", "budget_calc_diff", "gain", "max_abs")},
            }
        )
        if c.outcome is Outcome.FAIL:
            zero = not bool(g["out"].float().abs().sum()) and bool(r_out.float().abs().sum())
            bad.append(f"rank {r}: {'partial output all zero; ' if zero else ''}{c.message}")
        if worst is None or c.metrics["calc_diff"] > worst.metrics["calc_diff"]:
            worst = c
    m = dict(worst.metrics) if worst is not None else {}
    m["per_rank"] = per_rank
    m["bit_exact_ranks"] = sum(bool(p.get("bit_exact")) for p in per_rank)
    return Comparison("partials", Outcome.FAIL if bad else Outcome.PASS, "; ".join(bad), m)


__all__ = ["count_check", "dispatch", "owned", "rank_task", "reference_ep", "run_ep"]
