"""Compile a CuTeDSL kernel for an arch on a CPU-only machine and read back what was made.

`compile_report(compile_fn, arch)` compiles with the PTX kept and ptxas's verbose report on,
capturing the report at the file-descriptor and the sys.stdout level (the DSL prints it from
either), and returns the PTX text and ptxas's numbers: registers, stack frame and spill bytes.
CI asserts on these (the e2m1 conversion present on sm_100a, no spills, no local memory); a
failed compile raises naming the configuration (`compile_named`, which every kernel module's
compile function calls).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class PtxReport:
    arch: str
    ptx: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    def count(self, opcode: str) -> int:
        """How many instructions are `opcode` (e.g. "cvt.rn.satfinite.e2m1x2.f32"), inline
        assembly included (its statements share a line, separated by ';')."""
        return len(re.findall(rf"(?:^|[\s;{{}}]){re.escape(opcode)}(?=\s)", self.ptx, re.M))

    @property
    def uses_local_memory(self) -> bool:
        return bool(re.search(r"\.local\b|\bld\.local|\bst\.local", self.ptx))


def compile_named(kernel, args: tuple, arch: str, extra_options: str, what: str):
    """cute.compile(kernel, *args) for `arch` (plus `extra_options`); no GPU needed. A failure is
    re-raised as RuntimeError naming `what` (the kernel and its configuration) and the arch,
    the original chained."""
    import cutlass.cute as cute

    try:
        return cute.compile(kernel, *args, options=f"--gpu-arch={arch} {extra_options}".strip())
    except Exception as e:  # re-raised with the configuration named, original chained
        raise RuntimeError(f"{what} failed to compile for {arch}: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _captured_fds(path: str):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:  # Python-level writers too (pytest swaps sys.stdout for its own buffer)
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def compile_report(compile_fn, arch: str) -> PtxReport:
    """compile_fn(extra_options: str) -> compiled function; returns its PTX and ptxas numbers."""
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "ptxas.log")
        opts = f"--keep-ptx --dump-dir={d} remarks{{ptx}}"
        with _captured_fds(log):
            compiled = compile_fn(opts)
        text = open(log, errors="replace").read()
        ptx = compiled.__ptx__ or ""
        if not ptx.lstrip().startswith("//") and os.path.exists(ptx):
            ptx = open(ptx).read()  # some DSL versions hand back the dump path
    m = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text
    )
    regs = re.search(r"Used (\d+) registers", text)
    if m is None or regs is None:
        raise RuntimeError(f"no ptxas report in the compile output for {arch}:\n{text[-2000:]}")
    return PtxReport(arch, ptx, int(regs.group(1)), *(int(v) for v in m.groups()))


_TCGEN05_MMA = re.compile(r"tcgen05\.mma((?:\.[\w:]+)*)")


def tcgen05_mma_kinds(ptx: str) -> set[str]:
    """The `kind::...` qualifiers (with the block_scale / blockN suffix) of every tcgen05.mma in
    the PTX, e.g. {"kind::mxf4nvf4.block_scale.block16"}."""
    kinds = set()
    for m in _TCGEN05_MMA.finditer(ptx):
        quals = m.group(1).lstrip(".").split(".")
        kind = [q for q in quals if q.startswith("kind::")]
        if kind:
            i = quals.index(kind[0])
            tail = [q for q in quals[i + 1 :] if q == "block_scale" or q.startswith("block")]
            kinds.add(".".join([kind[0], *tail]))
    return kinds


class MmaKindMismatch(AssertionError):
    """The compiled kernel's tcgen05.mma is not the kind its caller needs."""


def check_mma_kind(report: PtxReport, expected: str, what: str) -> None:
    """Raise MmaKindMismatch naming `what` (the configuration) unless every tcgen05.mma in the
    PTX is of kind `expected` (and there is at least one)."""
    kinds = tcgen05_mma_kinds(report.ptx)
    if kinds != {expected}:
        raise MmaKindMismatch(
            f"{what}: the {report.arch} PTX holds tcgen05.mma kinds {sorted(kinds) or 'none'}, "
            f"expected only {expected!r}"
        )
