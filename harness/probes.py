"""Isolation probes of a grouped GEMM (docs/cases.md "probes"): what must not reach a real row.

A probe runs the adapter's `grouped_gemm` twice, on the teacher-forced operands and on a copy
with one perturbation of its input buffers, and demands that every row the perturbation must not
reach is BITWISE unchanged (not "within tolerance": a padding byte a correct kernel never reads
cannot move a single bit). Perturbations (`harness.cases.Probe`):
- padding_nan: byte 0x7F (NaN) in every padding row of the swizzled activation and weight scales
  (rows past a group's tokens up to 128, weight rows past N); no row may change.
- padding_garbage: random bytes in every padding byte (rows and columns); no row may change.
- scale_padding_7f: 0x7F in the padding columns past K/16 (K/16 not a multiple of 4); no row.
- expert_scale_byte: expert 0's largest weight scale byte one binade lower (plain and swizzled
  alike); the rows of every other expert may not change.
Any adapter runs them: they are a case axis (`probes`), not an adapter feature.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from harness.adapters import GemmOperands, poisoned
from harness.cases import Probe
from harness.stages.verdicts import Comparison, Outcome
from harness.trace import adapter_ops
from reference.layouts import assemble_scales_3d_side, round_up, swizzle_scales

DATA, ROW_PAD, COL_PAD = 1, 2, 3  # marker values of a swizzled padding map
ATOM_ROWS, ATOM_COLS = 128, 4


def _marker(rows: int, cols: int) -> torch.Tensor:
    """Swizzled map of one [rows, cols] scale matrix: DATA, ROW_PAD or COL_PAD per byte."""
    m = torch.full(
        (round_up(rows, ATOM_ROWS), round_up(cols, ATOM_COLS)), COL_PAD, dtype=torch.uint8
    )
    m[:rows, :cols] = DATA
    m[rows:, :cols] = ROW_PAD
    return swizzle_scales(m)


def padding_maps(ops: GemmOperands) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation-side map [bytes of a_scales_swizzled], weight-side map [E, ...]) of DATA /
    ROW_PAD / COL_PAD, built by swizzling marker matrices: they follow the layout itself."""
    cols = ops.a_scales.shape[1]
    ends = ops.expert_offsets.cpu().tolist()
    parts = [_marker(e - s, cols) for s, e in zip([0, *ends[:-1]], ends, strict=True) if e > s]
    a = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    n = ops.b_codes.shape[-1]
    b = _marker(n, ops.b_scales.shape[1]).expand(ops.b_codes.shape[0], -1)
    dev = ops.a_codes.device
    return a.to(dev), b.to(dev)


def _fill(buf: torch.Tensor, where: torch.Tensor, values: torch.Tensor | int) -> torch.Tensor:
    out = buf.view(torch.uint8).clone()
    if isinstance(values, int):
        out[where.reshape(out.shape)] = values
    else:
        out[where.reshape(out.shape)] = values[: int(where.sum())]
    return out.view(torch.float8_e4m3fn)


def perturb(probe: Probe, ops: GemmOperands, seed: int = 0) -> tuple[GemmOperands, int | None]:
    """(perturbed operands, the expert whose rows may change or None: no row may change)."""
    a_map, b_map = padding_maps(ops)
    a_sw, b_sw = ops.a_scales_swizzled, ops.b_scales_swizzled
    if probe is Probe.PADDING_NAN:
        a_sw, b_sw = _fill(a_sw, a_map == ROW_PAD, 0x7F), _fill(b_sw, b_map == ROW_PAD, 0x7F)
    elif probe is Probe.SCALE_PADDING_7F:
        a_sw, b_sw = _fill(a_sw, a_map == COL_PAD, 0x7F), _fill(b_sw, b_map == COL_PAD, 0x7F)
    elif probe is Probe.PADDING_GARBAGE:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randint(0, 256, (a_map.numel() + b_map.numel(),), generator=g)
        noise = noise.to(torch.uint8).to(a_sw.device)
        a_sw = _fill(a_sw, a_map != DATA, noise)
        b_sw = _fill(b_sw, b_map != DATA, noise[a_map.numel() :])
    else:  # EXPERT_SCALE_BYTE
        b = ops.b_scales.view(torch.uint8).clone()
        e0 = b[0].reshape(-1)
        i = int(torch.argmax(ops.b_scales[0].float().reshape(-1)))
        v = int(e0[i])
        e0[i] = v - 8 if (v & 0x78) >= 8 else v + 8  # exponent field -1 (or +1 at the bottom)
        b_scales = b.view(torch.float8_e4m3fn)
        b_sw = assemble_scales_3d_side(list(b_scales)).to(b_sw.device)
        b_side = dataclasses.replace(ops.b, scales=b_scales)
        return dataclasses.replace(ops, b=b_side, b_scales_swizzled=b_sw), 0
    return dataclasses.replace(ops, a_scales_swizzled=a_sw, b_scales_swizzled=b_sw), None


def _run(adapter: Any, ops: GemmOperands) -> torch.Tensor:
    conv_ops = adapter_ops(ops, adapter.conventions.global_scale)
    out = poisoned(
        (ops.a_codes.shape[0], ops.b_codes.shape[-1]), torch.bfloat16, ops.a_codes.device
    )
    adapter.grouped_gemm(conv_ops, out)
    return out


def check(
    probe: Probe, ops: GemmOperands, adapter: Any, clean: torch.Tensor | None = None
) -> Comparison:
    """The probe's verdict: rows it must not reach bitwise equal to the clean run's `clean`."""
    clean = _run(adapter, ops) if clean is None else clean
    probed, may_change = perturb(probe, ops)
    out = _run(adapter, probed)
    ends = ops.expert_offsets.cpu().tolist()
    expert = torch.zeros(clean.shape[0], dtype=torch.long)
    for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        expert[s:t] = e
    guarded = (
        torch.ones(clean.shape[0], dtype=torch.bool)
        if may_change is None
        else (expert != may_change)
    )
    changed = (clean.view(torch.int16) != out.view(torch.int16)).cpu() & guarded[:, None]
    n = int(changed.sum())
    what = "every row" if may_change is None else f"the rows of experts other than {may_change}"
    m: dict[str, Any] = {
        "probe": probe.value,
        "n_changed": n,
        "numel_guarded": int(guarded.sum()) * clean.shape[1],
        "guarded": what,
    }
    if not n:
        return Comparison(f"probe.{probe.value}", Outcome.PASS, "", m)
    row, col = divmod(int(torch.argmax(changed.reshape(-1).to(torch.uint8))), clean.shape[1])
    m["first_changed"] = {"row": row, "expert": int(expert[row]), "col": col}
    rows_hit = changed.any(1)
    m["experts_changed"] = sorted({int(e) for e in expert[rows_hit].tolist()})
    return Comparison(
        f"probe.{probe.value}",
        Outcome.FAIL,
        f"probe {probe.value}: {n} elements of {what} changed (must be bitwise unchanged); "
        f"first at row {row} (expert {int(expert[row])}) col {col}, was "
        f"{float(clean[row, col]):.6g}, now {float(out[row, col]):.6g}",
        m,
    )


__all__ = ["check", "padding_maps", "perturb"]
