"""Rank groups: W spawned processes in one torch.distributed group, reused from task to task.

An expert-parallel case (harness.stages.ep) runs a function on every rank of a group: the ranks
are started once per (world size, device kind) in this process (torch.multiprocessing's spawn
context; gloo on CPU, NCCL where every rank has its own GPU; the store is a file in a temporary
directory) and serve task after task, since starting 8 torch processes costs seconds. A task
that cannot end well ends the group instead of the sweep: a rank that raises is `error` (its
traceback), a rank whose process dies is `crashed` (its exit code and its output's tail), a task
past its timeout is `timeout` (every rank's Python stack dumped by faulthandler, then every rank
killed), each naming the rank; the next task starts a fresh group. Ranks die with this process
(PR_SET_PDEATHSIG) and are killed at its exit. Results travel as files the task writes (a
queue carries only their small return values).
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.procs import die_with_parent
from harness.records import Outcome


@dataclass(frozen=True)
class RankContext:
    """What a task function receives beside its payload: who it is and where it runs."""

    rank: int
    world: int
    device: str  # "cpu" or "cuda:i": this rank's device
    collective_device: str  # where collectives run: the rank's GPU with NCCL, else "cpu"
    workdir: Path  # the group's temporary directory (shared by parent and ranks)


class RankFailure(Exception):
    """A task that did not end on every rank: the outcome, the rank and what it left."""

    def __init__(self, outcome: Outcome, rank: int, message: str, tail: str = ""):
        super().__init__(message)
        self.outcome, self.rank, self.tail = outcome, rank, tail


def rank_device(kind: str, rank: int, cuda_count: int) -> str:
    """Rank r's device: the CPU, or GPU r mod the GPU count (ranks share GPUs when fewer)."""
    return f"cuda:{rank % cuda_count}" if kind == "cuda" else "cpu"


def dist_backend(kind: str, world: int, cuda_count: int) -> str:
    """NCCL where every rank has a GPU of its own, gloo otherwise (CPU, or ranks sharing)."""
    return "nccl" if kind == "cuda" and cuda_count >= world else "gloo"


def _log_tail(path: Path, n: int = 3000) -> str:
    return path.read_bytes().decode(errors="replace")[-n:] if path.exists() else ""


def _rank_main(
    rank: int,
    world: int,
    kind: str,
    workdir: str,
    parent_pid: int,
    threads: int,
    tasks: Any,
    results: Any,
) -> None:
    """A rank's life: join the group, then run tasks until told to stop (None)."""
    log = os.open(Path(workdir) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    die_with_parent(parent_pid)
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    count = torch.cuda.device_count() if kind == "cuda" else 0
    device = rank_device(kind, rank, count)
    backend = dist_backend(kind, world, count)
    if device != "cpu":
        torch.cuda.set_device(device)
    store = f"file://{Path(workdir) / 'store'}"
    dist.init_process_group(backend, init_method=store, rank=rank, world_size=world)
    ctx = RankContext(rank, world, device, device if backend == "nccl" else "cpu", Path(workdir))
    results.put((_READY, rank, True, None))
    while (task := tasks.get()) is not None:
        task_id, fn, payload = task
        try:
            results.put((task_id, rank, True, fn(ctx, payload)))
        except Exception as e:  # noqa: BLE001 - the parent names the rank and ends the group
            msg = f"{type(e).__name__}: {e}".strip()[:2000]
            results.put((task_id, rank, False, (msg, traceback.format_exc(limit=8))))
    dist.destroy_process_group()


_READY = -1  # the task id of a rank's "joined the group" message
STARTUP_S = 300.0  # spawning, importing torch and joining: seconds on a loaded 2-core machine


class RankGroup:
    """`world` rank processes on `kind` ("cpu" or "cuda"), serving tasks in order."""

    def __init__(self, world: int, kind: str, threads: int = 1) -> None:
        ctx = mp.get_context("spawn")
        self.world, self.kind = world, kind
        self.workdir = Path(tempfile.mkdtemp(prefix="harness-ranks-"))
        self._tasks = [ctx.SimpleQueue() for _ in range(world)]
        self._results = ctx.Queue()
        self._next = 0
        self._ready: set[int] = set()
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, world, kind, str(self.workdir), os.getpid(), threads, q, self._results),
                daemon=True,
                name=f"harness-rank{r}",
            )
            for r, q in enumerate(self._tasks)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[[RankContext, Any], Any], payload: Any, timeout: float) -> list:
        """fn(ctx, payload) on every rank; their return values by rank. Raises RankFailure (the
        group is then closed and unusable)."""
        try:
            pickle.dumps((fn, payload))  # before any rank gets it: all or none do
        except Exception as e:  # noqa: BLE001 - said as what cannot be sent, then raised
            raise ValueError(f"cannot send the task to the rank processes: {e}") from e
        self._wait_ready()
        task_id, self._next = self._next, self._next + 1
        for q in self._tasks:
            q.put((task_id, fn, payload))
        done: dict[int, Any] = {}
        deadline = time.monotonic() + timeout  # from the task on: startup is not the case's
        while len(done) < self.world:
            try:
                tid, rank, ok, value = self._results.get(timeout=0.05)
            except queue.Empty:
                self._check_alive(done)
                if time.monotonic() > deadline:
                    self._timeout(done, timeout)
                continue
            if not ok:
                msg, tb = value
                end = time.monotonic() + 1.0  # a peer's death often surfaces as this error
                while time.monotonic() < end:
                    self._check_alive(done)
                    time.sleep(0.05)
                self.close()
                raise RankFailure(Outcome.ERROR, rank, f"rank {rank} of {self.world}: {msg}", tb)
            done[rank] = value
        return [done[r] for r in range(self.world)]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while len(self._ready) < self.world:
            try:
                tid, rank, _, _ = self._results.get(timeout=0.05)
                assert tid == _READY, tid  # no task was sent before every rank joined
                self._ready.add(rank)
            except queue.Empty:
                self._check_alive({r: None for r in self._ready})
                if time.monotonic() > deadline:
                    self._timeout({r: None for r in self._ready}, STARTUP_S, "joining the group")

    def _check_alive(self, done: dict[int, Any]) -> None:
        for r, p in enumerate(self._procs):
            if p.exitcode is not None:
                code = p.exitcode
                tail = _log_tail(self.workdir / f"rank{r}.log")
                self.close()
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                msg = f"rank {r} of {self.world} died ({how})"
                raise RankFailure(Outcome.CRASHED, r, msg, tail)

    def _timeout(self, done: dict[int, Any], timeout: float, what: str = "the task") -> None:
        waiting = [r for r in range(self.world) if r not in done]
        for p in self._procs:  # faulthandler: where every rank's threads are
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.5)
        tails = "\n".join(
            f"--- rank {r}\n{_log_tail(self.workdir / f'rank{r}.log', 1500)}" for r in waiting
        )
        self.close()
        ranks = ", ".join(map(str, waiting))
        msg = f"killed after {timeout:g} s: rank(s) {ranks} of {self.world} did not finish {what}"
        raise RankFailure(Outcome.TIMEOUT, waiting[0], msg, tails)

    @property
    def alive(self) -> bool:
        return all(p.exitcode is None for p in self._procs)

    def close(self) -> None:
        """Stop every rank (SIGKILL: a rank may be stuck in a collective) and clean up."""
        for p in self._procs:
            if p.exitcode is None:
                p.kill()
        for p in self._procs:
            p.join(5)
        shutil.rmtree(self.workdir, ignore_errors=True)
        _GROUPS.pop((self.world, self.kind), None)


_GROUPS: dict[tuple[int, str], RankGroup] = {}


def group(world: int, kind: str) -> RankGroup:
    """This process's group of `world` ranks on `kind`, started on first use (and after a
    failure closed the last one). CPU ranks get cores / world torch threads each."""
    g = _GROUPS.get((world, kind))
    if g is None or not g.alive:
        if g is not None:
            g.close()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else max(1, cores // world)
        g = _GROUPS[(world, kind)] = RankGroup(world, kind, threads)
    return g


def close_all() -> None:
    for g in list(_GROUPS.values()):
        g.close()


atexit.register(close_all)

__all__ = ["RankContext", "RankFailure", "RankGroup", "close_all", "dist_backend", "group"]
