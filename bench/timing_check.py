"""Check the harness's timing protocol on a CUDA GPU and print one table (docs/timing.md).

    python bench/timing_check.py [--repeats 5] [--out DIR]

For a few cases (quantize [8192, 7168] and [128, 7168] with static scales, SwiGLU-requant,
grouped GEMM, shared-expert layer) on `dsv4-torch` and the `bf16` and `reference-compiled`
baselines: each is timed `--repeats` times
by `harness.timing.time_case`; the table gives the median of the first measurement with its
p10..p90, the spread of the repeated medians ((max - min) / median; the goal is under 2%),
the verdict of the first against the second measurement (the same kernel twice must be SAME),
graph vs eager, the stopping reason, GB/s and percent of the measured roofline, beside the
correctness verdict of the same case and backend. Full records go to DIR/timing_check.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from harness import adapters, timing  # noqa: E402
from harness.cases import PRESETS, Case, Stage  # noqa: E402
from harness.records import jsonable  # noqa: E402
from harness.runner import run_one  # noqa: E402


def cases() -> list[Case]:
    pro, flash = PRESETS["v4_pro"], PRESETS["v4_flash"]
    return [
        Case(Stage.QUANTIZE, pro, 8192, scale_ratio=1.0, device="cuda"),
        Case(Stage.QUANTIZE, pro, 128, scale_ratio=1.0, device="cuda"),
        Case(
            Stage.SWIGLU_REQUANT, dataclasses.replace(pro, intermediate=3072), 8192, device="cuda"
        ),
        Case(Stage.GROUPED_GEMM, dataclasses.replace(flash, n_experts=8), 256, device="cuda"),
        Case(Stage.SHARED_EXPERT, flash, 128, scale_ratio=1.0, device="cuda"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--out", default="reports/timing_check")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("timing_check needs a CUDA GPU")
    dev = torch.device("cuda")
    roof = timing.measured_roofline(dev)
    print(f"device: {torch.cuda.get_device_name(dev)}; roofline {roof.row()}")
    print(f"nvml: {timing.device_state(dev)}")
    proto = timing.Protocol(budget_s=a.budget)
    table, records = [], []
    for case in cases():
        for backend in ("dsv4-torch", "bf16", "reference-compiled"):
            adapter = adapters.load(backend)
            if backend == "bf16":
                verdict = "baseline"
            else:  # the correctness verdict of this very case and backend
                verdict = run_one(dataclasses.replace(case, source=""), backend)[-1].outcome
            try:
                runs = [timing.time_case(case, adapter, proto, roof) for _ in range(a.repeats)]
            except timing.TimingUnavailable as e:
                table.append((case.id, backend, verdict, f"not timed: {e}"))
                continue
            meds = [r["latency_us"] for r in runs]
            first = runs[0]
            same = timing.compare_samples(runs[0]["samples_us"], runs[1]["samples_us"])
            rep_spread = (max(meds) - min(meds)) / sorted(meds)[len(meds) // 2]
            records.append({"case": case.id, "backend": backend, "verdict": verdict, "runs": runs})
            table.append(
                (
                    case.id,
                    backend,
                    verdict,
                    f"{first['latency_us']:.2f} ({first['latency_p10_us']:.2f}.."
                    f"{first['latency_p90_us']:.2f})",
                    f"{100 * first['rel_spread']:.1f}",
                    f"{100 * rep_spread:.2f}",
                    f"{same['verdict']} x{same['ratio']:.3f}",
                    f"{first['mode']}{' (graph failed)' if first['graph_error'] else ''}",
                    f"{first['eager_us']:.2f}",
                    f"{first['stop_reason']} n={first['n_samples']} sets={first['n_sets']}",
                    f"{first['gbps']:.0f}",
                    f"{first.get('roofline_pct', float('nan')):.1f}",
                )
            )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing_check.json").write_text(json.dumps(jsonable(records)))
    head = (
        "case",
        "backend",
        "verdict",
        "median us (p10..p90)",
        "spread %",
        "repeat medians %",
        "1st vs 2nd",
        "mode",
        "eager us",
        "stop",
        "GB/s",
        "% roof",
    )
    print("\n" + " | ".join(head))
    for row in table:
        print(" | ".join(map(str, row)))


if __name__ == "__main__":
    main()
