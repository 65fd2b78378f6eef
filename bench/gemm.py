"""NVFP4 grouped GEMM speed on a CUDA GPU against BF16 cuBLAS, ratios from one run (issue 10).

    python bench/gemm.py [--backends sm90,torch] [--budget 0.5] [--out DIR] [--plans [--match S]]

For the issue's shapes (K=7168 N=6144: one expert at M = 1, 16, 64, 8192; 8 experts x 1024 rows; 48
experts x 4 rows, a decode step of the V4-Pro routed MoE; 48 x 16 rows, its L1 at 128 tokens, and
the L2 of the same step at K=3072 N=7168; e48_r128[_l2]: the same step with the rows per expert of a
seeded uniform routing, as bench/layers.py's routed MoE sees them; e48_m512[_l2]: its prefill step,
4096 tokens x top-6, 512 rows per expert) each dsv4 backend and the
baselines on the same (dequantized) weights are timed by `harness.timing.measure` (CUDA-graph
replays, input sets rotated so a pass reads > 2x L2, median with p10..p90, every sample kept in
DIR/gemm.json). Baselines: `bf16-mm` (one torch.mm per expert's rows; at E=1 the BF16 cuBLAS number)
and `bf16-grouped` (`torch._grouped_mm`, where torch has it). Each backend's output on set 0 is
first judged against reference.gemm's derived bound: a speed is printed only beside `pass`. Each
dsv4 backend reads B in its own layout (`prepare_weight_codes`: sm90's is make_b_tiled's); a backend
named `NAME-k-major` (`--backends sm90,sm90-k-major`) is NAME on make_b_k_major's layout, measured
beside it. TFLOP/s counts 2*M*N*K over routed rows; GB/s counts the bytes a kernel must read (FP4
codes + scales, or bf16 weights) and write. The goal column is the issue's target, against the
baseline named there; the last column says whether this run met it.
`--plans` measures the sm90 kernel's tuning space instead (`candidate_plans` of each shape: tile
sizes, K step, split-K, pipeline depth), each plan judged first, plan()'s own marked `[plan()]`
and the fastest passing one `fastest` (with its speed-up over plan()'s where that was measured):
what `plan()` is chosen from; `--match half,swap` keeps the plans whose label contains "half" or
"swap".
Needs a CUDA GPU; the sm90 rows need sm_90 and Triton (docs/backends.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import dsv4.ops as ops  # noqa: E402
from harness import timing  # noqa: E402
from reference import gemm as rgemm  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    counts: tuple[int, ...]  # routed rows per expert
    k: int = 7168
    n: int = 6144
    goal: tuple[str, float] | None = None  # (baseline, min speed-up), the target

    @property
    def rows(self) -> int:
        return sum(self.counts)


def routed_counts(tokens: int, experts: int = 48, top_k: int = 6, seed: int = 0) -> tuple[int, ...]:
    """Rows per expert of `tokens` x top-k distinct experts drawn uniformly per token, the
    harness's `routing: uniform` draw (harness.inputs.routing): at 128 tokens x top-6 over 48
    experts 16 on average, 10..24 (seed 0), 19 experts above 16."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return tuple(torch.bincount(ids.flatten(), minlength=experts).tolist())


SHAPES = [
    Shape("e1_m1", (1,), goal=("bf16-mm", 3.5)),
    Shape("e1_m2", (2,)),
    Shape("e1_m4", (4,)),
    Shape("e1_m16", (16,), goal=("bf16-mm", 3.5)),
    Shape("e1_m64", (64,), goal=("bf16-mm", 3.5)),
    Shape("e1_m8192", (8192,), goal=("bf16-mm", 0.75)),
    Shape("e8_m1024", (1024,) * 8, goal=("bf16-grouped", 0.75)),
    Shape("e48_m1x6", (1,) * 6 + (0,) * 42),  # one token's top-6 (a batch-1 decode step)
    Shape("e48_m4", (4,) * 48),
    Shape("e48_m16", (16,) * 48),  # the routed MoE's L1 at 128 tokens x top-6 (V4-Pro)
    Shape("e48_m16_l2", (16,) * 48, k=3072, n=7168),  # and its L2
    Shape("e48_r128", routed_counts(128)),  # the same step with the layer's uniform routing
    Shape("e48_r128_l2", routed_counts(128), k=3072, n=7168),
    Shape("e48_m512", (512,) * 48),  # the routed MoE's L1 at 4096 tokens x top-6 (prefill)
    Shape("e48_m512_l2", (512,) * 48, k=3072, n=7168),  # and its L2
]


def operands(s: Shape, dev: torch.device, seed: int) -> dict:
    """Quantized operands (dsv4.ops, production layouts), their plain forms for the bound, and
    the bf16 dequantized weights the baselines multiply."""
    g = torch.Generator(device=dev).manual_seed(seed)
    e = len(s.counts)
    x = torch.randn(s.rows, s.k, device=dev, generator=g)
    a_codes, a_scales, gsa = ops.quantize_to_nvfp4(x)
    qs = [
        ops.quantize_weight_to_nvfp4(torch.randn(s.k, s.n, device=dev, generator=g) * 0.05)
        for _ in range(e)
    ]
    b_codes = torch.stack([q[0] for q in qs])
    counts = torch.tensor(s.counts, dtype=torch.int32, device=dev)
    offsets = ops.compute_expert_offsets(counts)
    a_sw, _ = ops.assemble_scales_2d_side_from_offsets(a_scales, offsets)
    gsa_e = gsa.reshape(1).float().expand(e).contiguous()
    gsb = torch.stack([q[2] for q in qs]).reshape(e).float()
    deq_a = ops.dequantize_nvfp4(a_codes, a_scales, gsa, torch.bfloat16)
    deq_b = torch.stack(
        [ops.dequantize_nvfp4(q[0].t(), q[1].t(), q[2], torch.bfloat16).t() for q in qs]
    )  # [E, K, N]
    return {
        "gemm": (
            a_codes,
            ops.make_b_k_major(b_codes),
            a_sw,
            ops.assemble_scales_3d_side([q[1] for q in qs]),
            offsets,
            gsa_e,
            gsb,
        ),
        "plain": (a_codes, a_scales, b_codes, torch.stack([q[1] for q in qs]), offsets, gsa_e, gsb),
        "b_codes": b_codes,
        "a": deq_a,
        "b": deq_b,
        "offsets": offsets,
        "out": torch.empty(s.rows, s.n, dtype=torch.bfloat16, device=dev),
    }


def judge(op: dict):
    """verdict(out) -> "pass" or "FAIL (...)" against reference.gemm's derived bound: the float64
    oracle and the bound are computed once per input set, for every backend and plan judged."""
    oracle = rgemm.grouped_gemm_nvfp4(*op["plain"], oracle=True)
    bound = rgemm.grouped_gemm_error_bound(*op["plain"])

    def verdict(out: torch.Tensor) -> str:
        bad = int(((out.double() - oracle).abs() > bound).sum())
        return "pass" if bad == 0 else f"FAIL ({bad} elements outside the bound)"

    return verdict


def runner(name: str, s: Shape, op: dict):
    """fn() for one timed call of `name` on one input set, or None where it cannot run."""
    if name == "bf16-mm":
        starts = [0]
        for c in s.counts:
            starts.append(starts[-1] + c)

        def mm() -> None:
            for ei in range(len(s.counts)):
                lo, hi = starts[ei], starts[ei + 1]
                torch.mm(op["a"][lo:hi], op["b"][ei], out=op["out"][lo:hi])

        return mm
    if name == "bf16-grouped":
        if not hasattr(torch, "_grouped_mm") or len(s.counts) == 1:
            return None
        b_nk = op["b"].transpose(1, 2).contiguous().transpose(1, 2)  # [E, K, N], K-major

        def grouped() -> None:
            torch._grouped_mm(op["a"], b_nk, offs=op["offsets"], out_dtype=torch.bfloat16)

        return grouped
    backend = name.removesuffix("-k-major")
    ws_bytes = ops.grouped_gemm_workspace_bytes(backend, s.rows, s.k, s.n, len(s.counts))
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=op["out"].device) if ws_bytes else None
    if name.endswith("-k-major"):
        mat_b = ops.make_b_k_major(op["b_codes"])
    else:
        mat_b = ops.prepare_weight_codes(op["b_codes"], backend)
    gemm = (op["gemm"][0], mat_b, *op["gemm"][2:])

    def dsv4() -> None:
        ops.run_nvfp4_grouped_gemm(*gemm, out=op["out"], backend=backend, workspace=ws)

    return dsv4


def plan_label(p) -> str:
    """One sm90 plan as a table cell (and what --match selects on)."""
    if p.dense and p.dense_group:
        return (
            f"dense grouped: dequantize, fp16 GEMM bm{p.bm} bn{p.bn} bk{8 * p.bj} "
            f"w{p.num_warps} st{p.num_stages}, {p.dense_group} experts a pass"
        )
    if p.dense:
        return "dense: dequantize + cuBLAS fp32 out"
    if p.stream and p.split_n:
        return (
            f"stream split N: {p.bn * p.num_warps} weight rows ({p.bn} a warp) x {p.bm} tokens, "
            f"w{p.num_warps} stage{p.stage}"
        )
    if p.stream:
        return (
            f"stream: {p.bn} weight rows x {p.bm} tokens, w{p.num_warps} st{p.num_stages} "
            f"unroll{p.unroll}"
        )
    return (
        f"bm{p.bm} bn{p.bn} bj{p.bj} split{p.split_k} w{p.num_warps} st{p.num_stages} "
        f"grid{p.programs}{' swap' if p.swap_ab else ''}{' half' if p.half_decode else ''}"
        f"{' hfma' if p.hfma else ''}"
    )


def sweep_plans(
    s: Shape, sets: list[dict], verdict, budget: float, match: str = ""
) -> tuple[list[tuple], list[dict]]:
    """Every candidate plan of the sm90 kernel on one shape whose label contains one of the
    comma-separated `match`:
    verdict, then timing if it passes."""
    from dsv4.kernels.triton import grouped_gemm_sm90 as g

    dev = sets[0]["out"].device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    e = len(s.counts)
    plans = g.candidate_plans(s.rows, s.k, s.n, e, sms)
    need = max(g.plan_workspace_bytes(p, s.rows, s.k, s.n, e) for p in plans)
    ws = torch.empty(need, dtype=torch.uint8, device=dev)
    gemms = [  # B in the sm90 layout
        (o["gemm"][0], ops.prepare_weight_codes(o["b_codes"], "sm90"), *o["gemm"][2:]) for o in sets
    ]
    rows, records, best, chosen = [], [], None, None
    default = g.plan(s.rows, s.k, s.n, e, sms)
    for p in plans:
        label = plan_label(p) + (" [plan()]" if p == default else "")
        if match and not any(m in label for m in match.split(",")):
            continue

        def call(i: int, p=p) -> None:
            g.launch_grouped_gemm(*gemms[i], sets[i]["out"], workspace=ws, the_plan=p)

        try:
            call(0)
            torch.cuda.synchronize()
        except Exception as err:  # a plan that does not compile or launch: reported, not fatal
            rows.append((s.name, label, f"error: {type(err).__name__}: {str(err)[:80]}", "", ""))
            continue
        ok = verdict(sets[0]["out"])
        if ok != "pass":
            rows.append((s.name, label, ok, "", ""))
            continue
        t = timing.measure(call, len(sets), budget_s=budget)
        records.append({"shape": s.name, "plan": label, **t.summary()})
        rows.append((s.name, label, ok, f"{t.median_us:.2f} ({t.p10_us:.2f}..{t.p90_us:.2f})", ""))
        if best is None or t.median_us < best[1]:
            best = (len(rows) - 1, t.median_us)
        if p == default:
            chosen = t.median_us
    if best is not None:
        vs = f" ({chosen / best[1]:.2f}x plan()'s)" if chosen and best[1] < chosen else ""
        rows[best[0]] = (*rows[best[0]][:4], "fastest" + vs)
    return rows, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="sm90", help="dsv4 backends, comma-separated")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of samples per row")
    ap.add_argument("--shapes", default=",".join(s.name for s in SHAPES))
    ap.add_argument("--out", default="reports/bench_gemm")
    ap.add_argument("--plans", action="store_true", help="measure the sm90 plans of each shape")
    ap.add_argument(
        "--match",
        default="",
        help="--plans: only the plans whose label contains one of these (comma-separated)",
    )
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gemm.py needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}; nvml: {timing.device_state(dev)}")
    names = [*a.backends.split(","), "bf16-mm", "bf16-grouped"]
    table, records = [], []
    for s in (s for s in SHAPES if s.name in a.shapes.split(",")):
        e = len(s.counts)
        fp4_bytes = (s.rows + e * s.n) * s.k * (0.5 + 1 / 16) + s.rows * s.n * 2
        bf16_bytes = (s.rows + e * s.n) * s.k * 2 + s.rows * s.n * 2
        n_sets = timing.cold_l2_sets(bf16_bytes, dev, max_sets=8)
        sets = [operands(s, dev, seed) for seed in range(n_sets)]
        flops = 2.0 * s.rows * s.n * s.k
        verdict = judge(sets[0])
        if a.plans:
            rows, recs = sweep_plans(s, sets, verdict, a.budget, a.match)
            table += rows
            records += recs
            print("\n".join(" | ".join(r) for r in rows), flush=True)
            del sets
            continue
        medians: dict[str, float] = {}
        for name in names:
            fns = [runner(name, s, op) for op in sets]
            if fns[0] is None:
                continue
            fns[0]()
            ok = verdict(sets[0]["out"]) if not name.startswith("bf16") else "base"
            if ok not in ("pass", "base"):
                table.append((s.name, name, ok, "", "", "", ""))
                continue
            t = timing.measure(lambda i, fns=fns: fns[i](), n_sets, budget_s=a.budget)
            medians[name] = t.median_us
            nbytes = bf16_bytes if name.startswith("bf16") else fp4_bytes
            records.append({"shape": s.name, "backend": name, **t.summary()})
            table.append(
                (
                    s.name,
                    name,
                    ok,
                    f"{t.median_us:.2f} ({t.p10_us:.2f}..{t.p90_us:.2f})",
                    f"{flops / t.median_us / 1e6:.1f}",
                    f"{nbytes / t.median_us / 1e3:.0f}",
                    "",
                )
            )
        if s.goal and s.goal[0] in medians:
            base, want = s.goal
            for i, row in enumerate(table):
                if row[0] == s.name and row[1] in a.backends.split(",") and row[1] in medians:
                    got = medians[base] / medians[row[1]]
                    met = "met" if got >= want else f"MISSED by {want / got:.2f}x"
                    table[i] = (*row[:6], f"x{got:.2f} vs {base} (goal x{want}): {met}")
        del sets
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm.json").write_text(json.dumps(records))
    head = ("shape", "backend", "verdict", "median us (p10..p90)", "TFLOP/s", "GB/s", "goal")
    if a.plans:
        head = ("shape", "sm90 plan", "verdict", "median us (p10..p90)", "")
    print("\n" + " | ".join(head))
    for row in table:
        print(" | ".join(map(str, row)))
    print(f"\nevery sample: {out / 'gemm.json'}")


if __name__ == "__main__":
    main()
