"""harness.records: outcomes with their severity, rows and panels to and from JSON (NaN and Inf
as numbers, old files still load, malformed lines named by file, line and field), and the
table of what each stage compares."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from harness import cli, results
from harness.records import (
    SCHEMA,
    STAGE_METRICS,
    Outcome,
    Panel,
    RecordError,
    Row,
    compared,
    key_metrics,
    measure_of,
)

# A line as the harness before schema 2 wrote it (main at 05ae944): non-finite metrics as
# strings, no "schema" field.
OLD_LINE = (
    '{"adapter_digest": "f683273ebfcb790d", "backend": "dsv4-torch", "budget_calc_diff": null, '
    '"case_digest": "db6a5be59cacf93e", "case_id": "shared_expert_t5_h256_i128_L10_normal_r1_s0", '
    '"compare": "out", "conv_swiglu": "dsv4", "final": false, "limit": 10.0, "message": "", '
    '"metrics": {"sqnr_db": "inf", "max_rel": "nan", "per_group": [{"worst_ratio": "-inf"}], '
    '"calc_diff": 0.0, "nan_first_stage": null}, "outcome": "pass", "run_id": "0ce46d508aa8", '
    '"seed": 0, "shape_hidden": 256, "source": "cases/smoke.yaml", "stage": "shared_expert", '
    '"tokens": 5}'
)


def test_outcome_severity_and_meaning():
    order = sorted(Outcome, key=lambda o: o.severity)
    assert order[0] is Outcome.PASS and order[-1] is Outcome.CRASHED
    assert Outcome.worst([Outcome.PASS, Outcome.FAIL, Outcome.UNSUPPORTED]) is Outcome.FAIL
    assert Outcome.worst([]) is Outcome.SKIPPED  # nothing was judged
    assert {o for o in Outcome if o.bad} == {"fail", "error", "timeout", "crashed"}
    assert {o for o in Outcome if not o.ran} == {"unsupported", "skipped"}
    assert {o for o in Outcome if o.retried} == {"error", "timeout", "crashed", "skipped"}
    # its value is what files hold: equal to, hashed as and formatted as that string
    assert Outcome.PASS == "pass" and {"pass": 1}[Outcome.PASS] == 1
    assert f"{Outcome.FAIL:<6}|" == "fail  |" and str(Outcome.TIMED) == "timed"
    with pytest.raises(RecordError, match="'pas' is not an outcome"):
        Outcome.parse("pas")


def test_a_row_round_trips_nan_and_inf_as_json_numbers(tmp_path):
    row = Row(
        case_id="c",
        backend="b",
        compare="out",
        outcome="fail",
        stage="quantize",
        metrics={
            "sqnr_db": math.inf,
            "low": -math.inf,
            "max_rel": math.nan,
            "nested": [{"worst_ratio": math.inf}],
        },
        fields={"tokens": 5, "limit": None},
    )
    assert isinstance(row.outcome, Outcome) and isinstance(row.metrics, Panel)
    line = results.row_line(row)
    assert "Infinity" in line and "NaN" in line and '"inf"' not in line and '"nan"' not in line
    d = json.loads(line)
    assert d["schema"] == SCHEMA and d["tokens"] == 5 and d["outcome"] == "fail"
    back = Row.from_json(d)
    assert back.metrics["sqnr_db"] == math.inf and back.metrics["low"] == -math.inf
    assert math.isnan(back.metrics["max_rel"]) and back.metrics["nested"][0]["worst_ratio"] > 1e308
    assert back.value("tokens") == 5 and back.value("limit") is None and back.value("x", 7) == 7
    with results.ResultWriter(tmp_path) as w:
        w.write([row])
    (loaded,) = results.read_rows(tmp_path)
    assert loaded.metrics["sqnr_db"] == math.inf and loaded.outcome is Outcome.FAIL
    results.write_parquet(tmp_path)  # the parquet copy reads back the same rows
    (from_parquet,) = results.read_rows(tmp_path / results.PARQUET)
    assert from_parquet.metrics["sqnr_db"] == math.inf and from_parquet.value("tokens") == 5
    assert from_parquet.key == row.key


def test_rows_and_panels_are_frozen():
    row = Row(case_id="c", backend="b", compare="case", outcome="pass", metrics={"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.outcome = Outcome.FAIL
    with pytest.raises(TypeError):
        row.metrics["a"] = 2
    with pytest.raises(TypeError):
        row.fields["tokens"] = 2
    moved = row.replace(outcome="fail", tokens=3, metrics=row.metrics.replace(a=2))
    assert (moved.outcome, moved.value("tokens"), moved.metrics["a"]) == ("fail", 3, 2)
    assert row.metrics["a"] == 1  # the original is unchanged


def test_a_results_file_written_before_schema_2_still_loads(tmp_path):
    (tmp_path / results.JSONL).write_text(OLD_LINE + "\n")
    (row,) = results.read_rows(tmp_path)
    assert row.outcome is Outcome.PASS and row.stage == "shared_expert"
    assert row.metrics["sqnr_db"] == math.inf and math.isnan(row.metrics["max_rel"])
    assert row.metrics["per_group"][0]["worst_ratio"] == -math.inf
    assert row.metrics.number("calc_diff") == 0.0 and row.value("tokens") == 5
    assert row.adapter_digest == "f683273ebfcb790d" and row.threads is None
    # written again, it is schema 2 and the numbers stay numbers
    d = json.loads(results.row_line(row))
    assert d["schema"] == SCHEMA and d["metrics"]["sqnr_db"] == math.inf


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"case_id": "c", "backend": "b", "compare": "x", "outcome": "pas"}', "outcome"),
        ('{"case_id": "c", "backend": "b", "outcome": "pass"}', "compare"),
        ('{"case_id": 3, "backend": "b", "compare": "x", "outcome": "pass"}', "case_id"),
        (
            '{"case_id": "c", "backend": "b", "compare": "x", "outcome": "pass", "metrics": [1]}',
            "metrics",
        ),
        (
            '{"case_id": "c", "backend": "b", "compare": "x", "outcome": "pass", "schema": 9}',
            "schema",
        ),
    ],
)
def test_a_malformed_line_names_file_line_and_field(tmp_path, capsys, line, field):
    good = results.row_line(Row(case_id="c", backend="b", compare="case", outcome="pass"))
    (tmp_path / results.JSONL).write_text(good + '{"torn": \n' + line + "\n")
    with pytest.raises(RecordError) as e:
        results.read_rows(tmp_path)
    assert f"{results.JSONL}:3: field '{field}'" in str(e.value)  # the torn line 2 is skipped
    assert cli.main(["show", str(tmp_path), "c"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f":3: field '{field}'" in err  # one line, no traceback


def test_stage_table_names_the_plotted_measures():
    assert {c.name: c.measure for cs in STAGE_METRICS.values() for c in cs if c.measure} == {
        "grouped_gemm.out": "worst_ratio",
        "out": "calc_diff",
        "partials": "calc_diff",  # routed_moe_ep: the worst rank's share
    }
    row = Row(
        case_id="c", backend="b", compare="grouped_gemm.out", outcome="fail", stage="grouped_gemm"
    )
    assert measure_of(row) == "worst_ratio" and "first_bound" in key_metrics(row)
    assert compared("quantize", "quantize.codes").discrete
    assert not compared("grouped_gemm", "grouped_gemm.out").discrete
    assert compared("routed_moe", "l1_out").how.value == "informational"
    final = row.replace(compare="case")
    assert measure_of(final) is None and compared(final.stage, final.compare) is None
