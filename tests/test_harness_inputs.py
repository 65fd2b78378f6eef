"""harness.inputs: CPU cases keep their exact streams; CUDA cases draw on the device, repeatably.

Weights are drawn one expert at a time: on the CPU that must be the one-shot stream bit for bit
(checked against the one-shot formula here), so every CPU result stays comparable with earlier
runs. CUDA draws are checked only where a GPU is present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import inputs
from harness.cases import PRESETS, Case, Distribution, Stage
from harness.stages.inputs import layer_inputs

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("shape", [(64, 48), (3, 64, 48), (2, 3, 32, 16), (3, 16, 1), (4, 1, 1)])
def test_weights_drawn_per_expert_are_the_one_shot_stream_on_cpu(shape):
    case = Case(Stage.ROUTED_MOE, seed=7)
    got = inputs.weight(shape, inputs.generator(case, "w13"))
    g = inputs.generator(case, "w13")
    want = (torch.randn(shape, generator=g) / shape[-2] ** 0.5).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    # and the generator stands where the one-shot draw left it: later draws are unchanged too
    g2 = inputs.generator(case, "w13")
    inputs.weight(shape, g2)
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=g2))


def test_cpu_cases_draw_on_the_cpu():
    case = Case(Stage.SHARED_EXPERT, PRESETS["tiny"], 5)
    assert inputs.generator(case, "x").device == torch.device("cpu")
    d = layer_inputs(case, torch.device("cpu"))
    assert all(v.device.type == "cpu" for v in d.tensors().values())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: CUDA cases draw on the GPU")
@pytest.mark.parametrize("stage", [Stage.ROUTED_MOE, Stage.SHARED_EXPERT, Stage.GROUPED_LINEAR])
@pytest.mark.parametrize(
    "dist", [Distribution.NORMAL, Distribution.OUTLIERS, Distribution.FP4_GRID]
)
def test_cuda_cases_draw_on_the_device_and_repeat(stage, dist):
    case = Case(stage, PRESETS["tiny"], 33, device="cuda", distribution=dist, scale_ratio=2.0)
    assert inputs.generator(case, "x").device.type == "cuda"
    dev = torch.device("cuda")
    a, b = layer_inputs(case, dev).tensors(), layer_inputs(case, dev).tensors()
    for k in a:
        assert a[k].device.type == "cuda", k
        assert torch.equal(a[k], b[k]), k
    cpu = layer_inputs(dataclasses.replace(case, device="cpu"), torch.device("cpu")).tensors()
    assert {k: v.shape for k, v in cpu.items()} == {k: v.shape for k, v in a.items()}
