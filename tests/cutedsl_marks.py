"""Skip marks of the CuTeDSL kernel tests: the DSL importable (CPU compile tests), and a CUDA GPU
of sm_90+ with it (GPU tests, also marked `gpu` so that `-m gpu` selects them)."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.cutedsl import available

HAS_DSL, WHY_NO_DSL = available()
needs_dsl = pytest.mark.skipif(not HAS_DSL, reason=WHY_NO_DSL)
_skip_without_gpu = pytest.mark.skipif(
    not (HAS_DSL and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="needs a CUDA GPU of sm_90 or newer and nvidia-cutlass-dsl",
)


def needs_gpu(test):
    """Marked `gpu` (selected by -m gpu) and skipped, with the reason, without one."""
    return pytest.mark.gpu(_skip_without_gpu(test))
