"""dsv4: the NVFP4 inference path for DeepSeek V4 layers (docs/design.md §2).

Thin and lazy: `import dsv4` imports nothing heavy and never initialises CUDA; `dsv4.ops` and
`dsv4.layers` load on first access. The production API lives in `dsv4.ops` (quantize, layouts,
grouped GEMM with its backend registry, SwiGLU + requantize) and `dsv4.layers` (the runners).
dsv4 imports nothing of the harness: the harness reaches it through its own bridge
(harness/backends/dsv4.py), which uses only this public API.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("ops", "layers")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"dsv4.{name}")
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


__all__ = list(_SUBMODULES)
