"""Speed: one measuring protocol for every adapter and stage (docs/timing.md).

A measurement times a callable `fn(i)` that runs the hot path on input set `i`. There are as many
input sets as it takes for their total to exceed 2x the device's L2 (`cold_l2_sets`), and one
sample is one pass over all of them, so every call reads cold memory. In graph mode the pass is
captured once as a CUDA graph and a sample is one replay between two CUDA events; in eager mode
it is the Python loop itself, which shows launch overhead. Samples are drawn until the 95%
confidence interval of their median is narrower than a target (`converged`), or the time budget
or sample cap runs out (`time_limit`, `max_samples`): the record says which. Every sample is
kept; the summary is the median, p10/p90 and the relative spread (p90 - p10) / median. NVML
(`nvidia-ml-py`) reads the device's clocks, temperature and power before and after.

NVBench's Python API (`cuda-bench`, evaluated at 0.3.0) was considered as the engine: it runs
registered benchmarks from `run_all_benchmarks(argv)` and hands samples back only through the
JSON files it writes, with no CUDA-graph replay of a Python callable and no per-call in-process
result, so the protocol is written here on CUDA events instead.

What a case times (`time_case`), the bytes and FLOPs it touches (`work`), the roofline of a device
(`roofline`) and the verdict between two sets of samples (`compare_samples`) live here too; the
runner turns the result into a `timing` row beside the case's error rows. The statistics and the
stopping rule take any sample source, so they are tested on CPU with synthetic samples.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# protocol and statistics (no GPU needed)


@dataclass(frozen=True)
class Protocol:
    """How long and how finely to measure (defaults suit kernels of 1 us to 100 ms)."""

    warmup_s: float = 0.1  # discarded samples first (clocks, caches, lazy init)
    budget_s: float = 1.0  # time limit for the measured samples
    min_samples: int = 20
    max_samples: int = 5000
    target_ci: float = 0.005  # stop when the 95% CI of the median is within +-0.5%
    graph: bool = True  # CUDA-graph replays (eager is always measured too, for launch overhead)

    def __post_init__(self) -> None:
        for name in ("warmup_s", "budget_s", "target_ci"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Protocol.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 1 <= self.min_samples <= self.max_samples:
            raise ValueError(
                f"Protocol needs 1 <= min_samples <= max_samples, got "
                f"{self.min_samples} and {self.max_samples}"
            )


class StopReason(str, enum.Enum):
    CONVERGED = "converged"  # the median's 95% CI fell under the target
    TIME_LIMIT = "time_limit"  # the budget ran out first
    MAX_SAMPLES = "max_samples"  # the sample cap was reached first


def median_ci(samples: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (order statistics, normal approx)."""
    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("median_ci of no samples")
    half = z * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    return float(x[lo]), float(x[hi])


def ci_rel(samples: Sequence[float]) -> float:
    """Half-width of the median's 95% CI relative to the median."""
    lo, hi = median_ci(samples)
    med = float(np.median(samples))
    return (hi - lo) / (2 * med) if med > 0 else math.inf


def collect(
    sample: Callable[[], float], proto: Protocol, clock: Callable[[], float] = time.perf_counter
) -> tuple[list[float], StopReason]:
    """Warm up, then draw samples from `sample()` until the stopping rule holds."""
    t0 = clock()
    sample()  # at least one warm-up call, whatever the budget
    while clock() - t0 < proto.warmup_s:
        sample()
    samples: list[float] = []
    t0 = clock()
    while True:
        samples.append(float(sample()))
        n = len(samples)
        if n >= proto.min_samples and ci_rel(samples) <= proto.target_ci:
            return samples, StopReason.CONVERGED
        if n >= proto.max_samples:
            return samples, StopReason.MAX_SAMPLES
        if clock() - t0 >= proto.budget_s and n >= min(3, proto.min_samples):
            return samples, StopReason.TIME_LIMIT


@dataclass
class Timing:
    """One measurement: every sample (us per call) and its summary."""

    mode: str  # "graph" or "eager"
    samples_us: list[float]
    stop_reason: str
    n_sets: int = 1

    @property
    def median_us(self) -> float:
        return float(np.median(self.samples_us))

    @property
    def p10_us(self) -> float:
        return float(np.percentile(self.samples_us, 10))

    @property
    def p90_us(self) -> float:
        return float(np.percentile(self.samples_us, 90))

    @property
    def rel_spread(self) -> float:
        """(p90 - p10) / median: how wide the distribution is (not how well the median is known)."""
        return (self.p90_us - self.p10_us) / self.median_us if self.median_us > 0 else math.inf

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "latency_us": self.median_us,
            "latency_p10_us": self.p10_us,
            "latency_p90_us": self.p90_us,
            "rel_spread": self.rel_spread,
            "ci_rel": ci_rel(self.samples_us),
            "n_samples": len(self.samples_us),
            "stop_reason": self.stop_reason,
            "n_sets": self.n_sets,
            "samples_us": [round(s, 4) for s in self.samples_us],
        }


# --------------------------------------------------------------------------------------------
# verdicts between two runs


class Verdict(str, enum.Enum):
    FASTER = "faster"
    SLOWER = "slower"
    SAME = "same"
    AMBIGUOUS = "ambiguous"


SAME_WITHIN = 0.03  # a median ratio whose CI lies within 1 +- 3% is SAME


def compare_samples(
    base: Sequence[float],
    new: Sequence[float],
    same_within: float = SAME_WITHIN,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Verdict from a bootstrap of the median ratio new/base (95% CI), never from one mean.

    FASTER / SLOWER when the whole CI lies beyond 1 -+ `same_within`; SAME when it lies inside;
    AMBIGUOUS when it straddles a boundary (too noisy to tell).
    """
    b, n = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    if len(b) == 0 or len(n) == 0:
        raise ValueError("compare_samples needs samples on both sides")
    rng = np.random.default_rng(seed)
    mb = np.median(rng.choice(b, (n_boot, len(b))), axis=1)
    mn = np.median(rng.choice(n, (n_boot, len(n))), axis=1)
    lo, hi = (float(v) for v in np.percentile(mn / mb, [2.5, 97.5]))
    return {
        "verdict": _verdict(lo, hi, same_within).value,
        "ratio": float(np.median(n) / np.median(b)),
        "ratio_lo": lo,
        "ratio_hi": hi,
    }


def compare_intervals(
    base: tuple[float, float, float],
    new: tuple[float, float, float],
    same_within: float = SAME_WITHIN,
) -> dict[str, Any]:
    """Verdict from (median, p10, p90) only, for rows recorded without samples: the p10..p90
    intervals must not overlap for FASTER / SLOWER."""
    (mb, lb, hb), (mn, ln, hn) = base, new
    ratio = mn / mb
    if ln > hb:
        v = Verdict.SLOWER
    elif hn < lb:
        v = Verdict.FASTER
    elif abs(ratio - 1) <= same_within and hb / lb - 1 <= 2 * same_within:
        v = Verdict.SAME
    else:
        v = Verdict.AMBIGUOUS
    return {"verdict": v.value, "ratio": ratio, "ratio_lo": ln / hb, "ratio_hi": hn / lb}


def _verdict(lo: float, hi: float, tol: float) -> Verdict:
    if hi < 1 - tol:
        return Verdict.FASTER
    if lo > 1 + tol:
        return Verdict.SLOWER
    if lo >= 1 - tol and hi <= 1 + tol:
        return Verdict.SAME
    return Verdict.AMBIGUOUS


# --------------------------------------------------------------------------------------------
# work and rooflines


@dataclass(frozen=True)
class Work:
    """What a case touches: FLOPs, bytes moved, and the MMA kind its FLOPs run on."""

    flops: float
    bytes: float
    mma: str | None = None  # "fp4" (NVFP4 MMA), "bf16", or None (memory-bound, no MMA)


@dataclass(frozen=True)
class Peak:
    """Datasheet figures of one device (dense tensor-core rates, SXM parts)."""

    hbm_gbps: float
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float | None  # None: no FP4 MMA (Hopper decodes FP4 and runs BF16 MMAs)


# NVIDIA datasheets, dense rates: H100 SXM5 80 GB, H200 SXM 141 GB, B200 (HGX, per GPU).
DATASHEET: dict[str, Peak] = {
    "H100": Peak(hbm_gbps=3350, bf16_tflops=989, fp8_tflops=1979, fp4_tflops=None),
    "H200": Peak(hbm_gbps=4800, bf16_tflops=989, fp8_tflops=1979, fp4_tflops=None),
    "B200": Peak(hbm_gbps=8000, bf16_tflops=2250, fp8_tflops=4500, fp4_tflops=9000),
}


@dataclass(frozen=True)
class Roofline:
    """Peak rates in use, each with where it came from ("datasheet <name>" or "measured")."""

    gbps: float
    bf16_tflops: float
    fp4_tflops: float | None
    source: dict[str, str] = field(default_factory=dict)

    def time_us(self, w: Work) -> float:
        """The fastest this work can run: max(FLOPs / MMA rate, bytes / bandwidth)."""
        t_mem = w.bytes / (self.gbps * 1e9)
        if w.mma is None:
            return t_mem * 1e6
        rate = self.fp4_tflops if w.mma == "fp4" and self.fp4_tflops else self.bf16_tflops
        return max(t_mem, w.flops / (rate * 1e12)) * 1e6

    def row(self) -> dict[str, Any]:
        return {
            "roof_gbps": self.gbps,
            "roof_bf16_tflops": self.bf16_tflops,
            "roof_fp4_tflops": self.fp4_tflops,
            "roof_source": self.source,
        }


def datasheet_for(device_name: str) -> tuple[str, Peak] | None:
    for key, peak in DATASHEET.items():
        if key in device_name.upper():
            return key, peak
    return None


def roofline(
    device_name: str, copy_gbps: float | None = None, bf16_tflops: float | None = None
) -> Roofline | None:
    """The device's roofline: datasheet figures, overridden by rates measured in this run.

    None where the device is not in the table and nothing was measured.
    """
    found = datasheet_for(device_name)
    if found is None and (copy_gbps is None or bf16_tflops is None):
        return None
    key, peak = found if found else ("?", None)
    src = f"datasheet {key}"
    gbps = copy_gbps if copy_gbps is not None else peak.hbm_gbps
    bf16 = bf16_tflops if bf16_tflops is not None else peak.bf16_tflops
    fp4 = peak.fp4_tflops if peak else None
    return Roofline(
        gbps,
        bf16,
        fp4,
        {
            "gbps": "measured (copy)" if copy_gbps is not None else src,
            "bf16_tflops": "measured (cuBLAS)" if bf16_tflops is not None else src,
            "fp4_tflops": src if fp4 else "none (no FP4 MMA)",
        },
    )


def derived(w: Work, median_us: float, roof: Roofline | None) -> dict[str, Any]:
    """TFLOP/s, GB/s and percent of the roofline of one median latency."""
    s = median_us * 1e-6
    out: dict[str, Any] = {
        "flops": w.flops,
        "bytes": w.bytes,
        "mma": w.mma,
        "tflops": w.flops / s / 1e12 if w.flops else None,
        "gbps": w.bytes / s / 1e9,
    }
    if roof is not None:
        out["roofline_us"] = roof.time_us(w)
        out["roofline_pct"] = 100.0 * out["roofline_us"] / median_us
        out.update(roof.row())
    return out


# --------------------------------------------------------------------------------------------
# devices: L2, NVML, measured peaks (CUDA only)


def l2_bytes(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


def cold_l2_sets(
    bytes_per_set: float,
    device: torch.device | None = None,
    max_sets: int = 256,
    l2: int | None = None,
) -> int:
    """How many input sets make a pass over them read more than 2x L2 (at least 2)."""
    if l2 is None:
        l2 = l2_bytes(device if device is not None else torch.device("cuda"))
    if bytes_per_set <= 0:
        return max_sets
    return int(min(max_sets, max(2, math.ceil(2 * l2 / bytes_per_set) + 1)))


def device_state(device: torch.device) -> dict[str, Any]:
    """Name, SM and memory clocks, temperature, power and throttle reasons, read through NVML."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as e:
        return {"nvml": f"unavailable: {e}"}
    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device)
        try:
            h = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
        except (pynvml.NVMLError, AttributeError):
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        name = pynvml.nvmlDeviceGetName(h)
        st = {
            "name": name.decode() if isinstance(name, bytes) else name,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
        }
        try:
            st["throttle_reasons"] = int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h))
        except pynvml.NVMLError:
            pass
        return st
    except pynvml.NVMLError as e:
        return {"nvml": f"error: {e}"}


def _events_sampler(run: Callable[[], None], n_calls: int) -> Callable[[], float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample() -> float:
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000.0 / n_calls  # ms -> us per call

    return sample


def measure(
    fn: Callable[[int], Any],
    n_sets: int = 1,
    *,
    graph: bool = True,
    proto: Protocol | None = None,
    **proto_fields: Any,
) -> Timing:
    """Time `fn(i)` over `n_sets` input sets on the current CUDA device (see module doc).

    With `graph=True` the pass over the sets is captured once as a CUDA graph; a callable that
    cannot be captured raises (the caller records why and falls back to eager, visibly).
    `proto_fields` override fields of `proto` (e.g. `budget_s=0.3`).
    """
    proto = dataclasses.replace(proto or Protocol(), **proto_fields)

    def one_pass() -> None:
        for i in range(n_sets):
            fn(i)

    side = torch.cuda.Stream()  # warm-up on a side stream, as graph capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_pass()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.cuda.graph(g):
                one_pass()
        if any("Graph is empty" in str(w.message) for w in caught):
            # Replaying nothing would time as a fast kernel: the work ran off the capture stream.
            raise RuntimeError(
                "the captured CUDA graph is empty (work launched on another stream?)"
            )
        run: Callable[[], None] = g.replay
    else:
        run = one_pass
    samples, why = collect(_events_sampler(run, n_sets), proto)
    return Timing("graph" if graph else "eager", samples, why.value, n_sets)


def copy_bandwidth_gbps(device: torch.device | None = None, nbytes: int = 1 << 30) -> float:
    """Device-to-device streaming rate (read + write bytes) measured now, as the memory roof:
    the faster of a DMA copy (`copy_` of bytes) and a copy kernel (a bf16 `mul` by one)."""
    device = device or torch.device("cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    sb, db = src.view(torch.bfloat16), dst.view(torch.bfloat16)
    rates = []
    for run in (lambda i: dst.copy_(src), lambda i: torch.mul(sb, 1, out=db)):
        t = measure(run, warmup_s=0.2, budget_s=0.3, target_ci=0.002)
        rates.append(2 * nbytes / (t.median_us * 1e-6) / 1e9)
    return max(rates)


def bf16_matmul_tflops(
    device: torch.device | None = None, m: int = 8192, n: int = 8192, k: int = 8192
) -> float:
    """BF16 cuBLAS rate measured now, as the compute roof of Hopper's decoded-FP4 GEMMs."""
    device = device or torch.device("cuda")
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    t = measure(lambda i: torch.mm(a, b, out=c), warmup_s=0.5, budget_s=0.3, target_ci=0.002)
    return 2 * m * n * k / (t.median_us * 1e-6) / 1e12


_MEASURED_ROOF: dict[str, Roofline | None] = {}


def measured_roofline(device: torch.device) -> Roofline | None:
    """The roofline with copy bandwidth and BF16 rate measured once per process and device."""
    key = str(device)
    if key not in _MEASURED_ROOF:
        name = torch.cuda.get_device_name(device)
        _MEASURED_ROOF[key] = roofline(
            name, copy_bandwidth_gbps(device), bf16_matmul_tflops(device)
        )
    return _MEASURED_ROOF[key]


# --------------------------------------------------------------------------------------------
# what a case times


class TimingUnavailable(RuntimeError):
    """Timing cannot run here (no CUDA, or the adapter has no timed form of the stage)."""


def _bytes_fp4(n: float) -> float:
    return n / 2 + n / 16  # packed E2M1 codes + one UE4M3 scale per 16


def work(case: Any) -> Work:
    """The compulsory FLOPs and bytes of a case: its inputs, the weights of experts that received
    tokens, and its outputs (intermediates and padding are not counted)."""
    from harness.cases import Stage
    from harness.stages.inputs import routed_counts

    s, t = case.shape, case.tokens
    h, i2 = s.hidden, 2 * s.intermediate
    if case.stage is Stage.QUANTIZE:
        return Work(0.0, t * h * 2 + _bytes_fp4(t * h))
    if case.stage is Stage.SWIGLU_REQUANT:
        return Work(0.0, t * i2 * 2 + _bytes_fp4(t * s.intermediate))
    if case.stage is Stage.SHARED_EXPERT:
        flops = 2.0 * t * h * i2 + 2.0 * t * s.intermediate * h
        return Work(flops, 2 * t * h * 2 + _bytes_fp4(h * i2 + s.intermediate * h), "fp4")
    if case.stage is Stage.GROUPED_LINEAR:
        d, r = s.n_groups * s.group_dim, s.o_lora_rank
        return Work(2.0 * t * d * r, t * d * 2 + _bytes_fp4(d * r) + t * s.n_groups * r * 2, "fp4")
    counts = routed_counts(case)
    rows, touched = int(counts.sum()), int((counts > 0).sum())
    if case.stage is Stage.SCALE_ASSEMBLY:
        c = h // 16
        return Work(0.0, 2 * (rows * c + s.n_experts * c * i2))  # read + write every scale byte
    if case.stage is Stage.GROUPED_GEMM:
        return Work(
            2.0 * rows * h * i2,
            _bytes_fp4(rows * h) + touched * _bytes_fp4(h * i2) + rows * i2 * 2,
            "fp4",
        )
    flops = 2.0 * rows * h * i2 + 2.0 * rows * s.intermediate * h  # routed MoE
    return Work(flops, 2 * t * h * 2 + touched * _bytes_fp4(h * i2 + s.intermediate * h), "fp4")


class _Prepared:
    """Routes `stage_inputs.run_layer`'s calls to the adapter's `prepare_<layer>` methods."""

    def __init__(self, adapter: Any) -> None:
        self._adapter = adapter
        self.conventions = getattr(adapter, "conventions", None)  # run_layer reads them

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._adapter, f"prepare_{name}", None)
        if not callable(fn):
            raise TimingUnavailable(
                f"{getattr(self._adapter, 'name', self._adapter)} has no prepare_{name}(): layer "
                f"timing needs a prepared steady-state run (docs/timing.md)"
            )
        return fn


def _prepare_stage(adapter: Any, method: str, *args: Any) -> Callable[[], Any]:
    """The adapter's `prepare_<method>(*args)` when it has one, else the stage method itself."""
    prep = getattr(adapter, f"prepare_{method}", None)
    if callable(prep):
        return prep(*args)
    fn = getattr(adapter, method, None)
    if not callable(fn):
        raise TimingUnavailable(f"{adapter.name} has no {method}() or prepare_{method}()")
    return lambda: fn(*args)


def prepare(case: Any, adapter: Any, dev: torch.device) -> Callable[[], Any]:
    """One input set of `case` (its own seed) with outputs allocated: a call runs the hot path."""
    from harness.adapters import STAGE_METHODS, to_adapter_scale
    from harness.cases import Stage
    from harness.stages import inputs as stage_inputs
    from reference.layouts import assemble_scales_2d_side_from_offsets, assemble_scales_3d_side

    conv = adapter.conventions.global_scale
    method = STAGE_METHODS[case.stage]
    s, t = case.shape, case.tokens
    if case.stage is Stage.QUANTIZE:  # the very inputs and scale the verdict used
        x, gs = stage_inputs.quantize_inputs(case, dev)
        codes = torch.empty((t, s.hidden // 2), dtype=torch.uint8, device=dev)
        scales = torch.empty((t, s.hidden // 16), dtype=torch.float8_e4m3fn, device=dev)
        return _prepare_stage(adapter, method, x, to_adapter_scale(gs, conv), codes, scales)
    if case.stage is Stage.SWIGLU_REQUANT:
        l1, _, gs = stage_inputs.swiglu_inputs(case, dev, adapter.conventions)
        i = s.intermediate
        codes = torch.empty((t, i // 2), dtype=torch.uint8, device=dev)
        scales = torch.empty((t, i // 16), dtype=torch.float8_e4m3fn, device=dev)
        args = (l1, case.limit, to_adapter_scale(gs, conv), codes, scales)
        return _prepare_stage(adapter, method, *args)
    if case.stage is Stage.SCALE_ASSEMBLY:
        a, offsets, b = stage_inputs.scale_assembly_inputs(case, dev)
        o2d = torch.empty_like(assemble_scales_2d_side_from_offsets(a, offsets)[0])
        o3d = torch.empty_like(assemble_scales_3d_side(list(b)))
        return _prepare_stage(adapter, method, a, offsets, b, o2d, o3d)
    if case.stage is Stage.GROUPED_GEMM:
        _, ops = stage_inputs.gemm_operands(case, dev, conv)
        out = torch.empty(
            (ops.a_codes.shape[0], ops.b_codes.shape[-1]), dtype=torch.bfloat16, device=dev
        )
        return _prepare_stage(adapter, method, ops, out)
    return stage_inputs.run_layer(case, _Prepared(adapter), stage_inputs.layer_inputs(case, dev))


def _input_sets(case: Any, n: int) -> list[Any]:
    return [dataclasses.replace(case, seed=case.seed + 7919 * i) for i in range(n)]


def time_case(
    case: Any,
    adapter: Any,
    proto: Protocol = Protocol(),
    roof: Roofline | None = None,
) -> dict[str, Any]:
    """Time `adapter` on `case` (graph replays, and eager): a timing row's metrics.

    Raises TimingUnavailable off CUDA or where the adapter cannot be timed on this stage.
    """
    dev = torch.device(case.device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise TimingUnavailable(f"timing needs CUDA; this case runs on {case.device}")
    if case.stage.value == "routed_moe_ep":  # its ranks are other processes (harness.stages.ep)
        raise TimingUnavailable("routed_moe_ep is not timed: time its routed_moe cases")
    w = work(case)
    n = cold_l2_sets(w.bytes, dev, max_sets=64)
    with torch.no_grad():
        fns = [prepare(c, adapter, dev) for c in _input_sets(case, n)]
        fn = lambda i: fns[i]()  # noqa: E731
        before = device_state(dev)
        eager = measure(fn, n, graph=False, proto=proto)
        graph_error = None
        headline = eager
        if proto.graph:
            try:
                headline = measure(fn, n, graph=True, proto=proto)
            except Exception as e:  # noqa: BLE001 - recorded: the headline is then eager
                graph_error = f"{type(e).__name__}: {e}"[:500]
        after = device_state(dev)
    m = headline.summary()
    m.update(
        eager_us=eager.median_us,
        eager_samples_us=eager.summary()["samples_us"],
        launch_overhead_us=eager.median_us - headline.median_us if headline is not eager else None,
        graph_error=graph_error,
        l2_bytes=l2_bytes(dev),
        device=torch.cuda.get_device_name(dev),
        nvml_before=before,
        nvml_after=after,
    )
    m.update(derived(w, headline.median_us, roof))
    return m


__all__ = [
    "DATASHEET",
    "Peak",
    "Protocol",
    "Roofline",
    "StopReason",
    "Timing",
    "TimingUnavailable",
    "Verdict",
    "Work",
    "bf16_matmul_tflops",
    "ci_rel",
    "cold_l2_sets",
    "collect",
    "compare_intervals",
    "compare_samples",
    "copy_bandwidth_gbps",
    "derived",
    "device_state",
    "l2_bytes",
    "measure",
    "measured_roofline",
    "prepare",
    "time_case",
    "work",
    "median_ci",
    "roofline",
]
