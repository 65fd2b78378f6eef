"""Case files: malformed ones are refused in one line naming file and field; valid ones load.

Every malformed file gives `CaseError` from `load_cases`, and the same message from the CLI as
one stderr line with exit code 2 and no traceback (in process through `harness.cli.main`, and
for a few through a real `python -m harness run` process). The shipped case files load, with
unique, readable ids. The pytest plugin collects a case file, prints the metric table of a
failing case and honours --case-filter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli
from harness.cases import (
    AXES,
    SWEEP_FIELDS,
    Case,
    CaseError,
    Shape,
    Stage,
    load_cases,
    load_many,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "cases").glob("*.yaml"))

QUANTIZE = "sweeps:\n  - stage: quantize\n"
GEMM = "sweeps:\n  - stage: grouped_gemm\n"

# name -> (file text, what the one-line message must contain besides the file name)
MALFORMED = {
    "unknown_top_level_field": ("sweep:\n  - stage: quantize\n", "sweep: unknown field"),
    "unknown_sweep_field": (QUANTIZE + "    tokns: [1]\n", "sweeps[0].tokns: unknown field"),
    "axis_not_of_stage": (
        QUANTIZE + "    routing: [uniform]\n",
        "sweeps[0].routing: not an axis of stage quantize",
    ),
    "tokens_not_a_number": (
        QUANTIZE + "    tokens: many\n",
        "sweeps[0].tokens: expected a number, got 'many'",
    ),
    "tokens_not_integer": (QUANTIZE + "    tokens: [1.5]\n", "sweeps[0].tokens: expected integers"),
    "tokens_zero": (QUANTIZE + "    tokens: [0]\n", "sweeps[0].tokens: must be > 0"),
    "hidden_not_multiple_of_32": (
        QUANTIZE + "    shape: {hidden: 100}\n",
        "sweeps[0].shape.hidden: must be a multiple of 32",
    ),
    "top_k_exceeds_experts": (
        GEMM + "    shape: {top_k: 5, n_experts: 4}\n",
        "sweeps[0].shape.top_k: 5 exceeds n_experts=4",
    ),
    "unknown_shape_field": (
        QUANTIZE + "    shape: {hiden: 256}\n",
        "sweeps[0].shape.hiden: unknown field",
    ),
    "unknown_preset": (
        QUANTIZE + "    shape: v5_pro\n",
        "sweeps[0].shape.preset: unknown preset 'v5_pro'",
    ),
    "unknown_distribution": (
        QUANTIZE + "    distributions: [normal, gaussian]\n",
        "sweeps[0].distributions: unknown value 'gaussian'",
    ),
    "unknown_stage": (
        "sweeps:\n  - stage: quantise\n",
        "sweeps[0].stage: unknown value 'quantise'",
    ),
    "missing_stage": ("sweeps:\n  - tokens: [1]\n", "sweeps[0].stage: missing"),
    "exact_distribution_with_ratio": (
        QUANTIZE + "    distributions: [midpoints]\n    scale_ratios: [2]\n",
        "sweeps[0].scale_ratios",
    ),
    "empty_backends": (QUANTIZE + "    backends: []\n", "sweeps[0].backends: empty list"),
    "unknown_budget_field": (
        "sweeps:\n  - stage: shared_expert\n    budget: {calc_dif: 1}\n",
        "sweeps[0].budget.calc_dif: unknown field",
    ),
    "bad_device": (QUANTIZE + "    device: tpu\n", "sweeps[0].device"),
    "bad_seed": (QUANTIZE + "    seeds: [a]\n", "sweeps[0].seeds: expected integers"),
    "no_sweeps": ("name: nothing\n", "sweeps: expected a non-empty list"),
    "not_a_mapping": ("- stage: quantize\n", "expected a mapping with 'sweeps'"),
    "duplicate_ids": (
        QUANTIZE + "    tokens: [1]\n  - stage: quantize\n    tokens: [1, 2]\n",
        "duplicate case ids ['quantize_t1_h256_normal_rdyn_s0']",
    ),
    "invalid_yaml": ("sweeps: [\n  - stage: quantize\n", "line 2 not valid YAML"),
    "duplicate_key": (
        QUANTIZE + "    tokens: [1]\n    tokens: [2]\n",
        "line 4 duplicate key 'tokens'",
    ),
    "duplicate_shape_key": (
        QUANTIZE + "    shape: {hidden: 64, hidden: 128}\n",
        "line 3 duplicate key 'hidden'",
    ),
    "duplicate_top_level_key": (QUANTIZE + "sweeps: []\n", "line 3 duplicate key 'sweeps'"),
    "seed_out_of_range": (
        QUANTIZE + "    seeds: [4294967296]\n",
        "sweeps[0].seeds: 4294967296 out of range (0 <= seed < 2**32)",
    ),
    "unknown_field_in_defaults": (
        "defaults: {tokns: [1]}\n" + QUANTIZE,
        "defaults.tokns: unknown field",
    ),
    "bad_timeout": (QUANTIZE + "    timeout_s: 0\n", "sweeps[0].timeout_s: must be > 0, got 0"),
    "bad_limit": (
        "sweeps:\n  - stage: swiglu_requant\n    limits: [ten]\n",
        "sweeps[0].limits: expected a number, got 'ten'",
    ),
    "bad_budget_value": (
        "sweeps:\n  - stage: shared_expert\n    budget: {calc_diff: big}\n",
        "sweeps[0].budget.calc_diff: expected a number, got 'big'",
    ),
    "unknown_tolerance": (
        QUANTIZE + "    tolerance: loose\n",
        "sweeps[0].tolerance: unknown value 'loose' (one of: derived, exact)",
    ),
    "shape_not_a_mapping": (
        QUANTIZE + "    shape: [1, 2]\n",
        "sweeps[0].shape: expected a preset name or a mapping",
    ),
    "bad_routed_scaling_factor": (
        QUANTIZE + "    shape: {routed_scaling_factor: 0}\n",
        "sweeps[0].shape.routed_scaling_factor: must be a finite number > 0, got 0",
    ),
}


@pytest.fixture(params=sorted(MALFORMED))
def malformed(request, tmp_path):
    text, field = MALFORMED[request.param]
    path = tmp_path / f"{request.param}.yaml"
    path.write_text(text)
    return path, field


def test_load_cases_names_file_and_field(malformed):
    path, field = malformed
    with pytest.raises(CaseError) as e:
        load_cases(path)
    msg = str(e.value)
    assert str(path) in msg and field in msg
    assert "\n" not in msg


def test_cli_reports_one_line_and_exit_2(malformed, tmp_path, capsys):
    path, field = malformed
    assert cli.main(["run", str(path), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0] and field in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    with pytest.raises(CaseError, match=re.escape(f"{path}: no such case file")):
        load_cases(path)
    assert cli.main(["run", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {path}: no such case file\n"


@pytest.mark.parametrize("name", ["invalid_yaml", "tokens_not_a_number"])
def test_cli_process_exit_2_without_traceback(name, tmp_path):
    text, field = MALFORMED[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    p = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(path), "-o", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and field in lines[0], p.stderr


# --------------------------------------------------------------------------------------------
# known loader bugs (strict: a fix turns these into failures that ask to drop the marker)


def test_unknown_defaults_field_is_refused(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("defaults:\n  seed: [1, 2]\n" + QUANTIZE)  # `seed` for `seeds`
    with pytest.raises(CaseError, match="seed"):
        load_cases(path)


def test_binary_case_file_is_a_case_error(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"sweeps:\n  - stage: \xff\xfe\n")
    with pytest.raises(CaseError, match=re.escape(str(path))):
        load_cases(path)


def test_yaml_reader_error_is_one_line(tmp_path):
    path = tmp_path / "ctl.yaml"
    path.write_text(QUANTIZE.replace("quantize", "quantize\x07"))
    with pytest.raises(CaseError) as e:
        load_cases(path)
    assert "\n" not in str(e.value)


def test_gemm_ids_distinguish_intermediate(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text(
        GEMM + "    shape: {intermediate: 128}\n"
        "  - stage: grouped_gemm\n    shape: {intermediate: 256}\n"
    )
    assert len({c.id for c in load_cases(path)[1]}) == 2


def test_same_id_in_two_files_is_refused(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(QUANTIZE)
    b.write_text(QUANTIZE + "    tolerance: exact\n")  # same id, another verdict rule
    with pytest.raises(CaseError, match="duplicate"):
        load_many([a, b])


# --------------------------------------------------------------------------------------------
# the schema


def test_case_takes_stage_shape_and_tokens_by_position_and_the_rest_by_keyword():
    c = Case(Stage.QUANTIZE, Shape(), 5, seed=3)
    assert (c.tokens, c.seed) == (5, 3)
    with pytest.raises(TypeError):
        Case(Stage.QUANTIZE, Shape(), 5, 3)  # a positional seed is refused


def test_sweep_defaults_are_the_case_defaults(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("sweeps:\n  - stage: routed_moe\n")
    (c,) = load_cases(path)[1]
    assert c == Case(Stage.ROUTED_MOE, source=str(path))


def test_cases_come_in_product_order_seeds_fastest(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text(QUANTIZE + "    tokens: [1, 2]\n    seeds: [0, 1]\n")
    assert [(c.tokens, c.seed) for c in load_cases(path)[1]] == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_docs_list_every_sweep_field():
    doc = (REPO / "docs" / "cases.md").read_text()
    for name in SWEEP_FIELDS:
        assert f"| `{name}` |" in doc or f"`{name}`:" in doc, name


# --------------------------------------------------------------------------------------------
# valid files

ID = re.compile(r"^[a-z_]+_t\d+(_[A-Za-z0-9.+-]+)*_s-?\d+$")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_case_files_load(path):
    header, cases = load_cases(path)
    assert cases and header["name"]
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids)
    for c in cases:
        assert ID.match(c.id), c.id
        assert c.id.startswith(c.stage.value + f"_t{c.tokens}_") and c.id.endswith(f"_s{c.seed}")
        assert c.source == str(path)
        hash(c)  # frozen: usable as a cache key


def test_smoke_covers_every_stage_and_the_tricky_inputs():
    _, cases = load_cases(REPO / "cases" / "smoke.yaml")
    # expert parallel spawns rank processes (seconds): cases/ep.yaml, tests/test_harness_ep.py
    assert {c.stage for c in cases} == set(Stage) - {Stage.ROUTED_MOE_EP}
    assert {1, 129} <= {c.tokens for c in cases}
    dists = {c.distribution.value for c in cases if c.stage is Stage.QUANTIZE}
    assert {"midpoints", "fp4_grid", "nan_one", "inf_one", "zero_blocks"} <= dists
    assert {c.routing.value for c in cases if c.stage is Stage.GROUPED_GEMM} >= {
        "uniform",
        "empty_experts",
        "one_expert",
    }
    assert None in {c.limit for c in cases if c.stage is Stage.SWIGLU_REQUANT}


def test_defaults_apply_only_to_axes_a_stage_has(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(
        "defaults:\n  tokens: [3]\n  routing: [empty_experts]\n  seeds: [0, 1]\n"
        "sweeps:\n  - stage: quantize\n  - stage: scale_assembly\n"
    )
    _, cases = load_cases(path)
    assert sorted(c.id for c in cases) == [
        "quantize_t3_h256_normal_rdyn_s0",
        "quantize_t3_h256_normal_rdyn_s1",
        "scale_assembly_t3_i128_e4_k2_h256_empty_experts_s0",
        "scale_assembly_t3_i128_e4_k2_h256_empty_experts_s1",
    ]
    assert set(AXES[Stage.QUANTIZE]) >= {"tokens"} and "routing" not in AXES[Stage.QUANTIZE]


# --------------------------------------------------------------------------------------------
# the pytest plugin


PLUGIN_CASES = """\
sweeps:
  - stage: quantize
    tokens: [5]
  - stage: grouped_gemm
    tokens: [5]
"""


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "harness.pytest_plugin",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_plugin_runs_a_case_file_and_prints_the_metric_table(tmp_path):
    path = tmp_path / "plugin.yaml"
    path.write_text(PLUGIN_CASES)
    p = _pytest(str(path), "-q", "--harness-backend", "tests.planted:SkipLastKBlock")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 failed, 1 passed" in p.stdout
    gemm = "grouped_gemm_t5_i128_e4_k2_h256_normal_uniform_s0"
    assert f"case {gemm} on tests.planted:SkipLastKBlock: fail" in p.stdout
    assert "grouped_gemm.out: fail" in p.stdout and "outside the derived bound" in p.stdout
    assert re.search(r"n_outside\s+\d+", p.stdout) and "worst_ratio" in p.stdout
    assert re.search(r"first_ref\s+\S+\n\s+first_out\s+\S+\n\s+first_bound\s+\S+", p.stdout)
    assert "Traceback" not in p.stdout  # the table replaces the Python traceback


def test_plugin_case_filter_deselects(tmp_path):
    path = tmp_path / "plugin.yaml"
    path.write_text(PLUGIN_CASES)
    p = _pytest(str(path), "-q", "--collect-only", "--case-filter", "quantize")
    assert p.returncode == 0, p.stdout + p.stderr
    items = [ln for ln in p.stdout.splitlines() if "::" in ln]
    # the node id's directory part depends on pytest's rootdir choice; the item is what counts
    assert len(items) == 1 and items[0].endswith(
        f"{path.name}::quantize_t5_h256_normal_rdyn_s0[reference]"
    ), items


def test_plugin_spreads_over_xdist_workers_and_records_every_case(tmp_path):
    """`-n 2` runs the items on two worker processes; --harness-results gets every row."""
    path = tmp_path / "plugin.yaml"
    path.write_text(PLUGIN_CASES.replace("tokens: [5]", "tokens: [1, 5, 33]"))
    out = tmp_path / "results"
    p = _pytest(str(path), "-q", "-n", "2", "--harness-results", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "6 passed" in p.stdout
    from harness.results import read_rows

    finals = [r for r in read_rows(out) if r.final]
    assert sorted(r.case_id for r in finals) == sorted(c.id for c in load_cases(path)[1])


# --------------------------------------------------------------------------------------------
# presets


def test_v4_presets_follow_the_published_configs():
    from harness.cases import PRESETS, PUBLISHED

    pro, flash = PRESETS["v4_pro"], PRESETS["v4_flash"]
    # 128 heads of 512 in 16 groups of 4096 -> 1024; 384 routed experts over EP=8
    assert (pro.hidden, pro.intermediate, pro.n_experts, pro.top_k) == (7168, 3072, 48, 6)
    assert (pro.n_groups, pro.group_dim, pro.head_dim, pro.o_lora_rank) == (16, 4096, 512, 1024)
    assert pro.n_groups * pro.group_dim // pro.head_dim == PUBLISHED["v4_pro"].num_attention_heads
    assert (flash.hidden, flash.intermediate, flash.n_experts) == (4096, 2048, 32)
    assert (flash.n_groups, flash.group_dim, flash.o_lora_rank) == (8, 4096, 1024)
    assert flash.n_groups * flash.group_dim // flash.head_dim == 64
    assert PUBLISHED["v4_pro"].shape(ep=16).n_experts == 24
    with pytest.raises(ValueError, match="ep=5"):
        PUBLISHED["v4_pro"].shape(ep=5)
    seed = PRESETS["v4_pro_seed_wo_a"]  # the seed's wo_a runner, its own preset
    assert (seed.n_groups, seed.group_dim, seed.o_lora_rank) == (8, 8192, 1536)
    for name in ("v4_pro", "v4_flash", "v4_pro_seed_wo_a", "v4_pro_reduced", "v4_flash_reduced"):
        PRESETS[name].validate(name)  # every preset satisfies the case checks
    # routed_scaling_factor: each preset carries its model's (published: Pro 2.5, Flash 1.5)
    assert PUBLISHED["v4_pro"].routed_scaling_factor == 2.5
    assert PUBLISHED["v4_flash"].routed_scaling_factor == 1.5
    for name in ("v4_pro", "v4_pro_seed_wo_a", "v4_pro_reduced"):
        assert PRESETS[name].routed_scaling_factor == 2.5, name
    for name in ("v4_flash", "v4_flash_reduced"):
        assert PRESETS[name].routed_scaling_factor == 1.5, name
    assert PRESETS["tiny"].routed_scaling_factor == 1.0


def test_routed_scaling_factor_is_a_shape_field_named_in_routed_moe_ids(tmp_path):
    path = tmp_path / "rsf.yaml"
    path.write_text(
        "sweeps:\n  - stage: routed_moe\n    shape: {preset: tiny, routed_scaling_factor: 2}\n"
        "  - stage: routed_moe\n    shape: v4_flash_reduced\n"
        "  - stage: grouped_gemm\n    shape: v4_flash_reduced\n"
    )
    a, b, gemm = load_cases(path)[1]
    assert a.shape.routed_scaling_factor == 2.0 and isinstance(a.shape.routed_scaling_factor, float)
    assert "_h256_rsf2_L10_" in a.id and "_rsf1.5_" in b.id
    assert "rsf" not in gemm.id  # only the routed MoE applies it
    assert "rsf" not in Case(Stage.ROUTED_MOE).id  # factor 1: ids as before
    assert a.digest != Case(Stage.ROUTED_MOE, Shape(), a.tokens, scale_ratio=a.scale_ratio).digest


def test_v4_case_files_name_their_source_and_sweep_the_seed_wo_a_shape():
    for name in ("dsv4_pro.yaml", "dsv4_flash.yaml"):
        assert "configuration_deepseek_v4.py" in (REPO / "cases" / name).read_text(), name
    _, cases = load_cases(REPO / "cases" / "dsv4_pro.yaml")
    linear = {c.shape.o_lora_rank for c in cases if c.stage is Stage.GROUPED_LINEAR}
    assert linear == {1024, 1536}
