"""The DeepSeek V4 layers' speed on a CUDA GPU against BF16 cuBLAS, beside their verdicts.

    python bench/layers.py [--backends dsv4-sm90] [--tokens 128,4096] [--preset v4_pro]
                           [--budget 1.0] [--out DIR]

Runs the harness itself (`python -m harness run --time --baseline bf16`) on one generated case
file: the shared expert, the routed MoE and the grouped o-projection at the preset's shapes
(V4-Pro: hidden 7168, 48 local experts of 3072, top-6; 16 o-groups of 4096 -> 1024) for each
token count. Each pair is first judged against the float64 reference within the layer budget,
then timed by harness.timing (CUDA-graph replays, input sets rotated past L2) beside the `bf16`
baseline on the same (dequantized) weights, in the same process: the routed MoE's baseline is two
`torch._grouped_mm` calls. The table prints the verdict beside every speed, and the goal column
the issue's target (routed MoE: >= 2x faster than the BF16 grouped MoE). Every sample and row:
DIR/results.jsonl (`python -m harness report DIR` renders them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import cli, results  # noqa: E402
from harness.records import Outcome  # noqa: E402

LAYERS = ("shared_expert", "routed_moe", "grouped_linear")
GOALS = {"routed_moe": 2.0}  # min speed-up over the bf16 baseline, the target


def case_file(preset: str, tokens: list[int]) -> str:
    """The sweep: every layer of the preset at each token count, one seed, calibrated scales."""
    lines = [
        "name: bench_layers",
        f"description: layers of {preset} timed against BF16 (bench/layers.py)",
        f"defaults: {{shape: {preset}, seeds: [0], scale_ratios: [1], timeout_s: 1200}}",
        "sweeps:",
    ]
    for layer in LAYERS:
        lines.append(f"  - stage: {layer}")
        lines.append(f"    tokens: [{', '.join(map(str, tokens))}]")
        if layer == "shared_expert":
            lines.append("    limits: [10]")
        if layer == "routed_moe":
            lines.append("    routing: [uniform]")
    return "\n".join(lines) + "\n"


def table(out: Path) -> list[tuple[str, ...]]:
    """One row per timed pair: layer, tokens, backend, verdict, latency, bf16, ratio, goal."""
    rows = []
    for r in results.read_rows(out):
        if r.compare != results.TIMING:
            continue
        m = r.metrics
        verdict = str(m.get("verdict", "?"))
        stage, tokens = r.stage, r.fields.get("tokens", "?")
        if r.outcome is not Outcome.TIMED:
            rows.append((stage, str(tokens), r.backend, verdict, r.message[:60], "", "", ""))
            continue
        base = (m.get("baselines") or {}).get("bf16", {})
        ratio = base.get("speedup")
        goal = ""
        if stage in GOALS and ratio is not None:
            want = GOALS[stage]
            met = "met" if ratio >= want and verdict == "pass" else f"MISSED by {want / ratio:.2f}x"
            goal = f"goal x{want}: {met}"
        if verdict != "pass":
            goal = "invalid: the case does not pass"
        rows.append(
            (
                stage,
                str(tokens),
                r.backend,
                verdict,
                f"{m['latency_us']:.1f} ({m['latency_p10_us']:.1f}..{m['latency_p90_us']:.1f})",
                f"{base['latency_us']:.1f}" if "latency_us" in base else "n/a",
                f"x{ratio:.2f}" if ratio is not None else "",
                goal,
            )
        )
    order = {name: i for i, name in enumerate(LAYERS)}
    return sorted(
        rows, key=lambda r: (order.get(r[0], 9), int(r[1]) if r[1].isdigit() else 0, r[2])
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="dsv4-sm90", help="adapters, comma-separated")
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--preset", default="v4_pro")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per timing measurement")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_layers")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    cases = a.out / "bench_layers.yaml"
    cases.write_text(case_file(a.preset, tokens))
    args = ["run", str(cases), "-o", str(a.out), "--device", a.device, "--time", "--fresh"]
    args += ["--baseline", "bf16", "--time-budget", str(a.budget), "--no-progress"]
    for b in a.backends.split(","):
        args += ["-b", b]
    rc = cli.main(args)
    head = ("layer", "tokens", "backend", "verdict", "median us (p10..p90)", "bf16 us", "speed-up")
    print("\n" + " | ".join((*head, "goal")))
    for row in table(a.out):
        print(" | ".join(row))
    print(f"\nevery row and sample: {a.out / results.JSONL}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
