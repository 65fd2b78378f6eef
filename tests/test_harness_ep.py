"""Expert parallel (harness.stages.ep, harness.ranks): routed_moe_ep over gloo rank processes.

The pure parts (dispatch, the count check and its diagnoses, the case schema) are checked
directly; the rank groups run a few cases of cases/ep.yaml end to end: dsv4-torch and the
reference pass at EP=2 and EP=8 on tiny and reduced shapes in both combine modes, the planted
adapters that forget the first expert id or drop the last rank's tokens fail and are named, and
a rank that raises, dies or hangs ends its case as error / crashed / timeout naming the rank.
Each test reuses its process's group of W ranks (harness.ranks) for all its cases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from harness import ranks
from harness.cases import Case, CaseError, EpMode, Stage, load_cases
from harness.records import Outcome
from harness.runner import run_one
from harness.stages.ep import count_check, dispatch, owned

REPO = Path(__file__).resolve().parents[1]
EP = {c.id: c for c in load_cases(REPO / "cases" / "ep.yaml")[1]}


def _case(tokens: int, ep: int, mode: str, shape: str = "tiny", routing: str = "uniform") -> Case:
    hits = [
        c
        for c in EP.values()
        if c.tokens == tokens
        and c.ep_size == ep
        and c.ep_mode.value == mode
        and c.routing.value == routing
        and (shape == "tiny") == (c.shape.hidden == 256)
    ]
    assert len(hits) == 1, (tokens, ep, mode, shape, [c.id for c in hits])
    return hits[0]


def _final(case: Case, backend: str):
    rows = run_one(case, backend)
    return rows[-1], {r.compare: r for r in rows[:-1]}


# ---- pure parts


def test_dispatch_sends_each_token_to_the_ranks_of_its_slots():
    ids = torch.tensor([[0, 5], [1, 2], [7, -1], [9, 3]])  # 2 ranks of 4 experts; 9 is nobody's
    assert [t.tolist() for t in dispatch(ids, 2, 4)] == [[0, 1, 3], [0, 2]]
    assert [t.tolist() for t in owned(5, 2)] == [[0, 1, 2], [3, 4]]


def _rank_view(ids, world, n, first_of=lambda r, n: r * n, drop=()):
    """What an adapter reports per rank, computed from the ids the way a runner stages rows:
    `first_of(r, n)` the first expert id it subtracts; ranks in `drop` stage nothing."""
    out = []
    for r in range(world):
        first = first_of(r, n)
        local = ids - first
        ends, tokens = [], []
        for e in range(n):
            hit = [] if r in drop else torch.nonzero((local == e).any(dim=1)).flatten().tolist()
            tokens += hit
            ends.append(len(tokens))
        out.append(
            {
                "expert_offsets": torch.tensor(ends, dtype=torch.int32),
                "gather_index": torch.tensor(tokens, dtype=torch.int64),
                "tokens": torch.arange(len(ids)),
            }
        )
    return out


IDS = torch.tensor([[0, 5], [1, 2], [7, 4], [6, 3], [2, 7]])


def test_count_check_passes_a_correct_split_and_counts_every_slot():
    c = count_check(IDS, 2, 4, _rank_view(IDS, 2, 4))
    assert c.outcome is Outcome.PASS
    assert c.metrics["slots"] == c.metrics["processed"] == IDS.numel()
    assert [p["processed"] for p in c.metrics["per_rank"]] == [5, 5]


def test_count_check_names_a_first_expert_offset_not_subtracted():
    c = count_check(IDS, 2, 4, _rank_view(IDS, 2, 4, first_of=lambda r, n: 0))
    assert c.outcome is Outcome.FAIL
    assert "rank 1: expert offset not subtracted" in c.message
    assert c.metrics["lost"] == 5 and "rank 0" not in c.message


def test_count_check_names_a_dropped_last_rank_and_doubled_slots():
    c = count_check(IDS, 2, 4, _rank_view(IDS, 2, 4, drop=(1,)))
    assert c.outcome is Outcome.FAIL and c.metrics["lost"] == 5
    assert "rank 1 (the last rank): tokens routed to rank 1 dropped (0 of 5 slots)" in c.message
    twice = _rank_view(IDS, 2, 4)
    twice[0]["gather_index"] = torch.cat([twice[0]["gather_index"][:1], twice[0]["gather_index"]])
    twice[0]["expert_offsets"] = twice[0]["expert_offsets"] + 1  # expert 0 saw token 0 twice
    c = count_check(IDS, 2, 4, twice)
    assert c.outcome is Outcome.FAIL and c.metrics["doubled"] == 1


def test_ep_axes_ids_and_errors(tmp_path):
    c = _case(33, 8, "alltoall")
    assert "_ep8_alltoall_" in c.id and c.ep_mode is EpMode.ALLTOALL
    assert c.digest != dataclasses.replace(c, ep_size=2).digest
    assert Case(Stage.ROUTED_MOE).row().get("ep_size") is None  # other stages' rows unchanged
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweeps:\n  - stage: routed_moe_ep\n    ep_sizes: [0]\n")
    with pytest.raises(CaseError, match=r"sweeps\[0\]\.ep_sizes: expected integers >= 1"):
        load_cases(bad)
    bad.write_text("sweeps:\n  - stage: routed_moe\n    ep_sizes: [2]\n")
    with pytest.raises(CaseError, match="ep_sizes: not an axis of stage routed_moe"):
        load_cases(bad)


def test_rank_devices_and_backends():
    assert [ranks.rank_device("cuda", r, 2) for r in range(4)] == ["cuda:0", "cuda:1"] * 2
    assert ranks.rank_device("cpu", 3, 0) == "cpu"
    assert ranks.dist_backend("cuda", 8, 8) == "nccl"
    assert ranks.dist_backend("cuda", 8, 1) == "gloo"  # ranks sharing a GPU: gloo over the CPU
    assert ranks.dist_backend("cpu", 2, 0) == "gloo"


# ---- rank groups (spawned processes)


def _passes(case: Case, backend: str) -> dict:
    final, rows = _final(case, backend)
    assert final.outcome is Outcome.PASS, (case.id, backend, final.message)
    assert set(rows) == {"out", "counts", "partials"}
    assert rows["counts"].metrics["processed"] == rows["counts"].metrics["slots"]
    return rows


def test_ep2_passes_and_catches_the_planted_defects():
    for mode in ("allreduce", "alltoall"):
        case = _case(33, 2, mode)
        rows = _passes(case, "reference")
        assert rows["partials"].metrics["bit_exact_ranks"] == 2  # the reference's own order
        _passes(case, "dsv4-torch")
        final, rows = _final(case, "tests.planted:ForgetsFirstExpert")
        assert final.outcome is Outcome.FAIL
        assert "rank 1: expert offset not subtracted" in final.message
        assert rows["counts"].outcome is rows["partials"].outcome is Outcome.FAIL
        final, _ = _final(case, "tests.planted:DropsLastRank")
        assert final.outcome is Outcome.FAIL
        assert "tokens routed to rank 1 dropped" in final.message
    _passes(_case(17, 2, "allreduce", shape="reduced"), "dsv4-torch")


def test_ep8_passes_tiny_and_reduced_and_names_the_last_rank():
    for mode in ("allreduce", "alltoall"):
        for backend in ("reference", "dsv4-torch"):
            _passes(_case(5, 8, mode, routing="invalid_ids"), backend)  # ranks with no tokens
    case = _case(33, 8, "alltoall")
    _passes(case, "dsv4-torch")
    final, _ = _final(case, "tests.planted:DropsLastRank")
    assert "rank 7 (the last rank): tokens routed to rank 7 dropped" in final.message
    final, _ = _final(_case(33, 8, "allreduce"), "tests.planted:ForgetsFirstExpert")
    assert all(f"rank {r}: expert offset not subtracted" in final.message for r in range(1, 8))
    assert "rank 0" not in final.message.split("; calc_diff")[0]  # rank 0: first expert 0
    _passes(_case(17, 8, "alltoall", shape="reduced"), "dsv4-torch")


def test_a_rank_that_raises_dies_or_hangs_ends_the_case_not_the_sweep():
    case = dataclasses.replace(_case(5, 2, "allreduce"), timeout_s=3.0)
    final, _ = _final(case, "tests.planted:RankRaises")
    assert final.outcome is Outcome.ERROR
    assert final.message.startswith("rank 1 of 2: RuntimeError: planted failure on rank 1")
    final, _ = _final(case, "tests.planted:RankDies")
    assert final.outcome is Outcome.CRASHED
    assert final.message == "rank 1 of 2 died (killed by signal 9)"
    final, _ = _final(case, "tests.planted:RankHangs")
    assert final.outcome is Outcome.TIMEOUT and "killed after 3 s" in final.message
    assert "rank(s) 0, 1 of 2 did not finish" in final.message
    assert "time.sleep" in final.metrics["stderr_tail"] or "planted" in final.metrics["stderr_tail"]
    _passes(case, "reference")  # a fresh group after the failures


# ---- multi-device sweeps (`run --devices`) and the xdist pinning


def test_devices_parse_and_worker_env():
    from harness.runner import device_worker_env, parse_devices

    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    for bad in ("", "gpu0", "cpu:1", "cuda:x"):
        with pytest.raises(ValueError, match="--devices"):
            parse_devices(bad)
    assert device_worker_env("cuda:3", 0) == ("cuda", {"CUDA_VISIBLE_DEVICES": "3"})
    assert device_worker_env("cuda", 2) == ("cuda", {"CUDA_VISIBLE_DEVICES": "2"})
    assert device_worker_env("cpu", 1) == ("cpu", {})


def test_xdist_worker_is_pinned_to_a_gpu():
    from harness.pytest_plugin import xdist_device

    assert [xdist_device(f"gw{i}", 8) for i in (0, 7, 8, 13)] == [0, 7, 0, 5]
    assert xdist_device("gw3", 0) is None and xdist_device(None, 8) is None
    assert xdist_device("master", 8) is None


def test_run_devices_spreads_the_pairs_and_merges(tmp_path):
    import subprocess
    import sys

    from harness import results

    out = tmp_path / "r"
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        str(REPO / "cases" / "smoke.yaml"),
        "-k",
        "quantize_t1_normal,scale_assembly_t5",
        "--devices",
        "cpu,cpu",
        "-o",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    finals = [r for r in results.latest(results.read_rows(out)) if r.final]
    shards = [
        {r.case_id for r in results.read_rows(out / "shards" / str(i)) if r.final} for i in (0, 1)
    ]
    assert shards[0] and shards[1] and not shards[0] & shards[1]  # each pair in one worker
    assert {r.case_id for r in finals} == shards[0] | shards[1]
    assert all(r.outcome is Outcome.PASS for r in finals)
    assert "merged 2 workers" in p.stdout
    p = subprocess.run([*cmd, "--device", "cpu"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "drop --device/--shard" in p.stderr


def test_trace_and_minimize_refuse_ep_cases_with_the_reason(capsys):
    from harness import cli

    case = _case(5, 2, "allreduce")
    ep = str(REPO / "cases" / "ep.yaml")
    assert cli.main(["trace", ep, "-b", "reference", "-k", case.id]) == cli.EXIT_OK
    assert "unsupported: runs in rank processes" in capsys.readouterr().out
    assert cli.main(["minimize", ep, "--case", case.id, "-b", "reference"]) == cli.EXIT_USAGE
    assert "minimise a routed_moe case" in capsys.readouterr().err
