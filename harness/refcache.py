"""Reference results computed once per case and shared by the backends of one sweep.

The runner runs a case for each of its backends in turn (harness.runner.plan is case-major), and
the reference side of a case does not depend on the backend: a layer's reference run in the
declared conventions, its float64-GEMM rerun (the noise floor) and its unquantized twin (the
quantization SQNR); a grouped GEMM's float64 oracle and derived bound. On V4-Pro shapes that is
most of a case's time, so it is computed once per key and reused.

Key: (what, the case's input-defining fields, the declared conventions): stage, shape, tokens,
seed, distribution, scale ratio, routing, limit and device -- not the backend, tolerance, budget,
timeout or source file, which change the verdict but not the reference. Bounded in bytes (tensor
storage, each storage counted once): least recently used entries go first, and an entry larger
than the bound is returned without being kept. In-process only: under `--isolate` every pair
runs in its own process, so nothing is shared there. Values are shared, read-only: the harness
never writes into a reference result, and hands an adapter a copy where it passes one on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from harness.cases import Case

# A V4-Pro routed MoE's reference stages hold ~1.7 GB (quantized weights of 48 experts); the
# bound keeps the latest few cases and stays well inside one GPU next to the case in flight.
DEFAULT_MAX_BYTES = 4 << 30


def input_key(case: Case) -> tuple:
    """The fields of a case that decide its inputs and its reference results."""
    return (
        case.stage,
        case.shape,
        case.tokens,
        case.seed,
        case.distribution,
        case.scale_ratio,
        case.routing,
        case.limit,
        case.device,
        case.ep_size,  # routed_moe_ep: how many experts and ranks, how tokens are dispatched
        case.ep_mode,
    )


def nbytes(value: Any) -> int:
    """Bytes of the tensor storages in a (nested) result, each storage once."""
    seen: dict[int, int] = {}

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)

    walk(value)
    return sum(seen.values())


class RefCache:
    """An LRU of reference results bounded in bytes; counts its hits and misses."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes=}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value of `key`, or compute() (kept when it fits the bound)."""
        try:
            hit = self._entries.get(key)
        except TypeError:  # an unhashable key (a custom adapter's conventions): no caching
            return compute()
        if hit is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return hit[0]
        self.misses += 1
        value = compute()
        size = nbytes(value)
        if size <= self.max_bytes:
            self._entries[key] = (value, size)
            while self.bytes > self.max_bytes:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0


CACHE = RefCache()  # the process's cache (harness.stages reads through it)


def cached(what: str, case: Case, compute: Callable[[], Any], conventions: Any = None) -> Any:
    """`compute()` for (what, case inputs, conventions), through the process's cache."""
    return CACHE.get((what, input_key(case), conventions), compute)


__all__ = ["CACHE", "DEFAULT_MAX_BYTES", "RefCache", "cached", "input_key", "nbytes"]
