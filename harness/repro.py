"""Repro bundles: one failing (case, backend) as a directory anyone can replay (docs/bisect.md).

A bundle holds `case.yaml` (a case file of exactly that one case: `python -m harness run
BUNDLE/case.yaml` runs it too), `bundle.yaml` (backend, conventions, the environment fingerprint of
where it was made, the case id) and, for layer cases, `tensors.pt`: the layer's input tensors by
name (the tensor fields of the case's `harness.stages.inputs.LayerInputs`: x, w13, w2,
calib_sample, and topk_ids, topk_weights for a routed MoE; o, w, calib_sample for a grouped
linear), so a replay does not depend on the input generator of the version that replays it.
Loading never runs code: `yaml.safe_load` and `torch.load(weights_only=True)`; a tensor file that
holds anything but tensors, or names that do not fit the case's layer, is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from harness import adapters, results
from harness.cases import AXES, Case, load_cases
from harness.records import Row, jsonable
from harness.stages.inputs import LayerInputs, LayerInputsError, layer_inputs_from_tensors

CASE_FILE, META_FILE, TENSORS_FILE = "case.yaml", "bundle.yaml", "tensors.pt"


class BundleError(ValueError):
    """A bundle that is missing, malformed or unsafe to load."""


def case_document(case: Case) -> dict[str, Any]:
    """A case file (the YAML schema of docs/cases.md) holding exactly `case`."""
    axes = {
        "tokens": [case.tokens],
        "distributions": [case.distribution.value],
        "scale_ratios": [case.scale_ratio],
        "routing": [case.routing.value],
        "limits": [case.limit],
        "probes": [None if case.probe is None else case.probe.value],
    }
    sweep: dict[str, Any] = {
        "stage": case.stage.value,
        "shape": {f: getattr(case.shape, f) for f in case.shape.__dataclass_fields__},
        "seeds": [case.seed],
        "tolerance": case.tolerance.value,
        "budget": {f: getattr(case.budget, f) for f in case.budget.__dataclass_fields__},
        "device": case.device,
        "backends": list(case.backends),
        **{a: v for a, v in axes.items() if a in AXES[case.stage]},
    }
    return {
        "name": f"repro {case.id}",
        "description": "one case, written by a repro bundle",
        "sweeps": [sweep],
    }


def save(
    out: str | Path,
    case: Case,
    backend: str,
    inputs: LayerInputs | Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a bundle for (case, backend) into `out`; `inputs` (a layer case's, or its tensors by
    name) override the seed's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CASE_FILE).write_text(yaml.safe_dump(case_document(case), sort_keys=False))
    adapter = adapters.load(backend)
    meta = {
        "case_id": case.id,
        **adapters.describe(adapter),
        "backend": backend,  # the name the user gave (import paths included)
        "env": json.loads(json.dumps(jsonable(results.fingerprint()), default=str)),
    }
    (out / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=True))
    if isinstance(inputs, LayerInputs):
        inputs = inputs.tensors()
    if inputs:
        tensors = {k: v.detach().cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        torch.save(tensors, out / TENSORS_FILE)
    return out


def load(path: str | Path) -> tuple[Case, dict[str, Any], dict[str, torch.Tensor] | None]:
    """(case, meta, input tensors or None) of a bundle directory; never runs code from it."""
    path = Path(path)
    if not (path / CASE_FILE).is_file() or not (path / META_FILE).is_file():
        raise BundleError(f"{path}: not a repro bundle (needs {CASE_FILE} and {META_FILE})")
    meta = yaml.safe_load((path / META_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or "case_id" not in meta or "backend" not in meta:
        raise BundleError(f"{path / META_FILE}: needs the fields case_id and backend")
    cases = [c for c in load_cases(path / CASE_FILE)[1] if c.id == meta["case_id"]]
    if not cases:
        raise BundleError(f"{path / CASE_FILE}: holds no case {meta['case_id']!r}")
    tensors = None
    if (path / TENSORS_FILE).exists():
        try:
            tensors = torch.load(path / TENSORS_FILE, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(
                f"{path / TENSORS_FILE}: refused: it holds more than tensors, and loading it "
                f"could run code (torch.load weights_only=True: {first})"
            ) from None
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise BundleError(f"{path / TENSORS_FILE}: expected a dict of name -> tensor")
        try:  # the names the case's layer takes (harness.stages.inputs.LayerInputs)
            layer_inputs_from_tensors(cases[0], tensors, str(path / TENSORS_FILE))
        except LayerInputsError as e:
            raise BundleError(str(e)) from None
    return cases[0], meta, tensors


def replay(path: str | Path, backend: str | None = None) -> list[Row]:
    """Run the bundle's case on its backend (or `backend`) with the bundle's inputs: its rows."""
    from harness.runner import run_one

    case, meta, tensors = load(path)
    case = dataclasses.replace(case, source=str(Path(path) / CASE_FILE))
    return run_one(case, backend or meta["backend"], inputs=tensors)


__all__ = ["BundleError", "case_document", "load", "replay", "save"]
