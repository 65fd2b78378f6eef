"""NaN birth trace: where a NaN, an Inf or a saturated block scale is born (docs/bisect.md).

Two views of one case on one adapter, each a list of rows with the statistics of one
intermediate (NaN, Inf, finite amax, zero fraction, block-scale bytes 0x7F = NaN and 0x7E =
saturated 448) and the position of its first bad element (row, token, expert, block):
- end to end (layer cases): the reference's and the kernel's named intermediates of one layer
  run, in the reference's order. The culprit is the first stage whose input is clean and whose
  output is not; later bad stages only propagate it. A bad layer input makes the culprit "input".
- teacher forced (every case): each kernel stage (quantize, grouped GEMM, SwiGLU + requantize) is
  fed the reference's own inputs (for a layer: the reference layer's intermediates) and judged by
  the stage comparators of harness.stages; the first that fails is the first divergent stage.
"Bad" is NaN or Inf, or a saturated scale byte where the reference's byte is not (an Inf the
quantizer clamped to 448 leaves only that trace). Steps are data (`Step`: the stage's inputs as
tensors), so harness.minimize and harness.probes reuse them on shrunken or perturbed inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.adapters import (
    GemmOperands,
    QuantizedOperand,
    from_adapter_scale,
    poisoned,
    to_adapter_scale,
)
from harness.backends.reference import ReferenceAdapter
from harness.cases import Case, Stage, Tolerance
from harness.metrics import nonfinite_stats
from harness.stages.inputs import (
    LayerInputs,
    gemm_operands,
    layer_inputs,
    layer_inputs_from_tensors,
    quantize_inputs,
    run_layer,
    swiglu_inputs,
)
from harness.stages.verdicts import Comparison, Outcome, compare_bounded, compare_quantized
from reference.activation import swiglu
from reference.gemm import grouped_gemm_error_bound, grouped_gemm_nvfp4
from reference.layouts import assemble_scales_2d_side_from_offsets, assemble_scales_3d_side
from reference.nvfp4 import BLOCK, ScaleConvention

NAN_BYTE, SAT_BYTE = 0x7F, 0x7E  # e4m3 NaN and 448 (the largest finite scale), sign bit masked
SKIPPED = ("expert_offsets", "gather_index", "row_weight")  # routing metadata, not numbers


# --------------------------------------------------------------------------------------------
# statistics and positions


def stats(value: Any) -> dict[str, Any]:
    """nan, inf, amax, zero_frac, nan_bytes (0x7F / 0xFF), sat_bytes (0x7E / 0xFE) and the scale
    byte histogram of one intermediate. Quantized (codes, scales, gs): amax is the largest finite
    block scale, zero_frac the codes' share of zero magnitude, nan counts NaN scale bytes."""
    if isinstance(value, tuple):
        codes, scales = value[0], value[1]
        s = nonfinite_stats(scales)
        b = scales.view(torch.uint8) & 0x7F
        gs = torch.as_tensor(value[2]).float() if len(value) > 2 else torch.ones(1)
        return {
            "nan": s["nan"] + int(torch.isnan(gs).sum()),
            "inf": int(torch.isinf(gs).sum()),
            "amax": s["amax"],
            "zero_frac": nonfinite_stats(codes)["zero_frac"],
            "nan_bytes": int((b == NAN_BYTE).sum()),
            "sat_bytes": int((b == SAT_BYTE).sum()),
            "scale_byte_hist": s.get("scale_byte_hist", {}),
        }
    s = nonfinite_stats(value)
    return {k: s[k] for k in ("nan", "inf", "amax", "zero_frac")} | {"nan_bytes": 0, "sat_bytes": 0}


def _first(mask: torch.Tensor) -> tuple[int, int] | None:
    """(row, column) of the first True of a 2-D mask, or None."""
    m = mask.reshape(mask.shape[0], -1) if mask.dim() > 1 else mask.reshape(-1, 1)
    flat = m.reshape(-1)
    if not flat.numel() or not bool(flat.any()):
        return None
    i = int(torch.argmax(flat.to(torch.uint8)))
    return divmod(i, m.shape[1])


def first_bad(value: Any, reference: Any = None) -> tuple[str, int, int] | None:
    """(kind, row, block) of the first bad element: NaN / Inf, else a saturated scale byte where
    `reference` (same layout) has none. Blocks are along the last dim (16 elements; a scale's
    column is its block)."""
    if isinstance(value, tuple):
        b = value[1].view(torch.uint8) & 0x7F
        at = _first(b == NAN_BYTE)
        if at is not None:
            return ("nan", at[0], at[1])
        if reference is not None and reference[1].shape == value[1].shape:
            rb = reference[1].view(torch.uint8) & 0x7F
            at = _first((b == SAT_BYTE) & (rb != SAT_BYTE))
            if at is not None:
                return ("saturated", at[0], at[1])
        return None
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return None
    v = value.reshape(value.shape[0], -1) if value.dim() > 1 else value.reshape(-1, 1)
    for kind, mask in (("nan", torch.isnan(v)), ("inf", torch.isinf(v))):
        at = _first(mask)
        if at is not None:
            return (kind, at[0], at[1] // BLOCK)
    return None


@dataclass(frozen=True)
class Rows:
    """How a stage's rows map to tokens and experts: END offsets per group and the token of each
    row (None: row r is token r)."""

    offsets: torch.Tensor
    tokens: torch.Tensor | None = None
    group: str = "expert"

    def locate(self, row: int, block: int) -> dict[str, int]:
        ends = self.offsets.cpu().tolist()
        g = next((i for i, e in enumerate(ends) if row < e), len(ends) - 1)
        token = row if self.tokens is None else int(self.tokens[row])
        if not self.group:  # token-level tensors (layer input and output)
            return {"token": token, "block": block}
        return {"row": row, "token": token, self.group: g, "block": block}


def position(value: Any, rows: Rows, reference: Any = None) -> dict[str, Any] | None:
    bad = first_bad(value, reference)
    if bad is None:
        return None
    return {"kind": bad[0], **rows.locate(bad[1], bad[2])}


def is_bad(value: Any, reference: Any = None) -> bool:
    return first_bad(value, reference) is not None


# --------------------------------------------------------------------------------------------
# teacher-forced steps


@dataclass
class Step:
    """One kernel stage on given inputs (decode-convention scales): `method` is the adapter's
    stage method, `inputs` its tensors: quantize {x, gs [G] or None, offsets}, grouped_gemm
    {ops}, swiglu_requant {l1, gs [G], offsets} (+ `limit`)."""

    name: str
    method: str
    inputs: dict[str, Any]
    rows: Rows
    limit: float | None = None
    exact: bool = False

    def input_bad(self) -> bool:
        d = self.inputs
        if self.method == "grouped_gemm":
            o = d["ops"]
            a_bad = is_bad((o.a_codes, o.a_scales, o.global_scale_a))
            return a_bad or is_bad((o.b_codes, o.b_scales, o.global_scale_b))
        return is_bad(d["x"] if self.method == "quantize" else d["l1"])


def gemm_ops(a_q: tuple, b_q: tuple, offsets: torch.Tensor) -> GemmOperands:
    """Decode-convention operands from quantized activations (codes, scales, gs [E]) and weights
    (codes [E, K/2, N], scales [E, K/16, N], gs [E]), with the reference's assembled scales."""
    e = b_q[0].shape[0]
    gsa = torch.as_tensor(a_q[2]).float().reshape(-1).expand(e).contiguous()
    a_sw, a_rows = assemble_scales_2d_side_from_offsets(a_q[1], offsets)
    b_sw = assemble_scales_3d_side(list(b_q[1]))
    gsb = torch.as_tensor(b_q[2]).float().reshape(e)
    a, b = QuantizedOperand(a_q[0], a_q[1], gsa), QuantizedOperand(*b_q[:2], gsb)
    return GemmOperands(a, b, offsets, a_sw, a_rows, b_sw)


def _one_group(t: int) -> Rows:
    return Rows(torch.tensor([t], dtype=torch.int32))


def adapter_ops(ops: GemmOperands, convention: ScaleConvention) -> GemmOperands:
    """Decode-convention operands with their global scales in the adapter's `convention`."""
    return ops.with_global_scales(
        to_adapter_scale(ops.global_scale_a, convention),
        to_adapter_scale(ops.global_scale_b, convention),
    )


def case_steps(case: Case, adapter: Any, dev: torch.device) -> list[Step]:
    """The teacher-forced steps of a stage case: its one stage on the case's own inputs."""
    exact = case.tolerance is Tolerance.EXACT or case.distribution.exact
    if case.stage is Stage.QUANTIZE:
        x, gs = quantize_inputs(case, dev)
        gs = None if gs is None else gs.reshape(1)
        offs = torch.tensor([x.shape[0]], dtype=torch.int32, device=dev)
        return [
            Step(
                "quantize",
                "quantize",
                {"x": x, "gs": gs, "offsets": offs},
                _one_group(x.shape[0]),
                exact=exact,
            )
        ]
    if case.stage is Stage.GROUPED_GEMM:
        ops, _ = gemm_operands(case, dev, ScaleConvention.DECODE)
        return [Step("grouped_gemm", "grouped_gemm", {"ops": ops}, Rows(ops.expert_offsets))]
    if case.stage is Stage.SWIGLU_REQUANT:
        l1, _, gs = swiglu_inputs(case, dev, adapter.conventions)
        offs = torch.tensor([l1.shape[0]], dtype=torch.int32, device=dev)
        d = {"l1": l1, "gs": gs.reshape(1), "offsets": offs}
        rows = _one_group(l1.shape[0])
        return [Step("swiglu_requant", "swiglu_requant", d, rows, case.limit, exact)]
    raise ValueError(f"trace: stage {case.stage.value} has no numeric stage to trace")


def layer_rows_in(case: Case, r: dict[str, Any], d: LayerInputs) -> tuple[torch.Tensor, Rows]:
    """The rows a layer's first quantize sees, and how they map to tokens and groups."""
    if case.stage is Stage.GROUPED_LINEAR:
        o = d.o
        t, g = o.shape[0], case.shape.n_groups
        x = o.reshape(t, g, -1).transpose(0, 1).reshape(g * t, -1)
        tokens = torch.arange(g * t) % max(t, 1)
        return x, Rows(r["expert_offsets"], tokens, "group")
    if case.stage is Stage.ROUTED_MOE:
        return d.x[r["gather_index"]], Rows(r["expert_offsets"], r["gather_index"].cpu())
    t = d.x.shape[0]
    return d.x, Rows(torch.tensor([t], dtype=torch.int32, device=d.x.device))


def layer_steps(case: Case, r: dict[str, Any], d: LayerInputs) -> list[Step]:
    """Teacher-forced steps of a layer: each stage on the reference layer's own intermediates."""
    x, rows = layer_rows_in(case, r, d)
    offs = rows.offsets.to(x.device)
    steps = [Step("x_q", "quantize", {"x": x, "gs": r["x_q"][2], "offsets": offs}, rows)]
    w1 = "w_q" if "w_q" in r else "w13_q"
    name1 = "gemm_out" if "gemm_out" in r else "l1_out"
    steps.append(Step(name1, "grouped_gemm", {"ops": gemm_ops(r["x_q"], r[w1], offs)}, rows))
    if "act_q" in r:
        d2 = {"l1": r["l1_out"], "gs": r["act_q"][2], "offsets": offs}
        steps.append(Step("act_q", "swiglu_requant", d2, rows, case.limit))
        ops2 = gemm_ops(r["act_q"], r["w2_q"], offs)
        steps.append(Step("l2_out", "grouped_gemm", {"ops": ops2}, rows))
    return steps


def _groups(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    ends = offsets.cpu().tolist()
    return [(g, s, e) for g, (s, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True))]


@dataclass
class StepRun:
    """A step's reference and kernel outputs and the stage comparators' verdicts."""

    step: Step
    ref_out: Any
    out: Any
    comparisons: list[Comparison]

    @property
    def failed(self) -> bool:
        return any(c.outcome is Outcome.FAIL for c in self.comparisons)


def run_step(step: Step, adapter: Any) -> StepRun:
    """Run one step on the reference and on `adapter` (outputs poisoned first), and judge it."""
    conv = adapter.conventions
    cv = conv.global_scale
    reference = ReferenceAdapter(conventions=conv)
    d = step.inputs
    if step.method == "grouped_gemm":
        ops = d["ops"]
        oracle = grouped_gemm_nvfp4(*ops.plain(), oracle=True)
        bound = grouped_gemm_error_bound(*ops.plain(), out_dtype=torch.bfloat16)
        out = poisoned(
            (ops.a_codes.shape[0], ops.b_codes.shape[-1]), torch.bfloat16, ops.a_codes.device
        )
        adapter.grouped_gemm(adapter_ops(ops, cv), out)
        # a NaN / Inf the reference has at the same place came in with the inputs: not judged
        same = ~torch.isfinite(oracle) & (
            (out.double() == oracle) | (torch.isnan(out) & torch.isnan(oracle))
        )
        o_j, r_j = out.masked_fill(same, 0), oracle.masked_fill(same, 0)
        c = compare_bounded(step.name, r_j, o_j, bound.masked_fill(same, 0), ops.expert_offsets)
        return StepRun(step, oracle, out, [c])
    x = d["x"] if step.method == "quantize" else d["l1"]
    dev, n_out = x.device, x.shape[1] if step.method == "quantize" else x.shape[1] // 2
    shapes = ((x.shape[0], n_out // 2), (x.shape[0], n_out // BLOCK))
    dtypes = (torch.uint8, torch.float8_e4m3fn)
    rc, rs = (poisoned(s, t, dev) for s, t in zip(shapes, dtypes, strict=True))
    kc, ks = (poisoned(s, t, dev) for s, t in zip(shapes, dtypes, strict=True))
    comps: list[Comparison] = []
    gs_out = []
    for g, s, e in _groups(d["offsets"]):
        if e == s:
            continue
        gs = None if d["gs"] is None else torch.as_tensor(d["gs"]).float().reshape(-1)[g]
        if step.method == "quantize":
            r_gs = reference.quantize(x[s:e], gs, rc[s:e], rs[s:e])
            k_gs = adapter.quantize(x[s:e], to_adapter_scale(gs, cv), kc[s:e], ks[s:e])
            gs_out.append(from_adapter_scale(k_gs, cv))
            act = x[s:e]
        else:
            reference.swiglu_requant(x[s:e], step.limit, gs, rc[s:e], rs[s:e])
            adapter.swiglu_requant(x[s:e], step.limit, to_adapter_scale(gs, cv), kc[s:e], ks[s:e])
            r_gs = gs
            act = swiglu(x[s:e], step.limit, conv.swiglu_variant, conv.gate_first)
        rows = compare_quantized(  # judged at the reference's global scale
            step.name,
            act,
            QuantizedOperand(rc[s:e], rs[s:e], r_gs),
            QuantizedOperand(kc[s:e], ks[s:e], r_gs),
            step.exact,
            conv.policies,
        )
        for c in rows:
            if c.outcome is Outcome.FAIL and len(d["offsets"]) > 1:
                c.message = f"{step.rows.group} {g}: {c.message}"
        comps += rows
    gs_k = (
        torch.stack([torch.as_tensor(v).float().reshape(()) for v in gs_out])
        if gs_out
        else (torch.ones(1))
    )
    return StepRun(step, (rc, rs), (kc, ks, gs_k), comps)


def divergence(run: StepRun) -> dict[str, Any] | None:
    """Position of the first element the step's comparators reject (None when it passes)."""
    if not run.failed:
        return None
    if isinstance(run.out, tuple):
        diff_s = run.out[1].view(torch.uint8) != run.ref_out[1].view(torch.uint8)
        diff_c = run.out[0] != run.ref_out[0]
        at_s, at_c = _first(diff_s), _first(diff_c)
        opts = [] if at_s is None else [at_s]
        if at_c is not None:
            opts.append((at_c[0], at_c[1] * 2 // BLOCK))  # two codes per byte
        row, block = min(opts)
        return run.step.rows.locate(row, block)
    first = next(
        (c.metrics.get("first_outside") for c in run.comparisons if c.metrics.get("first_outside")),
        None,
    )
    if first is None:
        return None
    return run.step.rows.locate(int(first[0]), int(first[1]) // BLOCK)


# --------------------------------------------------------------------------------------------
# the trace


@dataclass
class TraceRow:
    """One intermediate of one side: its stats, first bad element and role in the trace."""

    part: str  # "layer" (end to end) or "forced" (teacher forced)
    stage: str
    side: str  # "reference" or "kernel"
    stats: dict[str, Any]
    bad: dict[str, Any] | None = None
    verdict: str = ""  # forced kernel rows: pass / fail
    role: str = ""  # culprit, propagates, diverges


@dataclass
class Trace:
    case_id: str
    backend: str
    rows: list[TraceRow] = field(default_factory=list)
    culprit: dict[str, Any] | None = None  # {stage, part, position}
    propagators: list[str] = field(default_factory=list)
    first_divergent: dict[str, Any] | None = None  # {stage, position, message}

    def summary(self) -> str:
        parts = []
        if self.culprit:
            p = self.culprit["position"] or {}
            parts.append(f"culprit {self.culprit['stage']} ({self.culprit['part']}) {_pos(p)}")
            if self.propagators:
                parts.append(f"propagated by {', '.join(self.propagators)}")
        else:
            parts.append("no NaN, Inf or new saturation in any stage")
        if self.first_divergent:
            f = self.first_divergent
            parts.append(f"first divergent (teacher forced) {f['stage']} {_pos(f['position'])}")
        else:
            parts.append("no stage diverges under teacher forcing")
        return "; ".join(parts)


def _pos(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    return "at " + " ".join(f"{k}={v}" for k, v in p.items())


def _flat(v: Any) -> Any:
    return v.reshape(v.shape[0], -1) if isinstance(v, torch.Tensor) else v


def _layer_part(case: Case, adapter: Any, d: LayerInputs, tr: Trace) -> dict[str, Any]:
    declared = adapter.conventions
    r = run_layer(case, ReferenceAdapter(conventions=declared), d)
    k = run_layer(case, adapter, d)
    _, rows = layer_rows_in(case, r, d)
    inp = d.o if case.stage is Stage.GROUPED_LINEAR else d.x
    t = inp.shape[0]
    token_rows = Rows(torch.tensor([t], dtype=torch.int32), group="")
    order = ["input"] + [n for n in r if not n.startswith("w") and n not in SKIPPED]
    prev_bad = None
    for name in order:
        rv = inp if name == "input" else r[name]
        kv = inp if name == "input" else k.get(name)
        where = token_rows if name in ("input", "out") else rows
        tr.rows.append(TraceRow("layer", name, "reference", stats(rv), position(_flat(rv), where)))
        if kv is None:
            continue  # the kernel does not expose this stage
        pos = position(_flat(kv), where, _flat(rv) if isinstance(rv, tuple) else None)
        row = TraceRow("layer", name, "kernel", stats(kv), pos)
        tr.rows.append(row)
        bad = pos is not None
        if bad and tr.culprit is None and not prev_bad:
            tr.culprit = {"stage": name, "part": "layer", "position": pos}
            row.role = "culprit"
        elif bad and tr.culprit is not None:
            tr.propagators.append(name)
            row.role = "propagates"
        prev_bad = bad
    return r


def trace_case(
    case: Case, adapter: Any, inputs: LayerInputs | Mapping[str, torch.Tensor] | None = None
) -> Trace:
    """The NaN trace of one case on one adapter (module docstring); `inputs`: a layer case's
    (a `LayerInputs`, or its tensors by name, e.g. from a repro bundle) instead of the seed's."""
    dev = torch.device(case.device)
    tr = Trace(case.id, getattr(adapter, "name", type(adapter).__name__))
    with torch.no_grad():
        if case.stage.is_layer:
            if inputs is None:
                d = layer_inputs(case, dev)
            elif isinstance(inputs, LayerInputs):
                d = inputs.to(dev)
            else:
                d = layer_inputs_from_tensors(case, inputs).to(dev)
            r = _layer_part(case, adapter, d, tr)
            steps = layer_steps(case, r, d)
        else:
            steps = case_steps(case, adapter, dev)
        forced_culprit = None
        for step in steps:
            if not callable(getattr(adapter, step.method, None)):
                continue  # the adapter lacks this stage method: nothing to force
            run = run_step(step, adapter)
            ref_pos = position(run.ref_out, step.rows)
            tr.rows.append(TraceRow("forced", step.name, "reference", stats(run.ref_out), ref_pos))
            pos = position(run.out, step.rows, run.ref_out if isinstance(run.out, tuple) else None)
            if pos is not None and isinstance(run.out, torch.Tensor) and ref_pos == pos:
                pos = None  # the reference's own NaN at the same place: not the kernel's doing
            row = TraceRow(
                "forced",
                step.name,
                "kernel",
                stats(run.out),
                pos,
                "fail" if run.failed else "pass",
            )
            tr.rows.append(row)
            if forced_culprit is None and pos is not None and not step.input_bad():
                forced_culprit = {"stage": step.name, "part": "forced", "position": pos}
                row.role = "culprit"
            if tr.first_divergent is None and run.failed:
                msg = next(c.message for c in run.comparisons if c.outcome.value == "fail")
                tr.first_divergent = {
                    "stage": step.name,
                    "position": divergence(run),
                    "message": msg,
                }
                row.role = row.role or "diverges"
        if tr.culprit is None and forced_culprit is not None:
            tr.culprit = forced_culprit
    return tr


def format_table(tr: Trace) -> str:
    """The trace as a fixed-width table, then its summary line."""
    head = (
        "part",
        "stage",
        "side",
        "nan",
        "inf",
        "amax",
        "zero%",
        "0x7F",
        "0x7E",
        "verdict",
        "first bad",
        "role",
    )
    lines = []
    for r in tr.rows:
        s = r.stats
        lines.append(
            (
                r.part,
                r.stage,
                r.side,
                str(s["nan"]),
                str(s["inf"]),
                f"{s['amax']:.4g}",
                f"{100 * s['zero_frac']:.1f}",
                str(s["nan_bytes"]),
                str(s["sat_bytes"]),
                r.verdict,
                "" if r.bad is None else " ".join(f"{k}={v}" for k, v in r.bad.items()),
                r.role,
            )
        )
    widths = [
        max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)
    ]
    fmt = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join(
        [f"trace {tr.case_id} [{tr.backend}]", fmt(head), *map(fmt, lines), tr.summary()]
    )


__all__ = [
    "adapter_ops",
    "Rows",
    "Step",
    "StepRun",
    "Trace",
    "TraceRow",
    "case_steps",
    "first_bad",
    "format_table",
    "gemm_ops",
    "layer_steps",
    "position",
    "run_step",
    "stats",
    "trace_case",
]
