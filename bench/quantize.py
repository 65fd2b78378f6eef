"""Speed of the NVFP4 quantize kernels on a CUDA GPU, one table, ratios measured in one run.

    python bench/quantize.py [--budget 1.0] [--out DIR] [--variants [--match S,S2]]

Rows: the CuTeDSL kernels (static-scale quantize with swizzled scales, SwiGLU-requantize, grouped
gs[G]), dsv4's portable torch path and a torch.compile'd seed-style quantizer (reciprocal,
threshold rounding: fast, not bit-exact; the speed baseline the issue names). Each is timed by
harness.timing.measure (CUDA-graph replays, input sets rotated so a pass reads more than 2x L2)
and given as median us, GB/s of the bytes it must move (input read, codes and scale bytes
written) and percent of the device-to-device copy bandwidth measured in the same run. Small
shapes (T = 128) report graph-replay latency. Every CuTeDSL row is checked bit-exact against
reference/ before it is timed (the `exact` column). Full records go to DIR/quantize.json.
The `divided codes` row is the same kernel without the sm_90 bracket (codes from the corrected
divisions, QuantConfig.bracketed_codes=False), `div.rn only` without the fast path at all.
--variants instead times every tuning in VARIANTS (blocks per thread x threads per CTA) of the
quantize [8192,7168] and the SwiGLU-requant [8192,2x3072], with and without the bracket, each
checked bit-exact first (FAIL rows are not timed; a compile error is printed in its row), into
DIR/quantize_variants.json; --match keeps the variants whose label contains one of the
comma-separated strings (`--match thr=128,thr=256`).
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

from dsv4 import ops  # noqa: E402
from dsv4.kernels.cutedsl import nvfp4_quant as nq  # noqa: E402
from dsv4.ops import quantize_activation_nvfp4  # noqa: E402
from harness import timing  # noqa: E402
from reference.activation import swiglu as ref_swiglu  # noqa: E402
from reference.layouts import swizzle_scales  # noqa: E402
from reference.nvfp4 import quantize_nvfp4  # noqa: E402


def seed_style_quantize(x: torch.Tensor, gs: torch.Tensor):
    """The common torch NVFP4 recipe (reciprocals, threshold count): the speed baseline."""
    xn = x.float() * (1.0 / gs)
    b = xn.unflatten(-1, (-1, 16))
    s = (b.abs().amax(-1, keepdim=True) / 6.0).clamp(max=448.0).to(torch.float8_e4m3fn)
    q = b * (1.0 / s.float())
    a = q.abs()
    mids = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
    code = sum((a > m).to(torch.uint8) for m in mids) | ((q < 0).to(torch.uint8) << 3)
    code = code.flatten(-2)
    return code[..., 0::2] | (code[..., 1::2] << 4), s.squeeze(-1)


def nvfp4_bytes(rows: int, k_in: int, k: int, in_bytes: int = 2) -> int:
    return rows * k_in * in_bytes + rows * k // 2 + rows * k // 16


def row(name, fn_sets, n_sets, nbytes, copy_gbps, exact, budget):
    t = timing.measure(fn_sets, n_sets, budget_s=budget)
    gbps = nbytes / (t.median_us * 1e-6) / 1e9
    return {
        "case": name,
        "median_us": t.median_us,
        "p10_us": t.p10_us,
        "p90_us": t.p90_us,
        "GB/s": gbps,
        "%copy": 100 * gbps / copy_gbps,
        "exact": exact,
        "stop": t.stop_reason,
    }


def sets(make, nbytes, dev):
    n = timing.cold_l2_sets(nbytes, dev)
    return [make(i) for i in range(n)]


def quantize_rows(t: int, k: int, dev, copy: float, budget: float) -> list[dict]:
    """Static quantize [t, k]: CuTeDSL (swizzled scales), dsv4's torch path, torch.compile seed."""
    cfg = nq.tuned(nq.QuantConfig(k), rows=t)  # what quantize() and dsv4.ops run
    nb = nvfp4_bytes(t, k, k)

    def make(i):
        x = (torch.randn(t, k, device=dev) * 2).to(torch.bfloat16)
        gs = (x.float().abs().amax() / 2688).reshape(1)
        codes = torch.empty(t, k // 2, dtype=torch.uint8, device=dev)
        sf = torch.empty(cfg.scale_bytes(t), dtype=torch.uint8, device=dev)
        lin = torch.empty(t, k // 16, dtype=torch.float8_e4m3fn, device=dev)
        return x, gs, codes, sf, lin

    data = sets(make, nb, dev)
    x, gs, codes, sf, _ = data[0]
    nq.run_quant(cfg, x, gs, codes, sf)
    rc, rs, _ = quantize_nvfp4(x, gs)
    exact = bool(torch.equal(codes, rc) and torch.equal(sf, swizzle_scales(rs).view(torch.uint8)))
    seed = torch.compile(seed_style_quantize, dynamic=False)
    n = len(data)
    slow = dataclasses.replace(cfg, fast_division=False, bracketed_codes=False)
    divided = dataclasses.replace(cfg, bracketed_codes=False)

    def check(c) -> bool:
        codes.fill_(0xAA)
        nq.run_quant(c, x, gs, codes, sf)
        return bool(
            torch.equal(codes, rc) and torch.equal(sf, swizzle_scales(rs).view(torch.uint8))
        )

    slow_exact, divided_exact = check(slow), check(divided)
    return [
        row(
            f"cutedsl quantize [{t},{k}] div.rn only",
            lambda i: nq.run_quant(slow, *data[i][:4]),
            n,
            nb,
            copy,
            slow_exact,
            budget,
        ),
        row(
            f"cutedsl quantize [{t},{k}] divided codes",
            lambda i: nq.run_quant(divided, *data[i][:4]),
            n,
            nb,
            copy,
            divided_exact,
            budget,
        ),
        row(
            f"cutedsl quantize [{t},{k}] swizzled",
            lambda i: nq.run_quant(cfg, *data[i][:4]),
            n,
            nb,
            copy,
            exact,
            budget,
        ),
        row(
            f"torch (dsv4 ops) quantize [{t},{k}]",
            lambda i: quantize_activation_nvfp4(*data[i][:3], data[i][4], impl="torch"),
            n,
            nb,
            copy,
            True,
            budget,
        ),
        row(
            f"torch.compile seed-style quantize [{t},{k}]",
            lambda i: seed(data[i][0], data[i][1]),
            n,
            nb,
            copy,
            False,
            budget,
        ),
    ]


def gather_rows(
    t: int, top_k: int, k: int, dev, copy: float, budget: float, experts: int = 48
) -> list[dict]:
    """The routed MoE's staged quantize of t tokens x top_k slots (rows gathered by token):
    the gather kernel with linear scales and into the experts' padded 2-D-side layout (what the
    MoE runner does with quant_impl "cutedsl", offsets of a uniform routing over `experts`),
    the unfused staging (quantize, gather codes and scales, assemble the layout), and the plain
    quantize of the same t * top_k rows (the 1.3x target's yardstick)."""
    rows_n = t * top_k
    plain = nq.tuned(nq.QuantConfig(k, scale_layout=nq.ScaleLayout.LINEAR), rows=rows_n)
    gather = nq.tuned(
        nq.QuantConfig(k, scale_layout=nq.ScaleLayout.LINEAR, gather=True), rows=rows_n
    )
    nb = nvfp4_bytes(rows_n, k, k)
    staged = nq.tuned(nq.QuantConfig(k, gather=True, experts=experts), rows=rows_n)
    counts = torch.bincount(torch.randint(0, experts, (rows_n,)), minlength=experts)
    offsets = ops.compute_expert_offsets(counts.to(dev))
    starts = ops.padded_group_starts(offsets)
    sf_x = torch.empty(staged.scale_bytes(rows_n), dtype=torch.uint8, device=dev)

    def make(i):
        x = (torch.randn(t, k, device=dev) * 2).to(torch.bfloat16)
        token = torch.randint(0, t, (rows_n,), device=dev, dtype=torch.int32)
        gs = (x.float().abs().amax() / 2688).reshape(1)
        codes = torch.empty(rows_n, k // 2, dtype=torch.uint8, device=dev)
        sf = torch.empty(rows_n, k // 16, dtype=torch.uint8, device=dev)
        tc = torch.empty(t, k // 2, dtype=torch.uint8, device=dev)
        ts = torch.empty(t, k // 16, dtype=torch.uint8, device=dev)
        xs = x[token.long()]  # the staged rows, materialized: the plain quantize's input
        return x, token, gs, codes, sf, tc, ts, xs

    data = sets(make, nb, dev)
    x, token, gs, codes, sf, *_ = data[0]
    nq.run_quant(gather, x, gs, codes, sf, index=token)
    rc, rs, _ = quantize_nvfp4(x[token.long()], gs)
    exact = bool(torch.equal(codes, rc) and torch.equal(sf, rs.view(torch.uint8)))
    nq.run_quant(staged, x, gs, codes, sf_x, index=token, experts=(offsets, starts))
    want, _ = ops.assemble_scales_2d_side_from_offsets(rs, offsets)
    staged_exact = bool(torch.equal(codes, rc) and torch.equal(sf_x, want.view(torch.uint8)))

    def then_gather(i):
        x, token, gs, codes, sf, tc, ts, _ = data[i]
        nq.run_quant(plain, x, gs, tc, ts)
        torch.index_select(tc, 0, token, out=codes)
        torch.index_select(ts, 0, token, out=sf)

    def unfused(i):
        then_gather(i)
        ops.assemble_scales_2d_side_from_offsets(data[i][4], offsets, out=sf_x)

    n = len(data)
    return [
        row(
            f"cutedsl gather quantize {t}x top-{top_k} [{rows_n},{k}]",
            lambda i: nq.run_quant(gather, *data[i][:1], *data[i][2:5], index=data[i][1]),
            n,
            nb,
            copy,
            exact,
            budget,
        ),
        row(
            f"cutedsl gather quantize {t}x top-{top_k} into {experts} experts' layout",
            lambda i: nq.run_quant(
                staged,
                data[i][0],
                data[i][2],
                data[i][3],
                sf_x,
                index=data[i][1],
                experts=(offsets, starts),
            ),  # fmt: skip
            n,
            nb,
            copy,
            staged_exact,
            budget,
        ),
        row(
            f"cutedsl quantize {t} then gather codes+scales", then_gather, n, nb, copy, None, budget
        ),
        row(
            f"unfused staging: quantize {t}, gather, assemble {experts} experts' layout",
            unfused,
            n,
            nb,
            copy,
            None,
            budget,
        ),  # fmt: skip
        row(
            f"cutedsl plain quantize [{rows_n},{k}] (yardstick)",
            lambda i: nq.run_quant(plain, data[i][7], *data[i][2:5]),
            n,
            nb,
            copy,
            None,
            budget,
        ),
    ]


VARIANTS = [  # the tuning fields (nq.DEFAULT_TUNING's keys) --variants times
    {"blocks_per_thread": b, "threads": n, "bracketed_codes": br}
    for br in (True, False)
    for b in (1, 2, 4)
    for n in (64, 128, 256, 512)
]


def variant_rows(dev, copy: float, budget: float, match: str = "") -> list[dict]:
    """Every VARIANTS tuning of the static quantize [8192,7168] and the SwiGLU-requant
    [8192, 2x3072]: each checked bit-exact against reference/ first (a wrong one is FAIL, not
    timed), a compile or launch error printed in its row, never stopping the table."""
    t, k, i_ = 8192, 7168, 3072
    cases = []
    nb = nvfp4_bytes(t, k, k)
    base = nq.QuantConfig(k)

    def make_q(j, t=t):
        x = (torch.randn(t, k, device=dev) * 2).to(torch.bfloat16)
        x[0, :16] = float("nan")  # the div.rn path and a NaN block in the checked set
        x[1, :32] = 0.0
        gs = (x.float().nan_to_num(0).abs().amax() / 2688).reshape(1)
        codes = torch.empty(t, k // 2, dtype=torch.uint8, device=dev)
        sf = torch.empty(base.scale_bytes(t), dtype=torch.uint8, device=dev)
        return x, gs, codes, sf

    qdata = sets(make_q, nb, dev)
    rc, rs, _ = quantize_nvfp4(qdata[0][0], qdata[0][1])
    qref = (rc, swizzle_scales(rs).view(torch.uint8))
    cases.append((f"quantize [{t},{k}]", base, qdata, nb, qref, lambda c, d: nq.run_quant(c, *d)))

    nb_d = nvfp4_bytes(128, k, k)  # a decode step's quantize (graph-replay latency)
    ddata = sets(lambda j: make_q(j, 128), nb_d, dev)
    rc, rs, _ = quantize_nvfp4(ddata[0][0], ddata[0][1])
    dref = (rc, swizzle_scales(rs).view(torch.uint8))
    cases.append((f"quantize [128,{k}]", base, ddata, nb_d, dref, lambda c, d: nq.run_quant(c, *d)))

    sw = nq.QuantConfig(i_, prologue=nq.Prologue.SWIGLU, row_weight=True)
    nb_sw = nvfp4_bytes(t, 2 * i_, i_) + 4 * t

    def make_l1(j):
        l1 = (torch.randn(t, 2 * i_, device=dev) * 4).to(torch.bfloat16)
        w = torch.rand(t, device=dev)
        h = ref_swiglu(l1, 10.0) * w[:, None] if j == 0 else None
        gs = torch.full((1,), 0.01, device=dev)
        codes = torch.empty(t, i_ // 2, dtype=torch.uint8, device=dev)
        sf = torch.empty(sw.scale_bytes(t), dtype=torch.uint8, device=dev)
        return l1, gs, codes, sf, w, h

    sdata = sets(make_l1, nb_sw, dev)
    rc, rs, _ = quantize_nvfp4(sdata[0][5], sdata[0][1])
    sref = (rc, swizzle_scales(rs).view(torch.uint8))
    cases.append(
        (
            f"swiglu-requant [{t},2x{i_}]",
            sw,
            sdata,
            nb_sw,
            sref,
            lambda c, d: nq.run_quant(c, *d[:4], d[4]),
        )
    )
    out = []
    for name, cfg0, data, nbytes, (rc, rsf), launch in cases:
        for tun in VARIANTS:
            label = f"{name} bpt={tun['blocks_per_thread']} thr={tun['threads']}"
            label += "" if tun["bracketed_codes"] else " divided"
            if match and not any(m in label for m in match.split(",")):
                continue
            rec = {"case": label, "tuning": tun, "median_us": None, "%copy": None}
            try:
                cfg = nq.tuned(cfg0, tun)
                if cfg.blocks_per_thread != tun["blocks_per_thread"]:
                    raise ValueError(f"blocks_per_thread does not divide k/16={cfg0.cols}")
                data[0][2].fill_(0xAA)
                data[0][3].fill_(0xAA)
                launch(cfg, data[0])
                torch.cuda.synchronize()
                ok = bool(
                    torch.equal(data[0][2], rc) and torch.equal(data[0][3][: rsf.numel()], rsf)
                )
                rec["exact"] = ok
                if ok:
                    rec.update(
                        row(
                            label,
                            lambda j, c=cfg, f=launch, d=data: f(c, d[j]),
                            len(data),
                            nbytes,
                            copy,
                            ok,
                            budget,
                        )
                    )
                else:
                    rec["error"] = "FAIL: not bit-exact against reference/"
            except Exception as e:  # one variant's failure is its row, not the run's end
                rec["exact"] = None
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out.append(rec)
            us = f"{rec['median_us']:10.2f} {rec['%copy']:6.1f}" if rec["median_us"] else " " * 17
            print(f"{label:44} {us} {rec['exact']} {rec.get('error', '')}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--variants",
        action="store_true",
        help="time every VARIANTS tuning (bit-exact checked first), one table, then stop",
    )
    ap.add_argument("--match", default="", help="--variants: labels containing one of S,S2,..")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    copy = timing.copy_bandwidth_gbps(dev)
    if args.variants:
        print(f"device {torch.cuda.get_device_name()}  copy bandwidth {copy:.0f} GB/s (same run)")
        print(f"default tuning {nq.DEFAULT_TUNING}\n")
        print(f"{'variant':44} {'us':>10} {'%copy':>6} bit-exact")
        rows = variant_rows(dev, copy, min(args.budget, 0.3), args.match)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "quantize_variants.json").write_text(
                json.dumps({"copy_gbps": copy, "rows": rows}, indent=1)
            )
        return
    rows = []

    for t in (8192, 128):
        rows += quantize_rows(t, 7168, dev, copy, args.budget)
    rows += gather_rows(4096, 6, 7168, dev, copy, args.budget)

    # SwiGLU-requant of the L1 output [8192, 2 x 3072], routing weight per row
    t, i_ = 8192, 3072
    cfg = nq.tuned(nq.QuantConfig(i_, prologue=nq.Prologue.SWIGLU, row_weight=True), rows=t)
    nb = nvfp4_bytes(t, 2 * i_, i_) + 4 * t

    def make_l1(j):
        l1 = (torch.randn(t, 2 * i_, device=dev) * 4).to(torch.bfloat16)
        w = torch.rand(t, device=dev)
        h = ref_swiglu(l1, 10.0) * w[:, None]
        gs = (h.abs().amax() / 2688).reshape(1)
        codes = torch.empty(t, i_ // 2, dtype=torch.uint8, device=dev)
        sf = torch.empty(cfg.scale_bytes(t), dtype=torch.uint8, device=dev)
        return l1, gs, codes, sf, w, h

    data = sets(make_l1, nb, dev)
    l1, gs, codes, sf, w, h = data[0]
    nq.run_quant(cfg, l1, gs, codes, sf, w)
    rc, rs, _ = quantize_nvfp4(h, gs)
    exact = bool(torch.equal(codes, rc) and torch.equal(sf, swizzle_scales(rs).view(torch.uint8)))
    rows.append(
        row(
            f"cutedsl swiglu-requant [{t},2x{i_}]",
            lambda j: nq.run_quant(cfg, *data[j][:4], data[j][4]),
            len(data),
            nb,
            copy,
            exact,
            args.budget,
        )
    )

    # grouped linear form: one launch for G groups, gs[G]
    t, g, d = 4096, 16, 4096
    cfg = nq.tuned(nq.QuantConfig(d, groups=g), rows=t)
    nb = nvfp4_bytes(t * g, d, d)

    def make_g(j):
        o = torch.randn(t, g * d, device=dev).to(torch.bfloat16)
        gs = torch.rand(g, device=dev) * 1e-3 + 1e-3
        codes = torch.empty(g * t, d // 2, dtype=torch.uint8, device=dev)
        sf = torch.empty(cfg.scale_bytes(t), dtype=torch.uint8, device=dev)
        return o.view(t, g, d), gs, codes, sf

    data = sets(make_g, nb, dev)
    rows.append(
        row(
            f"cutedsl grouped quantize G={g} [{t},{d}]",
            lambda j: nq.run_quant(cfg, *data[j]),
            len(data),
            nb,
            copy,
            None,
            args.budget,
        )
    )

    print(f"\ndevice {torch.cuda.get_device_name()}  copy bandwidth {copy:.0f} GB/s (same run)\n")
    hdr = f"{'case':46} {'median us':>10} {'p10..p90 us':>17} {'GB/s':>7} {'%copy':>6} exact"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['case']:46} {r['median_us']:10.2f} {r['p10_us']:8.2f}..{r['p90_us']:<8.2f} "
            f"{r['GB/s']:7.0f} {r['%copy']:6.1f} {r['exact']}"
        )
    by = {r["case"]: r for r in rows}
    ours = by["cutedsl quantize [8192,7168] swizzled"]["median_us"]
    seed = by["torch.compile seed-style quantize [8192,7168]"]["median_us"]
    print(f"\nquantize [8192,7168]: {seed / ours:.2f}x the torch.compile'd seed-style quantizer")
    g = by["cutedsl gather quantize 4096x top-6 [24576,7168]"]["median_us"]
    yard = by["cutedsl plain quantize [24576,7168] (yardstick)"]["median_us"]
    print(f"gather quantize 4096 x top-6: {g / yard:.2f}x the plain quantize of the same rows")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantize.json").write_text(
            json.dumps({"copy_gbps": copy, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
