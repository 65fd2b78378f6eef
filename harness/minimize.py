"""Input minimisation and parameter bisection: the smallest input, and the parameter value, at
which a failure still shows (docs/bisect.md).

`minimize(case, adapter)` delta-debugs (Zeller's ddmin: 1-minimal, every single removal makes the
failure vanish) the case's inputs while its failure persists: first the tokens (rows), then the
experts (routed MoE and grouped GEMM), then the K blocks (16 elements of the contraction dim set
to zero: the blocks that must stay). "Persists" means the comparison that failed first on the
whole input still fails. Layer cases shrink the tensors of
`harness.stages.inputs.layer_inputs` (the calibration sample is kept, so the static scales do
not move; a routed MoE's shrinks with its tokens, as the adapters calibrate it with x's routing)
and are judged by `harness.stages.run.run_case`; stage cases shrink their teacher-forced step
(harness.trace `Step`: the static global scale is kept) and are judged by the stage comparators
and the case's probe. A minimal layer input can be saved as a bundle.

`bisect_param(case, adapter, field, lo, hi)` bisects a numeric case field (`scale_ratio`,
`limit`, `tokens`) between a passing and a failing value to a relative precision (geometric
steps; whole numbers for tokens), assuming one threshold between them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import inputs, probes, trace
from harness.cases import AXES, Case, Stage
from harness.stages.inputs import LayerInputs, layer_inputs
from harness.stages.run import run_case
from reference.nvfp4 import BLOCK


def ddmin(items: list[int], fails: Callable[[list[int]], bool]) -> list[int]:
    """A 1-minimal sublist of `items` (which must fail) for which `fails` still holds."""
    n = 2
    while len(items) >= 2:
        size = math.ceil(len(items) / n)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        for c in chunks:
            if fails(c):
                items, n = c, 2
                break
        else:
            for i in range(len(chunks)):
                rest = [x for j, c in enumerate(chunks) if j != i for x in c]
                if len(chunks) > 2 and fails(rest):  # with 2 chunks a complement is a chunk
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return items


@dataclass
class Minimized:
    """A minimal failing input: the kept token rows, experts and K blocks (of the original)."""

    case_id: str
    failing: str  # the comparison whose failure was kept
    tokens: list[int]
    experts: list[int] | None  # None: the case has no experts to drop
    k_blocks: list[int]  # blocks that must stay nonzero (others zeroed)
    n_k_blocks: int
    runs: int = 0
    inputs: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # layer cases

    def summary(self) -> str:
        e = "" if self.experts is None else f", experts {self.experts}"
        return (
            f"minimal failing input of {self.case_id} ({self.failing} fails): tokens "
            f"{self.tokens}{e}, K blocks {self.k_blocks} of {self.n_k_blocks} "
            f"(the rest zeroed); {self.runs} runs"
        )


# --------------------------------------------------------------------------------------------
# shrinking a layer case's inputs


def _layer_shrink(case: Case, d: dict[str, Any], tokens, experts, blocks_kept) -> dict[str, Any]:
    key = "o" if case.stage is Stage.GROUPED_LINEAR else "x"
    idx = torch.tensor(tokens, dtype=torch.long, device=d[key].device)
    out = dict(d)
    x = d[key][idx].clone()
    n_blocks = x.shape[-1] // BLOCK
    for b in range(n_blocks):
        if b not in blocks_kept:
            x[..., b * BLOCK : (b + 1) * BLOCK] = 0
    out[key] = x
    if case.stage is Stage.ROUTED_MOE:
        ids = d["topk_ids"][idx].clone()
        local = ids - inputs.first_expert(case)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        for e in experts:
            keep |= local == e
        out["topk_ids"] = torch.where(keep, ids, torch.full_like(ids, -1))
        out["topk_weights"] = d["topk_weights"][idx]
        # the adapters calibrate a routed MoE on a warm-up batch with x's own routing
        out["calib_sample"] = d["calib_sample"][idx]
    return out


# --------------------------------------------------------------------------------------------
# shrinking a stage case's teacher-forced step


def _step_shrink(step: trace.Step, tokens, experts, blocks_kept) -> trace.Step:
    d = step.inputs
    if step.method == "grouped_gemm":
        ops = d["ops"]
        ends = ops.expert_offsets.cpu().tolist()
        expert = torch.zeros(ops.a_codes.shape[0], dtype=torch.long)
        for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
            expert[s:t] = e
        rows = [r for r in tokens if int(expert[r]) in experts]
        idx = torch.tensor(rows, dtype=torch.long)
        counts = torch.bincount(expert[idx], minlength=len(ends))
        offsets = torch.cumsum(counts, 0).to(torch.int32).to(ops.a_codes.device)
        idx = idx.to(ops.a_codes.device)
        codes, scales = ops.a_codes[idx].clone(), ops.a_scales[idx].clone()
        for b in range(scales.shape[1]):
            if b not in blocks_kept:
                codes[:, b * BLOCK // 2 : (b + 1) * BLOCK // 2] = 0
                scales.view(torch.uint8)[:, b] = 0
        b_q = (ops.b_codes, ops.b_scales, ops.global_scale_b)
        new = trace.gemm_ops((codes, scales, ops.global_scale_a), b_q, offsets)
        return dataclasses.replace(step, inputs={"ops": new}, rows=trace.Rows(offsets.cpu()))
    key = "x" if step.method == "quantize" else "l1"
    x = d[key][torch.tensor(tokens, dtype=torch.long, device=d[key].device)].clone()
    halves = [x] if step.method == "quantize" else list(x.chunk(2, dim=-1))  # gate | up
    for h in halves:
        for b in range(h.shape[-1] // BLOCK):
            if b not in blocks_kept:
                h[:, b * BLOCK : (b + 1) * BLOCK] = 0
    x = halves[0] if step.method == "quantize" else torch.cat(halves, dim=-1)
    offs = torch.tensor([len(tokens)], dtype=torch.int32, device=x.device)
    inputs = {**d, key: x, "offsets": offs}
    return dataclasses.replace(step, inputs=inputs, rows=trace.Rows(offs.cpu()))


def _failures_of_step(step: trace.Step, adapter: Any, case: Case) -> list[str]:
    names = [c.name for c in trace.run_step(step, adapter).comparisons if c.outcome.value == "fail"]
    if case.probe is not None and step.method == "grouped_gemm":
        c = probes.check(case.probe, step.inputs["ops"], adapter)
        names += [c.name] if c.outcome.value == "fail" else []
    return names


def _failures_of_layer(case: Case, adapter: Any, d: dict[str, Any]) -> list[str]:
    n = d["o" if case.stage is Stage.GROUPED_LINEAR else "x"].shape[0]
    rows = run_case(dataclasses.replace(case, tokens=n), adapter, d)
    return [c.name for c in rows if c.outcome.value == "fail"]


def minimize(
    case: Case,
    adapter: Any,
    given: LayerInputs | Mapping[str, torch.Tensor] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> Minimized:
    """The minimal failing input of a failing case (module docstring). ValueError if it passes."""
    dev = torch.device(case.device)
    with torch.no_grad():
        if case.stage.is_layer:
            # shrunk as tensors by name; run_case rebuilds the case's input type from them
            if given is None:
                d = layer_inputs(case, dev).tensors()
            else:
                d = dict(given.tensors() if isinstance(given, LayerInputs) else given)
            key = "o" if case.stage is Stage.GROUPED_LINEAR else "x"
            n_tok, n_blocks = d[key].shape[0], d[key].shape[-1] // BLOCK
            experts = list(range(case.shape.n_experts)) if case.stage is Stage.ROUTED_MOE else None

            def failures(tokens, exps, blocks):
                return _failures_of_layer(
                    case, adapter, _layer_shrink(case, d, tokens, exps, blocks)
                )
        else:
            (step,) = trace.case_steps(case, adapter, dev)
            if step.method == "grouped_gemm":
                ops = step.inputs["ops"]
                n_tok, n_blocks = ops.a_codes.shape[0], ops.a_scales.shape[1]
                experts = list(range(ops.b_codes.shape[0]))
            else:
                x = step.inputs["x" if step.method == "quantize" else "l1"]
                n_tok = x.shape[0]
                n_blocks = x.shape[1] // BLOCK // (1 if step.method == "quantize" else 2)
                experts = None

            def failures(tokens, exps, blocks):
                shrunk = _step_shrink(step, tokens, exps if exps is not None else [0], blocks)
                return _failures_of_step(shrunk, adapter, case)

        all_tokens, all_blocks = list(range(n_tok)), list(range(n_blocks))
        first = failures(all_tokens, experts, all_blocks)
        if not first:
            raise ValueError(f"minimize: {case.id} passes on {adapter.name}: nothing to minimise")
        target, runs = first[0], [1]

        def still(tokens, exps, blocks) -> bool:
            runs[0] += 1
            return bool(tokens) and target in failures(tokens, exps, blocks)

        say(f"minimize {case.id}: keeping the failure of {target}; {n_tok} tokens")
        tokens = ddmin(all_tokens, lambda t: still(t, experts, all_blocks))
        say(f"  tokens: {len(tokens)} left ({runs[0]} runs)")
        exps = experts
        if experts is not None and len(experts) > 1:
            exps = ddmin(experts, lambda e: still(tokens, e, all_blocks))
            say(f"  experts: {exps} ({runs[0]} runs)")
        blocks: list[int] = []
        if not still(tokens, exps, []):  # the failure needs some nonzero K blocks
            blocks = ddmin(all_blocks, lambda b: still(tokens, exps, b))
        say(f"  K blocks kept: {blocks} of {n_blocks} ({runs[0]} runs)")
    kept = _layer_shrink(case, d, tokens, exps, blocks) if case.stage.is_layer else None
    return Minimized(case.id, target, tokens, exps, blocks, n_blocks, runs[0], kept)


# --------------------------------------------------------------------------------------------
# parameter bisection

PARAMS = {"scale_ratio": "scale_ratios", "limit": "limits", "tokens": "tokens"}


@dataclass
class ParamThreshold:
    """Where a case starts failing along one numeric field: passes at `passes`, fails at `fails`."""

    case_id: str
    param: str
    passes: float
    fails: float
    runs: int
    history: list[tuple[float, bool]]

    def summary(self) -> str:
        return (
            f"{self.case_id}: {self.param} passes at {self.passes:.6g}, fails at {self.fails:.6g} "
            f"(threshold within {abs(self.fails / self.passes - 1) * 100:.3g}%; {self.runs} runs)"
        )


def bisect_param(
    case: Case,
    adapter: Any,
    param: str,
    lo: float,
    hi: float,
    precision: float = 0.01,
    criterion: str = "fail",
    say: Callable[[str], None] = lambda line: None,
) -> ParamThreshold:
    """Bisect `param` between `lo` and `hi` (one passes, the other fails) to `precision`
    (relative; tokens to one) with `criterion` "fail" (a comparison fails) or "nan" (the trace
    names a culprit: a NaN, Inf or new saturation is born)."""
    if param not in PARAMS:
        raise ValueError(f"bisect-param: --param must be one of {', '.join(PARAMS)}, got {param!r}")
    if PARAMS[param] not in AXES[case.stage]:
        raise ValueError(
            f"bisect-param: {param} is not a parameter of stage {case.stage.value} "
            f"(its axes: {', '.join(AXES[case.stage])})"
        )
    if criterion not in ("fail", "nan"):
        raise ValueError(f"bisect-param: --criterion must be fail or nan, got {criterion!r}")
    integer = param == "tokens"
    if not 0 < lo < hi:
        raise ValueError(f"bisect-param: needs 0 < lo < hi, got lo={lo} hi={hi}")
    history: list[tuple[float, bool]] = []

    def bad(v: float) -> bool:
        c = dataclasses.replace(case, **{param: int(v) if integer else float(v)})
        if criterion == "nan":
            r = trace.trace_case(c, adapter).culprit is not None
        else:
            r = any(x.outcome.value == "fail" for x in run_case(c, adapter))
        history.append((v, r))
        say(f"  {param}={v:.6g}: {'bad' if r else 'good'}")
        return r

    b_lo, b_hi = bad(lo), bad(hi)
    if b_lo == b_hi:
        state = "fails" if b_lo else "passes"
        raise ValueError(f"bisect-param: {case.id} {state} at both {param}={lo:g} and {hi:g}")
    while (hi - lo > 1) if integer else (hi / lo - 1 > precision):
        mid = (lo + hi) // 2 if integer else math.sqrt(lo * hi)
        if bad(mid) == b_lo:
            lo = mid
        else:
            hi = mid
    good, failing = (hi, lo) if b_lo else (lo, hi)
    return ParamThreshold(case.id, param, good, failing, len(history), history)


__all__ = ["Minimized", "ParamThreshold", "bisect_param", "ddmin", "minimize"]
