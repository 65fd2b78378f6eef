"""dsv4: the NVFP4 inference path for DeepSeek V4 layers (docs/design.md §2).

Thin and lazy: `import dsv4` imports nothing heavy and never initialises CUDA; `dsv4.ops`,
`dsv4.layers` and `dsv4.adapters` load on first access. The production API lives in `dsv4.ops`
(quantize, layouts, grouped GEMM with its backend registry, SwiGLU + requantize) and
`dsv4.layers` (the runners). `dsv4.adapters` registers dsv4's backends with the harness.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("ops", "layers", "adapters")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"dsv4.{name}")
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


__all__ = list(_SUBMODULES)
