"""Case files: YAML sweep definitions -> a list of frozen, hashable `Case`s.

A case file holds `sweeps`; each sweep names one stage or layer and lists values for the axes that
stage has. The loader enumerates only valid combinations: an axis a stage does not have is an error
at load time (naming the file and the field), never a product that is skipped later. Every error is
a `CaseError` whose one-line message names the file, the field and what was wrong; the CLI prints
it without a traceback. The schema is documented in docs/cases.md; keep the two in step.

A `Case` doubles as cache key, readable id (`moe_t129_e4_k2_h256_L10_uniform_r1_s0`) and report
row (`Case.row()`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class CaseError(ValueError):
    """A malformed case file; the message names file and field."""


class Stage(enum.Enum):
    """What a case exercises (stage level: teacher forced; layer level: end to end)."""

    QUANTIZE = "quantize"  # activation quantize: codes and scale bytes, bit-exact
    SCALE_ASSEMBLY = "scale_assembly"  # 2D (per-group activations) and 3D (weights) swizzle
    GROUPED_GEMM = "grouped_gemm"  # 2Dx3D NVFP4 grouped GEMM within the derived bound
    SWIGLU_REQUANT = "swiglu_requant"  # SwiGLU with limit + requantize, bit-exact
    SHARED_EXPERT = "shared_expert"  # layer, end to end
    ROUTED_MOE = "routed_moe"  # layer, end to end
    GROUPED_LINEAR = "grouped_linear"  # wo_a o-projection layer, end to end
    ROUTED_MOE_EP = "routed_moe_ep"  # routed MoE over ep_size rank processes (harness.stages.ep)

    @property
    def is_layer(self) -> bool:
        return self in (Stage.SHARED_EXPERT, Stage.ROUTED_MOE, Stage.GROUPED_LINEAR)


class Distribution(enum.Enum):
    """How activation inputs are drawn."""

    NORMAL = "normal"  # N(0, 1)
    OUTLIERS = "outliers"  # Student-t (df 3) plus a few 100x outliers
    FP4_GRID = "fp4_grid"  # exactly on the FP4 grid with power-of-two block scales: no rounding
    SPARSE = "sparse"  # 90% zeros
    ZERO_BLOCKS = "zero_blocks"  # a quarter of the 16-element blocks all zero
    MIDPOINTS = "midpoints"  # E2M1 rounding midpoints at power-of-two scales: every tie exercised
    NAN_ONE = "nan_one"  # one NaN element
    INF_ONE = "inf_one"  # one +Inf element

    @property
    def exact(self) -> bool:
        """Every intermediate is exact (power-of-two scales): equality is demanded, no classes."""
        return self in (Distribution.FP4_GRID, Distribution.MIDPOINTS)


class Probe(enum.Enum):
    """An isolation probe of a grouped GEMM case (harness.probes): the kernel runs on clean and on
    perturbed input buffers, and every row the perturbation must not reach is bitwise unchanged."""

    PADDING_NAN = "padding_nan"  # NaN (0x7F) in the padding rows of the swizzled scale buffers
    PADDING_GARBAGE = "padding_garbage"  # random bytes in every padding byte of those buffers
    SCALE_PADDING_7F = "scale_padding_7f"  # 0x7F in the padding columns past K/16
    EXPERT_SCALE_BYTE = "expert_scale_byte"  # expert 0's largest weight scale byte, one binade down


class EpMode(enum.Enum):
    """How an expert-parallel case's ranks share the tokens and combine (harness.stages.ep)."""

    ALLREDUCE = "allreduce"  # every rank runs every token; partial outputs summed by all-reduce
    ALLTOALL = "alltoall"  # tokens sharded; all-to-all dispatch of routed tokens, combine back


class Routing(enum.Enum):
    """How tokens are routed to the local experts."""

    UNIFORM = "uniform"  # top-k distinct experts drawn uniformly per token
    ONE_EXPERT = "one_expert"  # every token to expert 0 (one slot), other slots elsewhere
    EMPTY_EXPERTS = "empty_experts"  # only even experts receive tokens
    INVALID_IDS = "invalid_ids"  # a quarter of the slots hold -1 or ids of other ranks


@dataclass(frozen=True)
class Shape:
    """Model dimensions; presets in PRESETS, any field overridable in a case file."""

    hidden: int = 256
    intermediate: int = 128
    n_experts: int = 4  # local experts of one expert-parallel rank (routed_moe_ep: of each)
    top_k: int = 2
    n_groups: int = 2  # o-projection groups
    group_dim: int = 256  # heads_per_group * head_dim
    head_dim: int = 128
    o_lora_rank: int = 128
    # Routed MoE: DeepSeek V4's gate multiplies the normalized top-k weights by this factor
    # (V4-Pro 2.5, V4-Flash 1.5); where it is applied is a convention (docs/cases.md "Routing").
    routed_scaling_factor: float = 1.0

    def validate(self, where: str) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "routed_scaling_factor":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                if not ok or not math.isfinite(v) or v <= 0:
                    raise CaseError(f"{where}.{f.name}: must be a finite number > 0, got {v!r}")
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CaseError(f"{where}.{f.name}: must be a positive integer, got {v!r}")
        for name in ("hidden", "intermediate", "group_dim"):
            if getattr(self, name) % 32:
                raise CaseError(
                    f"{where}.{name}: must be a multiple of 32 (NVFP4 blocks of 16, two codes "
                    f"per byte), got {getattr(self, name)}"
                )
        if self.top_k > self.n_experts:
            raise CaseError(f"{where}.top_k: {self.top_k} exceeds n_experts={self.n_experts}")
        if self.group_dim % self.head_dim:
            raise CaseError(
                f"{where}.group_dim: {self.group_dim} is not a multiple of head_dim={self.head_dim}"
            )


@dataclass(frozen=True)
class PublishedConfig:
    """A released model's numbers, as its config.json spells them; the presets derive from it."""

    source: str
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    num_attention_heads: int
    head_dim: int
    o_groups: int
    o_lora_rank: int
    routed_scaling_factor: float

    def shape(self, ep: int = 8) -> Shape:
        """The shapes one rank sees at expert parallelism `ep` (attention replicated, as the
        published expert-parallel plans keep it: every o-group is local)."""
        if self.n_routed_experts % ep:
            raise ValueError(f"{ep=} does not divide n_routed_experts={self.n_routed_experts}")
        return Shape(
            hidden=self.hidden_size,
            intermediate=self.moe_intermediate_size,
            n_experts=self.n_routed_experts // ep,
            top_k=self.num_experts_per_tok,
            n_groups=self.o_groups,
            group_dim=self.num_attention_heads * self.head_dim // self.o_groups,
            head_dim=self.head_dim,
            o_lora_rank=self.o_lora_rank,
            routed_scaling_factor=self.routed_scaling_factor,
        )


_TRANSFORMERS = "transformers src/transformers/models/deepseek_v4/configuration_deepseek_v4.py"
PUBLISHED: dict[str, PublishedConfig] = {
    # the defaults of transformers' DeepseekV4Config are V4-Flash's (checkpoint
    # deepseek-ai/DeepSeek-V4-Flash-Base)
    "v4_flash": PublishedConfig(
        source=f"{_TRANSFORMERS} (defaults = deepseek-ai/DeepSeek-V4-Flash config.json)",
        hidden_size=4096,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        num_experts_per_tok=6,
        num_attention_heads=64,
        head_dim=512,
        o_groups=8,
        o_lora_rank=1024,
        routed_scaling_factor=1.5,
    ),
    "v4_pro": PublishedConfig(
        source=f"deepseek-ai/DeepSeek-V4-Pro config.json, read by {_TRANSFORMERS}",
        hidden_size=7168,
        moe_intermediate_size=3072,
        n_routed_experts=384,
        num_experts_per_tok=6,
        num_attention_heads=128,
        head_dim=512,
        o_groups=16,
        o_lora_rank=1024,
        routed_scaling_factor=2.5,
    ),
}

_PRO_RSF = PUBLISHED["v4_pro"].routed_scaling_factor
_FLASH_RSF = PUBLISHED["v4_flash"].routed_scaling_factor
# docs/design.md §3; n_experts is the local count of one rank at EP=8. Reduced presets keep
# the published proportions divided by 8 (hidden, intermediate, head_dim, group dim, rank) with
# 8 local experts: CPU sized.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(),
    "v4_pro": PUBLISHED["v4_pro"].shape(ep=8),
    "v4_flash": PUBLISHED["v4_flash"].shape(ep=8),
    # the seed's wo_a runner: 8 local groups of 8192 -> 1536 (not a published V4 shape)
    "v4_pro_seed_wo_a": Shape(7168, 3072, 48, 6, 8, 8192, 128, 1536, _PRO_RSF),
    "v4_pro_reduced": Shape(896, 384, 8, 6, 16, 512, 64, 128, _PRO_RSF),
    "v4_flash_reduced": Shape(512, 256, 8, 6, 8, 512, 64, 128, _FLASH_RSF),
}


class Tolerance(enum.Enum):
    """How a case's outputs are judged."""

    DERIVED = "derived"  # bit-exact (or classified) where discrete, derived bound where summed
    EXACT = "exact"  # every output bit-exact, no mismatch classes accepted


@dataclass(frozen=True)
class Budget:
    """End-to-end budget of a layer case (layers accumulate several roundings).

    calc_diff None (the default): derived per case from the measured noise floor (harness.stages
    `derived_calc_diff_budget`); a number caps it by hand."""

    calc_diff: float | None = None
    atol: float = 0.0
    rtol: float = 0.0
    min_frac_within: float = 0.0  # 0 disables the atol/rtol check


# Which axes each stage has: the loader rejects any other axis for it.
AXES: dict[Stage, tuple[str, ...]] = {
    Stage.QUANTIZE: ("tokens", "distributions", "scale_ratios"),
    Stage.SCALE_ASSEMBLY: ("tokens", "routing"),
    Stage.GROUPED_GEMM: ("tokens", "distributions", "routing", "probes"),
    Stage.SWIGLU_REQUANT: ("tokens", "distributions", "limits"),
    Stage.SHARED_EXPERT: ("tokens", "distributions", "limits", "scale_ratios"),
    Stage.ROUTED_MOE: ("tokens", "distributions", "limits", "scale_ratios", "routing"),
    Stage.GROUPED_LINEAR: ("tokens", "distributions", "scale_ratios"),
    Stage.ROUTED_MOE_EP: (
        "tokens",
        "distributions",
        "limits",
        "scale_ratios",
        "routing",
        "ep_sizes",
        "ep_modes",
    ),
}
_TOP = ("name", "description", "defaults", "sweeps")


@dataclass(frozen=True)
class Case:
    """One runnable case: a stage, shapes and one value per axis. Its field defaults are the
    case files' defaults too (`SWEEP_FIELDS` reads them): written once, here."""

    stage: Stage
    shape: Shape = Shape()
    tokens: int = 16
    _: dataclasses.KW_ONLY  # the rest by keyword only: Case(stage, shape, tokens, seed=1, ...)
    seed: int = 0
    distribution: Distribution = Distribution.NORMAL
    scale_ratio: float | None = None  # live amax / calibrated amax; None = dynamic scale
    routing: Routing = Routing.UNIFORM
    limit: float | None = 10.0  # SwiGLU clamp limit; None = no clamp
    tolerance: Tolerance = Tolerance.DERIVED
    budget: Budget = field(default_factory=Budget)
    backends: tuple[str, ...] = ("reference",)
    timeout_s: float = 120.0
    device: str = "cpu"
    source: str = ""  # file the case came from
    baselines: tuple[str, ...] = ()  # adapters timed beside each backend (`run --time`)
    probe: Probe | None = None  # grouped GEMM isolation probe (harness.probes); None: none
    ep_size: int = 1  # routed_moe_ep: ranks, each holding shape.n_experts of the experts
    ep_mode: EpMode = EpMode.ALLREDUCE  # routed_moe_ep: how the ranks dispatch and combine

    @property
    def id(self) -> str:
        s, parts = self.shape, [self.stage.value, f"t{self.tokens}"]
        if self.stage in (Stage.QUANTIZE, Stage.SWIGLU_REQUANT, Stage.SHARED_EXPERT):
            parts.append(f"h{s.hidden}")
        if self.stage not in (Stage.QUANTIZE, Stage.GROUPED_LINEAR):  # N = 2 * intermediate
            parts.append(f"i{s.intermediate}")
        moe = (Stage.ROUTED_MOE, Stage.ROUTED_MOE_EP)
        if self.stage in (Stage.SCALE_ASSEMBLY, Stage.GROUPED_GEMM, *moe):
            parts += [f"e{s.n_experts}", f"k{s.top_k}", f"h{s.hidden}"]
        if self.stage in moe and s.routed_scaling_factor != 1:
            parts.append(f"rsf{s.routed_scaling_factor:g}")
        if self.stage is Stage.ROUTED_MOE_EP:
            parts += [f"ep{self.ep_size}", self.ep_mode.value]
        if self.stage is Stage.GROUPED_LINEAR:
            parts += [f"g{s.n_groups}", f"d{s.group_dim}", f"r{s.o_lora_rank}"]
        axes = AXES[self.stage]
        if "limits" in axes:
            parts.append("Lnone" if self.limit is None else f"L{self.limit:g}")
        if "distributions" in axes:
            parts.append(self.distribution.value)
        if "routing" in axes:
            parts.append(self.routing.value)
        if "scale_ratios" in axes:
            parts.append("rdyn" if self.scale_ratio is None else f"r{self.scale_ratio:g}")
        if self.probe is not None:
            parts.append(f"p{self.probe.value}")
        parts.append(f"s{self.seed}")
        return "_".join(parts)

    def gemm_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        """(T, K, N, E) of every grouped GEMM this case runs: what a GEMM backend that tiles
        only some shapes checks (`dsv4.ops.backend_supports_shape`); () for stages without one."""
        s, t = self.shape, self.tokens
        h, i, e, rows = s.hidden, s.intermediate, s.n_experts, self.tokens * s.top_k
        return {
            Stage.GROUPED_GEMM: ((rows, h, 2 * i, e),),
            Stage.SHARED_EXPERT: ((t, h, 2 * i, 1), (t, i, h, 1)),
            Stage.ROUTED_MOE: ((rows, h, 2 * i, e), (rows, i, h, e)),
            Stage.GROUPED_LINEAR: ((s.n_groups * t, s.group_dim, s.o_lora_rank, s.n_groups),),
        }.get(self.stage, ())

    @property
    def digest(self) -> str:
        """Hash of everything that decides this case's verdict: resume reuses a finished row only
        while it is unchanged (a tightened budget reruns). Not part of it: the file it came from,
        the backends that run it and the isolated timeout (how long to wait, not the verdict).
        ~10 us a case: a resumed sweep of 10^6 cases checks every one."""
        key = (
            self.stage.value,
            tuple(vars(self.shape).values()),
            self.tokens,
            self.seed,
            self.distribution.value,
            self.scale_ratio,
            self.routing.value,
            self.limit,
            self.tolerance.value,
            tuple(vars(self.budget).values()),
            self.device,
        ) + (() if self.probe is None else (self.probe.value,))  # older digests stay valid
        if self.stage is Stage.ROUTED_MOE_EP:
            key += (self.ep_size, self.ep_mode.value)
        return hashlib.sha1(repr(key).encode()).hexdigest()[:16]

    def row(self) -> dict[str, Any]:
        """Flat, JSON-friendly description for result rows."""
        return {
            "case_id": self.id,
            "stage": self.stage.value,
            "tokens": self.tokens,
            "seed": self.seed,
            "distribution": self.distribution.value,
            "scale_ratio": self.scale_ratio,
            "routing": self.routing.value,
            "limit": self.limit,
            "tolerance": self.tolerance.value,
            "probe": None if self.probe is None else self.probe.value,
            "source": self.source,
            **{f"shape_{k}": v for k, v in dataclasses.asdict(self.shape).items()},
            **{f"budget_{k}": v for k, v in dataclasses.asdict(self.budget).items()},
            **(
                {"ep_size": self.ep_size, "ep_mode": self.ep_mode.value}
                if self.stage is Stage.ROUTED_MOE_EP
                else {}
            ),
        }


# --------------------------------------------------------------------------------------------
# loading

MAX_SEED = 2**32  # inputs are drawn from seed * 1_000_003 + crc32(tag), kept below 2**64


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; YAML 1.2, JSON and Python read a number, and
    so does this loader (docs/cases.md writes `budget: {calc_diff: 1e-4}`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _enum(cls: type[enum.Enum]) -> Callable[[str, Any], Any]:
    def parse(where: str, value: Any) -> Any:
        try:
            return cls(value)
        except ValueError:
            options = ", ".join(m.value for m in cls)
            raise CaseError(f"{where}: unknown value {value!r} (one of: {options})") from None

    return parse


def _list(where: str, value: Any) -> list[Any]:
    if isinstance(value, list):
        if not value:
            raise CaseError(f"{where}: empty list")
        return value
    return [value]


def _number(where: str, value: Any, *, allow_none: bool = False, positive: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CaseError(f"{where}: expected a number, got {value!r}")
    if positive and not value > 0:
        raise CaseError(f"{where}: must be > 0, got {value!r}")
    return value


def _tokens(where: str, value: Any) -> int:
    value = _number(where, value)
    if not isinstance(value, int):
        raise CaseError(f"{where}: expected integers, got {value!r}")
    return value


def _seed(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CaseError(f"{where}: expected integers, got {value!r}")
    if not 0 <= value < MAX_SEED:
        raise CaseError(f"{where}: {value} out of range (0 <= seed < 2**32)")
    return value


def _float_or_none(where: str, value: Any) -> float | None:
    v = _number(where, value, allow_none=True)
    return None if v is None else float(v)


def _probe(where: str, value: Any) -> Probe | None:
    return None if value is None else _enum(Probe)(where, value)


def _ep_size(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CaseError(f"{where}: expected integers >= 1 (ranks), got {value!r}")
    return value


def _strings(where: str, value: Any) -> tuple[str, ...]:
    return () if value is None else tuple(str(b) for b in _list(where, value))


def _timeout(where: str, value: Any) -> float:
    return float(_number(where, value))


def _device(where: str, value: Any) -> str:
    if not isinstance(value, str) or value.split(":")[0] not in ("cpu", "cuda"):
        raise CaseError(f"{where}: expected 'cpu' or 'cuda[:n]', got {value!r}")
    return value


def _fields_of(where: str, spec: dict[str, Any], cls: type, what: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for k in spec:
        if k not in names:
            raise CaseError(
                f"{where}.{k}: unknown field ({what} fields: {', '.join(sorted(names))})"
            )


def _shape(where: str, spec: Any) -> Shape:
    if spec is None:
        return PRESETS["tiny"]
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, dict):
        raise CaseError(f"{where}: expected a preset name or a mapping, got {spec!r}")
    spec = dict(spec)
    preset = spec.pop("preset", "tiny")
    if preset not in PRESETS:
        raise CaseError(f"{where}.preset: unknown preset {preset!r} (one of: {', '.join(PRESETS)})")
    _fields_of(where, spec, Shape, "shape")
    shape = dataclasses.replace(PRESETS[preset], **spec)
    shape.validate(where)
    return dataclasses.replace(shape, routed_scaling_factor=float(shape.routed_scaling_factor))


def _budget(where: str, spec: Any) -> Budget:
    if spec is None:
        return Budget()
    if not isinstance(spec, dict):
        raise CaseError(f"{where}: expected a mapping, got {spec!r}")
    _fields_of(where, spec, Budget, "budget")
    for k, v in spec.items():
        _number(f"{where}.{k}", v, positive=False, allow_none=k == "calc_diff")
    return Budget(**{k: None if v is None else float(v) for k, v in spec.items()})


@dataclass(frozen=True)
class SweepField:
    """One field of a sweep: the `Case` field it sets and how one YAML value becomes that field's
    value (raising a one-line CaseError). An axis holds a list of values, one case per value
    (a single value is a list of one); its default is [the Case field's default]."""

    case_field: str
    parse: Callable[[str, Any], Any]  # (where, value) -> Case value
    axis: bool = False

    @property
    def default(self) -> Any:
        f = next(f for f in dataclasses.fields(Case) if f.name == self.case_field)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


# The schema of a sweep, in one table: name in the file -> (Case field, parser, axis or not).
# Defaults are Case's; which axes a stage has is AXES; cross-field checks are _CHECKS. Table
# order is the order of the product (seeds vary fastest, tokens slowest).
SWEEP_FIELDS: dict[str, SweepField] = {
    "stage": SweepField("stage", _enum(Stage)),
    "shape": SweepField("shape", _shape),
    "backends": SweepField("backends", _strings),
    "baselines": SweepField("baselines", _strings),
    "tolerance": SweepField("tolerance", _enum(Tolerance)),
    "budget": SweepField("budget", _budget),
    "timeout_s": SweepField("timeout_s", _timeout),
    "device": SweepField("device", _device),
    "tokens": SweepField("tokens", _tokens, axis=True),
    "distributions": SweepField("distribution", _enum(Distribution), axis=True),
    "scale_ratios": SweepField("scale_ratio", _float_or_none, axis=True),
    "routing": SweepField("routing", _enum(Routing), axis=True),
    "limits": SweepField("limit", _float_or_none, axis=True),
    "probes": SweepField("probe", _probe, axis=True),
    "ep_sizes": SweepField("ep_size", _ep_size, axis=True),
    "ep_modes": SweepField("ep_mode", _enum(EpMode), axis=True),
    "seeds": SweepField("seed", _seed, axis=True),
}
_STAGE_AXES = {name for axes in AXES.values() for name in axes}
assert _STAGE_AXES <= set(SWEEP_FIELDS) and all(SWEEP_FIELDS[a].axis for a in _STAGE_AXES)
_COMMON = tuple(n for n in SWEEP_FIELDS if n not in _STAGE_AXES)


def _exact_distribution_takes_no_ratio(where: str, values: dict[str, list[Any]]) -> None:
    if values["stage"][0] is not Stage.QUANTIZE:
        return
    for d in values["distributions"]:
        if d.exact and any(r is not None for r in values["scale_ratios"]):
            raise CaseError(
                f"{where}.scale_ratios: distribution {d.value} fixes a power-of-two global "
                f"scale; use scale_ratios: [null] with it"
            )


def _probes_fit_the_shape(where: str, values: dict[str, list[Any]]) -> None:
    shape = values["shape"][0]
    for p in values["probes"]:
        if p is Probe.SCALE_PADDING_7F and (shape.hidden // 16) % 4 == 0:
            raise CaseError(
                f"{where}.probes: scale_padding_7f needs scale padding columns, but hidden/16 = "
                f"{shape.hidden // 16} is a multiple of 4 (e.g. shape: {{hidden: 288}})"
            )
        if p is Probe.EXPERT_SCALE_BYTE and shape.n_experts < 2:
            raise CaseError(
                f"{where}.probes: expert_scale_byte needs 2 or more experts, got "
                f"n_experts={shape.n_experts}"
            )


# Checks across fields of one sweep, given every field's parsed values (a list per field).
_CHECKS: tuple[Callable[[str, dict[str, list[Any]]], None], ...] = (
    _exact_distribution_takes_no_ratio,
    _probes_fit_the_shape,
)


def _expand(where: str, sweep: dict[str, Any], source: str) -> list[Case]:
    if "stage" not in sweep:
        raise CaseError(f"{where}.stage: missing (one of: {', '.join(s.value for s in Stage)})")
    stage = SWEEP_FIELDS["stage"].parse(f"{where}.stage", sweep["stage"])
    for key in sweep:
        if key not in _COMMON and key not in AXES[stage]:
            if key in _STAGE_AXES:
                raise CaseError(
                    f"{where}.{key}: not an axis of stage {stage.value} "
                    f"(its axes: {', '.join(AXES[stage])})"
                )
            raise CaseError(f"{where}.{key}: unknown field")
    values: dict[str, list[Any]] = {}
    for name, f in SWEEP_FIELDS.items():
        if name in _STAGE_AXES and name not in AXES[stage]:
            values[name] = [f.default]
        elif name not in sweep:
            values[name] = [f.default]
        elif f.axis:
            values[name] = [
                f.parse(f"{where}.{name}", v) for v in _list(f"{where}.{name}", sweep[name])
            ]
        else:
            values[name] = [f.parse(f"{where}.{name}", sweep[name])]
    for check in _CHECKS:
        check(where, values)
    names = list(values)
    fixed = {"source": source}
    return [
        Case(**{SWEEP_FIELDS[n].case_field: v for n, v in zip(names, combo, strict=True)}, **fixed)
        for combo in itertools.product(*values.values())
    ]


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    """PyYAML keeps the last of two equal keys silently; a case file that says `tokens` twice
    means one of them by mistake, so that is an error naming the key and its line."""
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) or key is None:
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_cases(path: str | Path) -> tuple[dict[str, Any], list[Case]]:
    """Load one case file. Returns (header {name, description}, cases). Raises CaseError."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: no such case file")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except _DuplicateKey as e:
        raise CaseError(
            f"{path}: line {e.line} duplicate key {e.key!r} (YAML would keep only the last one)"
        ) from None
    except UnicodeDecodeError as e:
        raise CaseError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise CaseError(f"{path}:{at} not valid YAML ({problem})") from None
    if not isinstance(doc, dict):
        raise CaseError(f"{path}: expected a mapping with 'sweeps', got {type(doc).__name__}")
    for key in doc:
        if key not in _TOP:
            raise CaseError(f"{path}: {key}: unknown field (top-level fields: {', '.join(_TOP)})")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise CaseError(f"{path}: defaults: expected a mapping, got {defaults!r}")
    for k in defaults:
        if k not in SWEEP_FIELDS:
            raise CaseError(f"{path}: defaults.{k}: unknown field")
    sweeps = doc.get("sweeps")
    if not isinstance(sweeps, list) or not sweeps:
        raise CaseError(f"{path}: sweeps: expected a non-empty list")
    cases: list[Case] = []
    for i, sweep in enumerate(sweeps):
        where = f"{path}: sweeps[{i}]"
        if not isinstance(sweep, dict):
            raise CaseError(f"{where}: expected a mapping, got {sweep!r}")
        merged = {**defaults, **sweep}
        stage = merged.get("stage")
        if stage in {s.value for s in Stage}:
            # defaults may carry axes some stages lack: apply only the ones this stage has
            axes = AXES[Stage(stage)]
            merged = {k: v for k, v in merged.items() if k in sweep or k in _COMMON or k in axes}
        cases.extend(_expand(where, merged, str(path)))
    dup = {i for i, n in Counter(c.id for c in cases).items() if n > 1}  # linear: 10^6 cases
    if dup:
        raise CaseError(f"{path}: sweeps: duplicate case ids {sorted(dup)[:3]}")
    header = {"name": doc.get("name", path.stem), "description": doc.get("description", "")}
    return header, cases


def load_many(paths: list[str | Path]) -> list[Case]:
    """Load several case files (or directories of *.yaml) into one list."""
    out: list[Case] = []
    seen: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        for f in files:
            for c in load_cases(f)[1]:
                if c.id in seen and seen[c.id] != c.source:
                    raise CaseError(
                        f"{f}: duplicate case id {c.id}, also defined in {seen[c.id]}; results and "
                        f"resume are keyed by id: run the files separately or change one"
                    )
                seen[c.id] = c.source
                out.append(c)
    return out
