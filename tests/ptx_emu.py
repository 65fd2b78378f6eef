"""A PTX emulator for the kernels' inline-assembly blocks, on numpy uint32 lanes (tests only).

`run_ptx(text, args)` executes one `{ .reg ...; op d, a, b; ... }` block the way the hardware
does on each lane: registers are uint32 arrays, `$i` the asm operands (`args`: index -> array of
uint32 bit patterns, or float32 values), immediates decimal, hex or `0fXXXXXXXX` floats. Returns
the registers ($0, $1, ... included) as uint32 arrays. Float results are correctly rounded to
nearest even: a product of two fp32 values is exact in fp64 (of two fp16 values in fp32), and fma
adds the addend to it with
TwoSum's exact error, which decides the one case where fp64's rounding could differ from fp32's
(the fp64 sum exactly halfway between two fp32 values). Only the opcodes the quantize kernel's
blocks use are modelled; any other raises naming the statement, so the emulator never guesses.
"""

from __future__ import annotations

import re

import numpy as np

U32 = np.uint32
_F32_IMM = re.compile(r"0f([0-9A-Fa-f]{8})$")


def _f(x: np.ndarray) -> np.ndarray:
    return x.astype(U32).view(np.float32)


def _u(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(U32)


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """RN(a * b + c) in fp32, exactly (see the module note)."""
    p = a.astype(np.float64) * b.astype(np.float64)  # exact: 24 x 24 bits
    c64 = c.astype(np.float64)
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)  # TwoSum: s + err == p + c exactly
    r = s.astype(np.float32)
    toward = np.where(s > r.astype(np.float64), np.inf, -np.inf).astype(np.float32)
    n = np.nextafter(r, toward)
    mid = (r.astype(np.float64) + n.astype(np.float64)) / 2 == s  # s halfway: err decides
    away = mid & (err != 0) & ((err > 0) == (n > r))  # the exact sum is past the midpoint
    return np.where(away, n, r)


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    """prmt.b32 (default mode): byte k of the result from byte sel[k] of {b, a}, the sign of
    that byte replicated where sel[k] has bit 3."""
    src = a.astype(np.uint64) | (b.astype(np.uint64) << 32)
    out = np.zeros(a.shape, dtype=np.uint64)
    for k in range(4):
        s = (sel >> (4 * k)) & 0xF
        byte = (src >> np.uint64(8 * (s & 7))) & np.uint64(0xFF)
        if s & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= byte << np.uint64(8 * k)
    return out.astype(U32)


def _lop3(a, b, c, lut: int) -> np.ndarray:
    out = np.zeros(a.shape, dtype=U32)
    for bit in range(8):
        if lut >> bit & 1:
            ta = a if bit & 4 else ~a
            tb = b if bit & 2 else ~b
            tc = c if bit & 1 else ~c
            out |= ta & tb & tc
    return out


def _imm(tok: str, n: int) -> np.ndarray:
    m = _F32_IMM.match(tok)
    v = int(m.group(1), 16) if m else int(tok, 0) & 0xFFFFFFFF
    return np.full(n, v, dtype=U32)


def run_ptx(text: str, args: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(next(iter(args.values())))
    regs: dict[str, np.ndarray] = {}
    for i, v in args.items():
        v = np.asarray(v)
        regs[f"${i}"] = v.view(U32) if v.dtype == np.float32 else v.astype(U32)
    body = text.strip().strip("{}")
    for stmt in (s.strip() for s in body.split(";")):
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        ops = [t.strip() for t in rest.split(",")]
        d, src = ops[0], ops[1:]
        v = [regs[t] if t in regs else _imm(t, n) for t in src]
        with np.errstate(over="ignore", invalid="ignore"):
            regs[d] = _exec(op, v, stmt)
    return regs


def _exec(op: str, v: list[np.ndarray], stmt: str) -> np.ndarray:
    if op == "abs.f32":
        return v[0] & U32(0x7FFFFFFF)
    if op in ("mul.rn.f32", "mul.rn.sat.f32"):
        r = (_f(v[0]).astype(np.float64) * _f(v[1]).astype(np.float64)).astype(np.float32)
        if op == "mul.rn.sat.f32":  # [0, 1], NaN -> 0
            r = np.where(np.isnan(r), np.float32(0), np.clip(r, 0, 1)).astype(np.float32)
        return _u(r)
    if op == "max.f32":  # PTX: the other operand where one is NaN
        return _u(np.fmax(_f(v[0]), _f(v[1])))
    if op == "min.f32":
        return _u(np.fmin(_f(v[0]), _f(v[1])))
    if op in ("add.rn.f32", "sub.rn.f32"):  # a * 1 -+ b: one rounding, exactly
        b = _f(v[1]) if op == "add.rn.f32" else -_f(v[1])
        return _u(_fma_f32(_f(v[0]), np.ones_like(b), b))
    if op == "mul.rn.f16x2":  # two fp16 lanes: the product exact in fp32, one rounding to fp16
        lanes = [
            (v[0] >> U32(16 * h) & U32(0xFFFF)).astype(np.uint16).view(np.float16) for h in (0, 1)
        ]
        other = [
            (v[1] >> U32(16 * h) & U32(0xFFFF)).astype(np.uint16).view(np.float16) for h in (0, 1)
        ]
        prod = [(a.astype(np.float32) * b.astype(np.float32)).astype(np.float16) for a, b in
                zip(lanes, other, strict=True)]  # fmt: skip
        return prod[0].view(np.uint16).astype(U32) | (prod[1].view(np.uint16).astype(U32) << 16)
    if op == "fma.rn.f32":
        return _u(_fma_f32(_f(v[0]), _f(v[1]), _f(v[2])))
    if op == "mul.hi.u32":
        return ((v[0].astype(np.uint64) * v[1].astype(np.uint64)) >> np.uint64(32)).astype(U32)
    if op in ("mad.lo.s32", "mad.lo.u32"):
        wide = v[0].astype(np.uint64) * v[1].astype(np.uint64) + v[2].astype(np.uint64)
        return (wide & np.uint64(0xFFFFFFFF)).astype(U32)
    if op == "shl.b32":
        return v[0] << (v[1] & U32(31))
    if op == "shr.u32":
        return v[0] >> (v[1] & U32(31))
    if op in ("add.u32", "add.s32"):
        return v[0] + v[1]
    if op in ("sub.u32", "sub.s32"):
        return v[0] - v[1]
    if op in ("and.b32", "or.b32", "xor.b32"):
        return {"and.b32": np.bitwise_and, "or.b32": np.bitwise_or, "xor.b32": np.bitwise_xor}[op](
            v[0], v[1]
        )
    if op == "prmt.b32":
        return _prmt(v[0], v[1], int(v[2][0]))
    if op == "lop3.b32":
        return _lop3(v[0], v[1], v[2], int(v[3][0]))
    if op == "mov.b32":
        return v[0].copy()
    raise AssertionError(f"unmodelled PTX statement {stmt!r}")
