"""The harness's record vocabulary: outcomes, result rows, metric panels, what each stage compares.

Every module that writes or reads results (runner, results, report, cli, pytest plugin, bisect,
repro) takes these types, so an outcome is spelled once and a row is parsed once:
- `Outcome`: the verdict of a comparison or a case, with its severity (which outcome of a case
  is its verdict, what a report lists first) and what it means (`bad`, `ran`, `retried`). It is
  a `str` enum: its value is what results files hold, and it compares equal to that string.
- `Panel`: a row's metrics, read-only; `first_bad()` is the first bad element with its values.
- `Row`: one result row (frozen). `to_json()` / `Row.from_json()` are the on-disk format
  (docs/cli.md "Results"): NaN and +-Inf are the JSON tokens NaN / Infinity / -Infinity, which
  Python's json reads back as floats. Rows written before schema 2 held them as the strings
  "nan" / "inf" / "-inf": loading such a row turns them back into floats. A malformed row is a
  `RecordError` naming the file, the line and the field.
- `STAGE_METRICS`: per stage, the outputs it compares, how, and the metric its plots read.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

SCHEMA = 2  # rows without a "schema" field are schema 1: non-finite floats written as strings


class RecordError(ValueError):
    """A results line that is not a valid row; the message names file, line and field."""


class Outcome(str, enum.Enum):
    """Verdict of one comparison or one case; each distinct in results and reports."""

    PASS = "pass"  # within the derived tolerance / budget
    FAIL = "fail"  # outside it: a wrong result
    ERROR = "error"  # the kernel (or the harness) raised
    UNSUPPORTED = "unsupported"  # can_implement said no: not a failure, not a pass
    SKIPPED = "skipped"  # not run (filtered, or needs hardware this machine lacks)
    TIMEOUT = "timeout"  # an isolated case ran past its timeout and was killed
    CRASHED = "crashed"  # an isolated case's process died (signal, illegal address, OOM kill)
    TIMED = "timed"  # a timing row that measured its pair (the verdict rides in its metrics)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:  # equal to its value, so it hashes as its value: counts["pass"]
        return str.__hash__(self)

    @property
    def severity(self) -> int:
        """Higher is worse: a case's verdict is its worst comparison; reports list worst first."""
        return _SEVERITY.index(self)

    @property
    def bad(self) -> bool:
        """A wrong or missing result of a kernel that ran: fails a sweep (exit 1)."""
        return self in (Outcome.FAIL, Outcome.ERROR, Outcome.TIMEOUT, Outcome.CRASHED)

    @property
    def ran(self) -> bool:
        """The pair was run (unsupported and skipped pairs were not: no verdict either way)."""
        return self not in (Outcome.UNSUPPORTED, Outcome.SKIPPED)

    @property
    def retried(self) -> bool:
        """No verdict on the kernel: resume runs these pairs again (unless --keep-errors)."""
        return self in (Outcome.ERROR, Outcome.TIMEOUT, Outcome.CRASHED, Outcome.SKIPPED)

    @classmethod
    def worst(cls, outcomes: Iterable[Outcome]) -> Outcome:
        """The most severe of `outcomes` (SKIPPED for none: nothing was judged)."""
        return max(outcomes, key=lambda o: o.severity, default=cls.SKIPPED)

    @classmethod
    def parse(cls, value: Any, where: str = "outcome") -> Outcome:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(o.value for o in cls)
            raise RecordError(f"{where}: {value!r} is not an outcome ({names})") from None


_SEVERITY = [
    Outcome.PASS,
    Outcome.TIMED,
    Outcome.SKIPPED,
    Outcome.UNSUPPORTED,
    Outcome.FAIL,
    Outcome.ERROR,
    Outcome.TIMEOUT,
    Outcome.CRASHED,
]


def jsonable(v: Any) -> Any:
    """Plain JSON values: numpy / torch scalars as Python numbers, tuples as lists; NaN and Inf
    stay floats (json.dumps writes NaN / Infinity)."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if not isinstance(v, (str, int, float, bool)) and hasattr(v, "item") and callable(v.item):
        return jsonable(v.item())
    return v


_LEGACY_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _legacy_floats(v: Any) -> Any:
    """Schema 1 wrote non-finite floats as "nan" / "inf" / "-inf": floats again."""
    if isinstance(v, str):
        return _LEGACY_NONFINITE.get(v, v)
    if isinstance(v, dict):
        return {k: _legacy_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_legacy_floats(x) for x in v]
    return v


# The first bad element of an output, as the metrics name its coordinate (harness.metrics), and
# the values recorded beside it.
FIRST_BAD = ("first_outside", "first_mismatch")
FIRST_VALUES = ("ref", "out", "bound")


class Panel(Mapping[str, Any]):
    """A row's metrics (harness.metrics panels plus what the stage adds), read-only."""

    __slots__ = ("_d",)

    def __init__(self, values: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_d", MappingProxyType(dict(values or {})))

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"Panel is read-only: cannot set {name}")

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"Panel({dict(self._d)!r})"

    def number(self, key: str) -> float | None:
        """The metric as a float (NaN and Inf included), None where absent or not a number."""
        v = self._d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        return float(v)

    def first_bad(self) -> dict[str, Any] | None:
        """{"index": coordinate, "ref", "out", "bound" where recorded} of the first bad element."""
        for key in FIRST_BAD:
            if self._d.get(key) is not None:
                vals = {k: self._d.get(f"first_{k}") for k in FIRST_VALUES}
                return {"index": self._d[key], **{k: v for k, v in vals.items() if v is not None}}
        return None

    def replace(self, **changes: Any) -> Panel:
        return Panel({**self._d, **changes})

    def to_json(self) -> dict[str, Any]:
        return jsonable(self._d)


_CORE = (
    "case_id",
    "backend",
    "compare",
    "outcome",
    "stage",
    "message",
    "metrics",
    "final",
    "run_id",
    "case_digest",
    "adapter_digest",
    "duration_s",
    "threads",
)
_OPTIONAL = ("duration_s", "threads")  # written only where set (final rows)


@dataclass(frozen=True)
class Row:
    """One result row: one compared output of one (case, backend) pair, or the pair's final row
    (`compare == "case"`, `final`), or its timing row (`compare == "timing"`).

    `fields` holds what else the row records: the case description (`Case.row()`: tokens, seed,
    limit, shape_*, budget_*, ...) and the adapter's conventions (`conv_*`), read by name with
    `value`. Strings and dicts given for `outcome` / `metrics` are converted."""

    case_id: str
    backend: str
    compare: str
    outcome: Outcome
    stage: str = ""
    message: str = ""
    metrics: Panel = field(default_factory=Panel)
    final: bool = False
    run_id: str = ""
    case_digest: str = ""
    adapter_digest: str = ""
    duration_s: float | None = None
    threads: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.outcome, Outcome):
            object.__setattr__(self, "outcome", Outcome.parse(self.outcome))
        if not isinstance(self.metrics, Panel):
            object.__setattr__(self, "metrics", Panel(self.metrics))
        clash = set(self.fields) & set(_CORE)
        if clash:
            raise ValueError(f"Row.fields may not hold core fields: {sorted(clash)}")
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    @property
    def pair(self) -> tuple[str, str]:
        return (self.case_id, self.backend)

    @property
    def key(self) -> tuple[str, str, str]:
        """What a later row replaces (resumed and merged runs: the last one wins)."""
        return (self.case_id, self.backend, self.compare)

    def value(self, name: str, default: Any = None) -> Any:
        """A field by name: a core field, else one of `fields` (a case axis such as `tokens`)."""
        if name in _CORE:
            return getattr(self, name)
        return self.fields.get(name, default)

    def replace(self, **changes: Any) -> Row:
        core = {k: v for k, v in changes.items() if k in _CORE or k == "fields"}
        extra = {k: v for k, v in changes.items() if k not in core}
        if extra:
            core["fields"] = {**self.fields, **core.get("fields", {}), **extra}
        return dataclasses.replace(self, **core)

    def to_json(self) -> dict[str, Any]:
        """The row as one results line holds it (flat: fields beside the core ones)."""
        d: dict[str, Any] = jsonable(self.fields)
        for k in _CORE:
            v = getattr(self, k)
            if v is None and k in _OPTIONAL:
                continue
            d[k] = v.to_json() if isinstance(v, Panel) else jsonable(v)
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "row") -> Row:
        """A row from its JSON object; `where` ("results.jsonl:12") prefixes any error."""
        if not isinstance(d, dict):
            raise RecordError(f"{where}: a row is a JSON object, got {type(d).__name__}")
        d = dict(d)
        schema = d.pop("schema", 1)
        if isinstance(schema, bool) or not isinstance(schema, int) or not 1 <= schema <= SCHEMA:
            raise RecordError(
                f"{where}: field 'schema': {schema!r} is not a schema this harness reads "
                f"(1..{SCHEMA}); a newer harness wrote it"
            )
        for k in ("case_id", "backend", "compare", "outcome"):
            if k not in d:
                raise RecordError(f"{where}: field '{k}' is missing")
        for k in ("case_id", "backend", "compare", "stage", "message", "run_id"):
            if k in d and not isinstance(d[k], str):
                raise RecordError(f"{where}: field '{k}': {d[k]!r} is not a string")
        metrics = d.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise RecordError(f"{where}: field 'metrics': {metrics!r} is not an object")
        if not isinstance(d.get("final", False), bool):
            raise RecordError(f"{where}: field 'final': {d['final']!r} is not true/false")
        core = {k: d.pop(k) for k in _CORE if k in d}
        core["outcome"] = Outcome.parse(core["outcome"], f"{where}: field 'outcome'")
        core["metrics"] = Panel(_legacy_floats(metrics) if schema < SCHEMA else metrics)
        for k in ("case_digest", "adapter_digest", "stage", "message", "run_id"):
            core[k] = core.get(k) or ""
        return cls(**core, fields=d)


# --------------------------------------------------------------------------------------------
# what each stage compares


class How(enum.Enum):
    """How one compared output is judged."""

    EXACT = "exact"  # bit for bit (layouts, offsets)
    CLASSIFIED = "classified"  # bit for bit, mismatches sorted into accepted classes and real
    RELATIVE = "relative"  # a scalar within a relative tolerance (global scales)
    BOUNDED = "bounded"  # elementwise within a bound derived from the operands (summed outputs)
    BUDGET = "budget"  # a layer output within its calc_diff budget (and gain / bias)
    INFORMATIONAL = "informational"  # a layer intermediate: traced, the verdict is on `out`

    @property
    def discrete(self) -> bool:
        return self in (How.EXACT, How.CLASSIFIED)


@dataclass(frozen=True)
class Compared:
    """One output a stage compares (the rows' `compare`), how, and the metric its plots,
    heatmaps and headroom read as "error" against the pass line (None: not plotted)."""

    name: str
    how: How
    measure: str | None = None
    discrete: bool = False  # codes, scale bytes, layouts: shown among the bit-exact stages

    def __post_init__(self) -> None:
        object.__setattr__(self, "discrete", self.discrete or self.how.discrete)


def _layer(*intermediates: str, discrete: tuple[str, ...] = ()) -> tuple[Compared, ...]:
    inter = tuple(Compared(n, How.INFORMATIONAL, discrete=n in discrete) for n in intermediates)
    return (Compared("out", How.BUDGET, "calc_diff"), *inter)


_ASSEMBLY = ("x_q.assembly", "act_q.assembly", "w13_q.assembly", "w2_q.assembly")
_MOE = ("x_q", "act_q", "l1_out", "l2_out", "calibration.gs1", "calibration.gs2", *_ASSEMBLY)

# stage (harness.cases.Stage value) -> what its cases compare. Layer intermediates are those
# the reference exposes (harness.stages compares each one the adapter exposes too).
STAGE_METRICS: dict[str, tuple[Compared, ...]] = {
    "quantize": (
        Compared("quantize.codes", How.CLASSIFIED),
        Compared("quantize.scales", How.CLASSIFIED),
        Compared("quantize.global_scale", How.RELATIVE),
    ),
    "scale_assembly": (Compared("scales_2d", How.EXACT), Compared("scales_3d", How.EXACT)),
    "grouped_gemm": (Compared("grouped_gemm.out", How.BOUNDED, "worst_ratio"),),
    "swiglu_requant": (
        Compared("swiglu_requant.codes", How.CLASSIFIED),
        Compared("swiglu_requant.scales", How.CLASSIFIED),
    ),
    "shared_expert": _layer(*_MOE, discrete=("x_q", "act_q", *_ASSEMBLY)),
    "routed_moe": _layer(
        *_MOE,
        "expert_offsets",
        "gather_index",
        discrete=("x_q", "act_q", "expert_offsets", "gather_index", *_ASSEMBLY),
    ),
    "grouped_linear": _layer(
        "x_q",
        "gemm_out",
        "expert_offsets",
        "calibration.gs",
        "x_q.assembly",
        "w_q.assembly",
        discrete=("x_q", "expert_offsets", "x_q.assembly", "w_q.assembly"),
    ),
    # harness.stages.ep: the combined output, every routed slot counted once, each rank's share
    "routed_moe_ep": (
        Compared("out", How.BUDGET, "calc_diff"),
        Compared("counts", How.EXACT),
        Compared("partials", How.BUDGET, "calc_diff"),
    ),
}


def compared(stage: str, compare: str) -> Compared | None:
    """The table's entry for one row (None for the final and timing rows, or unknown names)."""
    return next((c for c in STAGE_METRICS.get(stage, ()) if c.name == compare), None)


def measure_of(row: Row) -> str | None:
    """The metric key a row's plots read as its error (None where it is not plotted)."""
    c = compared(row.stage, row.compare)
    return c.measure if c else None


# Metrics worth a line when a comparison fails (pytest failure tables), by how it is judged;
# every failing row also shows the diagnoses and what a crash left behind.
KEY_METRICS: dict[How, tuple[str, ...]] = {
    How.EXACT: ("n_mismatch", "first_mismatch", "first_ref", "first_out", "lost", "doubled"),
    How.CLASSIFIED: ("n_mismatch", "first_mismatch", "first_ref", "first_out", "n_real", "classes"),
    How.RELATIVE: ("rel_err",),
    How.BOUNDED: (
        "n_outside",
        "worst_ratio",
        "first_outside",
        "first_ref",
        "first_out",
        "first_bound",
        "max_abs",
        "max_rel",
        "mean_err",
        "max_ulps_bf16",
    ),
    How.BUDGET: (
        "calc_diff",
        "budget_calc_diff",
        "cosine",
        "sqnr_db",
        "max_abs",
        "max_rel",
        "gain",
        "bias",
        "first_outside",
        "nan_out",
        "inf_out",
    ),
    How.INFORMATIONAL: ("n_mismatch", "codes_mismatch", "scales_mismatch", "max_abs"),
}
DIAGNOSIS_METRICS = (
    "matches_variant",
    "matches_alpha",
    "swiglu_convention",
    "first_divergent_stage",
    "nan_first_stage",
    "diagnoses",
    "per_rank",
    "traceback",
    "stderr_tail",
)


def key_metrics(row: Row) -> tuple[str, ...]:
    """The metric keys a failure of this row is shown with (all of them for unknown outputs)."""
    c = compared(row.stage, row.compare)
    if c is None:
        return tuple(row.metrics)
    return tuple(dict.fromkeys((*KEY_METRICS[c.how], "nan_out", "inf_out", *DIAGNOSIS_METRICS)))
