"""Flight recorder: a dsv4 layer runner's last N calls, kept on its device, written as repro
bundles (docs/bisect.md "Flight recorder").

`with FlightRecorder(runner, last=8, weights=..., calib_sample=...) as rec:` wraps the runner's
`run` (the instance attribute, which `run_op`'s custom op calls too) for the duration of the
block. Each call first copies its inputs into a ring of preallocated device buffers (slot =
calls % N, chosen by device arithmetic on preallocated tensors: no allocation, no host sync,
nothing a CUDA graph could not capture) and then runs. With `nan_check=True` it also folds
"the output holds a NaN" into a device flag (preallocated scratch, no sync). Host reads happen
only when asked: `calls()`, `dump(dir)` (every recorded call as a bundle of harness/repro.py's
format, oldest first) and `poll()` (dumps to `out` if the NaN flag fired; `__exit__` polls).
A bundle holds the layer case (shape and limit from the runner, tokens of that call), the call's
inputs and the layer's weights and calibration sample as given here (a runner keeps only its
quantized weights), so `python -m harness repro BUNDLE` replays it through any adapter.
dsv4 knows nothing of this module: it wraps the runner from outside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness import repro
from harness.cases import Case, Shape, Stage

# runner kind -> (harness stage, names of run()'s positional inputs)
KINDS = {
    "SharedExpertRunner": (Stage.SHARED_EXPERT, ("x",)),
    "RoutedMoERunner": (Stage.ROUTED_MOE, ("x", "topk_ids", "topk_weights")),
    "GroupedLinear": (Stage.GROUPED_LINEAR, ("o",)),
}
WEIGHTS = {
    Stage.SHARED_EXPERT: ("w13", "w2"),
    Stage.ROUTED_MOE: ("w13", "w2"),
    Stage.GROUPED_LINEAR: ("w",),
}


class FlightRecorder:
    """Ring of a runner's last `last` calls (module docstring)."""

    def __init__(
        self,
        runner: Any,
        *,
        last: int,
        weights: dict[str, torch.Tensor],
        calib_sample: torch.Tensor,
        backend: str = "dsv4-torch",
        nan_check: bool = False,
        out: str | Path | None = None,
        x_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        kind = getattr(runner, "kind", type(runner).__name__)
        if kind not in KINDS:
            raise ValueError(
                f"FlightRecorder: runner kind {kind!r} is not one of {', '.join(KINDS)}"
            )
        if isinstance(last, bool) or not isinstance(last, int) or last <= 0:
            raise ValueError(f"FlightRecorder: last must be a positive int, got last={last!r}")
        self.stage, self.names = KINDS[kind]
        missing = [w for w in WEIGHTS[self.stage] if w not in weights]
        if missing:
            raise ValueError(f"FlightRecorder: weights needs {', '.join(missing)} for {kind}")
        if nan_check and out is None:
            raise ValueError("FlightRecorder: nan_check=True needs out= (where bundles go)")
        self.runner, self.last, self.backend, self.nan_check = runner, last, backend, nan_check
        self.out = None if out is None else Path(out)
        self.weights = {k: v.detach().cpu() for k, v in weights.items()}
        self.calib_sample = calib_sample.detach().cpu()
        self.dumped: list[Path] = []
        dev, t = runner.device, runner.max_num_tokens
        self._ring = {
            n: torch.zeros(
                (last, t, *self._row_shape(n)), dtype=self._dtype(n, x_dtype), device=dev
            )
            for n in self.names
        }
        self._lens = torch.zeros(last, dtype=torch.int64, device=dev)
        self._arange = torch.arange(t + 1, dtype=torch.int64, device=dev)
        self._count = torch.zeros(1, dtype=torch.int64, device=dev)
        self._one = torch.ones(1, dtype=torch.int64, device=dev)
        self._n = torch.full((1,), last, dtype=torch.int64, device=dev)
        self._slot = torch.zeros(1, dtype=torch.int64, device=dev)
        self._flag = torch.zeros((), dtype=torch.bool, device=dev)
        self._any = torch.zeros((), dtype=torch.bool, device=dev)
        width = self._row_numel_out()
        self._scratch = torch.zeros((t, width), dtype=torch.bool, device=dev) if nan_check else None
        self._orig = None

    def _row_shape(self, name: str) -> tuple[int, ...]:
        r = self.runner
        if name == "o":
            return (r.n_groups * r.heads_per_group, r.head_dim)
        if name == "x":
            return (r.hidden,)
        return (r.top_k,)

    def _dtype(self, name: str, x_dtype: torch.dtype) -> torch.dtype:
        return {"topk_ids": torch.int64, "topk_weights": torch.float32}.get(name, x_dtype)

    def _row_numel_out(self) -> int:
        r = self.runner
        return r.n_groups * r.o_lora_rank if self.stage is Stage.GROUPED_LINEAR else r.hidden

    # ---- the hot path (inside run: copies into preallocated buffers only)

    def _record(self, args: tuple) -> None:
        torch.remainder(self._count, self._n, out=self._slot)
        t = args[0].shape[0]
        for name, v in zip(self.names, args, strict=False):
            self._ring[name][:, :t].index_copy_(0, self._slot, v.unsqueeze(0))
        self._lens.index_copy_(0, self._slot, self._arange[t : t + 1])
        self._count.add_(self._one)

    def _check(self, out: torch.Tensor) -> None:
        t = out.shape[0]
        scratch = self._scratch[:t]
        torch.ne(out.reshape(t, -1), out.reshape(t, -1), out=scratch)  # NaN != NaN
        torch.any(scratch, out=self._any)
        torch.logical_or(self._flag, self._any, out=self._flag)

    def __enter__(self) -> FlightRecorder:
        orig = self._orig = self.runner.run

        def run(*args: Any, **kwargs: Any) -> torch.Tensor:
            self._record(args[: len(self.names)])
            result = orig(*args, **kwargs)
            if self.nan_check:
                self._check(result)
            return result

        self.runner.run = run  # the instance attribute: run_op's custom op calls it too
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.runner.run  # back to the class's own method
        self.poll()

    # ---- host side (syncs)

    @property
    def fired(self) -> bool:
        """Whether an output held a NaN since the last dump (reads the device flag)."""
        return bool(self._flag)

    def calls(self) -> list[dict[str, torch.Tensor]]:
        """The recorded calls' inputs, oldest first (CPU copies)."""
        count = int(self._count)
        n = min(count, self.last)
        out = []
        for i in range(count - n, count):
            slot = i % self.last
            t = int(self._lens[slot])
            out.append({k: v[slot, :t].cpu().clone() for k, v in self._ring.items()})
        return out

    def case(self, tokens: int) -> Case:
        """The harness layer case of one recorded call."""
        r = self.runner
        if self.stage is Stage.GROUPED_LINEAR:
            shape = Shape(
                n_groups=r.n_groups,
                group_dim=r.heads_per_group * r.head_dim,
                head_dim=r.head_dim,
                o_lora_rank=r.o_lora_rank,
            )
            limit = None
        else:
            n_exp = getattr(r, "n_local_experts", 1)
            shape = Shape(
                hidden=r.hidden,
                intermediate=r.intermediate,
                n_experts=n_exp,
                top_k=getattr(r, "top_k", 1),
            )
            limit = r.swiglu_limit
        return Case(
            self.stage, shape, tokens, scale_ratio=1.0, limit=limit, backends=(self.backend,)
        )

    def _tensors(self, call: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d = {**call, **self.weights, "calib_sample": self.calib_sample}
        if self.stage is Stage.ROUTED_MOE and self.calib_sample.shape[0] != call["x"].shape[0]:
            # the adapters calibrate a routed MoE with x's own routing: the sample must have
            # x's tokens, so a sample of another size gives way to the call's own x
            d["calib_sample"] = call["x"]
        if self.stage is Stage.ROUTED_MOE:
            # the harness's local rank starts at global id n_experts (harness.inputs.first_expert)
            e, first = self.runner.n_local_experts, self.runner.first_expert
            local = d["topk_ids"] - first
            ok = (local >= 0) & (local < e)
            d["topk_ids"] = torch.where(ok, local + e, torch.full_like(local, -1))
        return d

    def dump(self, out: str | Path) -> list[Path]:
        """Every recorded call as a bundle `out/call<N>` (N: its call number), oldest first."""
        out = Path(out)
        count, paths = int(self._count), []
        calls = self.calls()
        for i, call in enumerate(calls, start=count - len(calls)):
            tokens = call[self.names[0]].shape[0]
            paths.append(
                repro.save(
                    out / f"call{i:06d}", self.case(tokens), self.backend, self._tensors(call)
                )
            )
        return paths

    def poll(self) -> list[Path]:
        """With nan_check: dump to `out` if an output held a NaN, then re-arm; else nothing."""
        if not self.nan_check or not self.fired:
            return []
        paths = self.dump(self.out)
        self.dumped += paths
        self._flag.zero_()
        return paths


__all__ = ["FlightRecorder"]
