"""The sm100 backend and its peers where they cannot run: unsupported with the reason, never pass.

CPU and a (faked) Hopper device: the `sm100` registry backend, the `dsv4-sm100` adapter and the
peers `torch-scaled-mm` / `flashinfer` refuse naming the capability they lack; a sweep of a
case file over them records `unsupported` with those reasons. On a (faked) sm_100 device the
backend is selected above sm90, and shapes the kernel cannot tile are refused naming why (an
override) or skipped for the next backend (automatic selection), never run.
"""

from __future__ import annotations

import pytest
import torch

from dsv4 import ops
from dsv4.ops import gemm as dgemm
from harness import adapters, cli, results
from harness.backends import peers
from harness.cases import PRESETS, Case, Stage

SM100_ADAPTERS = ("dsv4-sm100", "torch-scaled-mm", "flashinfer")


@pytest.fixture
def fake_capability(monkeypatch):
    """Pretend cuda:0 has compute capability `cap` (registry and peers read it cached)."""

    def set_cap(cap: tuple[int, int]) -> None:
        monkeypatch.setattr(dgemm, "_cuda_capability", lambda index: cap)
        monkeypatch.setattr(peers, "_capability", lambda index: cap)

    return set_cap


def test_sm100_is_registered_above_sm90_and_refused_on_cpu():
    assert ops.available_backends()[:2] == ["sm100", "sm90"]
    assert ops.select_backend("cpu") == "torch"
    with pytest.raises(ops.BackendUnavailableError, match=r"backend 'sm100' needs sm_100, got cpu"):
        ops.select_backend("cpu", "sm100")
    assert "sm100" not in ops.PLANNED_BACKENDS


def test_hopper_refuses_sm100_naming_the_capability(fake_capability):
    fake_capability((9, 0))
    ok, why = ops.sm100_supports(torch.device("cuda:0"))
    assert not ok and why == "needs sm_100, got sm_90"
    with pytest.raises(ops.BackendUnavailableError, match="needs sm_100, got sm_90"):
        ops.select_backend("cuda:0", "sm100")


@pytest.mark.parametrize("device,got", [("cpu", "cpu"), ("cuda:0", "sm_90")])
def test_sm100_adapters_are_unsupported_with_the_reason(device, got, fake_capability):
    fake_capability((9, 0))
    case = Case(Stage.GROUPED_GEMM, PRESETS["tiny"], 5, device=device)
    expected = {
        "dsv4-sm100": f"backend 'sm100' needs sm_100, got {got}",
        "torch-scaled-mm": f"needs an sm_100 CUDA device, got {got}",
        "flashinfer": f"needs an sm_100 CUDA device, got {got}",
    }
    for name in SM100_ADAPTERS:
        assert adapters.load(name).can_implement(case) == (False, expected[name])
    layer = Case(Stage.SHARED_EXPERT, PRESETS["tiny"], 5, device=device)
    for name in ("torch-scaled-mm", "flashinfer"):
        ok, why = adapters.load(name).can_implement(layer)
        assert not ok and why == f"{name} implements the grouped_gemm stage only"


def test_a_sweep_records_sm100_and_peers_unsupported(tmp_path, capsys):
    spec = tmp_path / "sm100.yaml"
    spec.write_text(
        "name: sm100\ndefaults:\n  shape: tiny\n"
        "  backends: [reference, dsv4-sm100, torch-scaled-mm, flashinfer]\n"
        "sweeps:\n  - stage: grouped_gemm\n    tokens: [5, 129]\n"
    )
    out = tmp_path / "out"
    rc = cli.main(["run", str(spec), "-o", str(out), "--no-progress"])
    said = capsys.readouterr()
    assert rc == 0, said.out + said.err
    finals = [r for r in results.read_rows(out) if r.final]
    mine = [r for r in finals if r.backend in SM100_ADAPTERS]
    assert len(mine) == 6 and {r.outcome for r in mine} == {"unsupported"}
    assert all("sm_100" in r.message and "got cpu" in r.message for r in mine), mine
    assert {r.outcome for r in finals if r.backend == "reference"} == {"pass"}


def test_sm100_device_selects_sm100_and_refuses_shapes_it_cannot_tile(fake_capability):
    fake_capability((10, 0))
    assert ops.select_backend("cuda:0") == "sm100"
    assert ops.select_backend("cuda:0", None, [(5, 7168, 6144, 48)]) == "sm100"
    # K = 128 is not a multiple of the 256 K tile: automatic selection takes the next backend
    assert ops.select_backend("cuda:0", None, [(5, 256, 256, 4), (5, 128, 256, 4)]) == "torch"
    with pytest.raises(ValueError, match=r"backend 'sm100': K must be a multiple of 256.*k=128"):
        ops.select_backend("cuda:0", "sm100", [(5, 128, 256, 4)])
    ok, why = adapters.load("dsv4-sm100").can_implement(
        Case(Stage.SHARED_EXPERT, PRESETS["tiny"], 5, device="cuda:0")
    )
    assert not ok and "K must be a multiple of 256" in why


def test_runner_refuses_a_device_that_is_not_sm100():
    from dsv4.kernels.cutedsl.grouped_gemm_sm100 import run_grouped_gemm

    a = torch.zeros(4, 128, dtype=torch.uint8)
    b = torch.zeros(1, 256, 128, dtype=torch.uint8).transpose(1, 2).contiguous()
    with pytest.raises(ValueError, match="needs an sm_100 device, got cpu"):
        run_grouped_gemm(a, b, None, None, None, None, None, None)


def test_torch_scaled_mm_peer_plumbing_on_cpu(monkeypatch):
    """The torch-scaled-mm peer's per-expert arguments, checked without a B200: torch's own meta
    kernel of `_scaled_mm` accepts them (FP4 dtypes, A row-major, B column-major, swizzled scale
    sizes of each group), and an emulation of the NVFP4 semantics (dequantize both sides from
    the 128x4 scales, fp32 matmul) on those very arguments lands within the reference's bound:
    scale slices per group, B's transpose and alpha are right. torch's kernel itself: not run."""
    import reference as ref
    from harness.cases import Routing
    from harness.stages.inputs import gemm_operands
    from reference import gemm as rgemm
    from reference.layouts import unswizzle_scales

    real = torch._scaled_mm
    u8 = torch.uint8

    def on_meta(t: torch.Tensor) -> torch.Tensor:
        return t.view(u8).to("meta").view(t.dtype) if t.dtype.itemsize == 1 else t.to("meta")

    def emulated(a, b, sa, sb, out_dtype):
        meta = real(*(on_meta(v) for v in (a, b, sa, sb)), out_dtype=out_dtype)
        m, n, k = a.shape[0], b.shape[1], 2 * a.shape[1]
        da = rgemm.dequantize_codes_scales(a.view(u8), unswizzle_scales(sa, m, k // 16))
        db = rgemm.dequantize_codes_scales(b.view(u8).t(), unswizzle_scales(sb, n, k // 16))
        assert meta.shape == (m, n) and meta.dtype == out_dtype
        return (da.double() @ db.double().t()).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", emulated)
    case = Case(Stage.GROUPED_GEMM, PRESETS["tiny"], 129, routing=Routing.EMPTY_EXPERTS)
    ops, _ = gemm_operands(case, torch.device("cpu"), ref.ScaleConvention.DECODE)
    t = ops.a_codes.shape[0]
    out = torch.full((t + 3, ops.b_codes.shape[2]), 7.0, dtype=torch.bfloat16)
    peers.TorchScaledMm().grouped_gemm(ops, out[:t])
    oracle = rgemm.grouped_gemm_nvfp4(*ops.plain(), oracle=True)
    bound = rgemm.grouped_gemm_error_bound(*ops.plain(), out_dtype=torch.bfloat16)
    assert ((out[:t].double() - oracle).abs() <= bound).all()
    assert (out[t:] == 7.0).all()
